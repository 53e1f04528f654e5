"""The benchmarks' trainer: the default proxy split above its top blocks, a prefix cache of the hidden states
entering them (one per data file, on disk), one fixed recipe that trains the top blocks from their pretrained
weights on one subset at a time, held-out evaluation, and the run files that record each (subset, shuffle).

Built on slapcli.proxy: the split (`SplitProxy.prefix`, `SplitProxy.top_only`), chat encoding (`encode_examples`,
`collate`, `length_sorted_batches`) and the loss (`response_losses`) are the tool's own, so the benchmark trains
and scores exactly the rows and tokens the replay sees. The replay's `PrefixCache`/`HiddenStore` and `train_step`
are NOT reused, on purpose:

- the replay's store is an anonymous temporary file that vanishes with its process; this cache outlives every
  invocation (a rerun or another benchmark on the same workdir reads it) and is memory-mapped by each training
  process of `--jobs`;
- the replay computes prefixes and steps in token-budget groups (`train_step` sums each group's loss / batch size),
  while the recipe's batch is one forward of the shuffled rows and the cache was filled in `length_sorted_batches`
  of 16: the same means in exact arithmetic, other float rounding, so every cached hidden state and run file of
  existing workdirs (named by `recipe_key`) would change.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchlib.common import log
from benchlib.data import read_rows
from slapcli.io.writers import atomic_path
from slapcli.models import DEFAULT_PROXY_MODEL, ModelRef, load_causal_lm, resolve_model
from slapcli.proxy import (
    EncodedExample,
    SplitProxy,
    collate,
    encode_examples,
    length_sorted_batches,
    response_losses,
)

PREFIX_BATCH = 16  # rows per frozen-bottom forward when filling the cache
EVAL_BATCH = 16


def add_recipe_options(p: argparse.ArgumentParser) -> None:
    """The training recipe's options (TopTrainer and recipe_of read them), with one set of defaults."""
    p.add_argument("--max-tokens", type=int, default=256, help="tokens per row, for the proxy and the training")
    p.add_argument("--train-blocks", type=int, default=2, help="top decoder blocks that train")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--schedule", choices=["constant", "cosine"], default="constant",
                   help="learning-rate schedule of the training runs (cosine decays to zero at the last step)")
    p.add_argument("--warmup", type=float, default=0.0, help="share of the steps with a linear learning-rate warmup")


# ---------------------------------------------------------------------------------------------- prefix cache


def pad_token(tokenizer: Any) -> int:
    """The id batches are padded with, as the replay pads them (pad, else end of text, else 0)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def prefix_cache_key(data: Path, identity: str, split_index: int, max_tokens: int) -> str:
    """What a prefix cache of `data` is valid for: the file's bytes, the model, where it is split, the token cap."""
    fp = hashlib.blake2b(data.read_bytes(), digest_size=16).hexdigest()
    return f"{fp}:{identity}:{split_index}:{max_tokens}"


