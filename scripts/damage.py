"""Damaged rows for the noisy benchmark regime: the ways real instruction pools go wrong, as a list to extend.

Each damage kind is a function `(row, rng, donors) -> row | None` that returns a damaged copy of `row` (or None
when the row cannot take that damage, e.g. an answer too short to cut), registered in `DAMAGE_KINDS`:

- `mismatch`: the answer of another row of the same domain (rows joined to the wrong prompt);
- `cut_off`: the answer cut to 20-70% of its words (distillation runs that hit a token limit);
- `refusal`: the answer replaced by a canned refusal;
- `repetition`: the answer's opening repeated until the text is 2-4x as long (degenerate decoding);
- `near_copy`: a lightly edited copy of a clean row that stays in the pool (merged sources, templated rows).

`HELD_OUT_KINDS` are other forms of the same failures, written after the screen's rules were set and never in
the default mix, to check the screen on damage it was not developed on (`--kinds cross_domain,cut_chars,...`):

- `cross_domain`: the answer of a row of another domain (a code answer to a writing prompt, or the reverse);
- `cut_chars`: the answer cut at 30-80% of its characters, mid-word or mid-line (a byte limit);
- `late_loop`: the answer's first 30-60% of words, then its last 6-10 of them said again and again (a loop that
  starts late, so the opening is fine);
- `non_answer`: the answer replaced by an upbeat reply with no content ("Sure! Here is the answer you asked for.").

Rows are plain dicts in any layout `slap` reads that has one answer to damage: Alpaca (`output`), prompt /
response or completion, OpenAI `messages` and ShareGPT `conversations` (the last assistant turn). A damaged row
carries `damage: KIND`; a clean row has no such field, so a trainer ignores it and a benchmark can read it back.
Add a kind: write the function and put it in `DAMAGE_KINDS` (the generator and `--kinds` pick it up).
"""

from __future__ import annotations

import copy
import random
import re
from collections.abc import Callable, Sequence
from typing import Any

Row = dict[str, Any]
DamageFn = Callable[[Row, random.Random, Sequence[Row]], Row | None]

REFUSALS = (
    "I'm sorry, but I can't help with that request.",
    "As an AI language model, I am unable to complete this task.",
    "I apologize, but I cannot provide an answer to this question.",
    "Sorry, I am not able to assist with that.",
    "I'm afraid I can't do that. Is there anything else I can help you with?",
)
_ASSISTANT = {"assistant", "gpt", "bot", "model", "chatgpt"}


def answer_slot(row: Row) -> tuple[Any, Any] | None:
    """(container, key) holding the row's (last) answer text, or None when the layout has none to damage."""
    for key in ("output", "response", "completion"):
        if isinstance(row.get(key), str):
            return row, key
    for key, role_key, text_key in (("messages", "role", "content"), ("conversations", "from", "value")):
        turns = row.get(key)
        if isinstance(turns, list):
            for turn in reversed(turns):
                if isinstance(turn, dict) and turn.get(role_key) in _ASSISTANT and isinstance(turn.get(text_key), str):
                    return turn, text_key
    return None


def get_answer(row: Row) -> str | None:
    slot = answer_slot(row)
    return None if slot is None else slot[0][slot[1]]


def with_answer(row: Row, text: str, kind: str) -> Row:
    out = copy.deepcopy(row)
    slot = answer_slot(out)
    assert slot is not None
    slot[0][slot[1]] = text
    out["damage"] = kind
    return out


def mismatch(row: Row, rng: random.Random, donors: Sequence[Row]) -> Row | None:
    same = [d for d in donors if d.get("domain") == row.get("domain") and get_answer(d) != get_answer(row)]
    if not same:
        return None
    return with_answer(row, get_answer(rng.choice(same)) or "", "mismatch")


def cut_off(row: Row, rng: random.Random, donors: Sequence[Row]) -> Row | None:
    answer = get_answer(row) or ""
    # Split on whitespace but keep it, so the kept part is the answer's own text (code keeps its layout).
    pieces = re.split(r"(\s+)", answer.strip())
    words = pieces[::2]
    if len(words) < 8:
        return None
    keep = max(2, int(len(words) * rng.uniform(0.2, 0.7)))
    return with_answer(row, "".join(pieces[: 2 * keep - 1]), "cut_off")


def refusal(row: Row, rng: random.Random, donors: Sequence[Row]) -> Row | None:
    return with_answer(row, rng.choice(REFUSALS), "refusal")


def repetition(row: Row, rng: random.Random, donors: Sequence[Row]) -> Row | None:
    answer = (get_answer(row) or "").strip()
    words = answer.split()
    if len(words) < 4:
        return None
    first = re.split(r"(?<=[.!?\n])\s+", answer, maxsplit=1)[0]
    opening = first if 3 <= len(first.split()) <= 40 else " ".join(words[: min(12, len(words))])
    times = max(3, round(rng.uniform(2.0, 4.0) * len(words) / max(1, len(opening.split()))))
    return with_answer(row, " ".join([opening] * min(times, 30)), "repetition")


def near_copy(row: Row, rng: random.Random, donors: Sequence[Row]) -> Row | None:
    """A copy of `row` with a few small edits in prompt and answer: a word dropped, a case or punctuation change."""
    out = copy.deepcopy(row)
    slot = answer_slot(out)
    if slot is None:
        return None
    slot[0][slot[1]] = _light_edit(slot[0][slot[1]], rng)
    for key in ("instruction", "prompt"):
        if isinstance(out.get(key), str):
            out[key] = _light_edit(out[key], rng)
    out["damage"] = "near_copy"
    return out


