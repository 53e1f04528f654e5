"""Cost of a SLAP selection next to one epoch of full fine-tuning of the same proxy on the same rows.

METHOD.md ("Cost") sets the target: the whole selection should cost no more than one epoch of fine-tuning the
proxy on the full data, measured as a ratio on the same machine. This script measures both sides:

- `slap embed`, `slap stratify` and `slap select` (method slap), each as the wall time of a whole `slap`
  subprocess, so interpreter start, imports, model loading and artifact I/O all count, as they do for a user.
  The select artifact's `stats.seconds` says where the replay's time went. Then `slap export` of the kept rows.
  Stratify and select share the run's own `--cache-dir` (`<workdir>/cache`, emptied first), so the disk of the
  prefix store stratify keeps for select is measured, beside the size of every artifact.
- One epoch of full fine-tuning of the default proxy (all parameters, float32, CPU, AdamW lr 1e-5, batch 8,
  rows shuffled with the seed as a trainer does, not length-sorted), in this process. Model load and
  tokenisation are timed apart from the training loop. With `--epoch-batches K` only the first K batches are
  timed and the epoch is extrapolated linearly (the output says so).

Usage (from the repository root):

    .venv/bin/python scripts/benchmark_cost.py --rows 300 --out work/cost/rows300.json
    .venv/bin/python scripts/benchmark_cost.py --rows 1000 --epoch-batches 40 --out work/cost/rows1000.json
    .venv/bin/python scripts/benchmark_cost.py --rows 500 --skip-epoch --out work/cost/scale500.json  # stages only

Without `--data`, a seeded two-domain excerpt of /work/shared/data (Alpaca 5k and CodeAlpaca 2k in their
~71/29 ratio, rows with an empty output skipped, original lines byte for byte) is written into the workdir.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from benchlib.data import build_excerpt
from benchlib.report import code_version, machine_info
from benchlib.stages import cold_cache, folder_bytes, run_stage

from slapcli.artifacts import read_meta
from slapcli.io.readers import SourceReader, iter_examples
from slapcli.models import (
    DEFAULT_PROXY_MODEL,
    ensure_gguf_converted,
    gguf_cache_path,
    load_causal_lm,
    resolve_model,
)
from slapcli.proxy import collate, encode_examples, response_losses

MAX_TOKENS = 1024  # slap embed's default --max-tokens, so both sides see the same token windows
EPOCH_LR = 1e-5
EPOCH_BATCH = 8
WARMUP_ROWS = 16


# ---------------------------------------------------------------------------------------------- data


def first_lines(src: Path, n: int, out: Path) -> None:
    with src.open("rb") as f:
        out.write_bytes(b"".join(ln for _, ln in zip(range(n), f, strict=False)))


# ---------------------------------------------------------------------------------------------- slap stages


# ---------------------------------------------------------------------------------------------- epoch


def full_finetune_epoch(data: Path, seed: int, max_batches: int | None) -> dict[str, Any]:
    """One epoch of full fine-tuning of the default proxy on every row of `data`, on the CPU in float32.

    Only the training loop counts as the epoch; loading and tokenising are reported apart (a trainer pays
    them once per run, not per epoch). With `max_batches`, the first batches are timed and the rest is
    extrapolated from them.
    """
    torch.manual_seed(seed)
    device = torch.device("cpu")
    t0 = time.perf_counter()
    tokenizer, model = load_causal_lm(resolve_model(DEFAULT_PROXY_MODEL), device, torch.float32)
    load_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    with SourceReader(str(data)) as reader:
        examples = [parsed.example for parsed in iter_examples(reader)]
    encoded = encode_examples(tokenizer, examples, MAX_TOKENS)
    tokenize_s = time.perf_counter() - t0

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    for p in model.parameters():
        p.requires_grad_(True)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    # weight_decay 0 as in the Hugging Face Trainer's default; it does not change the cost.
    optimizer = torch.optim.AdamW(model.parameters(), lr=EPOCH_LR, weight_decay=0.0)

    # Shuffled, not length-sorted: a trainer's sampler mixes lengths, so every batch pads to its longest row.
    order = torch.randperm(len(encoded), generator=torch.Generator().manual_seed(seed)).tolist()
    batches = [order[s:s + EPOCH_BATCH] for s in range(0, len(order), EPOCH_BATCH)]
    padded_tokens = [len(b) * max(len(encoded[i]) for i in b) for b in batches]
    timed = batches if max_batches is None else batches[:max_batches]

    batch_seconds: list[float] = []
    losses: list[float] = []
    load_before = os.getloadavg()[0]
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    for idx in timed:
        tb = time.perf_counter()
        batch = collate([encoded[i] for i in idx], pad_id)
        optimizer.zero_grad(set_to_none=True)
        loss = response_losses(model, batch).mean()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        batch_seconds.append(time.perf_counter() - tb)
    train_s = time.perf_counter() - t0
    train_cpu_s = time.process_time() - cpu0

    n_timed, n_all = len(timed), len(batches)
    extrapolated = n_timed < n_all
    timed_tokens = sum(padded_tokens[:n_timed])
    by_tokens = train_s * sum(padded_tokens) / max(1, timed_tokens)
    return {
        "rows": len(encoded),
        "batch_size": EPOCH_BATCH,
        "lr": EPOCH_LR,
        "max_tokens": MAX_TOKENS,
        "dtype": "float32",
        "trainable_parameters": n_params,
        "tokens": sum(len(e) for e in encoded),
        "padded_tokens": sum(padded_tokens),
        "batches": n_all,
        "batches_timed": n_timed,
        "extrapolated": extrapolated,
        "load_s": round(load_s, 3),
        "tokenize_s": round(tokenize_s, 3),
        "timed_train_s": round(train_s, 3),
        "timed_train_cpu_s": round(train_cpu_s, 3),
        # The epoch estimate: measured when every batch ran; else scaled by the number of batches.
        "epoch_s": round(train_s * n_all / n_timed, 3),
        "epoch_cpu_s": round(train_cpu_s * n_all / n_timed, 3),
        # A cross-check of the linear extrapolation: scaled by padded tokens instead of batches.
        "epoch_s_by_padded_tokens": round(by_tokens, 3),
        "seconds_per_batch_mean": round(train_s / max(1, n_timed), 3),
        "seconds_per_batch_first": round(batch_seconds[0], 3) if batch_seconds else None,
        "loss_first_batch": round(losses[0], 4) if losses else None,
        "loss_last_batch": round(losses[-1], 4) if losses else None,
        "load_1m": (round(load_before, 2), round(os.getloadavg()[0], 2)),
        "max_rss_mib_process": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


# ---------------------------------------------------------------------------------------------- replay profile


def profile_replay(data: Path, seed: int, proj_dim: int, trainable_blocks: int) -> dict[str, Any]:
    """Unit costs of the replay's parts on every row once, in this process, to explain `stats.seconds`.

    The replay's own timers put the one-off prefix pass (the frozen bottom blocks, once per row) inside
    `features` and `target`; timing the parts apart on the same rows, in the replay's feature batches (rows
    grouped by length under its token budget, as the replay groups each pass), shows what a feature and a
    prefix cost. Here every row goes in one pass, so the grouping pads less than the replay's passes of ~16-64
    rows do.
    """
    from slapcli.proxy import FEATURE_BATCH, PrefixCache, SplitProxy, row_features
    from slapcli.slapmath import GradientProjector

    torch.manual_seed(seed)
    device = torch.device("cpu")
    t0 = time.perf_counter()
    tokenizer, model = load_causal_lm(resolve_model(DEFAULT_PROXY_MODEL), device, torch.float32)
    load_s = time.perf_counter() - t0
    with SourceReader(str(data)) as reader:
        encoded_list = encode_examples(tokenizer, [p.example for p in iter_examples(reader)], MAX_TOKENS)
    encoded = dict(enumerate(encoded_list))
    keys = list(encoded)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    split = SplitProxy(model, trainable_blocks)
    model.train()
    cache = PrefixCache(split, encoded, pad_id, device)

    t0 = time.perf_counter()
    cache.ensure(keys)
    prefix_s = time.perf_counter() - t0

    projector = GradientProjector(model, split.linears, proj_dim, seed=seed)
    try:
        t0 = time.perf_counter()
        row_features(split, cache, projector, keys)
        features_s = time.perf_counter() - t0
    finally:
        projector.close()

    # The same top-only forward and backward with no projector hooks: what the sketches add on top.
    groups = [[keys[i] for i in idx] for idx in cache.groups(keys)]
    t0 = time.perf_counter()
    for chunk in groups:
        batch, hidden = cache.batch(chunk)
        with split.top_only(hidden):
            response_losses(model, batch).sum().backward()
        model.zero_grad(set_to_none=True)
    top_fwd_bwd_s = time.perf_counter() - t0

    # A full-model forward and backward of the same batches, for scale (no optimizer step).
    for p in model.parameters():
        p.requires_grad_(True)
    t0 = time.perf_counter()
    for chunk in groups:
        batch = collate([encoded[k] for k in chunk], pad_id)
        response_losses(model, batch).sum().backward()
        model.zero_grad(set_to_none=True)
    full_fwd_bwd_s = time.perf_counter() - t0

    n = len(keys)
    return {
        "rows": n,
        "feature_batch": FEATURE_BATCH,
        "feature_tokens": cache.token_budget,
        "trainable_blocks": trainable_blocks,
        "decoder_blocks": len(split.blocks),
        "proj_dim_used": projector.dim,
        "load_s": round(load_s, 3),
        "prefix_all_rows_s": round(prefix_s, 3),
        "features_all_rows_s": round(features_s, 3),
        "top_fwd_bwd_all_rows_s": round(top_fwd_bwd_s, 3),
        "full_fwd_bwd_all_rows_s": round(full_fwd_bwd_s, 3),
        "prefix_ms_per_row": round(1000 * prefix_s / n, 1),
        "feature_ms_per_row": round(1000 * features_s / n, 1),
        "prefix_cache_mib": round(cache.hidden.nbytes / 2**20, 1),
    }


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=300, help="rows of the default excerpt (ignored with --data)")
    p.add_argument("--keep", type=float, default=0.7, help="share of rows to keep (slap stratify --keep)")
    p.add_argument("--seed", type=int, default=0, help="seed of the excerpt, the stages and the epoch's shuffle")
    p.add_argument("--data", type=Path, default=None, help="data file to use instead of the default excerpt")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where the excerpt, artifacts and logs go (default: a new temporary folder)")
    p.add_argument("--out", type=Path, default=None, help="JSON results file (default: <workdir>/cost.json)")
    p.add_argument("--skip-epoch", action="store_true", help="measure the slap stages only")
    p.add_argument("--epoch-batches", type=int, default=None,
                   help="time only the first K batches of the epoch and extrapolate linearly (default: all)")
    p.add_argument("--profile-replay", action="store_true",
                   help="also time the replay's parts (prefix pass, row features, top-only and full "
                        "forward+backward) once over every row, in this process")
    p.add_argument("--no-warmup", action="store_true",
                   help="skip the warm-up (GGUF cache check and a tiny `slap embed`) before timing")
    # Pass-through knobs of `slap select`; None leaves the CLI's default in force.
    p.add_argument("--refresh", type=int, default=None)
    p.add_argument("--pool-factor", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--proj-dim", type=int, default=None)
    args = p.parse_args(argv)
    if args.epoch_batches is not None and args.epoch_batches < 1:
        p.error("--epoch-batches must be >= 1")
    return args


def warm_up(data: Path, workdir: Path) -> dict[str, Any]:
    """Make the timed runs see a converted proxy and warm file caches, and record what state they started in.

    The first use of the GGUF proxy converts it to safetensors (~25 s, once per machine); counting that in
    `stratify` would charge a one-off cost to every run.
    """
    ref = resolve_model(DEFAULT_PROXY_MODEL)
    state: dict[str, Any] = {"proxy": ref.identity}
    if ref.is_gguf:
        cache = gguf_cache_path(ref)
        state["gguf_cache"] = str(cache)
        state["gguf_cache_existed"] = cache.exists()
        t0 = time.perf_counter()
        ensure_gguf_converted(ref)
        state["gguf_convert_s"] = round(time.perf_counter() - t0, 3)
    tiny = workdir / "warmup.jsonl"
    first_lines(data, WARMUP_ROWS, tiny)
    stage = run_stage("warmup_embed", ["embed", str(tiny), "-o", str(workdir / "warmup_embeddings.parquet"),
                                       "--device", "cpu", "--quiet", "--force"], workdir)
    state["warmup_embed_s"] = stage.wall_s
    state["warmup_embed_rows"] = WARMUP_ROWS
    return state


def print_table(results: dict[str, Any]) -> None:
    out = sys.stdout
    stages = results["stages"]
    out.write(f"\n{'stage':<44} {'wall s':>9} {'cpu s':>9} {'rss MiB':>9}\n")
    for name in ("embed", "stratify", "select", "export"):
        s = stages[name]
        out.write(f"{'slap ' + name:<44} {s['wall_s']:>9.1f} {s['cpu_s']:>9.1f} {s['max_rss_mib']:>9.0f}\n")
    for key, value in results["select_stats"].get("seconds", {}).items():
        out.write(f"{'  select: ' + key:<44} {value:>9.1f}\n")
    out.write(f"{'  select: other (start, load, tokenize, I/O)':<44} {results['select_other_s']:>9.1f}\n")
    out.write("disk MiB: " + ", ".join(f"{k} {v:g}" for k, v in results["disk_mib"].items()) + "\n")
    epoch = results.get("epoch")
    if epoch:
        note = (f" (extrapolated from {epoch['batches_timed']}/{epoch['batches']} batches)"
                if epoch["extrapolated"] else "")
        out.write(f"{'epoch: load proxy':<44} {epoch['load_s']:>9.1f}\n")
        out.write(f"{'epoch: read + tokenize':<44} {epoch['tokenize_s']:>9.1f}\n")
        out.write(f"{'epoch: train ' + str(epoch['batches']) + ' batches':<44} {epoch['epoch_s']:>9.1f}"
                  f" {epoch['epoch_cpu_s']:>9.1f}{note}\n")
        if epoch["extrapolated"]:
            out.write(f"{'  (by padded tokens instead)':<44} {epoch['epoch_s_by_padded_tokens']:>9.1f}\n")
        r = results["ratios"]
        out.write(f"\n(stratify + select) / epoch          = {r['stratify_select_over_epoch']:.2f}\n")
        out.write(f"(embed + stratify + select) / epoch  = {r['embed_stratify_select_over_epoch']:.2f}\n")
        out.write(f"same in CPU seconds                  = {r['cpu_stratify_select_over_epoch']:.2f}, "
                  f"{r['cpu_embed_stratify_select_over_epoch']:.2f}\n")
        out.write("target: <= 0.40 (issue 19)\n")
    prof = results.get("replay_profile")
    if prof:
        out.write(f"\nreplay parts, once over all {prof['rows']} rows "
                  f"(up to {prof['feature_batch']} rows of up to {prof.get('feature_tokens', '?')} padded tokens, "
                  f"grouped by length):\n")
        for key in ("prefix_all_rows_s", "features_all_rows_s", "top_fwd_bwd_all_rows_s", "full_fwd_bwd_all_rows_s"):
            out.write(f"  {key:<42} {prof[key]:>9.1f}\n")
    out.flush()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="slap-cost-"))
    workdir.mkdir(parents=True, exist_ok=True)
    out_path = args.out or workdir / "cost.json"
    results: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                               "argv": sys.argv, "code": code_version(), "machine": machine_info(),
                               "load_average_start": os.getloadavg()}

    if args.data is not None:
        data = args.data
        results["data"] = {"path": str(data), "given": True}
    else:
        data = workdir / f"excerpt_{args.rows}_seed{args.seed}.jsonl"
        results["data"] = build_excerpt(args.rows, args.seed, data)

    results["warmup"] = {"skipped": True} if args.no_warmup else warm_up(data, workdir)

    emb, strata, selection = (workdir / f"{k}.parquet" for k in ("embeddings", "strata", "selection"))
    pruned = workdir / "pruned.jsonl"
    common = ["--device", "cpu", "--quiet", "--force"]
    # The prefix store stratify keeps for select lives in the run's own --cache-dir, emptied first: its disk is
    # measured, and an older run's store can neither be read nor counted.
    cache = workdir / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    cached = ["--cache-dir", str(cache)]
    # The proxy loss passes are cached per embeddings file in the slapcli cache, and the same excerpt embeds to the
    # same bytes, so a second run would time a cache hit (stratify in 2 s, select then computing every prefix).
    # The stages get a slapcli cache of their own, empty but for the model conversions (linked: warm, as a user's).
    stage_env = {"SLAP_CACHE_DIR": str(cold_cache(workdir / "slap_cache"))}
    select_knobs = [f for flag, value in (("--refresh", args.refresh), ("--pool-factor", args.pool_factor),
                                          ("--batch-size", args.batch_size), ("--proj-dim", args.proj_dim))
                    if value is not None for f in (flag, str(value))]
    stages = [
        run_stage("embed", ["embed", str(data), "-o", str(emb), "--max-tokens", str(MAX_TOKENS), *common], workdir,
                  env=stage_env),
        run_stage("stratify", ["stratify", str(emb), "-o", str(strata), "--keep", str(args.keep),
                               "--seed", str(args.seed), *cached, *common], workdir, env=stage_env),
    ]
    results["disk_mib"] = {"prefix_store": round(folder_bytes(cache) / 2**20, 2)}
    stages += [
        run_stage("select", ["select", str(strata), "-o", str(selection), "--method", "slap", "--timings",
                             "--seed", str(args.seed), *select_knobs, *cached, *common], workdir, env=stage_env),
        run_stage("export", ["export", str(selection), "-o", str(pruned), "--quiet", "--force"], workdir,
                  env=stage_env),
    ]
    results["stages"] = {s.stage: asdict(s) for s in stages}
    results["disk_mib"].update({path.name: round(path.stat().st_size / 2**20, 2)
                                for path in (data, emb, strata, selection, pruned)})
    sel_meta = read_meta(str(selection), "selection")
    strata_meta = read_meta(str(strata), "strata")
    results["select_stats"] = sel_meta.stats
    results["select_config"] = sel_meta.config
    results["strata_stats"] = {**strata_meta.stats, "clusters_used": strata_meta.config.get("clusters_used")}
    # What the replay's own timers do not see: interpreter start, imports, proxy load, tokenising, artifact I/O.
    results["select_other_s"] = round(results["stages"]["select"]["wall_s"]
                                      - sum(sel_meta.stats.get("seconds", {}).values()), 3)

    if not args.skip_epoch:
        epoch = full_finetune_epoch(data, args.seed, args.epoch_batches)
        results["epoch"] = epoch
        t = {s.stage: s.wall_s for s in stages}
        c = {s.stage: s.cpu_s for s in stages}
        selection_s = t["stratify"] + t["select"]
        results["ratios"] = {
            "stratify_select_over_epoch": round(selection_s / epoch["epoch_s"], 3),
            "embed_stratify_select_over_epoch": round((selection_s + t["embed"]) / epoch["epoch_s"], 3),
            # The same with the epoch's own load and tokenise included (a trainer pays them too).
            "embed_stratify_select_over_epoch_with_load": round(
                (selection_s + t["embed"]) / (epoch["epoch_s"] + epoch["load_s"] + epoch["tokenize_s"]), 3),
            # CPU seconds (user + sys) on both sides: steadier than wall time when others load the machine.
            "cpu_stratify_select_over_epoch": round(
                (c["stratify"] + c["select"]) / epoch["epoch_cpu_s"], 3),
            "cpu_embed_stratify_select_over_epoch": round(
                (c["embed"] + c["stratify"] + c["select"]) / epoch["epoch_cpu_s"], 3),
            "epoch_extrapolated": epoch["extrapolated"],
        }

    if args.profile_replay:
        cfg = results["select_config"]
        results["replay_profile"] = profile_replay(data, args.seed, int(cfg["proj_dim"]),
                                                   int(cfg["trainable_blocks"]))

    results["load_average_end"] = os.getloadavg()
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print_table(results)
    sys.stdout.write(f"\nresults: {out_path}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
