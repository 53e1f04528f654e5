"""Suspected damaged rows: tests on a row's response text that flag rows a person would not train on.

Each test is deliberately narrow (a false alarm costs a user's trust more than a missed row): the diagnosis
reports counts and example lines, and never drops anything itself.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from slapcli.screen import REPEATED_SHARE_MAX, repeated_ngram_share

# No letter or digit at all ("", "-", "..."), or a placeholder. Short answers ("7", "4.6") are real answers.
PLACEHOLDERS = {"n/a", "na", "none", "null", "nan", "tbd", "todo", "<noinput>", "<nooutput>", "no output"}
# Canned refusals: an apology or "I can't" followed by a refusal, at the start of the response, or the AI-model
# disclaimer in its first lines. "I'm sorry to hear that" alone is sympathy, not a refusal.
_REFUSAL_START = re.compile(
    r"^\s*((i'?m sorry|i am sorry|sorry|i apologi[sz]e|unfortunately)[,.!]?\s*(but\s*)?(as an ai[^.,]*,\s*)?"
    r"i (can(no|')?t|am (unable|not able)|won'?t|do not|don'?t)\b"
    r"|i (can(no|')?t|am unable to|am not able to|won'?t) (help|assist|provide|comply|fulfill|do that|answer|"
    r"complete|create|generate|write)\b)", re.IGNORECASE)
_AI_DISCLAIMER = re.compile(r"\bas an ai (language )?model\b", re.IGNORECASE)
# An answer that stops mid-sentence: it ends on a connective or a character that announces more text (not ";",
# which ends most lines of code).
_DANGLING_END = re.compile(r"([,:(\[{–]|\b(and|or|but|the|of|to|with|for|that|which|because|such as))\s*$",
                           re.IGNORECASE)


def is_emptyish(response: str) -> bool:
    text = response.strip()
    return text.lower() in PLACEHOLDERS or not any(c.isalnum() for c in text)


def is_repetitive(response: str) -> bool:
    """More than half of the text in word 5-grams it already used: the rule stratify's screen drops rows by."""
    return repeated_ngram_share(response) > REPEATED_SHARE_MAX


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
