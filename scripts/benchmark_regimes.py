"""Where pruning pays: the quality benchmark in the noisy and targeted regimes (issue 17).

- **noisy**: the shared mix's training draw (as `benchmark_quality.py` builds it) with `--damaged-share` of its
  rows damaged by scripts/damage.py (answers from another prompt, cut off, canned refusals, degenerate repetition,
  near-copies); held-out rows clean. Reports, with no training, the share of each damage kind every selection
  drops; then held-out loss of full data, the clean rows alone (the oracle), random and each method, and the
  damage margin: on the held-out prompts, the trained model's loss of a damaged answer (each in-place kind of
  scripts/damage.py applied to each held-out row) minus its loss of the clean one, mean over pairs. Held-out loss
  of clean answers barely sees what a model learnt from damaged rows (a cut-off answer is mostly good text); the
  margin falls when the model has learnt to refuse, stop early, repeat or answer another prompt.
- **targeted**: the shared mix as the pool, a `--target` dev file of `--target-rows` rows of one domain (disjoint
  from pool and held-out), held-out rows of that domain only; keeps 0.1-0.3; baselines random, `nearest`, and the
  domain oracle (random rows of the pool's target-domain rows, same size). With `--damaged-share`, the pool is
  damaged as the noisy one is (the target domain's rows too), the oracle draws on clean domain rows only and the
  drop table is reported.
- **clean**: the same draw undamaged (benchmark_quality.py's protocol, here with the seeds and report of the
  other two regimes): the default must be no worse than random.

Every method with a random choice runs `--seeds` selection seeds and every subset `--train-seeds` shuffles
(3 and 3). With `--equal-steps M,...`, those methods' subsets are also trained for as many optimizer steps as
full data (cycling through the subset), beside the equal-epochs runs. An ablation is a `--variant LABEL=METHOD
[select options]` (e.g. 'slap-prop=slap --allocation proportional'), seeded as its method. The training recipe,
caches and run files are scripts/benchlib's, as for benchmark_quality.py (top blocks of SmolLM2-135M from cached
hidden states, 1 epoch, lr 1e-4, batch 8).

Usage (from the repository root; ~1 h per draw on 2 cores, most of it the slap replays):

    .venv/bin/python scripts/benchmark_regimes.py noisy --workdir work/noisy_d0 --data-seed 0 --jobs 2 --threads 1
    .venv/bin/python scripts/benchmark_regimes.py targeted --workdir work/targeted_d0 --data-seed 0 --jobs 2

On other data: `--train FILE` draws pool and held-out rows from FILE (any container and layout `slap` reads; its
`--domain-field` names the domains, `--heldout-per-domain` held-out rows of each) instead of the shared mix, e.g.
the standard-library pool of scripts/stdlib_pool.py, which the project never developed on.

Outputs: `<workdir>/results.json` and `<workdir>/RESULTS.md`.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import random
import shlex
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import damage
import numpy as np
import torch
from benchlib.common import floats, log
from benchlib.data import DOMAIN_FILES, SHARED_DATA, jsonl_bytes, read_user_rows, shared_data, usable_rows, user_data
from benchlib.report import fmt_spread, git, machine_info, spread
from benchlib.stages import cached_stage, kept_rows
from benchlib.trainer import (
    HiddenCache,
    TopTrainer,
    load_split_proxy,
    load_trainer,
    prefix_cache_key,
    recipe_key,
    recipe_of,
    response_token_counts,
    run_file,
    subset_tag,
    token_weighted_loss,
    train_and_evaluate,
    write_run,
)

from slapcli.models import DEFAULT_PROXY_MODEL, ensure_gguf_converted, resolve_model

SEEDED = {"random", "slap", "stratified", "embedding", "ccs", "kcenter"}  # methods whose choice depends on --seed


# ---------------------------------------------------------------------------------------------- data


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write a generated file, refusing to overwrite a workdir's file that holds other data."""
    data = jsonl_bytes(rows)
    if path.exists() and path.read_bytes() != data:
        raise SystemExit(f"{path} holds other data; use another --workdir")
    path.write_bytes(data)


