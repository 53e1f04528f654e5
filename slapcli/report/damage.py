"""Suspected damaged rows: tests on a row's response text that flag rows a person would not train on.

Each test is deliberately narrow (a false alarm costs a user's trust more than a missed row): the diagnosis
reports counts and example lines, and never drops anything itself.
"""

from __future__ import annotations

import re
from collections.abc import Callable

# Fewer word characters than this in the whole response: "", "N/A", "-", "ok".
MIN_WORD_CHARS = 3
PLACEHOLDERS = {"n/a", "na", "none", "null", "nan", "tbd", "todo", "...", "<noinput>", "<nooutput>", "-"}
# Repeated text: at least this many word n-grams, of which at least this share repeat an earlier one.
NGRAM = 3
MIN_NGRAMS = 12
REPEATED_SHARE = 0.5
# Canned refusals, at the start of the response or (for the AI-model disclaimer) anywhere in its first lines.
_REFUSAL_START = re.compile(
    r"^\s*(i'?m sorry|i am sorry|sorry, (but )?i|i apologi[sz]e|unfortunately,? i (can(no|')?t|am unable)|"
    r"i (can(no|')?t|am unable to|am not able to|won'?t) (help|assist|provide|comply|do that|answer|fulfill|"
    r"complete|create|generate|write)|as an ai\b)", re.IGNORECASE)
_AI_DISCLAIMER = re.compile(r"\bas an ai (language )?model\b|\bi'?m (just )?an ai\b|\bi am (just )?an ai\b",
                            re.IGNORECASE)
# An answer that stops mid-sentence: it ends on a connective or a character that announces more text.
_DANGLING_END = re.compile(r"([,;:(\[{–]|\b(and|or|but|the|of|to|with|for|that|which|because|such as))\s*$",
                           re.IGNORECASE)


def is_emptyish(response: str) -> bool:
    text = response.strip()
    return text.lower() in PLACEHOLDERS or sum(c.isalnum() for c in text) < MIN_WORD_CHARS


def repeated_ngram_share(text: str, n: int = NGRAM) -> tuple[float, int]:
    """Share of the word n-grams that repeat an earlier n-gram, and how many n-grams there are."""
    words = text.lower().split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0, 0
    return 1.0 - len(set(grams)) / len(grams), len(grams)


def is_repetitive(response: str) -> bool:
    share, count = repeated_ngram_share(response)
    return count >= MIN_NGRAMS and share >= REPEATED_SHARE


def is_refusal(response: str) -> bool:
    return bool(_REFUSAL_START.match(response) or _AI_DISCLAIMER.search(response[:300]))


def looks_cut_off(response: str) -> bool:
    """An unclosed code fence, or prose that ends on a connective, comma or opening bracket."""
    text = response.rstrip()
    if text.count("```") % 2 == 1:
        return True
    return len(text.split()) >= 5 and bool(_DANGLING_END.search(text))


# Checked in this order; a row is counted under every kind that flags it.
CHECKS: dict[str, Callable[[str], bool]] = {
    "empty": is_emptyish,
    "repeated": is_repetitive,
    "refusal": is_refusal,
    "cut_off": looks_cut_off,
}


def damage_kinds(response: str) -> list[str]:
    """The kinds of damage a response shows (empty responses are not also tested for the rest)."""
    if is_emptyish(response):
        return ["empty"]
    return [kind for kind, check in CHECKS.items() if kind != "empty" and check(response)]
