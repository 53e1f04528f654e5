"""The damage screen's pure functions against naive references (slapcli.screen)."""

from __future__ import annotations

import numpy as np
import pytest

from slapcli.io.layouts import Example, Turn
from slapcli.screen import (
    CUT_OFF_MIN_END_LOSS,
    MIN_TAIL_TOKENS,
    OUTLIER_Z,
    REPEATED_SHARE_MAX,
    SCREEN_REASONS,
    ScreenSignals,
    answer_text,
    modified_z,
    near_duplicates,
    prompt_gain,
    repeated_ngram_share,
    restore_order,
    screen_flags,
    screen_scores,
    without_prompt,
)


def test_modified_z_matches_the_textbook_formula() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=101)
    x[::7] = np.nan
    mask = np.ones(101, dtype=bool)
    mask[:10] = False
    z = modified_z(x, mask)
    use = mask & ~np.isnan(x)
    med = np.median(x[use])
    mad = np.median([abs(v - med) for v in x[use]])
    expected = [0.6745 * (v - med) / mad if u else np.nan for v, u in zip(x, use, strict=True)]
    np.testing.assert_allclose(z, expected, equal_nan=True)


def test_modified_z_with_zero_mad_falls_back_to_mean_deviation() -> None:
    x = np.array([1.0, 1.0, 1.0, 1.0, 5.0])
    z = modified_z(x, np.ones(5, dtype=bool))
    mean_dev = np.mean(np.abs(x - 1.0))
    np.testing.assert_allclose(z, (x - 1.0) / (1.2533 * mean_dev))
    assert np.all(modified_z(np.ones(4), np.ones(4, dtype=bool)) == 0)
    assert np.isnan(modified_z(np.ones(3), np.zeros(3, dtype=bool))).all()


def signals(n: int, rng: np.random.Generator) -> ScreenSignals:
    return ScreenSignals(prompt_gain=rng.normal(0.6, 0.2, n).astype(np.float32),
                         end_loss=rng.normal(1.5, 0.5, n).astype(np.float32),
                         mean_loss=np.full(n, 1.5, dtype=np.float32),
                         tail_loss=np.exp(rng.normal(0.3, 0.3, n)).astype(np.float32),
                         response_tokens=np.full(n, 100), repeated_share=np.zeros(n, dtype=np.float32))


def test_each_kind_of_outlier_gets_its_reason_and_clean_rows_none() -> None:
    rng = np.random.default_rng(1)
    s = signals(200, rng)
    s.prompt_gain[0] = -0.2  # the prompt does not help (IFD > 1), however small the spread
    s.prompt_gain[1] = 0.55  # ordinary
    s.end_loss[2] = 25.0  # stops mid-sentence
    s.tail_loss[3] = 0.001  # its second half is copied ...
    s.repeated_share[3] = 0.7  # ... in words, too
    s.tail_loss[6] = 0.001  # an easy second half alone is no loop
    s.response_tokens[4] = 2 * MIN_TAIL_TOKENS - 1  # too short for the tail signal ...
    s.tail_loss[4] = 0.001  # ... so not flagged for it
    eligible = np.ones(200, dtype=bool)
    eligible[5] = False
    s.end_loss[5] = 99.0  # not eligible: never flagged
    reason, suspicion = screen_flags(screen_scores(s, eligible), eligible)
    names = {i: SCREEN_REASONS[r] for i, r in enumerate(reason) if r >= 0}
    assert names[0] == "ignores_prompt" and names[2] == "cut_off" and names[3] == "repetitive"
    assert 1 not in names and 4 not in names and 5 not in names and 6 not in names
    assert len(names) <= 3 + 4  # a normal sample has almost no 3.5-sigma outliers
    assert suspicion[5] == -np.inf and suspicion[2] > OUTLIER_Z


