"""The split proxy of the replay: a frozen bottom whose hidden states are cached once per row (on disk), trainable
top blocks, per-row projected gradient features and the training step on a chosen batch."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from slapcli.errors import SlapError
from slapcli.proxy.chat import IGNORE_INDEX, EncodedExample, collate, token_budget_batches
from slapcli.proxy.loss import response_losses
from slapcli.slapmath import GradientProjector, normalize_features

FEATURE_BATCH = 16  # rows per forward/backward when computing gradient features (bigger GEMMs)
# Padded tokens per such batch on a CPU: each pass groups its rows by length under this budget
# (proxy.token_budget_batches). A pass of 16 candidates in the pool's random order padded 2.3 tokens per real
# one on the quality benchmark's data; grouped under 512 tokens, 1.17 (under 2048, 1.68), and the frozen-prefix
# and feature passes ran 28% and 22% faster than under 2048 (work in docs/PERFORMANCE.md). Accelerators keep
# batches of FEATURE_BATCH rows (only sorted by length): small batches would leave them idle.
CPU_FEATURE_TOKENS = 512


def feature_token_budget(device: torch.device) -> int:
    return CPU_FEATURE_TOKENS if device.type == "cpu" else sys.maxsize


class _PassThrough(nn.Module):
    """Stands in for a frozen bottom block whose output is already cached."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


class _StopForward(Exception):
    def __init__(self, hidden: torch.Tensor) -> None:
        self.hidden = hidden


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder blocks: the longest ModuleList (model.layers for Llama-like models)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise SlapError(f"{type(model).__name__}: no stack of decoder blocks found to train")
    return max(lists, key=len)


