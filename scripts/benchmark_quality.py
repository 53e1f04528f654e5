"""Held-out quality of coresets: does training on the kept rows work as well as training on all of them?

Issue 4 / METHOD.md ("How to know it works"): fine-tune one model per subset with the same recipe and the same
number of epochs, and compare held-out response-token loss per domain and averaged over domains, with random
subsets of the same size over several seeds as the floor and the full data as the target.

The protocol, cheap enough for a 2-core CPU (a full fine-tune of the 135M proxy costs ~1 s per row and epoch):

- Data: a seeded train file (general + code rows of /work/shared/data in their natural ~71/29 ratio) and a
  disjoint held-out file with the same number of rows per domain; exact duplicates are dropped first, rows with an
  empty output are skipped; every row carries a `domain` field (`general` / `code`).
- Selections: `slap embed` and `slap stratify` once on the train file, then `slap select --method M --keep R
  --seed S` per subset (stratify reused; `--keep` re-budgets), each timed as a whole subprocess. Methods: full
  data; `random` at every keep over several seeds; every other method of `slap select --help` at every keep.
  Artifacts and their timings stay on disk, so an interrupted benchmark resumes where it stopped.
- Training: SmolLM2-135M-Instruct (the default proxy) with its bottom blocks frozen. The hidden states entering
  the top `--train-blocks` blocks are computed once per row (train and held-out) and cached on disk (float16
  memmap + index). Each subset then restarts the top blocks from the pretrained weights and trains only them
  (embeddings, final norm and LM head frozen; logits only at response positions) with one fixed recipe: AdamW
  (no weight decay), constant learning rate (`--schedule cosine` decays it), batch 8, the same number of
  epochs, rows shuffled; each subset is trained with several shuffle seeds (`--train-seeds`, 3) and scored by
  their mean, because the order alone moves one subset's held-out loss by up to ~0.01.
- Evaluation: mean response-token loss of each held-out row (the tool's row loss), averaged per domain; the
  headline is the mean over domains. The untrained model is evaluated too, for scale.

Usage (from the repository root):

    .venv/bin/python scripts/benchmark_quality.py --jobs 2 --threads 1   # outputs in work/quality/
    .venv/bin/python scripts/benchmark_quality.py --train-rows 40 --heldout-per-domain 8 \\
        --methods random,stratified --keeps 0.5,0.8 --random-seeds 2 --workdir work/quality/tiny --no-docs

Outputs: `<workdir>/results.json` (every run) and, unless `--no-docs`, docs/RESULTS_clean300.md and
docs/results_clean300_quality.png (needs matplotlib: `pip install -e '.[bench]'`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import re
import shlex
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from slapcli.errors import SlapError
from slapcli.io.readers import ReadStats, SourceReader, iter_examples, record_value
from slapcli.io.writers import atomic_path
from slapcli.models import DEFAULT_PROXY_MODEL, ModelRef, ensure_gguf_converted, load_causal_lm, resolve_model
from slapcli.proxy import (
    EncodedExample,
    SplitProxy,
    collate,
    encode_examples,
    length_sorted_batches,
    response_losses,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_cost import machine_info  # one description of the machine for every benchmark

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path("/work/shared/data")
DOMAIN_FILES = {"general": "alpaca_5000.jsonl", "code": "code_alpaca_2k.jsonl"}
PREFIX_BATCH = 16  # rows per frozen-bottom forward when filling the cache
EVAL_BATCH = 16
# The methods issue 4 asks for, in the order of the report; anything else `slap select` offers is appended.
EXPECTED_METHODS = ["slap", "embedding", "stratified", "ccs", "kcenter", "loss", "ifd"]


def log(msg: str) -> None:
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


# ---------------------------------------------------------------------------------------------- data


def _usable_rows(path: Path) -> list[dict[str, str]]:
    """Rows with a non-blank output (`slap embed` stops on the others), exact duplicates dropped."""
    seen: set[tuple[str, str, str]] = set()
    rows = []
    with path.open("rb") as f:
        for line in f:
            if not line.strip():
                continue
            obj = json.loads(line)
            key = (obj.get("instruction", ""), obj.get("input", ""), obj.get("output", ""))
            if not key[2].strip() or key in seen:
                continue
            seen.add(key)
            rows.append({"instruction": key[0], "input": key[1], "output": key[2]})
    return rows


def build_data(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """train.jsonl and heldout.jsonl in `workdir`, disjoint: from the user's `--train` (and `--heldout`) files,
    else from ../shared/data (natural domain mix unless --code-share, equal held-out rows per domain)."""
    if args.train is not None:
        train, heldout, info = user_data(args)
    else:
        train, heldout, info = shared_data(args)
    train_path, heldout_path = workdir / "train.jsonl", workdir / "heldout.jsonl"
    info = {"train": str(train_path), "heldout": str(heldout_path), "train_rows": len(train),
            "heldout_rows": len(heldout), **info}
    new = {p: b"".join(json.dumps(r, ensure_ascii=False, default=str).encode() + b"\n" for r in rows)
           for p, rows in ((train_path, train), (heldout_path, heldout))}
    if any(p.exists() and p.read_bytes() != b for p, b in new.items()):
        # Other data than the cached artifacts were made from: start the whole workdir over.
        raise SystemExit(f"{workdir} holds data built with other settings; use another --workdir or remove it")
    for p, b in new.items():
        if not p.exists():
            p.write_bytes(b)
    (workdir / "data.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def shared_data(args: argparse.Namespace) -> tuple[list[dict], list[dict], dict[str, Any]]:
    pools = {d: _usable_rows(SHARED_DATA / f) for d, f in DOMAIN_FILES.items()}
    total = sum(len(p) for p in pools.values())
    share = args.code_share if args.code_share is not None else len(pools["code"]) / total
    train_rows = 300 if args.train_rows is None else args.train_rows
    per_domain = 60 if args.heldout_per_domain is None else args.heldout_per_domain
    n_train = {"code": round(train_rows * share)}
    n_train["general"] = train_rows - n_train["code"]
    rng = random.Random(args.data_seed)
    train, heldout = [], []
    for domain, pool in pools.items():
        need = n_train[domain] + per_domain
        if need > len(pool):
            raise SystemExit(f"{domain}: {need} rows wanted, {len(pool)} usable in {DOMAIN_FILES[domain]}")
        picked = rng.sample(pool, need)
        heldout += [{**r, "domain": domain} for r in picked[:per_domain]]
        train += [{**r, "domain": domain} for r in picked[per_domain:]]
    rng.shuffle(train)
    return train, heldout, {
        "kind": "shared", "train_per_domain": n_train, "heldout_per_domain": per_domain, "code_share": share,
        "seed": args.data_seed, "sources": [str(SHARED_DATA / f) for f in DOMAIN_FILES.values()],
        "usable_rows": {d: len(p) for d, p in pools.items()}}


def read_user_rows(path: Path, domain_field: str, on_bad_line: str) -> tuple[list[dict[str, Any]], list[tuple],
                                                                            dict[str, int]]:
    """Records of a data file in any container and layout `slap` reads, each with a `domain` (the value of
    `domain_field`, "all" where it is missing), and the rows' contents (to tell duplicates and leaks apart).

    A row `slap` cannot use (malformed, or with no response) stops the benchmark with slap's own error, naming
    the file, line and field, unless `on_bad_line` is "skip". Exact repeats of an earlier row are dropped:
    stratify would drop them anyway, and a random subset should not spend its budget on them."""
    rows: list[dict[str, Any]] = []
    contents: list[tuple] = []
    seen: set[tuple] = set()
    stats = ReadStats()
    duplicates = 0
    try:
        with SourceReader(str(path)) as reader:
            for parsed in iter_examples(reader, on_bad_line=on_bad_line, stats=stats):
                content = tuple((t.role, t.text) for t in parsed.example.turns)
                if content in seen:
                    duplicates += 1
                    continue
                seen.add(content)
                value = dict(record_value(parsed.record))
                domain = value.get(domain_field)
                rows.append({**value, "domain": "all" if domain is None else str(domain)})
                contents.append(content)
    except SlapError as e:
        hint = "" if on_bad_line == "skip" else " (--on-bad-line skip drops such rows and counts them)"
        raise SystemExit(f"error: {e}{hint}") from None
    for example in stats.bad_examples:
        log(f"skipped: {example}")
    return rows, contents, {"bad_row": stats.bad_skipped, "duplicate": duplicates}


def by_domain(rows: list[dict[str, Any]]) -> dict[str, int]:
    return dict(sorted(Counter(r["domain"] for r in rows).items()))


def user_data(args: argparse.Namespace) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """--train FILE [--heldout FILE]: without a held-out file, `--heldout-per-domain` rows (60) of each domain
    are split off the training file. `--train-rows`, when given, samples that many training rows (seeded)."""
    rng = random.Random(args.data_seed)
    rows, contents, dropped = read_user_rows(args.train, args.domain_field, args.on_bad_line)
    info: dict[str, Any] = {"kind": "user", "seed": args.data_seed, "domain_field": args.domain_field,
                            "sources": [str(args.train)], "dropped": {"train": dropped}}
    if args.heldout is not None:
        heldout, held_contents, info["dropped"]["heldout"] = read_user_rows(args.heldout, args.domain_field,
                                                                            args.on_bad_line)
        info["sources"].append(str(args.heldout))
        if args.heldout_per_domain is not None:
            heldout = [r for d in by_domain(heldout) for r in
                       capped(rng, [r for r in heldout if r["domain"] == d], args.heldout_per_domain)]
        # A held-out row that is also a training row would reward the methods that keep it.
        leaked = set(held_contents)
        keep = [c not in leaked for c in contents]
        info["dropped"]["train"]["in_heldout"] = keep.count(False)
        pool = [r for r, k in zip(rows, keep, strict=True) if k]
    else:
        per_domain = 60 if args.heldout_per_domain is None else args.heldout_per_domain
        heldout, pool = [], []
        for d in by_domain(rows):
            mine = [r for r in rows if r["domain"] == d]
            if len(mine) <= per_domain:
                raise SystemExit(f"{args.train}: domain {d!r} has {len(mine)} usable rows, not more than the "
                                 f"{per_domain} held-out rows asked for (--heldout-per-domain)")
            rng.shuffle(mine)
            heldout += mine[:per_domain]
            pool += mine[per_domain:]
        rng.shuffle(pool)
        info["heldout_per_domain"] = per_domain
    if args.train_rows is not None:
        if args.train_rows > len(pool):
            raise SystemExit(f"{args.train}: --train-rows {args.train_rows} but only {len(pool)} usable training rows")
        pool = rng.sample(pool, args.train_rows)
    if not pool or not heldout:
        raise SystemExit(f"{args.train}: no training rows left" if not pool else "no held-out rows")
    info.update({"train_per_domain": by_domain(pool), "heldout_by_domain": by_domain(heldout)})
    return pool, heldout, info


def capped(rng: random.Random, rows: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    return rows if len(rows) <= n else rng.sample(rows, n)


def parse_variant(text: str) -> tuple[str, str, list[str], list[float] | None]:
    """'LABEL[@KEEPS]=METHOD --opt value ...' -> (LABEL, METHOD, ['--opt', 'value', ...], KEEPS or None).

    KEEPS (comma list) overrides --variant-keeps for this variant alone."""
    head, sep, rest = text.partition("=")
    label, at, keeps_text = head.partition("@")
    words = shlex.split(rest)
    if not sep or not label.strip() or not words or not re.fullmatch(r"[A-Za-z0-9.+-]+", label.strip()):
        raise SystemExit(f"--variant {text!r}: expected LABEL[@KEEPS]=METHOD [OPTIONS], LABEL of letters, digits, "
                         ". + -")
    try:
        keeps = floats(keeps_text) if at else None
    except (ValueError, argparse.ArgumentTypeError) as e:
        raise SystemExit(f"--variant {text!r}: KEEPS must be a comma list of ratios ({e})") from e
    return label.strip(), words[0], words[1:], keeps


def read_rows(path: Path) -> tuple[list[Any], list[str]]:
    """Parsed examples (as slapcli reads them) and each row's domain."""
    with SourceReader(str(path)) as reader:
        examples = [p.example for p in iter_examples(reader)]
    with path.open() as f:
        domains = [json.loads(line).get("domain", "all") for line in f if line.strip()]
    if len(domains) != len(examples):
        raise SystemExit(f"{path}: {len(examples)} rows parsed but {len(domains)} lines")
    return examples, domains


