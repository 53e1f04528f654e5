"""The damage screen of `stratify`: rows whose answer a trainer should not learn, flagged before the budget.

Real pools carry answers that are not answers: joined to the wrong prompt, canned refusals, text stuck repeating
itself, cut off by a token limit, and near-copies of other rows. Proxy loss alone cannot tell them from hard,
valuable rows (both are poorly predicted). Two questions the proxy can answer can:

- Does the prompt help predict the answer? `prompt_gain` = loss of the answer alone - loss of the answer after
  its prompt (nats per response token; the log of Li et al.'s IFD, "From Quantity to Quality", 2024, which drops
  rows whose IFD >= 1). An answer that belongs to another prompt, a refusal that fits any prompt, or text that
  predicts itself gains little or nothing from its prompt.
- Does the answer end where it ends? `end_loss` = the loss of the end-of-turn token after the last answer: an
  instruct model finds the end of a complete answer likely and the end of a cut-off sentence very unlikely. The
  cut is absolute, not relative to the pool: an answer is flagged where the model gives its end less than one
  chance in a million. Being unusual for the pool is not enough (a complete answer that ends without punctuation,
  a list, code, one word, is a less likely end than a sentence and an outlier on a clean pool of prose, yet the
  model still gives its end a fair chance), and it is not needed either: in a pool whose answers all end without
  a closing sentence (function bodies), the ends spread so widely that a cut-off one is no outlier, yet it is
  still a stop the model would not make.
- Is the answer's second half new, or a copy of its first? `tail_loss` / the first half's loss: an answer stuck
  repeating its opening is copied by the model at almost no loss, so its second half is far easier than its
  first (a ratio, so a predictable answer, e.g. code, is not taken for a repetitive one). Being an outlier of
  that ratio is not enough either (a clean pool has its tail): the answer must also repeat itself in words, more
  than half of its characters in word 5-grams it already used (Gopher's repetition rule, Rae et al. 2021).

A row is flagged when a signal is an outlier by the modified z-score of Iglewicz and Hoaglin (0.6745 (x -
median) / MAD, outlier beyond 3.5), a rule fixed a priori and robust to a large share of flagged rows (median
and MAD break down only at 50%), so on a clean pool it flags only rows that stand far from the rest. Near-copies
are rows whose embedding is within a cosine threshold of an earlier row of the same cluster (SemDeDup, Abbas et
al. 2023). Every function here is pure and tested against a naive reference in tests/test_screen.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from slapcli.io.layouts import Example
from slapcli.slapmath import group_positions

# Iglewicz & Hoaglin (1993): 0.6745 makes the MAD a consistent estimate of the standard deviation for normal
# data, and |z| > 3.5 is their recommended outlier cut.
MAD_SCALE = 0.6745
OUTLIER_Z = 3.5
# Reasons, in the order a row is labelled when several apply (the strata artifact's `pruned` column).
SCREEN_REASONS = ("ignores_prompt", "cut_off", "repetitive")
# The tail of a short answer is a few tokens (often just its end token): too few to call it repetitive.
MIN_TAIL_TOKENS = 16
# An end-of-turn token the proxy gives less than one chance in a million (loss > ln 1e6 = 13.8 nats) is a stop
# the model would not make. A round number, not fitted; for scale, on two 300-row draws of the shared mix the
# complete answers that the z-score alone flagged (ending in code, a list, a number) sat at 7-21 nats (all but 3
# below 15.1) and answers cut off mid-sentence at 18-34 nats (all but 2). Until 2026-12-03 a row also had to be a
# z-score outlier; on every shared-mix pool that flagged the same rows, but on a pool of standard-library function
# bodies (scripts/stdlib_pool.py: median end loss 6.4 nats, MAD 3.0) it let 16 of 18 cut-off answers through.
CUT_OFF_MIN_END_LOSS = float(np.log(1e6))
# Gopher (Rae et al. 2021, Table A1) drops a web page when over 15% of its characters sit in word 5-grams it already
# used. Answers are short and often legitimately repetitive (tables, arrays, markup), so the cut here is a half:
# flagged when more of the answer repeats its own earlier text than not. Not fitted; for scale, 5 of the shared
# data's 7,017 answers pass it (a truth table, an array of zeros, HTML tables), and answers stuck repeating their
# opening 2-4 times (scripts/damage.py's `repetition`) sit at 0.5-0.75.
REPEATED_NGRAM = 5
REPEATED_SHARE_MAX = 0.5


@dataclass(frozen=True)
class ScreenSignals:
    """Per-row signals (NaN where not computed, e.g. duplicates)."""

    prompt_gain: np.ndarray  # nats per response token the prompt saves; low = the answer ignores its prompt
    end_loss: np.ndarray  # loss of the answer's end-of-turn token; high = the answer stops where it should not
    mean_loss: np.ndarray  # mean loss over all response tokens
    tail_loss: np.ndarray  # mean loss of the answer's second half; far below the first half's = it repeats
    response_tokens: np.ndarray  # response tokens per row (the tail signal needs 2 * MIN_TAIL_TOKENS)
    repeated_share: np.ndarray  # share of the answer's characters in word n-grams it already used; high = loops


def prompt_gain(loss_with_prompt: np.ndarray, loss_without_prompt: np.ndarray) -> np.ndarray:
    """How much the prompt lowers the answer's loss: L(answer) - L(answer | prompt), per response token."""
    return (np.asarray(loss_without_prompt, dtype=np.float32) - np.asarray(loss_with_prompt, dtype=np.float32))