class HiddenCache:
    """Hidden states entering the trainable blocks, one float16 [tokens, H] slab per row, in a disk memmap.

    index.npz holds, per row, its token offset and length, and the token ids and response mask (all rows
    concatenated), so a batch is rebuilt without the tokenizer. Why not the replay's PrefixCache: the module's
    docstring.
    """

    def __init__(self, folder: Path) -> None:
        index = np.load(folder / "index.npz")
        self.offsets = index["offsets"]
        self.ids, self.mask = index["ids"], index["mask"]
        self.domains = [str(d) for d in index["domains"]]
        self.hidden_size = int(index["hidden_size"])
        self.hidden = np.memmap(folder / "hidden.f16", dtype=np.float16, mode="r",
                                shape=(int(self.offsets[-1]), self.hidden_size))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def example(self, i: int) -> EncodedExample:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        ids, mask = self.ids[a:b].tolist(), self.mask[a:b].tolist()
        n_resp = sum(mask)
        return EncodedExample(ids, mask, len(ids) - n_resp, n_resp, False)

    def length(self, i: int) -> int:
        return int(self.offsets[i + 1] - self.offsets[i])

    def batch(self, rows: list[int], pad_id: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        batch = collate([self.example(i) for i in rows], pad_id)
        hidden = torch.zeros(len(rows), batch["input_ids"].shape[1], self.hidden_size, dtype=torch.float32)
        for r, i in enumerate(rows):
            a, b = int(self.offsets[i]), int(self.offsets[i + 1])
            hidden[r, : b - a] = torch.from_numpy(np.asarray(self.hidden[a:b], dtype=np.float32))
        return batch, hidden

    @staticmethod
    def build(folder: Path, data: Path, split: SplitProxy, tokenizer: Any, max_tokens: int, key: str) -> dict:
        """Fill the cache for every row of `data` unless a complete one with the same key exists."""
        meta_path = folder / "meta.json"
        if meta_path.exists() and json.loads(meta_path.read_text()).get("key") == key:
            return {**json.loads(meta_path.read_text()), "cached": True}
        folder.mkdir(parents=True, exist_ok=True)
        meta_path.unlink(missing_ok=True)
        examples, domains = read_rows(data)
        encoded = encode_examples(tokenizer, examples, max_tokens)
        lengths = np.array([len(e) for e in encoded], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        hidden_size = int(split.model.config.hidden_size)
        tmp = folder / "hidden.f16.tmp"
        mm = np.memmap(tmp, dtype=np.float16, mode="w+", shape=(max(1, int(offsets[-1])), hidden_size))
        t0 = time.perf_counter()
        done = 0
        split.model.eval()
        with torch.inference_mode():
            for rows in length_sorted_batches(lengths.tolist(), PREFIX_BATCH):
                h = split.prefix(collate([encoded[i] for i in rows], pad_token(tokenizer)))
                for r, i in enumerate(rows):
                    mm[offsets[i]:offsets[i + 1]] = h[r, : lengths[i]].to(torch.float16).numpy()
                done += len(rows)
                if done % (PREFIX_BATCH * 8) < len(rows) or done == len(rows):
                    log(f"  prefix cache {data.name}: {done}/{len(encoded)} rows, {time.perf_counter() - t0:.0f} s")
        mm.flush()
        del mm
        np.savez(folder / "index.npz", offsets=offsets,
                 ids=np.concatenate([np.array(e.input_ids, dtype=np.int32) for e in encoded]),
                 mask=np.concatenate([np.array(e.response_mask, dtype=bool) for e in encoded]),
                 domains=np.array(domains), hidden_size=hidden_size)
        os.replace(tmp, folder / "hidden.f16")
        meta = {"key": key, "rows": len(encoded), "tokens": int(offsets[-1]),
                "response_tokens": int(sum(e.n_response_tokens for e in encoded)),
                "truncated_rows": int(sum(e.truncated for e in encoded)),
                "seconds": round(time.perf_counter() - t0, 2),
                "mib": round(int(offsets[-1]) * hidden_size * 2 / 2**20, 1)}
        meta_path.write_text(json.dumps(meta, indent=2) + "\n")
        return {**meta, "cached": False}


def response_token_counts(cache: HiddenCache) -> np.ndarray:
    return np.array([int(cache.mask[cache.offsets[i]:cache.offsets[i + 1]].sum()) for i in range(len(cache))])


def token_weighted_loss(row_losses: Any, tokens: Any, domains: Any) -> float:
    """Held-out loss as a trainer reports it: per domain, the response tokens' losses summed over rows and divided
    by their count (each row weighs as its answer is long), then the mean over domains as `evaluate`'s row mean is.

    Beside the row mean because a row mean weighs a one-token answer ("6", "false") like a 200-token one, and one
    such row's loss can move between subsets by more than the differences being measured."""
    losses, counts, domains = np.asarray(row_losses, float), np.asarray(tokens, float), np.asarray(domains)
    masks = [domains == d for d in np.unique(domains)]
    return float(np.mean([(losses[m] * counts[m]).sum() / counts[m].sum() for m in masks]))


# ---------------------------------------------------------------------------------------------- training


class TopTrainer:
    """Trains the top blocks of the split proxy from their pretrained weights on one subset at a time."""

    def __init__(self, split: SplitProxy, pad_id: int, args: argparse.Namespace) -> None:
        self.split, self.model, self.pad_id, self.args = split, split.model, pad_id, args
        self.initial = [p.detach().clone() for p in split.parameters]

    def reset(self) -> None:
        with torch.no_grad():
            for p, p0 in zip(self.split.parameters, self.initial, strict=True):
                p.copy_(p0)

    def start(self, n_rows: int, seed: int) -> tuple[torch.optim.Optimizer, Any, np.random.Generator]:
        """Pretrained top blocks, and the recipe's optimizer and learning-rate schedule for `n_rows` rows."""
        a = self.args
        self.reset()
        torch.manual_seed(seed)
        optimizer = torch.optim.AdamW(self.split.parameters, lr=a.lr, weight_decay=0.0)
        total = self.total_steps(n_rows)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, total, a.schedule, round(a.warmup * total)))
        self.model.train()
        return optimizer, schedule, np.random.default_rng(seed)

    def total_steps(self, n_rows: int) -> int:
        """Optimizer steps of the recipe on `n_rows` rows (the last batch of an epoch may be short)."""
        return math.ceil(n_rows / self.args.batch_size) * self.args.epochs

    def step(self, cache: HiddenCache, rows: list[int], optimizer: torch.optim.Optimizer, schedule: Any) -> float:
        batch, hidden = cache.batch(rows, self.pad_id)
        with self.split.top_only(hidden), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.args.bf16):
            loss = response_losses(self.model, batch).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        return float(loss.detach())

    def batches(self, rows: np.ndarray, rng: np.random.Generator) -> Iterator[list[int]]:
        """The recipe's batches: every epoch a new shuffle of `rows`."""
        for _ in range(self.args.epochs):
            order = rng.permutation(rows).tolist()
            for s in range(0, len(order), self.args.batch_size):
                yield order[s:s + self.args.batch_size]

    def train(self, cache: HiddenCache, rows: np.ndarray, seed: int) -> dict[str, Any]:
        a = self.args
        optimizer, schedule, rng = self.start(len(rows), seed)
        steps, losses = 0, []
        t0 = time.perf_counter()
        for batch_rows in self.batches(rows, rng):
            losses.append(self.step(cache, batch_rows, optimizer, schedule))
            steps += 1
        return {"steps": steps, "train_s": round(time.perf_counter() - t0, 2),
                "train_loss_first": round(losses[0], 4) if losses else None,
                "train_loss_last_epoch": round(float(np.mean(losses[-max(1, steps // a.epochs):])), 4)
                if losses else None}

    def evaluate(self, cache: HiddenCache) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.model.eval()
        out = np.zeros(len(cache), dtype=np.float64)
        with torch.inference_mode():
            for rows in length_sorted_batches([cache.length(i) for i in range(len(cache))], EVAL_BATCH):
                batch, hidden = cache.batch(rows, self.pad_id)
                with self.split.top_only(hidden):
                    out[rows] = response_losses(self.model, batch).numpy()
        domains = np.array(cache.domains)
        per_domain = {d: round(float(out[domains == d].mean()), 5) for d in sorted(set(cache.domains))}
        # Per-row losses too: benchmark_bound.py scores halves of the held-out set apart.
        return {"heldout": per_domain, "mean": round(float(np.mean(list(per_domain.values()))), 5),
                "eval_s": round(time.perf_counter() - t0, 2), "heldout_rows": [round(float(x), 5) for x in out]}


def lr_factor(step: int, total: int, schedule: str, warmup: int) -> float:
    """Multiplier of the learning rate at optimizer step `step` of `total`: linear warmup over `warmup` steps,
    then constant or a cosine decay to zero at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    raise ValueError(f"schedule must be constant or cosine, got {schedule!r}")


# ---------------------------------------------------------------------------------------------- run files


def recipe_of(args: argparse.Namespace) -> dict[str, Any]:
    """The training recipe's settings; those left at the defaults of earlier reports are omitted, so run files
    cached under an older recipe key stay valid."""
    recipe = {k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "train_blocks", "max_tokens")}
    if args.bf16:
        recipe["bf16"] = True
    if args.schedule != "constant" or args.warmup:
        recipe.update(schedule=args.schedule, warmup=args.warmup)
    return recipe


def recipe_key(args: argparse.Namespace, prefix_cache: dict[str, dict[str, Any]]) -> str:
    """Names the run files of one recipe on one pair of prefix caches (train, held-out)."""
    blob = json.dumps([recipe_of(args), prefix_cache["train"]["key"], prefix_cache["heldout"]["key"]])
    return hashlib.blake2b(blob.encode(), digest_size=6).hexdigest()


# A subset's run-file tag in benchmark_regimes: {label}_k{keep}_s{seed}[_eqsteps], the label made file-safe;
# SUBSET_RUN reads the whole file name back (compare_heldout.py).
SUBSET_RUN = re.compile(r"(?P<label>.+?)_k(?P<keep>\d\.\d\d)_s(?P<seed>\d+)(?P<eq>_eqsteps)?_t(?P<shuffle>\d+)"
                        r"\.[0-9a-f]+\.json")


def subset_tag(label: str, keep: float, seed: int, equal_steps: bool) -> str:
    return f"{label.replace(': ', '-').replace(' ', '_')}_k{keep:.2f}_s{seed}{'_eqsteps' if equal_steps else ''}"


def run_file(workdir: Path, tag: str, train_seed: int | None, run_key: str) -> Path:
    """The run file of subset `tag` trained with shuffle `train_seed` (None: the untrained model) under `run_key`;
    benchmark_quality.py and benchmark_bound.py on one workdir share the files of the subsets both train."""
    return workdir / "runs" / f"{tag}{'' if train_seed is None else f'_t{train_seed}'}.{run_key}.json"


def train_and_evaluate(trainer: TopTrainer, caches: dict[str, HiddenCache], rows: np.ndarray | None,
                       train_seed: int | None) -> dict[str, Any]:
    """One run file's content: train on `rows` with one shuffle seed (None: the untrained model), then evaluate."""
    one: dict[str, Any] = {"train_seed": train_seed}
    if rows is None:
        trainer.reset()
    else:
        tr = trainer.train(caches["train"], rows, train_seed)
        one.update({"train_wall_s": tr["train_s"], "steps": tr["steps"], "train_loss_first": tr["train_loss_first"],
                    "train_loss_last_epoch": tr["train_loss_last_epoch"]})
    one.update(trainer.evaluate(caches["heldout"]))
    return one


def write_run(path: Path, one: dict[str, Any]) -> None:
    # Atomic: parallel workers and the main process read run files as the record of finished runs.
    with atomic_path(str(path)) as tmp:
        Path(tmp).write_text(json.dumps(one, indent=2) + "\n")


def load_split_proxy(train_blocks: int) -> tuple[ModelRef, Any, SplitProxy, int]:
    """The default proxy in float32 on the CPU, split above its top `train_blocks` blocks: (ref, tokenizer,
    split, pad id)."""
    ref = resolve_model(DEFAULT_PROXY_MODEL)
    tokenizer, model = load_causal_lm(ref, torch.device("cpu"), torch.float32)
    return ref, tokenizer, SplitProxy(model, train_blocks), pad_token(tokenizer)


def load_trainer(args: argparse.Namespace, workdir: Path) -> tuple[TopTrainer, dict[str, HiddenCache]]:
    """The proxy split for training and the (already built) prefix caches of `workdir`."""
    _, _, split, pad_id = load_split_proxy(args.train_blocks)
    caches = {key: HiddenCache(workdir / f"prefix_{key}") for key in ("train", "heldout")}
    return TopTrainer(split, pad_id, args), caches


# A pool process builds its trainer once (model load ~10 s) and reuses it for every run it is handed.
_POOL_TRAINER: dict[str, Any] = {}


def _pool_init(args: argparse.Namespace, workdir: Path) -> None:
    torch.set_num_threads(args.threads)
    _POOL_TRAINER["trainer"], _POOL_TRAINER["caches"] = load_trainer(args, workdir)


def _pool_run(run_path: Path, rows: np.ndarray | None, train_seed: int | None) -> dict[str, Any]:
    one = train_and_evaluate(_POOL_TRAINER["trainer"], _POOL_TRAINER["caches"], rows, train_seed)
    write_run(run_path, one)
    return one


def run_in_parallel(pending: list[tuple[Path, np.ndarray | None, int | None]], args: argparse.Namespace,
                    workdir: Path) -> None:
    """Train the pending runs in `args.jobs` processes; each writes its run file, which the report then reads."""
    # Largest subsets first, so the last process to finish is not left alone with a full-data run.
    pending = sorted(pending, key=lambda p: -1 if p[1] is None else -len(p[1]))
    with ProcessPoolExecutor(max_workers=min(args.jobs, len(pending)), mp_context=get_context("spawn"),
                             initializer=_pool_init, initargs=(args, workdir)) as pool:
        futures = {pool.submit(_pool_run, *p): p[0] for p in pending}
        for i, future in enumerate(as_completed(futures)):
            one = future.result()
            took = f" (trained {one['train_wall_s']} s)" if "train_wall_s" in one else ""
            log(f"  run file {i + 1}/{len(pending)} {futures[future].name}: held-out mean {one['mean']:.4f}{took}")