# ---------------------------------------------------------------------------------------------- machine


def git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def slap_executable() -> str:
    beside = Path(sys.executable).parent / "slap"
    return str(beside) if beside.exists() else "slap"


def run_slap(args: list[str], log_path: Path) -> dict[str, Any]:
    """Wall and CPU seconds of one whole `slap` subprocess (start, imports, model loading and I/O included)."""
    command = [slap_executable(), *args]
    load_before = os.getloadavg()[0]
    with log_path.open("wb") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"`{' '.join(command)}` exited with {code}:\n{tail}")
    return {"wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "load_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)], "command": command}


def available_methods() -> list[str]:
    """The methods `slap select --help` lists ("One of: a, b, c."), read at run time."""
    out = subprocess.run([slap_executable(), "select", "--help"], capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "300"}).stdout
    flat = " ".join(re.sub(r"[│╭╮╰╯─]", " ", out).split())
    m = re.search(r"One of: (.*?)\.", flat)
    if not m:
        raise SystemExit("cannot read the method list from `slap select --help`")
    return [x.strip() for x in m.group(1).split(",") if x.strip()]


def cached_stage(name: str, args: list[str], output: Path, workdir: Path) -> dict[str, Any]:
    """Run a stage unless its output and timing record exist (a complete output is renamed into place)."""
    record = output.with_name(output.name + ".timing.json")
    if output.exists() and record.exists():
        t = json.loads(record.read_text())
        if "slapcli" not in t:  # a record from before versions were kept: the last commit before the stage started
            started = int(output.stat().st_mtime - t["wall_s"])
            t["slapcli"] = git("log", "-1", f"--before=@{started}", "--format=%h", "--", "slapcli") + "(by start time)"
        return {**t, "cached": True}
    force = ["--force"] if output.exists() else []
    version = slapcli_version()  # the code the subprocess imports is the code there when it starts
    t = run_slap([*args, *force], workdir / "logs" / f"{name}.stderr.txt")
    t.update(finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), slapcli=version)
    record.write_text(json.dumps(t, indent=2) + "\n")
    return {**t, "cached": False}


