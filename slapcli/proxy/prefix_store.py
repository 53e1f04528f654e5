"""The frozen prefix's hidden states, kept from stratify's loss pass for select's replay.

Stratify's loss pass runs the whole proxy over every row; the replay (slapcli.replay) trains only the last
decoder blocks, so it needs the hidden states entering them, which that loss pass computed on its way. Without
this store the replay ran the frozen bottom blocks over every offered row a second time (a third of the replay's
CPU at 2,000 rows, docs/COST.md).

A store is a folder in the slapcli cache (`$SLAP_CACHE_DIR/prefix`): float16 states of every row appended to one
file, and an index from each row's token ids (a digest) to its place. Rows are found by their token ids, not by
file and line, so another input, another --max-tokens or a changed row simply misses; the store's name covers
everything else the states depend on (model identity, dtype, device type, split block, torch and transformers
versions). A store is written under a temporary name and renamed when complete, so a killed stratify leaves no
half store that a select could read. Only the newest KEEP_STORES stores are kept (SmolLM2-135M: 1,152 bytes per
token, about 110 MB per 1,000 rows of sample_data), and a store is given up when the disk would fall under
DISK_RESERVE.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from slapcli.models import cache_dir
from slapcli.runtime import chosen_cache_dir

STORE_FORMAT = "prefix-store-v1"
KEEP_STORES = 2  # complete stores kept in the cache: this run's, and the one before (another --keep, another data)
DISK_RESERVE = 1 << 30  # bytes a store leaves free on its disk; below that it is given up (the replay recomputes)
STALE_SECONDS = 3600.0  # a temporary store not written to for this long belongs to a killed run
_STATES, _INDEX, _HEADER = "states.f16", "index.npz", "header.json"


def ids_digest(input_ids: Sequence[int] | np.ndarray) -> bytes:
    """What a row is looked up by: its token ids (as int32), hashed."""
    return hashlib.blake2b(np.asarray(input_ids, dtype=np.int32).tobytes(), digest_size=16).digest()


@dataclass(frozen=True)
class PrefixKey:
    """Everything besides the token ids that the hidden states at the split depend on."""

    model_identity: str
    dtype: str
    device_type: str
    split: int  # index of the first trainable block: the states are its input
    n_blocks: int

    def header(self) -> dict[str, Any]:
        import transformers

        return {**asdict(self), "format": STORE_FORMAT, "torch": torch.__version__,
                "transformers": transformers.__version__}

    def name(self) -> str:
        return hashlib.blake2b(json.dumps(self.header(), sort_keys=True).encode(), digest_size=8).hexdigest()


def store_root() -> Path:
    """`--cache-dir DIR` (its `prefix/`) when the command was given one: the disk the user chose for big files;
    else the slapcli cache's. Stratify writes there and select reads there, so both need the same --cache-dir."""
    chosen = chosen_cache_dir()
    return Path(chosen) / "prefix" if chosen else cache_dir() / "prefix"


class PrefixWriter:
    """Appends rows' states to a temporary store; `finish` makes it a complete one, `abandon` removes it."""

    def __init__(self, key: PrefixKey, root: Path | None = None) -> None:
        self.root = root or store_root()
        self.root.mkdir(parents=True, exist_ok=True)
        _remove_stale(self.root)
        self.key = key
        self.tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key.name()}-", dir=self.root))
        self._file = open(self.tmp / _STATES, "wb")  # closed by finish/abandon
        self._end = 0
        self._rows: dict[bytes, tuple[int, int]] = {}  # digest -> (byte offset, tokens)
        self.hidden_size: int | None = None
        self.given_up = False

    def put(self, input_ids: Sequence[int] | np.ndarray, states: torch.Tensor) -> None:
        """Keep one row's states [tokens, hidden] (a row already kept, e.g. a copy, is skipped)."""
        if self.given_up:
            return
        digest = ids_digest(input_ids)
        if digest in self._rows:
            return
        data = states.detach().to("cpu", torch.float16).contiguous().numpy()
        if shutil.disk_usage(self.tmp).free < data.nbytes + DISK_RESERVE:
            self.abandon()  # the replay recomputes these states; a full disk would fail the user's run instead
            return
        self.hidden_size = int(data.shape[1])
        os.pwrite(self._file.fileno(), data.tobytes(), self._end)
        self._rows[digest] = (self._end, int(data.shape[0]))
        self._end += data.nbytes

    def finish(self) -> Path | None:
        """Write the index and rename the store into place; returns its folder (None when given up or empty)."""
        if self.given_up:
            return None
        self._file.close()
        if not self._rows:
            self.abandon()
            return None
        digests = list(self._rows)
        np.savez(self.tmp / _INDEX, digests=np.array(digests, dtype="S16"),
                 offsets=np.array([self._rows[d][0] for d in digests], dtype=np.int64),
                 tokens=np.array([self._rows[d][1] for d in digests], dtype=np.int64))
        (self.tmp / _HEADER).write_text(json.dumps({**self.key.header(), "hidden_size": self.hidden_size,
                                                    "rows": len(digests), "bytes": self._end}) + "\n")
        final = self.root / f"{self.key.name()}.{uuid.uuid4().hex[:12]}"
        os.rename(self.tmp, final)
        _evict(self.root, keep=final)
        return final

    def abandon(self) -> None:
        self.given_up = True
        self._file.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


