"""Loss passes over source rows: stream the rows an artifact records, score them under the untrained proxy (the
policy at step 0), and cache the result. Used by stratify (loss strata, the damage screen) and the ifd method."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from slapcli.artifacts import ArtifactMeta
from slapcli.config import SelectConfig
from slapcli.engine import ENGINES, Engine
from slapcli.io.layouts import Example
from slapcli.io.readers import ParsedRow, file_fingerprint
from slapcli.io.writers import atomic_path
from slapcli.models import cache_dir, load_causal_lm, pick_device, pick_dtype, resolve_model
from slapcli.progress import Reporter
from slapcli.proxy.chat import EncodedExample
from slapcli.proxy.loss import LOSS_TERMS, compute_loss_terms
from slapcli.proxy.prefix_store import PrefixCapture, PrefixWriter
from slapcli.proxy.split import decoder_blocks, prefix_key
from slapcli.source import iter_source_rows


@dataclass(frozen=True)
class LossPass:
    """What a proxy loss pass over source rows needs to know."""

    proxy_model: str
    max_tokens: int
    batch_size: int
    device: str
    label: str = "proxy loss"


LOSS_CHUNK_ROWS = 1024  # source rows per chunk of a loss pass (what an engine maps over)


@dataclass(frozen=True)
class LossWork:
    """What `chunk_loss_terms` needs besides its rows: the pass, the loaded proxy, the row view and a progress hook."""

    loss_pass: LossPass
    tokenizer: Any
    model: nn.Module
    device: torch.device
    view: Callable[[Example], Example] | None = None
    advance: Callable[[int], None] | None = None  # called per batch: a bar that moves, not one that jumps per chunk
    # Wraps each batch's forward: stratify's pass keeps the frozen prefix's states for the replay with it.
    around_batch: Callable[[list[EncodedExample]], contextlib.AbstractContextManager] | None = None

    def for_worker(self, device: torch.device) -> LossWork:
        """This work as a worker on `device` runs it (slapcli.engine): the proxy there, at that device's dtype, and
        no progress hook of this process."""
        model = self.model if device == self.device else copy.deepcopy(self.model).to(device, pick_dtype(device))
        return dataclasses.replace(self, model=model, device=device, advance=None, around_batch=None)


def chunk_loss_terms(work: LossWork, chunk: list[ParsedRow]) -> np.ndarray:
    """A chunk of source rows to their loss terms [rows, len(LOSS_TERMS)] (the per-chunk work an engine runs)."""
    examples = [r.example if work.view is None else work.view(r.example) for r in chunk]
    return compute_loss_terms(work.model, work.tokenizer, examples, work.loss_pass.max_tokens,
                              work.loss_pass.batch_size, work.device, progress_callback=work.advance,
                              around_batch=work.around_batch)


def proxy_losses(meta: ArtifactMeta, src: str, name: str, wanted_rows: np.ndarray, loss_pass: LossPass,
                 reporter: Reporter, view: Callable[[Example], Example] | None = None,
                 engine: Engine = ENGINES["local"], keep_prefix: bool = False) -> tuple[np.ndarray, str]:
    """Each wanted row's loss terms under the untrained proxy (the policy at step 0), in `wanted_rows` order:
    [rows, len(LOSS_TERMS)] (mean response loss, end-token loss, second-half loss; slapcli.proxy).

    `view` rewrites each row before scoring (IFD scores the response without its prompt). Rows are read from
    the source again, streaming, and scored LOSS_CHUNK_ROWS at a time. Returns the terms and the model's identity.
    With `keep_prefix` (and no view), the hidden states entering the replay's first trainable block are kept on the
    way (slapcli.proxy.prefix_store), where this process runs the chunks: the replay then skips its frozen bottom.
    """
    device = pick_device(loss_pass.device)
    ref = resolve_model(loss_pass.proxy_model)
    reporter.log(f"loading proxy {ref.spec}")
    tokenizer, model = load_causal_lm(ref, device, pick_dtype(device))
    wanted = set(wanted_rows.tolist())
    position = {r: i for i, r in enumerate(wanted_rows.tolist())}
    losses = np.full((len(wanted_rows), len(LOSS_TERMS)), np.nan, dtype=np.float32)
    done = settled = 0
    with reporter.progress(loss_pass.label, len(wanted_rows)) as bar:
        def advance(n: int) -> None:
            nonlocal done
            done += n
            bar.update(advance=n, rows_done=done)

        chunks: deque[list[ParsedRow]] = deque()  # handed to the engine, waiting for their terms

        def to_score() -> Iterator[list[ParsedRow]]:
            chunk: list[ParsedRow] = []
            for row in iter_source_rows(meta, src, name, wanted):
                chunk.append(row)
                if len(chunk) == LOSS_CHUNK_ROWS:
                    chunks.append(chunk)
                    yield chunk
                    chunk = []
            if chunk:
                chunks.append(chunk)
                yield chunk

        writer = None
        if keep_prefix and view is None:
            key = prefix_key(model, ref.identity, SelectConfig.trainable_blocks)
            writer = PrefixWriter(key)
            capture = PrefixCapture(decoder_blocks(model)[key.split], writer)
        work = LossWork(loss_pass, tokenizer, model, device, view, advance,
                        around_batch=None if writer is None else capture.batch)
        try:
            for values in engine.map(chunk_loss_terms, work, to_score()):
                chunk = chunks.popleft()
                for r, v in zip(chunk, values, strict=True):
                    losses[position[r.record.index]] = v
                settled += len(chunk)
                if done < settled:  # a worker elsewhere moves no bar here: the chunk moves it when it comes back
                    advance(settled - done)
        except BaseException:
            if writer is not None:
                writer.abandon()
            raise
    if writer is not None:
        kept = writer.finish()
        if kept is not None:
            reporter.log(f"frozen-prefix states kept for the replay in {kept}")
    return losses, ref.identity


def cached_proxy_losses(meta: ArtifactMeta, src: str, embeddings_path: str, wanted_rows: np.ndarray,
                        loss_pass: LossPass, reporter: Reporter,
                        view: Callable[[Example], Example] | None = None,
                        engine: Engine = ENGINES["local"]) -> tuple[np.ndarray, str]:
    """`proxy_losses`, cached in the slapcli cache per embeddings file, rows, proxy, max tokens, batch, device
    and view (by its function name); not by engine, which gives the same terms.

    The losses do not depend on --keep, --budget, --allocation or the clusters, so trying another budget (or a
    `slap run` with a new --keep) pays for the pass once. The embeddings file's fingerprint covers the source.
    """
    identity = resolve_model(loss_pass.proxy_model).identity
    device = pick_device(loss_pass.device)
    key = hashlib.blake2b(json.dumps([
        file_fingerprint(embeddings_path).to_dict(), identity, loss_pass.max_tokens, loss_pass.batch_size,
        str(device), str(pick_dtype(device)), hashlib.blake2b(wanted_rows.astype(np.int64).tobytes()).hexdigest(),
        getattr(view, "__name__", None), "stratify-loss-terms-v2"]).encode(), digest_size=16).hexdigest()
    cached = cache_dir() / "losses" / f"{key}.npy"
    if cached.exists():
        with contextlib.suppress(OSError, ValueError):
            losses = np.load(cached, allow_pickle=False)
            if losses.shape == (len(wanted_rows), len(LOSS_TERMS)):
                reporter.log(f"{loss_pass.label} from the cache ({cached})")
                return losses, identity
    # The pass with the prompt keeps the frozen prefix for the replay (select --method slap skips its bottom blocks).
    losses, identity = proxy_losses(meta, src, embeddings_path, wanted_rows, loss_pass, reporter, view, engine,
                                    keep_prefix=view is None)
    cached.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(str(cached)) as tmp, open(tmp, "wb") as f:
        np.save(f, losses, allow_pickle=False)
    return losses, identity