def _light_edit(text: str, rng: random.Random) -> str:
    words = text.split(" ")
    if len(words) < 3:
        return text + rng.choice(["", ".", " "])
    for _ in range(rng.randint(1, 2)):
        i = rng.randrange(len(words))
        edit = rng.choice(["drop", "case", "punct"])
        if edit == "drop" and len(words) > 3:
            del words[i]
        elif edit == "case":
            words[i] = words[i].capitalize() if words[i][:1].islower() else words[i].lower()
        else:
            words[i] = words[i].rstrip(".,;:") + rng.choice([",", ";", ""])
    return " ".join(words)


def cross_domain(row: Row, rng: random.Random, donors: Sequence[Row]) -> Row | None:
    other = [d for d in donors if d.get("domain") != row.get("domain") and get_answer(d)]
    if not other:
        return None
    return with_answer(row, get_answer(rng.choice(other)) or "", "cross_domain")


def cut_chars(row: Row, rng: random.Random, donors: Sequence[Row]) -> Row | None:
    answer = (get_answer(row) or "").strip()
    if len(answer) < 60:
        return None
    return with_answer(row, answer[: int(len(answer) * rng.uniform(0.3, 0.8))], "cut_chars")


def late_loop(row: Row, rng: random.Random, donors: Sequence[Row]) -> Row | None:
    words = (get_answer(row) or "").split()
    if len(words) < 20:
        return None
    head = words[: int(len(words) * rng.uniform(0.3, 0.6))]
    phrase = head[-rng.randint(6, 10):]
    loops = max(3, round(len(words) * rng.uniform(1.0, 2.0) / len(phrase)))
    return with_answer(row, " ".join(head + phrase * loops), "late_loop")


NON_ANSWERS = (
    "Sure! Here is the answer you asked for.",
    "Great question! Let me know if you need anything else.",
    "Of course, happy to help with that. Here you go.",
    "Done! I hope this helps.",
    "Thanks for asking. The answer is below.",
)


def non_answer(row: Row, rng: random.Random, donors: Sequence[Row]) -> Row | None:
    return with_answer(row, rng.choice(NON_ANSWERS), "non_answer")


# Kinds that replace a row in place; `near_copy` adds a row beside a clean one that stays.
DAMAGE_KINDS: dict[str, DamageFn] = {
    "mismatch": mismatch,
    "cut_off": cut_off,
    "refusal": refusal,
    "repetition": repetition,
    "near_copy": near_copy,
}
ADDS_A_ROW = {"near_copy"}
HELD_OUT_KINDS: dict[str, DamageFn] = {
    "cross_domain": cross_domain,
    "cut_chars": cut_chars,
    "late_loop": late_loop,
    "non_answer": non_answer,
}


def make_noisy_pool(rows: Sequence[Row], damaged_share: float, seed: int,
                    kinds: dict[str, float] | None = None) -> list[Row]:
    """A pool of len(rows) rows of which `damaged_share` are damaged, split over `kinds` by weight (equal by
    default), in a seeded random order.

    In-place kinds take a row's place (its clean original is not in the pool); an added kind (`near_copy`)
    copies a clean row that stays in the pool, so every damaged row has a clean row it is not. A row that cannot
    take its kind (too short to cut) is passed over for the next one.
    """
    if not 0.0 <= damaged_share < 1.0:
        raise ValueError(f"damaged_share must be in [0, 1), got {damaged_share}")
    weights = kinds or dict.fromkeys(DAMAGE_KINDS, 1.0)
    known = {**DAMAGE_KINDS, **HELD_OUT_KINDS}
    unknown = sorted(set(weights) - set(known))
    if unknown:
        raise ValueError(f"unknown damage kinds {unknown}; known: {', '.join(known)}")
    rng = random.Random(seed)
    n = len(rows)
    n_damaged = round(damaged_share * n)
    total = sum(weights.values())
    counts = {k: int(n_damaged * w / total) for k, w in weights.items()}
    by_remainder = sorted(weights, key=lambda k: -(n_damaged * weights[k] / total % 1))
    for k in by_remainder[: n_damaged - sum(counts.values())]:
        counts[k] += 1
    order = list(range(n))
    rng.shuffle(order)
    # The first n - n_damaged shuffled rows stay clean; in-place damage draws on the others, each used once.
    clean, spare = order[: n - n_damaged], order[n - n_damaged:]
    used: set[int] = set()
    pool: list[Row] = [copy.deepcopy(rows[i]) for i in clean]
    for kind, count in counts.items():
        fn = known[kind]
        made = 0
        for i in rng.sample(clean if kind in ADDS_A_ROW else spare, len(clean if kind in ADDS_A_ROW else spare)):
            if made == count:
                break
            if kind not in ADDS_A_ROW and i in used:
                continue
            damaged = fn(rows[i], rng, rows)
            if damaged is None:
                continue
            if kind not in ADDS_A_ROW:
                used.add(i)
            pool.append(damaged)
            made += 1
        if made < count:
            raise ValueError(f"only {made} of {count} rows could take damage {kind!r}")
    rng.shuffle(pool)
    return pool


def damaged_views(rows: Sequence[Row], seed: int, kinds: Sequence[str] | None = None) -> list[Row]:
    """Each row under each in-place damage kind (default: all but the added ones), its `domain` set to the kind and
    `source` to the row's position in `rows`: the damaged half of pairs (clean answer, damaged answer) to the same
    prompt, on which a trained model's preference for the clean answer is measured. A row that cannot take a kind
    (too short to cut) is left out of that kind."""
    rng = random.Random(seed)
    out: list[Row] = []
    for kind in kinds or [k for k in DAMAGE_KINDS if k not in ADDS_A_ROW]:
        for i, row in enumerate(rows):
            damaged = DAMAGE_KINDS[kind](row, rng, rows)
            if damaged is not None:
                out.append({**damaged, "domain": kind, "source": i})
    return out

