"""The proxy's response loss of a batch, and of many rows without gradients (see `chat` for the masks)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from slapcli.io.layouts import Example
from slapcli.proxy.chat import IGNORE_INDEX, EncodedExample, collate, encode_examples, length_sorted_batches


def _head_split(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """The decoder body and the linear LM head, when logits are exactly head(body(x).last_hidden_state).

    Computing the head only on response positions avoids materialising [B, T, vocab] logits (3 GB in float32
    for 16 x 1024 tokens and a 49k vocabulary). Models that post-process logits (soft-capping, scaling) take
    the general path.
    """
    config = getattr(model, "config", None)
    if config is None or getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    body = getattr(model, "base_model", None)
    if not isinstance(head, nn.Linear) or body is None or body is model:
        return None
    return body, head


def response_losses(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-row mean cross-entropy over response tokens, shape [B], float32 whatever the model's dtype.

    Token t is predicted from positions < t, so logits at t-1 are scored against labels at t. Rows are
    independent (right padding is masked out of attention and labels). A row with no scored token (only
    possible without any end token and with an empty response, which the layouts reject) gets loss 0, so
    that it neither poisons a batch with NaN nor contributes gradient.
    """
    return response_loss_terms(model, batch)[0]


LOSS_TERMS = ("loss", "end_loss", "tail_loss")  # the columns of compute_loss_terms

# Response tokens whose logits exist at once in a pass without gradients: 2,048 x 49k vocabulary is 0.4 GB of float32
# logits (and as much for the softmax), where a whole 16 x 1,024-token batch would be 3 GB of each. Peak memory of a
# loss pass then no longer grows with the longest batch a pool happens to hold.
HEAD_CHUNK_TOKENS = 2048


def _head_token_losses(head: nn.Linear, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each response position [N] from its final hidden state [N, d]: in one piece when gradients
    are on (the head's weight gradient is then one product, as before), else HEAD_CHUNK_TOKENS positions at a
    time. Each position's loss is a function of its own row of logits, so the pieces give the same values up to
    the product's float rounding (a BLAS kernel may round a row differently in a shorter product)."""
    if torch.is_grad_enabled() or len(hidden) <= HEAD_CHUNK_TOKENS:
        return F.cross_entropy(head(hidden).float(), targets, reduction="none")
    return torch.cat([F.cross_entropy(head(hidden[i:i + HEAD_CHUNK_TOKENS]).float(),
                                      targets[i:i + HEAD_CHUNK_TOKENS], reduction="none")
                      for i in range(0, len(hidden), HEAD_CHUNK_TOKENS)])


def response_loss_terms(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Per row, float32 [B] each: the mean response loss, the loss of the LAST response token, and the mean loss
    over the second half of the response tokens (LOSS_TERMS).

    The last response token is the end-of-turn token of the last assistant turn (the formats here always close
    an assistant turn): its loss is how surprised the model is that the answer ends there, high for an answer
    cut off mid-sentence. The second half's loss is near zero when the answer only repeats its own first half
    (slapcli.screen uses both). Rows without a scored token get 0 for all three.
    """
    input_ids, attention_mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    targets = labels[:, 1:]
    rows, cols = (targets != IGNORE_INDEX).nonzero(as_tuple=True)  # row-major: a row's last entry is its end
    split = _head_split(model)
    if split is not None:
        body, head = split
        hidden = body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        token_loss = _head_token_losses(head, hidden[rows, cols], targets[rows, cols])
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[rows, cols]
        token_loss = F.cross_entropy(logits.float(), targets[rows, cols], reduction="none")
    n_rows = input_ids.shape[0]
    sums = torch.zeros(n_rows, dtype=torch.float32, device=token_loss.device).index_add(0, rows, token_loss)
    counts = torch.bincount(rows, minlength=n_rows)
    ends = torch.cumsum(counts, 0)
    last = torch.zeros(n_rows, dtype=torch.float32, device=token_loss.device)
    has = counts > 0
    if bool(has.any()):
        last[has] = token_loss[ends[has] - 1]
    # A token's rank inside its row (entries are row-major); the tail is ranks >= count // 2.
    rank = torch.arange(len(rows), device=rows.device) - (ends - counts)[rows]
    in_tail = rank >= torch.div(counts, 2, rounding_mode="floor")[rows]
    tail_sums = torch.zeros(n_rows, dtype=torch.float32, device=token_loss.device).index_add(
        0, rows[in_tail], token_loss[in_tail])
    tail_counts = torch.bincount(rows[in_tail], minlength=n_rows).to(torch.float32)
    return sums / counts.to(torch.float32).clamp(min=1.0), last, tail_sums / tail_counts.clamp(min=1.0)


def response_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of the per-row mean losses: its gradient is the sum of per-row gradients (rows stay independent)."""
    return response_losses(model, batch).sum()


def compute_losses(model: nn.Module, tokenizer: Any, examples: Sequence[Example], max_tokens: int,
                   batch_size: int, device: torch.device,
                   progress_callback: Callable[[int], None] | None = None) -> np.ndarray:
    """Response loss of every row (float32 array in input order) under `model`, without gradients.

    Rows are batched by token count so padding stays minimal. `progress_callback(n)` is called after each
    batch with the number of rows it just finished.
    """
    return compute_loss_terms(model, tokenizer, examples, max_tokens, batch_size, device, progress_callback)[:, 0]


def compute_loss_terms(model: nn.Module, tokenizer: Any, examples: Sequence[Example], max_tokens: int,
                       batch_size: int, device: torch.device,
                       progress_callback: Callable[[int], None] | None = None,
                       around_batch: Callable[[list[EncodedExample]], AbstractContextManager] | None = None,
                       ) -> np.ndarray:
    """[rows, len(LOSS_TERMS)] float32: each row's `response_loss_terms` (mean, end-token and tail loss).

    `around_batch(rows)` wraps each batch's forward (stratify keeps the frozen prefix's states with it:
    slapcli.proxy.prefix_store)."""
    encoded = encode_examples(tokenizer, examples, max_tokens)
    out = np.zeros((len(encoded), len(LOSS_TERMS)), dtype=np.float32)
    if not encoded:
        return out
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for idx in length_sorted_batches([len(e) for e in encoded], batch_size):
                rows = [encoded[i] for i in idx]
                batch = {k: v.to(device) for k, v in collate(rows, pad_id).items()}
                with around_batch(rows) if around_batch is not None else contextlib.nullcontext():
                    out[idx] = torch.stack(response_loss_terms(model, batch), 1).cpu().numpy()
                if progress_callback is not None:
                    progress_callback(len(idx))
    finally:
        model.train(was_training)
    return out
