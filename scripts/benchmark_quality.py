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

This file is the command: its options, the plan of runs and the report's words. The data, the `slap` stages, the
prefix caches, the trainer and run files, the gradient signals and the shared report pieces are scripts/benchlib/,
which benchmark_bound.py and benchmark_regimes.py use too.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from benchlib.common import ROOT, floats, log, rel
from benchlib.data import add_data_options, build_data
from benchlib.influence import gradient_alignment
from benchlib.report import at_keeps, code_version, data_line, fmt, machine_info, pyplot, schedule_words, spread
from benchlib.stages import available_methods, cached_stage, kept_rows
from benchlib.trainer import (
    HiddenCache,
    TopTrainer,
    add_recipe_options,
    load_split_proxy,
    prefix_cache_key,
    recipe_key,
    response_token_counts,
    run_file,
    run_in_parallel,
    train_and_evaluate,
    write_run,
)

from slapcli.models import DEFAULT_PROXY_MODEL, ensure_gguf_converted, resolve_model

# The methods issue 4 asks for, in the order of the report; anything else `slap select` offers is appended.
EXPECTED_METHODS = ["slap", "embedding", "stratified", "ccs", "kcenter", "loss", "ifd"]


# ---------------------------------------------------------------------------------------------- plan


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


# ---------------------------------------------------------------------------------------------- probes and diagnostic


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
    plt = pyplot()  # optional extra `bench`: imported only here
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
    add_data_options(p)
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
    add_recipe_options(p)
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
        "code": code_version(),
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
        ckey = prefix_cache_key(path, ref.identity, split.split, args.max_tokens)
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

    for _, _, _, rows, sel in jobs:
        if rows is not None and rows.size and int(rows.max()) >= n_train:
            raise SystemExit(f"{sel and sel['path']}: row {int(rows.max())} beyond the {n_train} training rows")
    tags = [f"{method}_k{keep:.2f}_s{seed}" if sel else method for method, keep, seed, _, sel in jobs]
    wanted = [(run_file(workdir, tag, ts, run_key), rows, ts)
              for tag, (_, _, _, rows, _) in zip(tags, jobs, strict=True)
              for ts in (train_seeds if rows is not None else [None])]
    pending = [w for w in wanted if not w[0].exists()]
    if args.jobs > 1 and len(pending) > 1:
        log(f"training {len(pending)} runs in {min(args.jobs, len(pending))} processes of {args.threads} thread(s)")
        run_in_parallel(pending, args, workdir)
    runs = []
    for i, (method, keep, seed, rows, sel) in enumerate(jobs):
        tag = tags[i]
        per_seed = []
        for ts in (train_seeds if rows is not None else [None]):  # the untrained model needs one evaluation
            run_path = run_file(workdir, tag, ts, run_key)
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
