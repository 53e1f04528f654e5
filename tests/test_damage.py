"""The noisy regime's damage generator (scripts/damage.py): shares, kinds, layouts and seeds."""

from __future__ import annotations

import random
import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import damage


def alpaca(i: int, domain: str = "general") -> dict:
    words = " ".join(f"w{i}_{k}" for k in range(20))
    return {"instruction": f"Task number {i} please", "input": "", "output": f"First sentence {i}. {words}.",
            "domain": domain}


ROWS = [alpaca(i, "code" if i % 3 == 0 else "general") for i in range(200)]


def test_pool_has_the_stated_share_split_evenly_and_keeps_its_size() -> None:
    pool = damage.make_noisy_pool(ROWS, 0.3, seed=0)
    assert len(pool) == len(ROWS)
    counts = Counter(r.get("damage", "clean") for r in pool)
    assert counts["clean"] == 140
    assert {k: counts[k] for k in damage.DAMAGE_KINDS} == dict.fromkeys(damage.DAMAGE_KINDS, 12)
    assert all("damage" not in r for r in ROWS)  # the input rows are not touched


def test_same_seed_same_pool_other_seed_other_pool() -> None:
    a = damage.make_noisy_pool(ROWS, 0.25, seed=3)
    assert a == damage.make_noisy_pool(ROWS, 0.25, seed=3)
    assert a != damage.make_noisy_pool(ROWS, 0.25, seed=4)


def test_each_kind_damages_the_answer_as_described() -> None:
    rng = random.Random(0)
    row = ROWS[1]
    cut = damage.cut_off(row, rng, ROWS)
    assert row["output"].startswith(cut["output"]) and len(cut["output"].split()) < len(row["output"].split())
    assert damage.refusal(row, rng, ROWS)["output"] in damage.REFUSALS
    rep = damage.repetition(row, rng, ROWS)["output"]
    assert rep.count("First sentence 1.") >= 3
    mis = damage.mismatch(row, rng, ROWS)
    assert mis["output"] != row["output"] and mis["output"] in {r["output"] for r in ROWS if r["domain"] == "general"}
    copy = damage.near_copy(row, rng, ROWS)
    assert copy["output"] != row["output"] or copy["instruction"] != row["instruction"]
    assert damage.cut_off({"instruction": "x", "output": "too short"}, rng, ROWS) is None


@pytest.mark.parametrize("row", [
    {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "old answer here"}]},
    {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "old answer here"}]},
    {"prompt": "q", "response": "old answer here"},
])
def test_other_layouts_damage_their_last_answer(row: dict) -> None:
    out = damage.refusal(row, random.Random(0), [row])
    assert damage.get_answer(out) in damage.REFUSALS and out["damage"] == "refusal"
    assert damage.get_answer(row) == "old answer here"


def test_kinds_can_be_chosen_and_extended(monkeypatch: pytest.MonkeyPatch) -> None:
    def shout(row: dict, rng: random.Random, donors: list) -> dict:
        return damage.with_answer(row, (damage.get_answer(row) or "").upper(), "shout")

    monkeypatch.setitem(damage.DAMAGE_KINDS, "shout", shout)
    pool = damage.make_noisy_pool(ROWS, 0.1, seed=0, kinds={"shout": 1.0, "refusal": 1.0})
    assert Counter(r.get("damage") for r in pool if "damage" in r) == {"shout": 10, "refusal": 10}
    with pytest.raises(ValueError, match="unknown damage kinds"):
        damage.make_noisy_pool(ROWS, 0.1, seed=0, kinds={"nope": 1.0})


def test_held_out_kinds_damage_as_described_and_stay_out_of_the_default_mix() -> None:
    rng = random.Random(0)
    row = ROWS[1]  # general
    assert damage.cross_domain(row, rng, ROWS)["output"] in {r["output"] for r in ROWS if r["domain"] == "code"}
    cut = damage.cut_chars(row, rng, ROWS)["output"]
    assert row["output"].startswith(cut) and 0.3 * len(row["output"]) - 1 <= len(cut) <= 0.8 * len(row["output"])
    loop = damage.late_loop(row, rng, ROWS)["output"].split()
    words = row["output"].split()
    assert loop[:6] == words[:6] and len(loop) > len(words) and set(loop) < set(words)  # the tail says nothing new
    assert damage.non_answer(row, rng, ROWS)["output"] in damage.NON_ANSWERS
    assert not set(damage.HELD_OUT_KINDS) & set(damage.DAMAGE_KINDS)
    assert not {r.get("damage") for r in damage.make_noisy_pool(ROWS, 0.3, seed=0)} & set(damage.HELD_OUT_KINDS)
    pool = damage.make_noisy_pool(ROWS, 0.2, seed=0, kinds=dict.fromkeys(damage.HELD_OUT_KINDS, 1.0))
    assert Counter(r.get("damage") for r in pool if "damage" in r) == dict.fromkeys(damage.HELD_OUT_KINDS, 10)