def test_an_unusual_but_plausible_end_is_not_taken_for_a_cut_off() -> None:
    # On a clean pool the end losses are tight, so an answer ending in code or a list (end loss 9 nats: the model
    # still gives its end a 1-in-8,000 chance) is a 3.5-sigma outlier; only an end below one in a million is flagged.
    rng = np.random.default_rng(2)
    s = signals(200, rng)
    s.end_loss[0] = 9.0
    s.end_loss[1] = CUT_OFF_MIN_END_LOSS + 0.5
    eligible = np.ones(200, dtype=bool)
    scores = screen_scores(s, eligible)
    assert modified_z(s.end_loss, eligible)[0] > OUTLIER_Z  # an outlier by the z-score alone ...
    assert scores["cut_off"][0] == OUTLIER_Z  # ... but its score is capped at the cut, so it is not flagged
    reason, _ = screen_flags(scores, eligible)
    assert reason[0] == -1 and SCREEN_REASONS[reason[1]] == "cut_off"
    assert np.all(scores["cut_off"][2:] <= OUTLIER_Z)  # every end under the floor is capped


def test_an_end_below_one_in_a_million_is_a_cut_off_however_widely_the_pool_ends_spread() -> None:
    # A pool of function bodies: no answer ends with a closing sentence, so end losses spread over 1-16 nats and a
    # cut-off end at 15 nats is no 3.5-sigma outlier; the model still gives it less than one chance in a million.
    rng = np.random.default_rng(3)
    s = signals(200, rng)
    s.end_loss[:] = rng.uniform(1.0, 12.0, 200).astype(np.float32)
    s.end_loss[0] = CUT_OFF_MIN_END_LOSS + 1.0
    s.end_loss[1] = CUT_OFF_MIN_END_LOSS - 0.1
    eligible = np.ones(200, dtype=bool)
    eligible[2] = False
    s.end_loss[2] = 99.0  # not eligible: never flagged
    assert modified_z(s.end_loss, eligible)[0] < OUTLIER_Z  # no outlier by the z-score ...
    scores = screen_scores(s, eligible)
    reason, _ = screen_flags(scores, eligible)
    assert SCREEN_REASONS[reason[0]] == "cut_off" and scores["cut_off"][0] > OUTLIER_Z  # ... flagged all the same
    assert reason[1] == -1 and reason[2] == -1
    flagged = {i for i, r in enumerate(reason) if r >= 0 and SCREEN_REASONS[r] == "cut_off"}
    assert flagged == {i for i in range(200) if eligible[i] and s.end_loss[i] >= CUT_OFF_MIN_END_LOSS}


def naive_repeated_share(text: str, n: int) -> float:
    """Word by word: is it inside some n-gram whose words appeared, in that order, at an earlier start?"""
    w = text.split()
    starts = [i for i in range(len(w) - n + 1) if any(w[j:j + n] == w[i:i + n] for j in range(i))]
    covered = [any(i <= k < i + n for i in starts) for k in range(len(w))]
    total = sum(len(x) for x in w)
    return sum(len(x) for x, c in zip(w, covered, strict=True) if c) / total if len(w) >= 2 * n else 0.0


@pytest.mark.parametrize("seed", range(6))
def test_repeated_ngram_share_matches_a_naive_scan(seed: int) -> None:
    rng = np.random.default_rng(seed)
    vocab = ["a", "bb", "ccc", "dd", "e", "fff"][: 2 + seed % 5]  # small vocabularies repeat n-grams by chance
    text = " ".join(rng.choice(vocab, size=int(rng.integers(0, 60))))
    for n in (1, 2, 3, 5):
        assert repeated_ngram_share(text, n) == pytest.approx(naive_repeated_share(text, n))


def test_an_opening_said_over_and_over_is_flagged_repetitive_however_short() -> None:
    opening = "The capital of France is Paris."
    assert repeated_ngram_share(" ".join([opening] * 2)) == pytest.approx(0.5)
    assert repeated_ngram_share(" ".join([opening] * 3)) == pytest.approx(2 / 3)
    assert repeated_ngram_share("a b c d a b c d a") == 0.0  # under 2n words: too short to judge
    assert repeated_ngram_share("a b c d e f g h i j k") == 0.0
    rng = np.random.default_rng(3)
    s = signals(50, rng)
    s.response_tokens[0] = 12  # too short for the loss-ratio signal
    s.repeated_share[0] = 2 / 3
    s.repeated_share[1] = REPEATED_SHARE_MAX  # exactly half: not more of the answer repeated than not
    s.repeated_share[2] = np.nan  # not computed (e.g. a duplicate)
    eligible = np.ones(50, dtype=bool)
    reason, _ = screen_flags(screen_scores(s, eligible), eligible)
    assert SCREEN_REASONS[reason[0]] == "repetitive" and reason[1] == -1 and reason[2] == -1
    ex = Example((Turn("user", "q"), Turn("assistant", "a b"), Turn("user", "q2"), Turn("assistant", "c")))
    assert answer_text(ex) == "a b\nc"


