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
from slapcli.proxy.prefix_store import PrefixKey, StoredPrefixes
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


def split_at(n_blocks: int, n_top: int) -> int:
    """Index of the first trainable block when the last `n_top` of `n_blocks` train (at least one does)."""
    return max(0, n_blocks - max(1, n_top))


def prefix_key(model: nn.Module, identity: str, n_top: int) -> PrefixKey:
    """What a stored prefix of this model (with `identity`), split before its last `n_top` blocks, is filed under."""
    blocks, param = decoder_blocks(model), next(model.parameters())
    return PrefixKey(identity, str(param.dtype), param.device.type, split_at(len(blocks), n_top), len(blocks))


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
        self.split = split_at(len(self.blocks), n_top)
        self.n_top = n_top
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

    @contextlib.contextmanager
    def weights_frozen(self) -> Iterator[None]:
        """The trainable blocks' weights need no gradient inside this block (feature passes)."""
        for p in self.parameters:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in self.parameters:
                p.requires_grad_(True)

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

    @property
    def nbytes(self) -> int:
        """Bytes written so far (what the file takes on disk)."""
        return self._end

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
    """Per-row hidden states at the split, computed on first use and stored in float16 on disk (HiddenStore).

    With `model_identity`, rows whose states stratify's loss pass kept (slapcli.proxy.prefix_store, found by token
    ids) are read from that store instead of running the frozen bottom again."""

    def __init__(self, split: SplitProxy, encoded: dict[int, EncodedExample], pad_id: int,
                 device: torch.device, spill_dir: str | None = None, model_identity: str | None = None) -> None:
        self.split, self.encoded, self.pad_id, self.device = split, encoded, pad_id, device
        self.hidden = HiddenStore(spill_dir)
        self.token_budget = feature_token_budget(device)  # padded tokens per batch of every pass on these rows
        self.stored: StoredPrefixes | None = None
        if model_identity is not None:
            key = PrefixKey(model_identity, str(split.compute_dtype), device.type, split.split, len(split.blocks))
            self.stored = StoredPrefixes(key)
        self._in_store: dict[Any, bool] = {}  # key -> whether the store holds its row (looked up once)
        self.computed = 0  # rows whose prefix ran here (the rest came from the store)

    def groups(self, keys: list[Any]) -> list[list[int]]:
        """Indices into `keys` in batches of similar length under the token budget, longest first."""
        return token_budget_batches([len(self.encoded[k].input_ids) for k in keys], FEATURE_BATCH,
                                    self.token_budget)

    def ensure(self, keys: list[Any]) -> None:
        missing = [k for k in keys if k not in self.hidden and not self._stored(k)]
        self.computed += len(missing)
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
        states = [self.hidden.get(k) if k in self.hidden else self._read_stored(k) for k in keys]
        hidden = torch.zeros(len(keys), width, states[0].shape[-1], dtype=torch.float32)
        for r, h in enumerate(states):
            hidden[r, : h.shape[0]] = h.float()
        return batch, hidden.to(self.device)

    @property
    def reused(self) -> int:
        """Rows whose states came from the store."""
        return sum(self._in_store.values())

    def _stored(self, key: Any) -> bool:
        if self.stored is None or not len(self.stored):
            return False
        if key not in self._in_store:
            self._in_store[key] = self.encoded[key].input_ids in self.stored
        return self._in_store[key]

    def _read_stored(self, key: Any) -> torch.Tensor:
        states = self.stored.get(self.encoded[key].input_ids) if self.stored is not None else None
        if states is None:
            raise SlapError("the frozen-prefix store lost a row it held")
        return states

    def close(self) -> None:
        self.hidden.close()
        if self.stored is not None:
            self.stored.close()


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
        # The features are built from activations and their gradients alone: with the weights frozen for this
        # pass and the cached states as the input that needs a gradient, backward computes no weight gradient
        # (a third of the top blocks' backward, thrown away before). The activation gradients are the same ops.
        hidden.requires_grad_(True)
        with split.weights_frozen():
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


@contextlib.contextmanager
def projection_paused(projector: GradientProjector | None) -> Iterator[None]:
    """No projection work inside this block: the projector's hooks are off and put back after.

    For passes whose features nobody reads (the training step): otherwise every trainable Linear would still
    sketch its inputs and output gradients there. The hooks only read, so gradients are the same either way."""
    if projector is None:
        yield
        return
    projector.close()  # removes the hooks and drops what they captured
    try:
        yield
    finally:
        # The projector's own hooks, registered as its __init__ does (slapmath has no public switch for them).
        projector._handles = [lin.register_forward_hook(projector._hook(i)) for i, lin in enumerate(projector.layers)]


def train_step(split: SplitProxy, cache: PrefixCache, optimizer: torch.optim.Optimizer, keys: list[Any],
               projector: GradientProjector | None = None) -> None:
    """One AdamW step of the trainable blocks on the chosen batch (mean of its rows' losses), with `projector`'s
    hooks off (projection_paused).

    The gradient is accumulated over length-grouped parts of the batch (each part's loss sum / batch size):
    the same mean, with less padding."""
    optimizer.zero_grad(set_to_none=True)
    with projection_paused(projector):
        for idx in cache.groups(keys):
            batch, hidden = cache.batch([keys[i] for i in idx])
            with split.top_only(hidden), split.compute():
                part = response_losses(split.model, batch).sum() / len(keys)
            part.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