def draw(args: argparse.Namespace) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """One seeded draw of pool and held-out rows: of the shared mix, or of the user's `--train` file (its
    `--domain-field` naming the domains, `--heldout-per-domain` rows of each split off)."""
    if args.train is None:
        return shared_data(argparse.Namespace(code_share=None, train_rows=args.train_rows,
                                              heldout_per_domain=args.heldout_per_domain, data_seed=args.data_seed))
    return user_data(argparse.Namespace(train=args.train, heldout=None, domain_field=args.domain_field,
                                        on_bad_line="error", heldout_per_domain=args.heldout_per_domain,
                                        train_rows=args.train_rows, data_seed=args.data_seed))


def domain_rows(args: argparse.Namespace, domain: str) -> list[dict]:
    """Every usable row of one domain in the data the draw came from (for the dev file and more held-out rows)."""
    if args.train is None:
        return [{**r, "domain": domain} for r in usable_rows(SHARED_DATA / DOMAIN_FILES[domain])]
    rows, _, _ = read_user_rows(args.train, args.domain_field, "error")
    return [r for r in rows if r["domain"] == domain]


def source_name(args: argparse.Namespace) -> str:
    return "the shared mix" if args.train is None else f"`{args.train}`"


def build_noisy(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    train, heldout, info = draw(args)
    pool = damage.make_noisy_pool(train, args.damaged_share, args.data_seed, args.kinds)
    write_jsonl(workdir / "train.jsonl", pool)
    write_jsonl(workdir / "heldout.jsonl", heldout)
    if args.regime == "noisy":
        write_jsonl(workdir / "heldout_damaged.jsonl", damage.damaged_views(heldout, args.data_seed + 2))
    return {**info, "train_rows": len(pool), "regime": args.regime, "damaged_share": args.damaged_share,
            "kinds": args.kinds or "all, equal",
            "pool_damage": dict(Counter(r.get("damage", "clean") for r in pool)), "source": source_name(args)}


def build_targeted(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Pool = a draw of the mix; dev + held-out = other rows of the target domain (never in the pool)."""
    extra = args.target_rows + args.heldout_per_domain
    train, heldout, info = draw(args)
    spare = [r for r in domain_rows(args, args.target_domain) if r not in train and r not in heldout]
    if extra > len(spare):
        raise SystemExit(f"--target-rows {args.target_rows} + --heldout-per-domain {args.heldout_per_domain}: only "
                         f"{len(spare)} {args.target_domain} rows outside the pool and the held-out rows")
    rng = random.Random(args.data_seed + 1)
    picked = rng.sample(spare, extra)
    held = [r for r in heldout if r["domain"] == args.target_domain]
    if args.heldout_extra:  # more held-out rows, drawn apart so the pool and the dev rows stay those of the draw
        dev = picked[: args.target_rows]
        rest = [r for r in spare if r not in dev]
        if args.heldout_extra > len(rest):
            raise SystemExit(f"--heldout-extra {args.heldout_extra}: only {len(rest)} {args.target_domain} rows left")
        held += random.Random(args.data_seed + 3).sample(rest, args.heldout_extra)
    pool, extra_info = train, {}
    if args.damaged_share:  # the target domain's rows are damaged as often as the others'
        pool = damage.make_noisy_pool(train, args.damaged_share, args.data_seed, args.kinds)
        write_jsonl(workdir / "heldout_damaged.jsonl", damage.damaged_views(held, args.data_seed + 2))
        extra_info = {"pool_damage": dict(Counter(r.get("damage", "clean") for r in pool))}
    write_jsonl(workdir / "train.jsonl", pool)
    write_jsonl(workdir / "heldout.jsonl", held)
    write_jsonl(workdir / "target.jsonl", picked[: args.target_rows])
    return {**info, "train_rows": len(pool), "regime": "targeted", "target_domain": args.target_domain,
            "target_rows": args.target_rows, "damaged_share": args.damaged_share,
            "heldout_rows_target": len(held), "pool_by_domain": dict(Counter(r["domain"] for r in pool)),
            "source": source_name(args), **extra_info}


def pool_labels(path: Path, field: str, default: str) -> np.ndarray:
    with path.open() as f:
        return np.array([json.loads(line).get(field) or default for line in f if line.strip()])


# ---------------------------------------------------------------------------------------------- training


class EqualStepsTrainer(TopTrainer):
    """The recipe, but for a fixed number of optimizer steps: the subset is reshuffled and cycled through."""

    def __init__(self, *args: Any, steps: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.steps = steps

    def total_steps(self, n_rows: int) -> int:
        return self.steps

    def batches(self, rows: np.ndarray, rng: np.random.Generator) -> Iterator[list[int]]:
        made = 0
        while made < self.steps:
            order = rng.permutation(rows).tolist()
            for s in range(0, len(order), self.args.batch_size):
                if made == self.steps:
                    return
                yield order[s:s + self.args.batch_size]
                made += 1


_WORKER: dict[str, Any] = {}


def _init(recipe: argparse.Namespace, workdir: Path, steps: int) -> None:
    torch.set_num_threads(recipe.threads)
    trainer, caches = load_trainer(recipe, workdir)
    if (workdir / "prefix_heldout_damaged").exists():
        caches["heldout_damaged"] = HiddenCache(workdir / "prefix_heldout_damaged")
    _WORKER.update(plain=trainer, caches=caches,
                   equal=EqualStepsTrainer(trainer.split, trainer.pad_id, recipe, steps=steps))


def _run(path: Path, rows: np.ndarray, seed: int, equal_steps: bool) -> dict[str, Any]:
    trainer = _WORKER["equal" if equal_steps else "plain"]
    one = train_and_evaluate(trainer, _WORKER["caches"], rows, seed)
    if "heldout_damaged" in _WORKER["caches"]:  # the same trained model, on the damaged answers
        one["damaged"] = trainer.evaluate(_WORKER["caches"]["heldout_damaged"])
    write_run(path, one)
    return one


# ---------------------------------------------------------------------------------------------- report


def damage_margins(clean_rows: list[float], damaged_rows: list[float], kind: np.ndarray,
                   source: np.ndarray) -> dict[str, float]:
    """Per damage kind, the mean over pairs of (loss of the damaged answer - loss of the clean answer to the same
    held-out prompt), and `mean` over kinds. Higher: the model prefers the clean answers more."""
    gap = np.asarray(damaged_rows, dtype=np.float64) - np.asarray(clean_rows, dtype=np.float64)[source]
    per_kind = {k: float(gap[kind == k].mean()) for k in sorted(set(kind.tolist()))}
    return {**per_kind, "mean": float(np.mean(list(per_kind.values())))}


def damage_table(selections: dict[str, dict[str, Any]], labels: np.ndarray) -> dict[str, dict[str, Any]]:
    """Per (method, keep): the share of each damage kind's rows (and of clean rows) NOT kept, mean over seeds."""
    kinds = sorted(set(labels.tolist()))
    out: dict[str, dict[str, Any]] = {}
    for sel in selections.values():
        kept = np.zeros(len(labels), dtype=bool)
        kept[kept_rows(Path(sel["path"]))] = True
        key = f"{sel['label']}@{sel['keep']:.2f}"
        entry = out.setdefault(key, {"method": sel["label"], "keep": sel["keep"], "by_seed": []})
        entry["by_seed"].append({k: float(1 - kept[labels == k].mean()) for k in kinds})
    for entry in out.values():
        entry["dropped"] = {k: float(np.mean([s[k] for s in entry["by_seed"]])) for k in kinds}
        harmful = [k for k in kinds if k not in ("clean", "near_copy")]
        weights = np.array([(labels == k).sum() for k in harmful], dtype=float)
        entry["dropped_damaged_non_copy"] = float(np.dot([entry["dropped"][k] for k in harmful], weights)
                                                  / max(1.0, weights.sum()))
    return out


def write_markdown(results: dict[str, Any], path: Path) -> None:
    regime, data = results["regime"], results["data"]
    lines = [f"# Quality, {regime} regime (data seed {data['seed']})", "",
             f"Written by `scripts/benchmark_regimes.py` on {results['finished']} (commit `{results['commit'][:10]}`).",
             "", "```sh", results["command"], "```", ""]
    # Cached artifacts keep the code that made them: a report rewritten later must not credit them to its commit.
    made_by: dict[str, set[str]] = {}
    for sel in results["selections"].values():
        made_by.setdefault(sel["label"], set()).add(str(sel.get("slapcli") or "unrecorded"))
    lines += ["slapcli that made the artifacts: stratify `" + str(results.get("stratify_slapcli") or "unrecorded")
              + "`; " + "; ".join(f"{label} `{', '.join(sorted(v))}`" for label, v in made_by.items()) + ".",
              "", "## Data", ""]
    source = data.get("source", "the shared mix")
    if regime in ("clean", "noisy"):
        lines.append(f"{data['train_rows']} training rows of {source}, {data['damaged_share']:.0%} damaged "
                     f"({', '.join(f'{k} {v}' for k, v in sorted(data['pool_damage'].items()))}); held-out: "
                     f"{data['heldout_per_domain']} clean rows per domain.")
    else:
        if data.get("damaged_share"):
            lines.append(f"{data['damaged_share']:.0%} of the pool damaged "
                         f"({', '.join(f'{k} {v}' for k, v in sorted(data['pool_damage'].items()))}).")
        lines.append(f"Pool: {data['train_rows']} rows of {source} ({data['pool_by_domain']}); target dev file: "
                     f"{data['target_rows']} {data['target_domain']} rows; held-out: {data['heldout_rows_target']} "
                     f"{data['target_domain']} rows (none in the pool or the dev file).")
    lines += ["", f"Recipe: top {results['recipe']['train_blocks']} blocks, {results['recipe']['epochs']} epoch, lr "
              f"{results['recipe']['lr']}, batch {results['recipe']['batch_size']}; every subset trained with "
              f"{len(results['train_seeds'])} shuffles, its loss the mean; methods with a random choice over "
              f"{results['seeds']} selection seeds (mean ± sd [min, max] over seeds).", "",
              "## Held-out loss (mean over domains; lower is better)", "",
              "Held-out loss: each row's mean response-token loss, averaged over rows (the verdicts use it). "
              "Token-weighted: the response tokens' losses summed and divided by their count, as a trainer reports "
              "it, where a one-token answer weighs one token.", "",
              "| subset | keep | steps | held-out loss | token-weighted | vs random mean | beyond random's spread? |",
              "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for row in results["table"]:
        tokens = fmt_spread(row["loss_tokens"]) if "loss_tokens" in row else ""
        lines.append(f"| {row['label']} | {row['keep']:.2f} | {row['steps']} | {fmt_spread(row['loss'])} | "
                     f"{tokens} | {row.get('vs_random', '')} | {row.get('verdict', '')} |")
    with_margin = [row for row in results["table"] if "margin" in row]
    if with_margin:
        kinds = sorted(with_margin[0]["margin_by_kind"])
        lines += ["", "## Damage margin (loss of a damaged answer minus the clean one, same held-out prompt; higher "
                  "is better)", "",
                  "The trained model's preference for clean answers over damaged ones: it falls when training "
                  "taught the model to refuse, stop early, repeat itself or answer another prompt.", "",
                  "| subset | keep | margin | vs random mean | beyond random's spread? | "
                  + " | ".join(kinds) + " |",
                  "| --- | ---: | ---: | ---: | --- | " + " | ".join("---:" for _ in kinds) + " |"]
        for row in with_margin:
            lines.append(f"| {row['label']} | {row['keep']:.2f} | {fmt_spread(row['margin'])} | "
                         f"{row.get('margin_vs_random', '')} | {row.get('margin_verdict', '')} | "
                         + " | ".join(f"{row['margin_by_kind'][k]:.4f}" for k in kinds) + " |")
    if results.get("damage"):
        kinds = sorted(next(iter(results["damage"].values()))["dropped"])
        lines += ["", "## Share of each kind of row dropped (no training; mean over selection seeds)", "",
                  "| selection | " + " | ".join(kinds) + " | damaged, copies aside |",
                  "| --- | " + " | ".join("---:" for _ in kinds) + " | ---: |"]
        for key, e in results["damage"].items():
            lines.append(f"| {key} | " + " | ".join(f"{e['dropped'][k]:.0%}" for k in kinds)
                         + f" | {e['dropped_damaged_non_copy']:.0%} |")
    wall = f"Wall: {results['wall_s']:.0f} s on {results['machine'].get('cpu', 'this machine')}"
    if results.get("trained_runs") == 0:  # a report rewritten over earlier invocations' runs
        wall += " for this report; every run was cached from earlier invocations (their times: runs/*.json)"
    lines += ["", wall + ".", ""]
    path.write_text("\n".join(lines))


# ---------------------------------------------------------------------------------------------- main


def parse_kinds(text: str) -> dict[str, float] | None:
    if not text:
        return None
    out = {}
    for part in text.split(","):
        name, _, weight = part.partition(":")
        out[name.strip()] = float(weight or 1.0)
    return out


def parse_variant(text: str) -> tuple[str, str, list[str]]:
    """'LABEL=METHOD --opt value ...' -> (label, method, select options)."""
    label, sep, rest = text.partition("=")
    words = shlex.split(rest)
    if not sep or not label or not words or "/" in label or "_" in label:
        raise argparse.ArgumentTypeError(f"expected LABEL=METHOD [OPTIONS] (LABEL without '/' or '_'), got {text!r}")
    return label, words[0], words[1:]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("regime", choices=["clean", "noisy", "targeted"])
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--train", type=Path, default=None, metavar="FILE",
                   help="draw pool and held-out rows from this file (any container and layout slap reads) instead "
                        "of the shared mix, e.g. scripts/stdlib_pool.py's")
    p.add_argument("--domain-field", default="domain", help="--train rows' field naming their domain")
    p.add_argument("--train-rows", type=int, default=300)
    p.add_argument("--heldout-per-domain", type=int, default=60)
    p.add_argument("--damaged-share", type=float, default=None,
                   help="share of damaged pool rows (default: 0.3 noisy, 0 targeted; clean: always 0)")
    p.add_argument("--kinds", type=parse_kinds, default=None,
                   help=f"noisy: damage kinds and weights, e.g. 'mismatch:2,refusal' (default: all of "
                        f"{', '.join(damage.DAMAGE_KINDS)}, equal; held out from the default, to check the screen "
                        f"on damage it was not developed on: {', '.join(damage.HELD_OUT_KINDS)})")
    p.add_argument("--target-domain", default="code", help="targeted: the domain of the dev and held-out rows")
    p.add_argument("--target-rows", type=int, default=64, help="targeted: rows in the dev file")
    p.add_argument("--heldout-extra", type=int, default=0,
                   help="targeted: this many more held-out rows of the target domain, drawn from rows in neither "
                        "the pool nor the dev file (the pool and dev rows stay the draw's); a 60-row mean is swayed "
                        "by a few one-token answers")
    p.add_argument("--keeps", type=floats, default=None, help="default: 0.7 (noisy), 0.1,0.2,0.3 (targeted)")
    p.add_argument("--methods", default=None, help="default: stratified,slap (noisy, clean); nearest,slap "
                                                      "(targeted); '' for random and the variants alone")
    p.add_argument("--variant", action="append", type=parse_variant, default=[], metavar="LABEL=METHOD [OPTIONS]",
                   help="an ablation: select with METHOD and these `slap select` options, reported as LABEL, e.g. "
                        "--variant 'slap-prop=slap --allocation proportional' (repeatable)")
    p.add_argument("--seeds", type=int, default=3, help="selection seeds of methods with a random choice")
    p.add_argument("--train-seeds", type=int, default=3)
    p.add_argument("--equal-steps", default="", help="methods (random too) also trained for full data's steps")
    p.add_argument("--no-train", action="store_true", help="selections and the damage table only")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--train-blocks", type=int, default=2)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    args = p.parse_args(argv)
    if args.regime == "clean" or (args.regime == "targeted" and args.damaged_share is None):
        args.damaged_share = 0.0
    elif args.damaged_share is None:
        args.damaged_share = 0.3
    # The shared trainer's recipe fields this script does not vary (its run files and keys read them).
    args.bf16, args.schedule, args.warmup = False, "constant", 0.0
    args.keeps = args.keeps or ([0.1, 0.2, 0.3] if args.regime == "targeted" else [0.7])
    if args.methods is None:  # '' = no methods but random and the variants
        args.methods = "nearest,slap" if args.regime == "targeted" else "stratified,slap"
    args.methods = [m for m in args.methods.split(",") if m]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    workdir = args.workdir.resolve()
    for sub in ("logs", "selections", "runs"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    data = build_targeted(args, workdir) if args.regime == "targeted" else build_noisy(args, workdir)
    train, heldout = workdir / "train.jsonl", workdir / "heldout.jsonl"
    log(f"{args.regime}: {data['train_rows']} pool rows -> {workdir}")

    ensure_gguf_converted(resolve_model(DEFAULT_PROXY_MODEL))
    common = ["--device", "cpu", "--quiet"]
    emb, strata = workdir / "embeddings.parquet", workdir / "strata.parquet"
    cached_stage("embed", ["embed", str(train), "-o", str(emb), "--max-tokens", str(args.max_tokens), *common],
                 emb, workdir)
    stratified = cached_stage("stratify", ["stratify", str(emb), "-o", str(strata), *common], strata, workdir)
    target = ["--target", str(workdir / "target.jsonl")] if args.regime == "targeted" else []
    plan = [("random", "random", k, s, []) for k in args.keeps for s in range(args.seeds)]
    for label, m, options in [(m, m, []) for m in args.methods] + args.variant:
        seeds = range(args.seeds) if m in SEEDED else [0]
        extra = (target if m in ("slap", "nearest") else []) + options
        plan += [(label, m, k, s, extra) for k in args.keeps for s in seeds]
    selections: dict[str, dict[str, Any]] = {}
    for label, method, keep, seed, extra in plan:
        name = f"{label}_k{keep:.2f}_s{seed}"
        out = workdir / "selections" / f"{name}.parquet"
        t = cached_stage(f"select_{name}", ["select", str(strata), "-o", str(out), "--method", method, "--keep",
                                            str(keep), "--seed", str(seed), *extra, *common], out, workdir)
        selections[name] = {"label": label, "keep": keep, "seed": seed, "path": str(out), "wall_s": t["wall_s"],
                            "slapcli": t.get("slapcli")}
        log(f"select {name}: {t['wall_s']} s")

    results: dict[str, Any] = {
        "regime": args.regime, "data": data, "seeds": args.seeds, "train_seeds": list(range(args.train_seeds)),
        "command": shlex.join([".venv/bin/python", "scripts/benchmark_regimes.py", *(argv or sys.argv[1:])]),
        "commit": git("rev-parse", "HEAD"), "machine": machine_info(), "selections": selections,
        "stratify_slapcli": stratified.get("slapcli"), "recipe": recipe_of(args)}
    damage_labels = pool_labels(train, "damage", "clean")
    labels = pool_labels(train, "domain", "all") if args.regime == "targeted" else damage_labels
    if args.damaged_share:
        results["damage"] = damage_table(selections, damage_labels)
    n = len(labels)
    subsets: list[tuple[str, float, int, np.ndarray]] = [("full", 1.0, 0, np.arange(n))]
    if args.regime == "noisy":
        subsets.append(("oracle: clean rows", round(float((labels == "clean").mean()), 2), 0,
                        np.flatnonzero(labels == "clean")))
    else:  # in a damaged pool, the oracle draws on the domain's clean rows only
        domain_rows = np.flatnonzero((labels == args.target_domain) & (damage_labels == "clean"))
        oracle = "oracle: clean domain rows" if args.damaged_share else "oracle: domain rows"
        for k in args.keeps:
            size = round(k * n)
            if size <= len(domain_rows):
                subsets += [(oracle, k, s, np.sort(np.random.default_rng(s).choice(
                    domain_rows, size, replace=False))) for s in range(args.seeds)]
    subsets += [(sel["label"], sel["keep"], sel["seed"], kept_rows(Path(sel["path"])))
                for sel in selections.values()]

    if not args.no_train:
        ref, tokenizer, split, _ = load_split_proxy(args.train_blocks)
        prefix = {}
        damaged = workdir / "heldout_damaged.jsonl"
        evaluated = [("train", train), ("heldout", heldout)] + ([("heldout_damaged", damaged)] if damaged.exists()
                                                                  else [])
        for key, path in evaluated:
            prefix[key] = HiddenCache.build(workdir / f"prefix_{key}", path, split, tokenizer, args.max_tokens,
                                            prefix_cache_key(path, ref.identity, split.split, args.max_tokens))
        del split
        run_key = recipe_key(args, prefix)
        if damaged.exists():  # run files with the damage margin are not those without it
            run_key = hashlib.blake2b((run_key + prefix["heldout_damaged"]["key"]).encode(), digest_size=6).hexdigest()
            pairs = [json.loads(line) for line in damaged.read_text().splitlines() if line.strip()]
            pair_kind = np.array([r["domain"] for r in pairs])
            pair_source = np.array([r["source"] for r in pairs])
        full_steps = math.ceil(n / args.batch_size) * args.epochs
        equal = {m for m in args.equal_steps.split(",") if m}
        jobs = [(label, keep, seed, rows, False) for label, keep, seed, rows in subsets]
        jobs += [(label, keep, seed, rows, True) for label, keep, seed, rows in subsets if label in equal]

        def run_path(label: str, keep: float, seed: int, eq: bool, ts: int) -> Path:
            return run_file(workdir, subset_tag(label, keep, seed, eq), ts, run_key)

        pending = [(run_path(lb, k, s, eq, ts), rows, ts, eq) for lb, k, s, rows, eq in jobs
                   for ts in results["train_seeds"] if not run_path(lb, k, s, eq, ts).exists()]
        pending.sort(key=lambda p: -len(p[1]))
        log(f"training {len(pending)} runs in {args.jobs} process(es)")
        results["trained_runs"] = len(pending)
        recipe = copy.copy(args)
        with ProcessPoolExecutor(max_workers=max(1, min(args.jobs, len(pending) or 1)),
                                 mp_context=get_context("spawn"), initializer=_init,
                                 initargs=(recipe, workdir, full_steps)) as pool:
            futures = {pool.submit(_run, *p): p[0].name for p in pending}
            for i, future in enumerate(as_completed(futures)):
                log(f"  run {i + 1}/{len(pending)} {futures[future]}: {future.result()['mean']:.4f}")
        table = []
        held_cache = HiddenCache(workdir / "prefix_heldout")
        held_tokens, held_domains = response_token_counts(held_cache), held_cache.domains
        grouped: dict[tuple[str, float, bool], list[float]] = {}
        grouped_tokens: dict[tuple[str, float, bool], list[float]] = {}
        margins: dict[tuple[str, float, bool], list[dict[str, float]]] = {}
        steps_of: dict[tuple[str, float, bool], int] = {}
        for label, keep, seed, _, eq in jobs:
            per_shuffle = [json.loads(run_path(label, keep, seed, eq, ts).read_text()) for ts in results["train_seeds"]]
            grouped.setdefault((label, keep, eq), []).append(float(np.mean([r["mean"] for r in per_shuffle])))
            grouped_tokens.setdefault((label, keep, eq), []).append(float(np.mean(
                [token_weighted_loss(r["heldout_rows"], held_tokens, held_domains) for r in per_shuffle])))
            steps_of[(label, keep, eq)] = per_shuffle[0]["steps"]
            if damaged.exists():
                per = [damage_margins(r["heldout_rows"], r["damaged"]["heldout_rows"], pair_kind, pair_source)
                       for r in per_shuffle]
                margins.setdefault((label, keep, eq), []).append({k: float(np.mean([m[k] for m in per]))
                                                                  for k in per[0]})
        for (label, keep, eq), values in grouped.items():
            table.append({"label": label + (" (equal steps)" if eq else ""), "keep": keep, "equal_steps": eq,
                          "steps": steps_of[(label, keep, eq)], "loss": spread(values), "per_seed": values,
                          "loss_tokens": spread(grouped_tokens[(label, keep, eq)])})
            if (label, keep, eq) in margins:
                seeds_margins = margins[(label, keep, eq)]
                table[-1]["margin"] = spread([m["mean"] for m in seeds_margins])
                table[-1]["margin_by_kind"] = {k: float(np.mean([m[k] for m in seeds_margins]))
                                               for k in seeds_margins[0] if k != "mean"}
        for row in table:
            base = next((r for r in table if r["label"] == "random" + (" (equal steps)" if row["equal_steps"] else "")
                         and r["keep"] == row["keep"]), None)
            if base is not None and row["label"] != base["label"]:
                delta = row["loss"]["mean"] - base["loss"]["mean"]
                row["vs_random"] = f"{delta:+.4f}"
                row["verdict"] = ("better" if row["loss"]["max"] < base["loss"]["min"] else
                                  "worse" if row["loss"]["min"] > base["loss"]["max"] else "within")
                if "margin" in row and "margin" in base:  # higher is better here
                    row["margin_vs_random"] = f"{row['margin']['mean'] - base['margin']['mean']:+.4f}"
                    row["margin_verdict"] = ("better" if row["margin"]["min"] > base["margin"]["max"] else
                                             "worse" if row["margin"]["max"] < base["margin"]["min"] else "within")
        results["table"] = table
    else:
        results["table"] = []
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    results["wall_s"] = round(time.perf_counter() - t0, 1)
    (workdir / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    write_markdown(results, workdir / "RESULTS.md")
    log(f"report: {workdir / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