class StoredPrefixes:
    """The read side: every complete store written under `key`, as one lookup by token ids."""

    def __init__(self, key: PrefixKey, root: Path | None = None) -> None:
        self._files: list[Any] = []
        self._rows: dict[bytes, tuple[int, int, int]] = {}  # digest -> (file, byte offset, tokens)
        self.hidden_size: int | None = None
        root = root or store_root()
        folders = sorted(root.glob(f"{key.name()}.*")) if root.is_dir() else []
        for folder in folders:
            with contextlib.suppress(OSError, ValueError, KeyError):  # one removed or damaged meanwhile: skipped
                header = json.loads((folder / _HEADER).read_text())
                if header.get("format") != STORE_FORMAT or {k: header.get(k) for k in key.header()} != key.header():
                    continue
                with np.load(folder / _INDEX, allow_pickle=False) as index:
                    digests, offsets, tokens = index["digests"], index["offsets"], index["tokens"]
                f = open(folder / _STATES, "rb")  # held open: the store may be evicted while read
                self._files.append(f)
                self.hidden_size = int(header["hidden_size"])
                fi = len(self._files) - 1
                for d, o, t in zip(digests.tolist(), offsets.tolist(), tokens.tolist(), strict=True):
                    self._rows.setdefault(bytes(d).ljust(16, b"\0"), (fi, int(o), int(t)))
                os.utime(folder)  # used: the newest to evict last

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, input_ids: Sequence[int] | np.ndarray) -> bool:
        return ids_digest(input_ids) in self._rows

    def get(self, input_ids: Sequence[int] | np.ndarray) -> torch.Tensor | None:
        """The row's float16 states [tokens, hidden], or None when no store holds these token ids."""
        where = self._rows.get(ids_digest(input_ids))
        if where is None or self.hidden_size is None:
            return None
        fi, offset, tokens = where
        out = np.empty((tokens, self.hidden_size), dtype=np.float16)
        os.preadv(self._files[fi].fileno(), [out], offset)
        return torch.from_numpy(out)

    def close(self) -> None:
        for f in self._files:
            f.close()
        self._files = []


class PrefixCapture:
    """Keeps, for each batch a loss pass runs, the hidden states entering `block` (the first trainable block)."""

    def __init__(self, block: nn.Module, writer: PrefixWriter) -> None:
        self.block, self.writer = block, writer

    @contextlib.contextmanager
    def batch(self, rows: Sequence[Any]) -> Iterator[None]:
        """Around the forward of a batch of these encoded rows (in the batch's order, right-padded)."""
        seen: list[torch.Tensor] = []

        def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
            seen.append(args[0] if args else kwargs["hidden_states"])

        handle = self.block.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()
        if seen:
            for r, row in enumerate(rows):
                self.writer.put(row.input_ids, seen[0][r, : len(row.input_ids)])


def _remove_stale(root: Path) -> None:
    """Temporary stores of killed runs (young ones may belong to a stratify running now)."""
    now = time.time()
    for tmp in root.glob(".tmp-*"):
        with contextlib.suppress(OSError):
            newest = max([tmp.stat().st_mtime, *(p.stat().st_mtime for p in tmp.iterdir())])
            if now - newest > STALE_SECONDS:
                shutil.rmtree(tmp, ignore_errors=True)


def _evict(root: Path, keep: Path) -> None:
    """All but the newest KEEP_STORES complete stores (by last use), never `keep`."""
    stores = []
    for folder in root.iterdir():
        if folder.name.startswith(".") or not folder.is_dir():
            continue
        with contextlib.suppress(OSError):
            stores.append((folder.stat().st_mtime, folder))
    stores.sort(reverse=True)
    for _, folder in stores[KEEP_STORES:]:
        if folder != keep:
            shutil.rmtree(folder, ignore_errors=True)
