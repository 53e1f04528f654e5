"""The proxy loss pass of `slap stratify --shard i/N`: each shard scores its chunks of the rows to score and writes
them as a loss part beside the strata output (`OUTPUT.loss-part-0001-of-0004`, a small Parquet file: the row, its
loss terms and its prompt-free loss); the unsharded stratify finds the parts there, checks them (this very pass,
every shard once) and takes the losses from them instead of running the proxy. Slicing: `slapcli.shard`.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from slapcli import __version__
from slapcli.artifacts import ArtifactMeta
from slapcli.engine import ENGINES, Engine
from slapcli.errors import DataError, UsageError
from slapcli.io.readers import file_fingerprint
from slapcli.io.writers import atomic_path
from slapcli.models import pick_device, pick_dtype, resolve_model
from slapcli.parts import base_name, check_set
from slapcli.progress import Reporter
from slapcli.proxy import passes
from slapcli.proxy.loss import LOSS_TERMS
from slapcli.proxy.passes import LossPass, cached_proxy_losses
from slapcli.screen import without_prompt
from slapcli.shard import LOSS_PART, Shard, part_path

LOSS_PART_KEY = b"slapcli-loss-part"
LOSS_PART_FORMAT = 1


def shard_rows(wanted: np.ndarray, shard: Shard) -> np.ndarray:
    """The rows of `wanted` (source order) in this shard's chunks: the whole chunks an unsharded pass scores, so
    that a shard passing them to the same loss pass cuts the same chunks (each owned chunk is full but the last)."""
    ordered = np.sort(wanted)
    chunk = np.arange(len(ordered)) // passes.LOSS_CHUNK_ROWS  # read when called: the pass reads it so too
    return ordered[chunk % shard.count == shard.index]


def loss_part_key(embeddings_path: str, loss_pass: LossPass, wanted: np.ndarray, screen: bool) -> dict[str, Any]:
    """What the loss terms depend on, and so what every loss part must share with the stratify that reads it."""
    return {"tool_version": __version__, "embeddings": file_fingerprint(embeddings_path).to_dict(),
            "proxy model": resolve_model(loss_pass.proxy_model).identity, "max tokens": loss_pass.max_tokens,
            "rows to score (--dedup, --clusters, --near-dup-cosine, --seed)":
                hashlib.blake2b(np.sort(wanted).astype(np.int64).tobytes(), digest_size=16).hexdigest(),
            "screen": screen}


def _pass_identity(loss_pass: LossPass) -> dict[str, Any]:
    """How the shards scored: the same for every part of one run (the values depend on them), whatever the
    stratify that reads the parts runs on."""
    device = pick_device(loss_pass.device)
    return {"batch size": loss_pass.batch_size, "device": str(device), "dtype": str(pick_dtype(device))}


def write_loss_part(path: str, shard: Shard, key: dict[str, Any], loss_pass: LossPass, rows: np.ndarray,
                    terms: np.ndarray, direct: np.ndarray | None) -> None:
    table = pa.table({
        "row": pa.array(rows, pa.int64()),
        **{name: pa.array(terms[:, i], pa.float32()) for i, name in enumerate(LOSS_TERMS)},
        "direct_loss": pa.array(direct if direct is not None else np.full(len(rows), np.nan, np.float32),
                                pa.float32()),
    })
    record = {"format": LOSS_PART_FORMAT, "shard": shard.to_dict(), "key": key, "pass": _pass_identity(loss_pass)}
    table = table.replace_schema_metadata({LOSS_PART_KEY: json.dumps(record, sort_keys=True)})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


@dataclass(frozen=True)
class _LossPart:
    path: str
    shard: Shard
    record: dict[str, Any]


def _read_loss_part(path: str) -> _LossPart:
    try:
        kv = pq.read_schema(path).metadata or {}
        record = json.loads(kv[LOSS_PART_KEY])
        shard = Shard(int(record["shard"]["index"]), int(record["shard"]["count"]))
    except (OSError, pa.ArrowException, KeyError, TypeError, ValueError):
        raise DataError("not a loss part of `slap stratify --shard` (or a damaged one)", path) from None
    if record.get("format") != LOSS_PART_FORMAT:
        raise UsageError(f"{path}: a loss part of another slapcli version; remove it or rerun its shard")
    return _LossPart(path, shard, record)


def find_loss_parts(output_path: str) -> list[str]:
    return sorted(glob.glob(glob.escape(output_path) + f".{LOSS_PART}-*-of-*"))


def read_loss_parts(paths: list[str], key: dict[str, Any], wanted: np.ndarray,
                    screen: bool) -> tuple[np.ndarray, np.ndarray]:
    """The loss terms [rows, len(LOSS_TERMS)] and prompt-free losses of `wanted` (in its order) from the parts."""
    parts = check_set([_read_loss_part(p) for p in paths], "loss part", lambda p: p.shard,
                       lambda p: {**p.record["key"], **{f"shards' {k}": v for k, v in p.record["pass"].items()}},
                       base_name(paths))
    for part in parts:
        differ = [k for k in key if part.record["key"].get(k) != key[k]]
        if differ:
            raise UsageError(f"{part.path}: a loss part of another run (its {differ[0]} differs from this "
                             "stratify's); remove it or rerun its shard with the same options")
    position = {int(r): i for i, r in enumerate(wanted.tolist())}
    terms = np.full((len(wanted), len(LOSS_TERMS)), np.nan, dtype=np.float32)
    direct = np.full(len(wanted), np.nan, dtype=np.float32)
    for part in parts:
        table = pq.read_table(part.path)
        rows = table.column("row").to_numpy()
        if not np.array_equal(rows, shard_rows(wanted, part.shard)):
            raise DataError(f"damaged loss part: it does not hold the rows of shard {part.shard}", part.path)
        where = np.array([position[int(r)] for r in rows], dtype=np.int64)
        for i, name in enumerate(LOSS_TERMS):
            terms[where, i] = table.column(name).to_numpy(zero_copy_only=False)
        if screen:
            direct[where] = table.column("direct_loss").to_numpy(zero_copy_only=False)
    return terms, direct


def write_loss_shard(emb_meta: ArtifactMeta, src: str, embeddings_path: str, wanted: np.ndarray,
                     loss_pass: LossPass, screen: bool, output_path: str, shard: Shard, reporter: Reporter,
                     engine: Engine = ENGINES["local"]) -> str:
    """Score this shard's chunks of the `wanted` rows (the loss terms, and the prompt-free loss for the screen)
    and write them as a loss part beside `output_path`; returns the part's path."""
    mine = shard_rows(wanted, shard)
    reporter.log(f"shard {shard}: scoring {len(mine):,} of {len(wanted):,} rows")
    terms, _ = cached_proxy_losses(emb_meta, src, embeddings_path, mine, loss_pass, reporter, engine=engine)
    direct = None
    if screen:
        direct_pass = dataclasses.replace(loss_pass, label="proxy loss without prompt")
        direct = cached_proxy_losses(emb_meta, src, embeddings_path, mine, direct_pass, reporter, view=without_prompt,
                                     engine=engine)[0][:, 0]
    path = part_path(output_path, shard, LOSS_PART)
    write_loss_part(path, shard, loss_part_key(embeddings_path, loss_pass, wanted, screen), loss_pass, mine, terms,
                    direct)
    return path


def loss_terms_from_parts(output_path: str, embeddings_path: str, wanted: np.ndarray, loss_pass: LossPass,
                          screen: bool, reporter: Reporter) -> tuple[np.ndarray, np.ndarray, str] | None:
    """(loss terms, prompt-free losses, proxy identity) of the `wanted` rows from the loss parts beside
    `output_path` (every shard once, of this very pass); None when there are none (the proxy runs here)."""
    found = find_loss_parts(output_path)
    if not found:
        return None
    reporter.log(f"proxy losses from {len(found)} loss parts ({found[0]}, ...)")
    terms, direct = read_loss_parts(found, loss_part_key(embeddings_path, loss_pass, wanted, screen), wanted, screen)
    return terms, direct, resolve_model(loss_pass.proxy_model).identity