def modified_z(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """0.6745 (x - median) / MAD with median and MAD over `mask` rows; NaN outside the mask or where x is NaN.

    A MAD of 0 (over half the rows equal) falls back to the mean absolute deviation times 1.2533 (its normal
    consistency factor, as Iglewicz and Hoaglin suggest), and to z = 0 when that is 0 too.
    """
    values = np.asarray(values, dtype=np.float64)
    use = mask & ~np.isnan(values)
    out = np.full(values.shape, np.nan)
    if not use.any():
        return out
    center = float(np.median(values[use]))
    mad = float(np.median(np.abs(values[use] - center)))
    if mad > 0:
        out[use] = MAD_SCALE * (values[use] - center) / mad
        return out
    mean_dev = float(np.mean(np.abs(values[use] - center)))
    out[use] = (values[use] - center) / (1.2533 * mean_dev) if mean_dev > 0 else 0.0
    return out


def screen_scores(signals: ScreenSignals, eligible: np.ndarray) -> dict[str, np.ndarray]:
    """Per reason, a suspicion score in outlier units (above OUTLIER_Z = flagged): the z-score oriented so that
    larger is worse. `ignores_prompt` also counts any row whose prompt does not help at all (gain <= 0, IFD >= 1)
    as flagged, whatever the spread of the rest; `cut_off` counts exactly the rows whose end the proxy finds less
    likely than CUT_OFF_MIN_END_LOSS allows, whatever the spread (the others' scores capped at the cut);
    `repetitive` counts the rows with more than REPEATED_SHARE_MAX of their answer in repeated n-grams (also those
    too short for the ratio), ranked by the tail-to-head loss ratio's z-score (capped at the cut for the rest: the
    ratio alone flagged 3-6 complete answers of every clean 300-row pool and caught 6-8 of 18 looping ones, the
    n-gram share 0 and 18)."""
    gain = signals.prompt_gain
    z_gain = -modified_z(gain, eligible)
    z_gain = np.where(eligible & (gain <= 0), np.maximum(z_gain, OUTLIER_Z + 1e-6), z_gain)
    long_enough = eligible & (signals.response_tokens >= 2 * MIN_TAIL_TOKENS)
    z_end = modified_z(signals.end_loss, eligible)
    stops = eligible & (np.nan_to_num(signals.end_loss, nan=0.0) >= CUT_OFF_MIN_END_LOSS)
    z_end = np.where(stops, np.fmax(z_end, OUTLIER_Z + 1e-6), np.minimum(z_end, OUTLIER_Z))
    z_tail = -modified_z(tail_to_head(signals), long_enough)
    loops = eligible & (np.nan_to_num(signals.repeated_share, nan=0.0) > REPEATED_SHARE_MAX)
    z_tail = np.where(loops, np.fmax(z_tail, OUTLIER_Z + 1e-6), np.fmin(z_tail, OUTLIER_Z))
    return {"ignores_prompt": z_gain, "cut_off": z_end, "repetitive": z_tail}


def tail_to_head(signals: ScreenSignals) -> np.ndarray:
    """log(second half's mean loss / first half's), the halves as `proxy.response_loss_terms` splits them
    (the first n // 2 response tokens, then the rest). On a log scale: losses span orders of magnitude."""
    n = signals.response_tokens.astype(np.float64)
    n_head = np.floor(n / 2)
    tail = signals.tail_loss.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        head = (signals.mean_loss * n - tail * (n - n_head)) / n_head
    return np.log(np.maximum(tail, 1e-4)) - np.log(np.maximum(head, 1e-4))


def repeated_ngram_share(text: str, n: int = REPEATED_NGRAM) -> float:
    """The share of `text`'s characters (of its whitespace-separated words) covered by a word n-gram that already
    occurred earlier in the text; 0 for text shorter than 2n words (too short to say an n-gram twice without
    overlapping it). First occurrences do not count, so an opening said twice scores 1/2, three times 2/3.
    `slap inspect`'s diagnosis calls an answer repeated by the same share (slapcli.report.damage)."""
    words = text.split()
    if len(words) < 2 * n:
        return 0.0
    covered = np.zeros(len(words), dtype=bool)
    seen: set[tuple[str, ...]] = set()
    for i in range(len(words) - n + 1):
        gram = tuple(words[i:i + n])
        if gram in seen:
            covered[i:i + n] = True
        else:
            seen.add(gram)
    lengths = np.fromiter((len(w) for w in words), dtype=np.int64, count=len(words))
    return float(lengths[covered].sum() / lengths.sum())


def answer_text(example: Example) -> str:
    """The assistant turns of a row, one after another: the text the repetition check reads."""
    return "\n".join(t.text for t in example.turns if t.role == "assistant")


def screen_flags(scores: dict[str, np.ndarray], eligible: np.ndarray,
                 threshold: float = OUTLIER_Z) -> tuple[np.ndarray, np.ndarray]:
    """(reason index per row or -1, suspicion = the largest score over reasons) for eligible rows.

    The reason is the one with the largest score among those above the threshold."""
    names = list(SCREEN_REASONS)
    stacked = np.stack([np.nan_to_num(scores[name], nan=-np.inf) for name in names])
    suspicion = stacked.max(0)
    reason = np.where(eligible & (suspicion > threshold), stacked.argmax(0), -1)
    return reason.astype(np.int32), np.where(eligible, suspicion, -np.inf)


def near_duplicates(embeddings: np.ndarray, cluster: np.ndarray, eligible: np.ndarray,
                    threshold: float) -> np.ndarray:
    """For each row, the position of an earlier eligible row of its cluster whose embedding has cosine >=
    `threshold` with it, else -1 (also for rows not eligible).

    Inside clusters only, as SemDeDup does: near-copies embed close enough to share a cluster, and the cost is
    the sum of squared cluster sizes, not the square of the pool. Unit-norm embeddings: cosine = dot product.
    """
    out = np.full(len(cluster), -1, dtype=np.int64)
    positions = np.flatnonzero(eligible)
    for _, part in group_positions(cluster[positions]).items():
        members = positions[part]  # ascending: "earlier" is a smaller position
        if len(members) < 2:
            continue
        x = np.asarray(embeddings[members], dtype=np.float32)
        sims = x @ x.T
        sims[np.tril_indices(len(members))] = -np.inf  # only earlier rows (i < j) count for row j
        best = sims.max(0)
        first = sims.argmax(0)
        hit = best >= threshold
        out[members[hit]] = members[first[hit]]
    return out


def restore_order(suspicion: np.ndarray, flagged: np.ndarray, near_copy: np.ndarray) -> np.ndarray:
    """The order in which screened rows come back when the budget needs more rows than the screen left (screened
    rows never shrink the budget): flagged rows least suspicious first, then near-copies in row order (a copy
    adds least of all)."""
    positions = np.flatnonzero(flagged & ~near_copy)
    by_suspicion = positions[np.lexsort((positions, suspicion[positions]))]
    return np.concatenate([by_suspicion, np.flatnonzero(near_copy)])


def without_prompt(example: Example) -> Example:
    """The row's assistant turns alone: what the prompt-free loss (and IFD's direct-answer loss) scores."""
    return Example(tuple(t for t in example.turns if t.role == "assistant"))