def test_screen_flags_reason_is_the_largest_score_above_the_threshold() -> None:
    scores = {"ignores_prompt": np.array([5.0, 1.0, np.nan, 4.0]), "cut_off": np.array([6.0, 2.0, 0.0, np.nan]),
              "repetitive": np.array([np.nan, 3.6, np.nan, 1.0])}
    reason, suspicion = screen_flags(scores, np.ones(4, dtype=bool))
    assert [SCREEN_REASONS[r] if r >= 0 else None for r in reason] == ["cut_off", "repetitive", None,
                                                                       "ignores_prompt"]
    np.testing.assert_allclose(suspicion, [6.0, 3.6, 0.0, 4.0])


def test_tail_to_head_is_the_log_ratio_of_the_two_halves() -> None:
    # 5 tokens: head = first 2 (losses 3, 1), tail = last 3 (losses 0.2, 0.2, 0.2)
    s = ScreenSignals(prompt_gain=np.zeros(1), end_loss=np.zeros(1), mean_loss=np.array([(3 + 1 + 0.6) / 5]),
                      tail_loss=np.array([0.2]), response_tokens=np.array([5]), repeated_share=np.zeros(1))
    from slapcli.screen import tail_to_head
    np.testing.assert_allclose(tail_to_head(s), [np.log(0.2 / 2.0)])


def test_prompt_gain_and_prompt_free_view() -> None:
    np.testing.assert_allclose(prompt_gain(np.array([1.0, 2.0]), np.array([1.5, 1.0])), [0.5, -1.0])
    ex = Example((Turn("system", "s"), Turn("user", "q"), Turn("assistant", "a"), Turn("user", "q2"),
                  Turn("assistant", "b")))
    assert [t.text for t in without_prompt(ex).turns] == ["a", "b"]


def naive_near_duplicates(emb: np.ndarray, cluster: np.ndarray, eligible: np.ndarray, t: float) -> np.ndarray:
    out = np.full(len(cluster), -1)
    for j in range(len(cluster)):
        if not eligible[j]:
            continue
        best, who = -np.inf, -1
        for i in range(j):
            if eligible[i] and cluster[i] == cluster[j] and float(emb[i] @ emb[j]) > best:
                best, who = float(emb[i] @ emb[j]), i
        if who >= 0 and best >= t:
            out[j] = who
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_near_duplicates_match_naive_pairwise_scan(seed: int) -> None:
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(30, 8))
    emb = np.concatenate([base, base[:10] + rng.normal(scale=0.05, size=(10, 8))])
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    order = rng.permutation(len(emb))
    emb = emb[order].astype(np.float32)
    cluster = rng.integers(0, 3, len(emb))
    eligible = rng.random(len(emb)) > 0.1
    got = near_duplicates(emb, cluster, eligible, 0.95)
    np.testing.assert_array_equal(got, naive_near_duplicates(emb, cluster, eligible, 0.95))


def test_near_copies_in_one_cluster_keep_their_first_row() -> None:
    emb = np.array([[1.0, 0.0], [0.999, 0.0447], [0.0, 1.0], [1.0, 0.0]], dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    got = near_duplicates(emb, np.array([0, 0, 0, 1]), np.ones(4, dtype=bool), 0.95)
    assert got.tolist() == [-1, 0, -1, -1]  # row 3 is a copy but in another cluster


def test_restore_order_is_least_suspicious_first_then_near_copies() -> None:
    suspicion = np.array([9.0, 4.0, 0.0, 4.0, 7.0, np.inf])
    flagged = np.array([True, True, False, True, True, False])
    near = np.array([False, False, False, False, False, True])
    assert restore_order(suspicion, flagged, near).tolist() == [1, 3, 4, 0, 5]
