"""Chat encoding for the proxy: token ids, the response mask, collation and length-grouped batches.

Formatting. When the tokenizer knows `<|im_start|>` and `<|im_end|>` (SmolLM2 and other ChatML models), each
turn is `<|im_start|>{role}\\n{text}<|im_end|>\\n`, as the model was instruction-tuned. Otherwise a plain
fallback is used: `{Role}: {text}\\n`, with the tokenizer's eos right after an assistant text (and its bos in
front when it has one distinct from eos). No default system prompt is injected: rows are scored as given.

Masking. The loss counts the assistant text and the end-of-turn token after it (`<|im_end|>` or eos): learning
where to stop is part of the response. Role headers and the newline after a turn are prompt. Every assistant
turn of a multi-turn row counts. Each segment is tokenised on its own (role header, text, end token), so the
mask is exact by construction; the cost is that token boundaries at a segment edge may differ slightly from
tokenising the whole string, which does not matter for scoring.

Truncation to `max_tokens` keeps the beginning of the row. If that would keep no response token at all (a
prompt longer than the budget), the prompt is cut from the left instead: the window keeps the end of the
prompt (usually the actual question) and the start of the first response, giving the response up to half the
budget. A row is never left without response tokens by truncation.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from slapcli.io.layouts import Example

IGNORE_INDEX = -100
_CHATML_START = "<|im_start|>"
_CHATML_END = "<|im_end|>"


@dataclass
class EncodedExample:
    input_ids: list[int]
    response_mask: list[bool]  # True where the loss counts: assistant text and its end-of-turn token
    n_prompt_tokens: int
    n_response_tokens: int
    truncated: bool

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class _Format:
    """How turns become segments for one tokenizer (worked out once per encode_examples call)."""

    chatml: bool
    start_id: int | None  # <|im_start|> in ChatML
    end_id: int | None  # <|im_end|> in ChatML, eos in the fallback (None when the tokenizer has no eos)
    bos_id: int | None  # fallback only


def _special_id(tokenizer: Any, token: str) -> int | None:
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or (tokenizer.unk_token_id is not None and tid == tokenizer.unk_token_id):
        return None
    return int(tid)


def _format_for(tokenizer: Any) -> _Format:
    start, end = _special_id(tokenizer, _CHATML_START), _special_id(tokenizer, _CHATML_END)
    if start is not None and end is not None:
        return _Format(chatml=True, start_id=start, end_id=end, bos_id=None)
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    return _Format(chatml=False, start_id=None, end_id=None if eos is None else int(eos),
                   bos_id=None if bos is None or bos == eos else int(bos))


def _tokenize_batch(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of many strings in one call, with no special tokens added.

    `split_special_tokens` makes a literal "<|im_end|>" inside row text count as plain text, so data cannot
    forge turn boundaries.
    """
    if not texts:
        return []
    try:
        out = tokenizer(texts, add_special_tokens=False, split_special_tokens=True)
    except TypeError:  # tokenizers that do not know the option
        out = tokenizer(texts, add_special_tokens=False)
    return [list(ids) for ids in out["input_ids"]]


def _truncate(ids: list[int], mask: list[bool], max_tokens: int) -> tuple[list[int], list[bool], bool]:
    if len(ids) <= max_tokens:
        return ids, mask, False
    first = next((i for i, m in enumerate(mask) if m), None)
    if first is None or first < max_tokens:
        return ids[:max_tokens], mask[:max_tokens], True
    # Keeping the beginning would drop every response token: keep the end of the prompt and the response start.
    keep_response = min(len(ids) - first, max(1, max_tokens // 2))
    start = first + keep_response - max_tokens
    return ids[start:start + max_tokens], mask[start:start + max_tokens], True


def encode_examples(tokenizer: Any, examples: Sequence[Example], max_tokens: int) -> list[EncodedExample]:
    """Encode many rows at once: all row texts are tokenised in one batched call."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    fmt = _format_for(tokenizer)
    roles = sorted({t.role for e in examples for t in e.turns})
    headers = [f"{r}\n" if fmt.chatml else f"{r.capitalize()}: " for r in roles]
    # Constant pieces once, row texts all together: one tokenizer call instead of one per segment.
    constant = _tokenize_batch(tokenizer, [*headers, "\n"])
    header_ids = dict(zip(roles, constant[:-1], strict=True))
    newline_ids = constant[-1]
    texts = _tokenize_batch(tokenizer, [t.text for e in examples for t in e.turns])

    encoded: list[EncodedExample] = []
    k = 0
    for example in examples:
        ids: list[int] = []
        mask: list[bool] = []
        if not fmt.chatml and fmt.bos_id is not None:
            ids.append(fmt.bos_id)
            mask.append(False)
        for turn in example.turns:
            is_response = turn.role == "assistant"
            if fmt.chatml:
                assert fmt.start_id is not None
                ids.append(fmt.start_id)
                mask.append(False)
            head = header_ids[turn.role]
            ids.extend(head)
            mask.extend([False] * len(head))
            body = texts[k]
            k += 1
            ids.extend(body)
            mask.extend([is_response] * len(body))
            # ChatML closes every turn; the fallback marks only the end of an assistant turn (with eos).
            if fmt.end_id is not None and (fmt.chatml or is_response):
                ids.append(fmt.end_id)
                mask.append(is_response)
            ids.extend(newline_ids)
            mask.extend([False] * len(newline_ids))
        ids, mask, truncated = _truncate(ids, mask, max_tokens)
        n_response = sum(mask)
        encoded.append(EncodedExample(ids, mask, len(ids) - n_response, n_response, truncated))
    return encoded


def encode_example(tokenizer: Any, example: Example, max_tokens: int) -> EncodedExample:
    """Encode one row (see the module docstring for format, mask and truncation)."""
    return encode_examples(tokenizer, [example], max_tokens)[0]


def collate(encoded: Sequence[EncodedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, and labels (-100 off the response mask and on padding)."""
    if not encoded:
        raise ValueError("collate needs at least one example")
    width = max(len(e.input_ids) for e in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(encoded):
        n = len(e.input_ids)
        ids = torch.tensor(e.input_ids, dtype=torch.long)
        input_ids[i, :n] = ids
        attention_mask[i, :n] = 1
        labels[i, :n] = torch.where(torch.tensor(e.response_mask, dtype=torch.bool), ids, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def token_budget_batches(lengths: Sequence[int], max_rows: int, max_tokens: int) -> list[list[int]]:
    """Indices grouped longest first into batches of at most `max_rows` rows whose padded size (rows x the
    batch's longest row) stays within `max_tokens`; a row longer than `max_tokens` gets a batch of its own.

    Why: a batch costs its padded size. Sixteen random rows of Alpaca-like data tokenised for SmolLM2 hold
    2.3 padded tokens per real one (its rows: median 76 tokens, max 256); grouped by length under 512 tokens,
    1.17 (docs/PERFORMANCE.md, change 6). Every pass that uses this treats rows independently, so only the cost changes.
    """
    if max_rows < 1 or max_tokens < 1:
        raise ValueError(f"max_rows and max_tokens must be >= 1, got {max_rows}, {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep the callers' order
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:  # longest first, so current[0] is the batch's longest row
        if current and (len(current) == max_rows or (len(current) + 1) * lengths[current[0]] > max_tokens):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first, so memory trouble shows at once)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return token_budget_batches(lengths, batch_size, sys.maxsize)  # no token limit: fixed-size batches