def slapcli_version() -> str:
    """The last commit touching slapcli/, plus "+dirty" when slapcli/ has uncommitted changes."""
    dirty = "+dirty" if git("status", "--short", "--", "slapcli") else ""
    return git("log", "-1", "--format=%h", "--", "slapcli") + dirty


def kept_rows(selection: Path) -> np.ndarray:
    table = pq.read_table(selection, columns=["row", "kept"])
    rows, kept = table["row"].to_numpy(), table["kept"].to_numpy(zero_copy_only=False)
    return np.sort(rows[kept.astype(bool)]).astype(np.int64)


# ---------------------------------------------------------------------------------------------- prefix cache


class HiddenCache:
    """Hidden states entering the trainable blocks, one float16 [tokens, H] slab per row, in a disk memmap.

    index.npz holds, per row, its token offset and length, and the token ids and response mask (all rows
    concatenated), so a batch is rebuilt without the tokenizer.
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
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        tmp = folder / "hidden.f16.tmp"
        mm = np.memmap(tmp, dtype=np.float16, mode="w+", shape=(max(1, int(offsets[-1])), hidden_size))
        t0 = time.perf_counter()
        done = 0
        split.model.eval()
        with torch.inference_mode():
            for rows in length_sorted_batches(lengths.tolist(), PREFIX_BATCH):
                h = split.prefix(collate([encoded[i] for i in rows], pad_id))
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


def schedule_words(config: dict[str, Any]) -> str:
    """The learning-rate schedule of a results file's config, in words (configs before --schedule: constant)."""
    schedule, warmup = config.get("schedule", "constant"), config.get("warmup", 0.0)
    words = "constant rate" if schedule == "constant" else "cosine decay to zero"
    return words + (f" after a linear warmup over {warmup:.0%} of the steps" if warmup else "")


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
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return ref, tokenizer, SplitProxy(model, train_blocks), pad_id


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


# ---------------------------------------------------------------------------------------------- diagnostic


def gradient_alignment(trainer: TopTrainer, train: HiddenCache, heldout: HiddenCache, path: Path,
                       key: str) -> dict[str, np.ndarray]:
    """Per training row: cosine of its loss gradient (trainable blocks, pretrained weights) with the held-out one.

    The held-out gradient is that of the mean row loss over all held-out rows. This is what a first-order
    data-selection score aims at (`slap`'s first-order term uses a projected version of it against its own
    target sample): a row with a high cosine is one whose training step lowers the held-out loss at the start.
    Cached in `path` (npz) under `key`.
    """
    if path.exists():
        cached = np.load(path)
        if str(cached["key"]) == key:
            return {"cos": cached["cos"], "response_tokens": cached["response_tokens"],
                    "seconds": float(cached["seconds"])}
    trainer.reset()
    model, params = trainer.model, trainer.split.parameters
    model.train()

    def grad(cache: HiddenCache, rows: list[int]) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        batch, hidden = cache.batch(rows, trainer.pad_id)
        with trainer.split.top_only(hidden):
            response_losses(model, batch).sum().backward()
        return torch.cat([q.grad.flatten() for q in params])

    t0 = time.perf_counter()
    target = torch.zeros(sum(q.numel() for q in params))
    for start in range(0, len(heldout), EVAL_BATCH):
        target += grad(heldout, list(range(start, min(len(heldout), start + EVAL_BATCH))))
    target /= len(heldout)
    cos = np.zeros(len(train))
    for i in range(len(train)):
        g = grad(train, [i])
        cos[i] = float(g @ target) / max(1e-30, float(g.norm() * target.norm()))
    model.zero_grad(set_to_none=True)
    resp = response_token_counts(train)
    seconds = round(time.perf_counter() - t0, 1)
    np.savez(path, key=key, cos=cos, response_tokens=resp, seconds=seconds)
    log(f"gradient alignment of {len(train)} rows: {seconds:.0f} s")
    return {"cos": cos, "response_tokens": resp, "seconds": seconds}


PROBES = {
    "probe-align": "oracle: highest cosine of the row's gradient with the HELD-OUT gradient (pretrained weights)",
    "probe-hard": "highest proxy loss (stratify's loss column)",
    "probe-long": "most response tokens",
}