class SplitProxy:
    """The proxy as a frozen bottom, run once per row, and trainable top blocks, run at every replay step.

    Only the last `n_top` decoder blocks train, so the hidden states entering them never change: they are
    computed once per row (`prefix`) and cached, and every later forward/backward runs the top blocks alone
    (`top_only`). On SmolLM2-135M (30 blocks) with 2 trainable blocks this makes a replay step ~10x cheaper.
    """

    def __init__(self, model: nn.Module, n_top: int) -> None:
        self.model = model
        self.blocks = decoder_blocks(model)
        self.split = max(0, len(self.blocks) - max(1, n_top))
        for p in model.parameters():
            p.requires_grad_(False)
        top = list(self.blocks)[self.split:]
        # The model's own dtype (bf16 on CUDA) is what the frozen part computes in. The trainable blocks are kept
        # in float32: AdamW on bf16 weights rounds most updates of a 1e-4 step away (a weight above ~0.03 in
        # magnitude has a bf16 spacing larger than the step), so the proxy would barely train. `compute()` then
        # runs the passes under bf16 autocast, so matmuls stay fast and mixed dtypes meet safely.
        self.compute_dtype = next(model.parameters()).dtype
        for b in top:
            b.to(torch.float32)
        self.parameters = [p for b in top for p in b.parameters()]
        for p in self.parameters:
            p.requires_grad_(True)
        self.linears = [m for b in top for m in b.modules() if isinstance(m, nn.Linear)]

    def compute(self) -> contextlib.AbstractContextManager:
        """Autocast to the model's dtype for passes through the float32 top blocks (a no-op in float32)."""
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        device_type = next(self.model.parameters()).device.type
        return torch.autocast(device_type=device_type, dtype=self.compute_dtype)

    @torch.no_grad()
    def prefix(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Hidden states entering the first trainable block, [B, T, H]; the forward stops there."""
        def stop(module: nn.Module, args: tuple, kwargs: dict) -> None:
            raise _StopForward(args[0] if args else kwargs["hidden_states"])

        handle = self.blocks[self.split].register_forward_pre_hook(stop, with_kwargs=True)
        try:
            self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        except _StopForward as s:
            return s.hidden.detach()
        finally:
            handle.remove()
        raise SlapError("the proxy's forward pass never reached its trainable blocks")

    @contextlib.contextmanager
    def top_only(self, hidden: torch.Tensor) -> Iterator[None]:
        """Within this block, a forward of the model skips the bottom and starts from `hidden`."""
        bottom = [self.blocks[i] for i in range(self.split)]
        for i in range(self.split):
            self.blocks[i] = _PassThrough()

        def inject(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if args:
                return (hidden.to(args[0].dtype), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden.to(kwargs["hidden_states"].dtype)}

        handle = self.blocks[self.split].register_forward_pre_hook(inject, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()
            for i, block in enumerate(bottom):
                self.blocks[i] = block


class HiddenStore:
    """Per-row float16 hidden states in an anonymous file on disk, appended once and read back by offset.

    The replay would otherwise hold every offered row's [tokens, hidden] states in RAM (~6 GB for 50k rows of
    SmolLM2). The file is created already unlinked (`tempfile.TemporaryFile`), so nothing is left behind even
    after a SIGKILL; reads go through the page cache, which the OS can drop under memory pressure.
    """

    def __init__(self, directory: str | None = None) -> None:
        if directory:
            os.makedirs(directory, exist_ok=True)  # the output's folder, which the artifact writer would create too
        self._file = tempfile.TemporaryFile(dir=directory)
        self._fd = self._file.fileno()
        self._end = 0
        self._where: dict[Any, tuple[int, tuple[int, ...]]] = {}  # key -> (byte offset, shape)

    def __contains__(self, key: Any) -> bool:
        return key in self._where

    def put(self, key: Any, states: torch.Tensor) -> None:
        data = states.detach().to("cpu", torch.float16).contiguous().numpy()
        os.pwrite(self._fd, data.tobytes(), self._end)
        self._where[key] = (self._end, data.shape)
        self._end += data.nbytes

    def get(self, key: Any) -> torch.Tensor:
        offset, shape = self._where[key]
        out = np.empty(shape, dtype=np.float16)
        os.preadv(self._fd, [out], offset)
        return torch.from_numpy(out)

    def close(self) -> None:
        self._file.close()


class PrefixCache:
    """Per-row hidden states at the split, computed on first use and stored in float16 on disk (HiddenStore)."""

    def __init__(self, split: SplitProxy, encoded: dict[int, EncodedExample], pad_id: int,
                 device: torch.device, spill_dir: str | None = None) -> None:
        self.split, self.encoded, self.pad_id, self.device = split, encoded, pad_id, device
        self.hidden = HiddenStore(spill_dir)
        self.token_budget = feature_token_budget(device)  # padded tokens per batch of every pass on these rows

    def groups(self, keys: list[Any]) -> list[list[int]]:
        """Indices into `keys` in batches of similar length under the token budget, longest first."""
        return token_budget_batches([len(self.encoded[k].input_ids) for k in keys], FEATURE_BATCH,
                                    self.token_budget)

    def ensure(self, keys: list[Any]) -> None:
        missing = [k for k in keys if k not in self.hidden]
        for idx in self.groups(missing):
            chunk = [missing[i] for i in idx]
            batch = {k: v.to(self.device) for k, v in collate([self.encoded[k] for k in chunk], self.pad_id).items()}
            hidden = self.split.prefix(batch)
            for r, k in enumerate(chunk):
                self.hidden.put(k, hidden[r, : len(self.encoded[k].input_ids)])

    def batch(self, keys: list[Any]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """A collated batch of these rows and their padded cached hidden states."""
        self.ensure(keys)
        batch = {k: v.to(self.device) for k, v in collate([self.encoded[k] for k in keys], self.pad_id).items()}
        width = batch["input_ids"].shape[1]
        states = [self.hidden.get(k) for k in keys]
        hidden = torch.zeros(len(keys), width, states[0].shape[-1], dtype=torch.float32)
        for r, h in enumerate(states):
            hidden[r, : h.shape[0]] = h.float()
        return batch, hidden.to(self.device)

    def close(self) -> None:
        self.hidden.close()


def row_features(split: SplitProxy, cache: PrefixCache, projector: GradientProjector,
                 keys: list[Any], norm: str = "raw",
                 reference_tokens: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Projected per-row gradient features [n, D] (normalised per `norm`; `reference_tokens` is the typical
    response length of norm "tokens") and losses [n] under the proxy's current state."""
    feats: list[torch.Tensor] = []
    losses: list[torch.Tensor] = []
    order: list[int] = []
    for idx in cache.groups(keys):
        order.extend(idx)
        batch, hidden = cache.batch([keys[i] for i in idx])
        split.model.zero_grad(set_to_none=True)
        projector.reset()  # drop captures of passes whose gradients were not for features (training steps)
        with split.top_only(hidden), split.compute():
            loss = response_losses(split.model, batch)
        loss.sum().backward()  # the sum keeps each row's gradient its own
        n_response = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1)  # the tokens response_losses averages
        feats.append(normalize_features(projector.features(batch["attention_mask"]), norm, n_response,
                                        reference_tokens).cpu())
        losses.append(loss.detach().float().cpu())
    split.model.zero_grad(set_to_none=True)
    back = torch.empty(len(order), dtype=torch.long)
    # Batches ran longest first: back to the keys' order.
    back[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    return torch.cat(feats)[back], torch.cat(losses)[back]


def train_step(split: SplitProxy, cache: PrefixCache, optimizer: torch.optim.Optimizer, keys: list[Any]) -> None:
    """One AdamW step of the trainable blocks on the chosen batch (mean of its rows' losses).

    The gradient is accumulated over length-grouped parts of the batch (each part's loss sum / batch size):
    the same mean, with less padding."""
    optimizer.zero_grad(set_to_none=True)
    for idx in cache.groups(keys):
        batch, hidden = cache.batch([keys[i] for i in idx])
        with split.top_only(hidden), split.compute():
            part = response_losses(split.model, batch).sum() / len(keys)
        part.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