def probe_list(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in names if x not in PROBES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown probe(s) {', '.join(unknown)}; known: {', '.join(PROBES)}")
    return names


def response_token_counts(cache: HiddenCache) -> np.ndarray:
    return np.array([int(cache.mask[cache.offsets[i]:cache.offsets[i + 1]].sum()) for i in range(len(cache))])


def probe_subsets(strata: Path, selections: dict[str, dict[str, Any]], align: dict[str, np.ndarray],
                  seed: int, wanted: list[str]) -> list[dict[str, Any]]:
    """Subsets that keep, in every stratum, as many rows as `stratified` does, ranked by one per-row score.

    Not methods of the tool (probe-align reads the held-out set): they ask which per-row signal is worth
    anything under this protocol, with the strata and budgets held equal to `stratified`'s.
    """
    table = pq.read_table(strata, columns=["row", "stratum", "loss"])
    rows = table["row"].to_numpy()
    stratum = table["stratum"].to_numpy()
    loss = table["loss"].to_numpy(zero_copy_only=False).astype(np.float64)
    scores = {"probe-align": align["cos"][rows] if "cos" in align else None,
              "probe-hard": np.nan_to_num(loss, nan=-np.inf),
              "probe-long": align["response_tokens"][rows].astype(np.float64)}
    scores = {name: score for name, score in scores.items() if name in wanted}
    out = []
    for sel in selections.values():
        if sel["method"] != "stratified":
            continue
        kept = set(kept_rows(Path(sel["path"])).tolist())
        counts = np.bincount(stratum[[r in kept for r in rows.tolist()]], minlength=int(stratum.max()) + 1)
        for name, score in scores.items():
            picks = []
            for s, c in enumerate(counts.tolist()):
                members = np.flatnonzero(stratum == s)
                picks += rows[members[np.argsort(-score[members], kind="stable")[:c]]].tolist()
            out.append({"method": name, "keep": sel["keep"], "seed": seed, "wall_s": None, "cpu_s": None,
                        "rows": np.sort(np.array(picks, dtype=np.int64))})
    return out


def selection_diagnostics(align: dict[str, np.ndarray], selections: dict[str, dict[str, Any]],
                          first: int) -> dict[str, Any]:
    """Per selection: mean alignment and response length of the kept and the dropped rows, and of its first picks."""
    cos, resp = align["cos"], align["response_tokens"]
    out: dict[str, Any] = {
        "all_rows": {"cos_mean": float(cos.mean()), "response_tokens_mean": float(resp.mean()),
                     "corr_cos_log_response_tokens": float(np.corrcoef(cos, np.log(resp.clip(1)))[0, 1])},
        "first_picks": first, "seconds": float(align["seconds"]), "selections": {}}
    for name, sel in selections.items():
        table = pq.read_table(sel["path"], columns=["row", "kept", "order"])
        rows, kept = table["row"].to_numpy(), table["kept"].to_numpy(zero_copy_only=False).astype(bool)
        order = table["order"].to_numpy(zero_copy_only=False)
        picked = rows[kept][np.argsort(order[kept], kind="stable")][:first]
        out["selections"][name] = {
            "method": sel["method"], "keep": sel["keep"], "seed": sel["seed"],
            "kept_cos": float(cos[rows[kept]].mean()), "dropped_cos": float(cos[rows[~kept]].mean()),
            "kept_response_tokens": float(resp[rows[kept]].mean()),
            "first_picks_cos": float(cos[picked].mean()), "first_picks_response_tokens": float(resp[picked].mean())}
    return out


# ---------------------------------------------------------------------------------------------- report


def spread(values: list[float]) -> dict[str, float]:
    """Mean, sample sd (0 for one value), min, max and count of a list of losses."""
    v = np.array(values, dtype=np.float64)
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "min": float(v.min()),
            "max": float(v.max()), "n": len(v)}


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Per method x keep: mean loss (random: mean, sd, min, max over seeds) and comparisons with random/full."""
    runs = [r for r in results["runs"] if r.get("mean") is not None]
    full = next((r["mean"] for r in runs if r["method"] == "full"), None)
    table: dict[str, dict[str, Any]] = {}
    for r in runs:
        if r["method"] in ("full", "pretrained"):
            continue
        table.setdefault(r["method"], {}).setdefault(f"{r['keep']:.2f}", []).append(r["mean"])
    out: dict[str, Any] = {"full": full, "pretrained": next((r["mean"] for r in runs if r["method"] == "pretrained"),
                                                            None), "cells": {}}
    for method, by_keep in table.items():
        for keep, values in by_keep.items():
            out["cells"].setdefault(method, {})[keep] = spread(values)
    rnd = out["cells"].get("random", {})
    for method, by_keep in out["cells"].items():
        for keep, cell in by_keep.items():
            r = rnd.get(keep)
            if method != "random" and r:
                cell["vs_random"] = cell["mean"] - r["mean"]
                # "Better than random by more than the seeds' spread": below the best random seed.
                cell["beats_random_spread"] = cell["mean"] < r["min"]
            if full is not None:
                cell["vs_full"] = cell["mean"] - full
    return out


def write_plot(results: dict[str, Any], summary: dict[str, Any], path: Path) -> None:
    import matplotlib  # optional extra `bench`: imported only here

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    cells = summary["cells"]
    if "random" in cells:
        keeps = sorted(cells["random"], key=float)
        x = [float(k) for k in keeps]
        ax.fill_between(x, [cells["random"][k]["min"] for k in keeps], [cells["random"][k]["max"] for k in keeps],
                        color="0.7", alpha=0.5, label=f"random: min-max over {results['config']['random_seeds']} seeds")
        ax.plot(x, [cells["random"][k]["mean"] for k in keeps], color="0.3", lw=2, label="random (mean)")
    markers = "osD^vP*Xh"
    for j, method in enumerate(m for m in cells if m != "random"):
        keeps = sorted(cells[method], key=float)
        ax.plot([float(k) for k in keeps], [cells[method][k]["mean"] for k in keeps], marker=markers[j % 9],
                lw=2.5 if method == "slap" else 1.2, label=method)
    if summary["full"] is not None:
        ax.axhline(summary["full"], color="k", ls="--", lw=1, label="full data")
        ax.plot([1.0], [summary["full"]], "k*", ms=10)
    ax.set_xlabel("keep ratio")
    ax.set_ylabel("held-out response loss, mean over domains")
    c = results["config"]
    ax.set_title(f"Top-{c['train_blocks']}-block fine-tune of SmolLM2-135M on each subset, {c['epochs']} "
                 f"epoch{'s' if c['epochs'] != 1 else ''} (lower is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def at_keeps(keeps: list[str]) -> str:
    return f"keep {', '.join(keeps)}" if keeps else "no keep ratio"


def fmt(x: float | None, digits: int = 4) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def data_line(d: dict[str, Any]) -> str:
    """The report's description of its data: the shared mix, or the user's files and what was dropped from them."""
    train_mix = ", ".join(f"{v} {k}" for k, v in d["train_per_domain"].items())
    if d.get("kind") != "user":
        return (f"- **Data**: {d['train_rows']} training rows from `../shared/data` ({train_mix}: the natural mix), "
                f"and a disjoint held-out set of {d['heldout_per_domain']} rows per domain; seed {d['seed']}, exact "
                "duplicates and rows with an empty output dropped. Each row has a `domain` field.")
    held = ", ".join(f"{v} {k}" for k, v in d["heldout_by_domain"].items())
    if len(d["sources"]) > 1:
        source = (f"{d['train_rows']} training rows from `{d['sources'][0]}` ({train_mix}) and {d['heldout_rows']} "
                  f"held-out rows from `{d['sources'][1]}` ({held})")
    else:
        source = (f"{d['train_rows']} training rows from `{d['sources'][0]}` ({train_mix}) and a disjoint held-out "
                  f"set split off the same file, {d['heldout_per_domain']} rows per domain ({held})")
    what = {"bad_row": "rows slap cannot use (skipped under `--on-bad-line skip`)", "duplicate": "exact repeats",
            "in_heldout": "rows also in the held-out file"}
    dropped = "; ".join(f"from {name}, " + ", ".join(f"{v} {what.get(k, k)}" for k, v in counts.items() if v)
                        for name, counts in d["dropped"].items() if any(counts.values()))
    return (f"- **Data**: {source}; seed {d['seed']}; domains from the `{d['domain_field']}` field (`all` where "
            f"missing). Dropped before anything ran: {dropped or 'nothing'}.")


def write_markdown(results: dict[str, Any], summary: dict[str, Any], path: Path, plot: Path | None,
                   analysis: Path | None = None) -> None:
    c, m, d = results["config"], results["machine"], results["data"]
    cells, keeps = summary["cells"], [f"{k:.2f}" for k in c["keeps"]]
    methods = [x for x in ["random", *results["methods_run"], *results.get("variants", {}),
                           *results.get("probes", {})] if x in cells]
    domains = sorted({k for r in results["runs"] if r.get("heldout") for k in r["heldout"]})
    dirty = ", slapcli/ with uncommitted changes" if results["code"]["slapcli_changes"] else ""
    unseen = sorted(set(d.get("heldout_by_domain", {})) - set(d["train_per_domain"]))
    heldout_note = (f"- Held-out domains without training rows: {', '.join(unseen)}." if unseen else
                    "- The held-out domains are the training domains (no unseen domain).")
    lines = ["# Held-out quality of coresets", "",
             f"Written by `scripts/benchmark_quality.py` on {results['finished']} (commit "
             f"`{results['code']['commit'][:10]}`{dirty}). Every number below comes from `{rel(results['out'])}` "
             "of that run (git-ignored); rerun the command to reproduce it.", "",
             "## Protocol", "",
             data_line(d),
             f"- **Selections**: `slap embed --max-tokens {c['max_tokens']}` and `slap stratify` once on the training "
             "file; then one `slap select --method M --keep R --seed S` per subset (stratify's strata reused, `--keep` "
             "re-budgets; default knobs otherwise). Wall time = the whole `slap select` subprocess.",
             f"- **Runs**: full data; `random` at keep {', '.join(keeps)} over seeds 0-{c['random_seeds'] - 1}; "
             f"every other method at the same keeps with seed {c['seed']}.",
             f"- **Model**: SmolLM2-135M-Instruct (the default proxy). The bottom {results['model']['frozen_blocks']} "
             f"of {results['model']['blocks']} decoder blocks are frozen and their output is computed once per row "
             f"and cached (float16 memmap); each subset restarts the top {c['train_blocks']} blocks "
             f"({results['model']['trainable_parameters']:,} parameters) from the pretrained weights and trains only "
             "them; embeddings, final norm and LM head stay frozen.",
             f"- **Recipe** (identical for every subset): AdamW lr {c['lr']:g}, no weight decay, {schedule_words(c)}, "
             f"batch {c['batch_size']}, {c['epochs']} epoch(s) (so a smaller subset takes fewer steps), rows "
             + (f"shuffled; every subset trained once (shuffle seed {c['train_seed']}); response-token "
                if c['train_seeds'] == 1 else
                f"shuffled; every subset trained {c['train_seeds']} times (shuffle seeds {c['train_seed']}-"
                f"{c['train_seed'] + c['train_seeds'] - 1}) and its loss is the mean of those runs; response-token ")
             + f"loss, max {c['max_tokens']} tokens per row "
             "(ChatML, as the tool formats rows); "
             + ("training under bf16 autocast, evaluation in float32." if c.get("bf16") else "float32 throughout."),
             "- **Metric**: held-out response loss (per row the mean cross-entropy over its response tokens, then "
             "the mean over the domain's rows), per domain and the mean over domains. Lower is better.", "",
             "### Limits of this protocol", "",
             f"- Only the top {c['train_blocks']} blocks train: this measures how useful a subset is for adapting the "
             "top of a model, not for a full fine-tune; full fine-tunes can rank subsets differently.",
             "- The model trained is the same one `slap` uses as its proxy (and whose losses shaped the strata), "
             "the most favourable case for proxy-based selection; a larger target model is untested here.",
             f"- Small scale: {d['train_rows']} training rows, {c['epochs']} epoch(s), "
             f"{d['heldout_rows']} held-out rows. The shuffle order alone moves one subset's loss by up "
             + ("to ~0.01 (hence several training seeds per subset); random's spread over subsets is the yardstick."
                if c['train_seeds'] > 1 else
                "to ~0.01 and each subset trained once here, so random's spread holds both the subsets' and the "
                "shuffles' noise, and a method's single run carries its own shuffle noise too."),
             "- Same epochs for every subset means fewer optimizer steps for smaller subsets, as in practice; "
             "keep-ratio curves mix the value of the rows with the number of steps.",
             heldout_note, "",
             "## Machine", "",
             f"{m['nproc']} cores ({m['cpu_model']}), {m['memory_gib']} GiB, no GPU; torch {m['torch']} with "
             f"{c['threads']} threads for training, transformers {m['transformers']}, Python {m['python']}. The "
             f"machine was shared with other work: load average {results['load_average_start'][0]:.2f} at start, "
             f"{results['load_average_end'][0]:.2f} at the end, so wall times are indicative.", "",
             "## Commands", "", "```sh", results["command"], "```", "",
             "which ran, per stage (paths relative to the repository root):", "", "```sh"]
    for key in ("embed", "stratify"):
        lines.append(" ".join(results["stages"][key]["command_rel"]))
    for method in ["random", *results["methods_run"], *results.get("variants", {})]:
        sel = next((s for s in results["selections"].values() if s["method"] == method), None)
        if sel:
            lines.append(" ".join(sel["command_rel"]))
    lines += ["```", "", "## Results", "",
              f"Mean held-out loss over domains ({' and '.join(domains)}). Random: mean ± sd over seeds "
              "[min, max]. **Bold**: below random's minimum at that keep (better than random by more than the seeds' "
              "spread).", "",
              "| method | " + " | ".join(f"keep {k}" for k in keeps) + " |",
              "| --- | " + " | ".join("---:" for _ in keeps) + " |"]
    for method in methods:
        row = []
        for k in keeps:
            cell = cells[method].get(k)
            if cell is None:
                row.append("")
            elif method == "random":
                row.append(f"{cell['mean']:.4f} ± {cell['sd']:.4f} [{cell['min']:.4f}, {cell['max']:.4f}]")
            else:
                text = f"{cell['mean']:.4f}"
                row.append(f"**{text}**" if cell.get("beats_random_spread") else text)
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    lines += [f"| full data (keep 1.00) | {fmt(summary['full'])} |" + " |" * (len(keeps) - 1),
              f"| untrained model | {fmt(summary['pretrained'])} |" + " |" * (len(keeps) - 1), ""]
    legend = [f"- `{label}`: `slap select --method {v['method']} {' '.join(v['options'])}`"
              for label, v in results.get("variants", {}).items() if label in cells]
    legend += [f"- `{label}` (probe, not a method): per stratum as many rows as `stratified` keeps, the ones with "
               f"the {text.split(': ', 1)[-1]}" + (" (reads the held-out set: an oracle)" if "oracle" in text else "")
               for label, text in results.get("probes", {}).items() if label in cells]
    if legend:
        lines += ["Variants (ablations) and probes in the table:", "", *legend, ""]
    if plot is not None:
        lines += [f"![held-out loss vs keep ratio]({plot.name})", ""]

    if "random" in cells:
        lines += ["Difference from random's mean at the same keep (negative = better than random), with random's "
                  "sd over seeds for scale, and from full data:", "",
                  "| method | " + " | ".join(f"keep {k}: vs random | vs full" for k in keeps) + " |",
                  "| --- | " + " | ".join("---: | ---:" for _ in keeps) + " |"]
        lines.append("| random: its sd, its mean vs full | " + " | ".join(
            f"{cells['random'][k]['sd']:.4f} | " + (f"{cells['random'][k]['vs_full']:+.4f}" if "vs_full" in
                                                     cells["random"][k] else "")
            if k in cells["random"] else " | " for k in keeps) + " |")
        for method in [x for x in methods if x != "random"]:
            lines.append(f"| {method} | " + " | ".join(
                (f"{cells[method][k]['vs_random']:+.4f}" if "vs_random" in cells[method].get(k, {}) else "")
                + " | " + (f"{cells[method][k]['vs_full']:+.4f}" if "vs_full" in cells[method].get(k, {}) else "")
                for k in keeps) + " |")
        lines.append("")

    # Generated observations: only comparisons computed from the table above.
    lines += ["### What the numbers say", ""]
    full = summary["full"]
    for method in [x for x in methods if x != "random"]:
        beats = [k for k in keeps if cells[method].get(k, {}).get("beats_random_spread")]
        worse = [k for k in keeps if k in cells[method] and k in cells.get("random", {})
                 and cells[method][k]["mean"] > cells["random"][k]["max"]]
        le_full = [k for k in keeps if k in cells[method] and full is not None and cells[method][k]["mean"] <= full]
        lines.append(f"- `{method}`: below random's spread at {at_keeps(beats)}; above it (worse than every random "
                     f"seed) at {at_keeps(worse)}; no worse than full data at {at_keeps(le_full)}.")
    if "slap" in cells and "random" in cells:
        target = [k for k in ("0.60", "0.70") if k in cells["slap"]]
        ok = [k for k in target if cells["slap"][k].get("beats_random_spread")
              and full is not None and cells["slap"][k]["mean"] <= full]
        lines += ["", f"Issue 4's bar (slap at keep 0.6-0.7 no worse than full data and below random's spread): "
                      f"{'met at keep ' + ', '.join(ok) if ok else 'not met'} in this run."]
    if "random" in cells and full is not None:
        rb = [k for k in keeps if k in cells["random"] and cells["random"][k]["mean"] <= full]
        lines.append(f"Random subsets reach full data's loss on average at {at_keeps(rb)}.")
    lines.append("")

    diag = results.get("diagnostics")
    if diag:
        a = diag["all_rows"]
        lines += ["### Diagnostic: which rows each method keeps", "",
                  "Per training row, the cosine between its loss gradient and the held-out loss gradient (both over "
                  "the trainable blocks, at the pretrained weights): the quantity a first-order selection score "
                  "estimates (a high cosine = a step on that row lowers held-out loss at the start). Cells: mean "
                  f"cosine of the kept rows / their mean response tokens; last column: the first {diag['first_picks']} "
                  "rows in the method's selection order at the lowest keep (cosine / response tokens). "
                  f"All {d['train_rows']} rows: cosine {a['cos_mean']:.3f}, {a['response_tokens_mean']:.1f} response "
                  f"tokens; correlation of the cosine with log response tokens: "
                  f"{a['corr_cos_log_response_tokens']:+.2f}.", "",
                  "| method | " + " | ".join(f"keep {k}" for k in keeps) + " | first picks |",
                  "| --- | " + " | ".join("---:" for _ in keeps) + " | ---: |"]
        for method in methods:
            row = []
            for k in keeps:
                sel = [x for x in diag["selections"].values() if x["method"] == method and f"{x['keep']:.2f}" == k]
                row.append(f"{np.mean([x['kept_cos'] for x in sel]):.3f} / "
                           f"{np.mean([x['kept_response_tokens'] for x in sel]):.0f}" if sel else "")
            low = sorted((x for x in diag["selections"].values() if x["method"] == method),
                         key=lambda x: (x["keep"], x["seed"]))
            first = f"{low[0]['first_picks_cos']:.3f} / {low[0]['first_picks_response_tokens']:.0f}" if low else ""
            lines.append(f"| {method} | " + " | ".join(row) + f" | {first} |")
        lines.append("")

    if analysis is not None and analysis.exists():
        lines += [f"## Reading of these results (hand-written, kept in `{rel(str(analysis))}`)", "",
                  analysis.read_text().strip(), ""]
    lines += ["### Per domain", "", "| method | keep | seed | kept rows | kept response tokens | "
              + " | ".join(domains) + " | mean | select wall s | train wall s |", "| --- | ---: | ---: | ---: | ---: | "
              + " | ".join("---:" for _ in domains) + " | ---: | ---: | ---: |"]
    for r in results["runs"]:
        if r.get("mean") is None:
            continue
        keep = "" if r["keep"] is None else f"{r['keep']:.2f}"
        lines.append(f"| {r['method']} | {keep} | {'' if r['seed'] is None else r['seed']} | {r['kept_rows']} | "
                     f"{r.get('kept_response_tokens', '')} | "
                     + " | ".join(fmt(r["heldout"].get(dm)) for dm in domains)
                     + f" | {fmt(r['mean'])} | {fmt(r.get('select_wall_s'), 1)} | {fmt(r.get('train_wall_s'), 1)} |")
    lines += ["", "## Wall times", "",
              "Each `slap` stage is a whole subprocess (start, imports, model loading included); load = the machine's "
              "1-minute load average when it started (2 cores: above 2 means it shared the CPU with other work).", "",
              "| stage | wall s | CPU s |", "| --- | ---: | ---: |"]
    for key in ("embed", "stratify"):
        s = results["stages"][key]
        lines.append(f"| slap {key} (load {s['load_1m'][0]:.1f}) | {s['wall_s']:.1f} | {s['cpu_s']:.1f} |")
    for method in ["random", *results["methods_run"], *results.get("variants", {})]:
        sels = [s for s in results["selections"].values() if s["method"] == method]
        if sels:
            walls = [s["wall_s"] for s in sels]
            cpus = [s["cpu_s"] for s in sels]
            load = np.mean([s["load_1m"][0] for s in sels])
            v = results.get("variants", {}).get(method)
            what = f"{v['method']} {' '.join(v['options'])} (`{method}`)" if v else method
            lines.append(f"| slap select --method {what} ({len(sels)} runs: mean, [min, max]; load {load:.1f}) | "
                         f"{np.mean(walls):.1f} [{min(walls):.1f}, {max(walls):.1f}] | {np.mean(cpus):.1f} |")
    for key, label in (("train", "prefix cache, training rows"), ("heldout", "prefix cache, held-out rows")):
        s = results["prefix_cache"][key]
        lines.append(f"| {label} ({s['rows']} rows, {s['tokens']:,} tokens, {s['mib']} MiB) | {s['seconds']:.1f} | |")
    trained = [r for r in results["runs"] if r.get("train_wall_s")]
    if trained:
        per_row = sum(r["train_wall_s"] for r in trained) / sum(r["kept_rows"] * c["epochs"] for r in trained)
        lines.append(f"| training, all {len(trained)} runs ({1000 * per_row:.0f} ms per row and epoch) | "
                     f"{sum(r['train_wall_s'] for r in trained):.1f} | |")
        eval_s = sum(r["eval_s"] for r in results["runs"] if r.get("eval_s"))
        lines.append(f"| held-out evaluation, all {len(results['runs'])} runs | {eval_s:.1f} | |")
    parts = (sum(results["stages"][k]["wall_s"] for k in ("embed", "stratify"))
             + sum(s["wall_s"] for s in results["selections"].values())
             + sum(s["seconds"] for s in results["prefix_cache"].values())
             + sum((r.get("train_wall_s") or 0) + (r.get("eval_s") or 0) for r in results["runs"]))
    if diag:
        lines.append(f"| diagnostic: gradient alignment of every training row | {diag['seconds']:.1f} | |")
        parts += diag["seconds"]
    lines.append(f"| everything above (including steps cached by an earlier, interrupted invocation) | {parts:.1f} | |")
    lines.append(f"| the last invocation (cached steps only loaded) | {results['wall_s']:.1f} | |")
    if results["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in results["notes"]]
    path.write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("work/quality"), help="data, artifacts, caches, results")
    p.add_argument("--train", type=Path, default=None, metavar="FILE",
                   help="your training data (any container and layout slap reads); default: the shared mix")
    p.add_argument("--heldout", type=Path, default=None, metavar="FILE",
                   help="your held-out data; default: split off --train, --heldout-per-domain rows per domain")
    p.add_argument("--domain-field", default="domain",
                   help="field of --train/--heldout rows naming their domain (rows without it: domain 'all')")
    p.add_argument("--on-bad-line", choices=["error", "skip"], default="error",
                   help="a --train/--heldout row slap cannot use (malformed, no response): stop, or skip and count it")
    p.add_argument("--train-rows", type=int, default=None,
                   help="training rows (default: 300 of the shared mix, all rows of --train)")
    p.add_argument("--heldout-per-domain", type=int, default=None,
                   help="held-out rows per domain (default: 60; all rows of a --heldout file)")
    p.add_argument("--code-share", type=float, default=None,
                   help="share of code rows in the training file (default: as in the shared files, ~29%%)")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--keeps", type=floats, default=[0.5, 0.6, 0.7, 0.8])
    p.add_argument("--methods", default="all",
                   help="comma-separated `slap select` methods besides random (default: every one it offers)")
    p.add_argument("--variant", action="append", default=[], metavar="LABEL[@KEEPS]=METHOD [OPTIONS]",
                   help="also run METHOD with extra `slap select` OPTIONS, reported as LABEL (an ablation row), at "
                        "KEEPS (default --variant-keeps), e.g. --variant 'slap-raw@0.6,0.7=slap --feature-norm raw'; "
                        "repeatable")
    p.add_argument("--variant-keeps", type=floats, default=None, help="keep ratios of the variants (default: --keeps)")
    p.add_argument("--random-seeds", type=int, default=3, help="random subsets per keep (seeds 0..N-1)")
    p.add_argument("--seed", type=int, default=0, help="seed of stratify and of the non-random selections")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens per row, for the proxy and the training")
    p.add_argument("--train-blocks", type=int, default=2, help="top decoder blocks that train")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--schedule", choices=["constant", "cosine"], default="constant",
                   help="learning-rate schedule of the training runs (cosine decays to zero at the last step)")
    p.add_argument("--warmup", type=float, default=0.0, help="share of the steps with a linear learning-rate warmup")
    p.add_argument("--train-seed", type=int, default=0, help="first shuffle seed of the training runs")
    p.add_argument("--train-seeds", type=int, default=3,
                   help="training runs per subset (shuffle seeds train-seed, train-seed+1, ...); a subset's loss is "
                        "their mean")
    p.add_argument("--bf16", action="store_true",
                   help="train under bf16 autocast (~1.5x faster on CPUs with avx512_bf16, ~20x SLOWER on CPUs "
                        "without it, e.g. the AMD EPYC of docs/RESULTS.md; evaluation stays float32)")
    p.add_argument("--threads", type=int, default=2, help="torch threads for caching, training and evaluation")
    p.add_argument("--jobs", type=int, default=1,
                   help="training runs at once, each in its own process of --threads threads (the report used "
                        "--jobs 2 --threads 1 on 2 cores)")
    p.add_argument("--no-full", action="store_true", help="skip the full-data run")
    p.add_argument("--probes", nargs="?", const=",".join(PROBES), default="", type=probe_list,
                   help="also train on per-row-score probes (stratified's per-stratum counts, top rows by held-out "
                        "gradient alignment, proxy loss or response length): which signal is worth anything; "
                        f"alone: all of them, or a comma list of {', '.join(PROBES)} (probe-align alone needs the "
                        "alignment pass)")
    p.add_argument("--no-diagnose", action="store_true",
                   help="skip the diagnostic (per-row gradient alignment with the held-out gradient; one backward "
                        "pass per training row)")
    p.add_argument("--first-picks", type=int, default=40, help="rows counted as a method's first picks")
    p.add_argument("--out", type=Path, default=None, help="results JSON (default: <workdir>/results.json)")
    p.add_argument("--no-docs", action="store_true", help="do not write the report and its plot")
    p.add_argument("--docs", type=Path, default=None,
                   help="the report (default: docs/RESULTS_clean300.md for the shared mix, "
                        "<workdir>/RESULTS.md for --train)")
    p.add_argument("--analysis", type=Path, default=None,
                   help="hand-written reading of the results, copied into the report when the file exists "
                        "(default: docs/results_analysis.md for the shared mix, none for --train)")
    args = p.parse_args(argv)
    if args.train is None and (args.heldout is not None or args.domain_field != "domain"
                               or args.on_bad_line != "error"):
        p.error("--heldout, --domain-field and --on-bad-line need --train")
    if args.train is not None and args.code_share is not None:
        p.error("--code-share applies to the shared mix only, not to --train")
    # A report on other data must not overwrite the shared mix's report, nor borrow its hand-written reading.
    if args.docs is None:
        args.docs = ROOT / "docs" / "RESULTS_clean300.md" if args.train is None else args.workdir / "RESULTS.md"
    if args.analysis is None and args.train is None:
        args.analysis = ROOT / "docs" / "results_analysis.md"
    return args


def rel(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    workdir = args.workdir.resolve()
    for sub in ("logs", "selections", "runs"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": shlex.join([".venv/bin/python", "scripts/benchmark_quality.py", *(argv or sys.argv[1:])]),
        "code": {"commit": git("rev-parse", "HEAD"), "slapcli_changes": git("status", "--short", "--", "slapcli")},
        "machine": machine_info(), "load_average_start": os.getloadavg(), "notes": [],
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    out_path = args.out or workdir / "results.json"

    # 1. data
    data = build_data(args, workdir)
    results["data"] = data
    train, heldout = workdir / "train.jsonl", workdir / "heldout.jsonl"
    held = data.get("heldout_by_domain") or f"({data['heldout_per_domain']} per domain)"
    log(f"data: {data['train_rows']} training rows {data['train_per_domain']}, {data['heldout_rows']} held-out "
        f"rows {held}")

    # 2. selections
    offered = available_methods()
    wanted = EXPECTED_METHODS + [m for m in offered if m not in EXPECTED_METHODS and m != "random"] \
        if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    methods = [m for m in wanted if m in offered and m != "random"]
    for m in wanted:
        if m not in offered:
            results["notes"].append(f"method `{m}` skipped: `slap select --help` does not offer it "
                                    f"(it offers {', '.join(offered)}).")
            log(results["notes"][-1])
    if "random" not in offered:
        raise SystemExit("`slap select` offers no random method")
    results["methods_offered"], results["methods_run"] = offered, methods

    ensure_gguf_converted(resolve_model(DEFAULT_PROXY_MODEL))
    common = ["--device", "cpu", "--quiet"]
    emb, strata = workdir / "embeddings.parquet", workdir / "strata.parquet"
    stages = {"embed": cached_stage("embed", ["embed", str(train), "-o", str(emb), "--max-tokens",
                                              str(args.max_tokens), *common], emb, workdir)}
    log(f"embed: {stages['embed']['wall_s']} s{' (cached)' if stages['embed']['cached'] else ''}")
    stages["stratify"] = cached_stage("stratify", ["stratify", str(emb), "-o", str(strata), "--seed",
                                                   str(args.seed), *common], strata, workdir)
    log(f"stratify: {stages['stratify']['wall_s']} s{' (cached)' if stages['stratify']['cached'] else ''}")
    for s in stages.values():
        s["command_rel"] = [rel(x) if "/" in x else x for x in s["command"]]
        s["command_rel"][0] = "slap"
    results["stages"] = stages

    # (label, method, keep, seed, extra select options); a variant is a method with other options, under its label
    plan: list[tuple[str, str, float, int, list[str]]] = [
        ("random", "random", k, s, []) for k in args.keeps for s in range(args.random_seeds)]
    plan += [(m, m, k, args.seed, []) for k in args.keeps for m in methods]
    variants = [parse_variant(v) for v in args.variant]
    plan += [(label, m, k, args.seed, extra) for label, m, extra, own_keeps in variants
             for k in (own_keeps or args.variant_keeps or args.keeps)]
    results["variants"] = {label: {"method": m, "options": extra} for label, m, extra, _ in variants}
    selections: dict[str, dict[str, Any]] = {}
    for label, method, keep, seed, extra in plan:
        name = f"{label}_k{keep:.2f}_s{seed}"
        out = workdir / "selections" / f"{name}.parquet"
        try:
            t = cached_stage(f"select_{name}", ["select", str(strata), "-o", str(out), "--method", method,
                                                "--keep", str(keep), "--seed", str(seed), *extra, *common],
                             out, workdir)
        except RuntimeError as e:
            results["notes"].append(f"`slap select --method {method} {' '.join(extra)} --keep {keep} --seed {seed}`"
                                    f" failed: {str(e).splitlines()[-1] if str(e).strip() else e}")
            log(results["notes"][-1])
            continue
        t["command_rel"] = ["slap", *[rel(x) if "/" in x else x for x in t["command"][1:]]]
        selections[name] = {"method": label, "keep": keep, "seed": seed, "path": str(out), **t}
        log(f"select {name}: {t['wall_s']} s{' (cached)' if t['cached'] else ''}")
    results["selections"] = selections

    # 3. prefix caches, then one training run per subset
    ref, tokenizer, split, pad_id = load_split_proxy(args.train_blocks)
    results["model"] = {"identity": ref.identity, "blocks": len(split.blocks), "frozen_blocks": split.split,
                        "trainable_parameters": sum(p.numel() for p in split.parameters)}
    caches, results["prefix_cache"] = {}, {}
    for key, path in (("train", train), ("heldout", heldout)):
        fp = hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()
        ckey = f"{fp}:{ref.identity}:{split.split}:{args.max_tokens}"
        results["prefix_cache"][key] = HiddenCache.build(workdir / f"prefix_{key}", path, split, tokenizer,
                                                         args.max_tokens, ckey)
        caches[key] = HiddenCache(workdir / f"prefix_{key}")
        log(f"prefix cache {key}: {results['prefix_cache'][key]['seconds']} s"
            f"{' (cached)' if results['prefix_cache'][key]['cached'] else ''}")

    trainer = TopTrainer(split, pad_id, args)
    run_key = recipe_key(args, results["prefix_cache"])
    n_train = len(caches["train"])
    train_tokens = response_token_counts(caches["train"])
    jobs: list[tuple[str, float | None, int | None, np.ndarray | None, dict[str, Any] | None]] = [
        ("pretrained", None, None, None, None)]
    if not args.no_full:
        jobs.append(("full", 1.0, None, np.arange(n_train), None))
    for sel in selections.values():
        jobs.append((sel["method"], sel["keep"], sel["seed"], kept_rows(Path(sel["path"])), sel))
    align_key = results["prefix_cache"]["train"]["key"] + results["prefix_cache"]["heldout"]["key"]
    if args.probes:
        align = gradient_alignment(trainer, caches["train"], caches["heldout"], workdir / "alignment.npz", align_key) \
            if "probe-align" in args.probes else {"response_tokens": train_tokens}
        probes = probe_subsets(strata, selections, align, args.seed, args.probes)
        results["probes"] = {name: PROBES[name] for name in sorted({p["method"] for p in probes})}
        jobs += [(p["method"], p["keep"], p["seed"], p.pop("rows"), p) for p in probes]
    train_seeds = list(range(args.train_seed, args.train_seed + args.train_seeds))

    def run_path_of(tag: str, ts: int | None) -> Path:
        return workdir / "runs" / f"{tag}{'' if ts is None else f'_t{ts}'}.{run_key}.json"

    for _, _, _, rows, sel in jobs:
        if rows is not None and rows.size and int(rows.max()) >= n_train:
            raise SystemExit(f"{sel and sel['path']}: row {int(rows.max())} beyond the {n_train} training rows")
    tags = [f"{method}_k{keep:.2f}_s{seed}" if sel else method for method, keep, seed, _, sel in jobs]
    pending = [(run_path_of(tag, ts), rows, ts) for tag, (_, _, _, rows, _) in zip(tags, jobs, strict=True)
               for ts in (train_seeds if rows is not None else [None]) if not run_path_of(tag, ts).exists()]
    if args.jobs > 1 and len(pending) > 1:
        log(f"training {len(pending)} runs in {min(args.jobs, len(pending))} processes of {args.threads} thread(s)")
        run_in_parallel(pending, args, workdir)
    runs = []
    for i, (method, keep, seed, rows, sel) in enumerate(jobs):
        tag = tags[i]
        per_seed = []
        for ts in (train_seeds if rows is not None else [None]):  # the untrained model needs one evaluation
            run_path = run_path_of(tag, ts)
            if run_path.exists():
                one = json.loads(run_path.read_text())
            else:
                one = train_and_evaluate(trainer, caches, rows, ts)
                write_run(run_path, one)
            per_seed.append(one)
        # One subset's result is the mean over training seeds: the shuffle order alone moves it by ~0.005-0.01.
        domains = sorted(per_seed[0]["heldout"])
        run = {"method": method, "keep": keep, "seed": seed, "kept_rows": 0 if rows is None else len(rows),
               # Response tokens trained on: a subset of long rows trains on more tokens in the same steps.
               "kept_response_tokens": 0 if rows is None else int(train_tokens[rows].sum()),
               "select_wall_s": sel["wall_s"] if sel else None, "select_cpu_s": sel["cpu_s"] if sel else None,
               "heldout": {d: round(float(np.mean([r["heldout"][d] for r in per_seed])), 5) for d in domains},
               "mean": round(float(np.mean([r["mean"] for r in per_seed])), 5),
               "train_seeds": [r["mean"] for r in per_seed] if rows is not None else None,
               "steps": per_seed[0].get("steps"),
               "train_wall_s": round(float(np.mean([r["train_wall_s"] for r in per_seed])), 2)
               if rows is not None else None,
               "eval_s": round(float(np.mean([r["eval_s"] for r in per_seed])), 2)}
        runs.append(run)
        spread = "" if rows is None or len(per_seed) < 2 else \
            f" (training seeds {min(run['train_seeds']):.4f}-{max(run['train_seeds']):.4f})"
        log(f"run {i + 1}/{len(jobs)} {tag}: {run['kept_rows']} rows, held-out {run['heldout']} mean "
            f"{run['mean']:.4f}{spread}")
    results["runs"] = runs

    if not args.no_diagnose:
        align = gradient_alignment(trainer, caches["train"], caches["heldout"], workdir / "alignment.npz", align_key)
        results["diagnostics"] = selection_diagnostics(align, selections, args.first_picks)

    # Other engineers may change slapcli/ while a long benchmark runs: say which code made which selection.
    versions = sorted({s.get("slapcli", "unrecorded") for s in selections.values()})
    if len(versions) > 1 or results["code"]["slapcli_changes"]:
        def described(version: str) -> str:
            keeps: dict[str, list[str]] = {}
            for sel in selections.values():
                if sel.get("slapcli", "unrecorded") == version:
                    keeps.setdefault(sel["method"], []).append(f"{sel['keep']:.2f}")
            return ", ".join(f"{m} at {'/'.join(sorted(set(k)))}" for m, k in keeps.items())

        results["notes"].append(
            "slapcli/ changed during this benchmark (it is shared with ongoing work). Selections per slapcli version "
            "(last commit touching slapcli/; +dirty = uncommitted edits): "
            + "; ".join(f"{v}: {described(v)}" for v in versions)
            + ". Wall times of the same method can differ across versions.")
    results["summary"] = summarize(results)
    results["load_average_end"] = os.getloadavg()
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    results["wall_s"] = round(time.perf_counter() - t_start, 1)
    results["out"] = str(out_path)
    out_path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    log(f"results: {out_path}")
    if not args.no_docs:
        plot = args.docs.parent / f"{args.docs.stem.lower()}_quality.png"
        try:
            write_plot(results, results["summary"], plot)
        except ImportError:
            results["notes"].append("no plot: matplotlib is missing (pip install -e '.[bench]')")
            plot = None
        write_markdown(results, results["summary"], args.docs, plot, args.analysis)
        log(f"report: {args.docs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
