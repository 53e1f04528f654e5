"""Can any subset of this data train as well as all of it? A learning curve and an influence heuristic (issue 4).

Issue 4 asks `slap` at keep 0.6-0.7 to reach the held-out loss of full data. Whether any selection can is a
property of the data and the protocol before it is one of the method. With the quality benchmark's data,
prefix caches, trainer and recipe (scripts/benchlib/, shared with benchmark_quality.py; the same `--workdir`
options), this measures:

1. The learning curve: random subsets at `--keeps` (several seeds) and full data. Its slope is what a
   selection has to win back at each keep ratio.
2. An oracle selection. Per training row, its first-order influence on the held-out loss: the inner product
   of its loss gradient with the held-out loss gradient, the latter preconditioned by the optimizer's second
   moments (an AdamW step moves along g / sqrt(v)), times the learning rate, summed over `--checkpoints` points
   of the full-data training run (TracIn; LESS uses the same Adam-aware form). The held-out gradient is taken
   on HALF of the held-out rows (A, half of each domain). The top rows by this score at `--oracle-keeps` are
   trained like every subset and scored on both halves: on A it is the best a per-row selection can do that
   sees the very rows it is scored on; on B (the same distribution, rows it never saw) it shows whether what
   such a signal finds carries over to new rows.
3. The same influence against the training rows' own mean gradient (`train`): the best a selection without a
   dev set can aim at.
4. Redundancy: the nearest-neighbour cosine of the training rows' sentence embeddings (`slap embed`).

Usage (the 1,000-row draw of docs/RESULTS_1000.md; caches are shared with benchmark_quality.py):

    .venv/bin/python scripts/benchmark_bound.py --workdir work/q1000 --train-rows 1000 --data-seed 1 \\
        --jobs 2 --threads 1

Outputs: `<workdir>/bound.json` and the report, docs/BOUND.md for the shared mix (`<workdir>/BOUND.md` with
`--train`), with a plot beside it (needs matplotlib).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow.parquet as pq
import torch
from benchlib.common import ROOT, floats, log, rel
from benchlib.data import add_data_options, build_data
from benchlib.influence import cached_influence, influence_scores
from benchlib.report import data_line, git, machine_info, pyplot, schedule_words, spread
from benchlib.stages import cached_stage
from benchlib.trainer import (
    HiddenCache,
    TopTrainer,
    add_recipe_options,
    load_split_proxy,
    prefix_cache_key,
    recipe_key,
    run_file,
    run_in_parallel,
    train_and_evaluate,
    write_run,
)

from slapcli.models import DEFAULT_PROXY_MODEL, ensure_gguf_converted, resolve_model

TARGETS = {
    "heldout-a": "held-out half A (the oracle: it sees rows it is scored on)",
    "train": "the training rows' own mean gradient (no dev set)",
}
SUBSET_STREAM = 7  # seed stream of the learning curve's random subsets (fixed: run files are named by seed)


# ---------------------------------------------------------------------------------------------- pure helpers


def random_subset(n: int, keep: float, seed: int) -> np.ndarray:
    """Uniform random rows, sorted; its own seed stream so it never equals another script's draw by accident."""
    return np.sort(np.random.default_rng([SUBSET_STREAM, seed]).choice(n, round(keep * n), replace=False))


def halves(domains: list[str], seed: int = 0) -> np.ndarray:
    """Boolean mask of half A: half of each domain's held-out rows (rounded down), drawn with `seed`."""
    rng = np.random.default_rng(seed)
    dom = np.array(domains)
    mask = np.zeros(len(dom), dtype=bool)
    for d in sorted(set(domains)):
        idx = np.flatnonzero(dom == d)
        mask[rng.permutation(idx)[: len(idx) // 2]] = True
    return mask


def domain_mean(losses: np.ndarray, domains: np.ndarray, where: np.ndarray) -> float:
    """The benchmark's metric on the rows in `where`: the mean over domains of each domain's mean row loss."""
    return float(np.mean([losses[where & (domains == d)].mean() for d in sorted(set(domains[where].tolist()))]))


def top_rows(scores: np.ndarray, keep: float) -> np.ndarray:
    """The round(keep * n) rows of highest score (ties by row order), sorted."""
    order = np.argsort(-scores, kind="stable")
    return np.sort(order[: round(keep * len(scores))])


def nearest_neighbour_cosine(embeddings: np.ndarray) -> np.ndarray:
    """Per row, the cosine of its nearest other row (unit-norm inputs): faiss's exact inner-product search for
    the two nearest, of which the one that is not the row itself (with an exact copy both score the same)."""
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    sims, ids = index.search(x, 2)
    return np.where(ids[:, 0] == np.arange(len(x)), sims[:, 1], sims[:, 0]).astype(np.float32)


# ---------------------------------------------------------------------------------------------- report


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per subset kind and keep: its losses on all held-out rows and on halves A and B (random: over seeds)."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["kind"], r["keep"]), []).append(r)
    out = {}
    for (kind, keep), members in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        out[f"{kind}@{keep:.2f}"] = {"kind": kind, "keep": keep, "rows": members[0]["rows"],
                                     **{part: spread([m[part] for m in members]) for part in ("all", "a", "b")}}
    return out


def fmt_cell(c: dict[str, float]) -> str:
    if c["n"] == 1:
        return f"{c['mean']:.4f}"
    return f"{c['mean']:.4f} ± {c['sd']:.4f} [{c['min']:.4f}, {c['max']:.4f}]"


def findings(summary: dict[str, Any], keeps: list[float], oracle_keeps: list[float], targets: list[str]) -> list[str]:
    """Sentences computed from the numbers: where random reaches full data, and where the oracles stand."""
    full = summary.get("full@1.00")
    if full is None:
        return []
    lines = []
    reach = [k for k in keeps if f"random@{k:.2f}" in summary
             and summary[f"random@{k:.2f}"]["all"]["mean"] <= full["all"]["max"]]
    lines.append("- Random's mean at or below full data's loss (its worst shuffle) at "
                 + (f"keep {', '.join(f'{k:.2f}' for k in reach)}." if reach else "no keep ratio measured."))
    steps = [(k, summary[f"random@{k:.2f}"]["all"]["mean"] - full["all"]["mean"]) for k in keeps
             if f"random@{k:.2f}" in summary]
    if steps:
        lines.append("- What a selection has to win back (random's mean minus full data's, all held-out rows): "
                     + ", ".join(f"keep {k:.2f}: {gap:+.4f}" for k, gap in steps) + ".")
    for target in targets:
        for k in oracle_keeps:
            o, r = summary.get(f"oracle-{target}@{k:.2f}"), summary.get(f"random@{k:.2f}")
            if o is None:
                continue
            parts = []
            for half, name in (("a", "half A"), ("b", "half B")):
                rel_full = o[half]["mean"] - full[half]["mean"]
                rel_rand = "" if r is None else f", vs random's mean {o[half]['mean'] - r[half]['mean']:+.4f}" + (
                    " (below every random subset)" if o[half]["mean"] < r[half]["min"] else
                    " (above every random subset)" if o[half]["mean"] > r[half]["max"] else " (inside random's range)")
                parts.append(f"{name} {o[half]['mean']:.4f} (vs full {rel_full:+.4f}{rel_rand})")
            lines.append(f"- `oracle-{target}` at keep {k:.2f}: " + "; ".join(parts) + ".")
    return lines


def write_plot(summary: dict[str, Any], path: Path, title: str) -> None:
    plt = pyplot()  # optional extra `bench`
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), dpi=120, sharey=False)
    for ax, half, name in ((axes[0], "a", "half A (the oracle's target)"), (axes[1], "b", "half B (unseen rows)")):
        rnd = sorted((c["keep"], c[half]) for c in summary.values() if c["kind"] == "random")
        if rnd:
            x = [k for k, _ in rnd]
            ax.fill_between(x, [c["min"] for _, c in rnd], [c["max"] for _, c in rnd], color="0.75", alpha=0.6,
                            label="random: min-max over seeds")
            ax.plot(x, [c["mean"] for _, c in rnd], color="0.3", lw=2, label="random (mean)")
        full = summary.get("full@1.00")
        if full:
            ax.axhline(full[half]["mean"], color="k", ls="--", lw=1, label="full data")
        for marker, target in zip("o^sD", TARGETS, strict=False):
            pts = sorted((c["keep"], c[half]["mean"]) for c in summary.values() if c["kind"] == f"oracle-{target}")
            if pts:
                ax.plot([k for k, _ in pts], [v for _, v in pts], marker=marker, ms=8, lw=0, label=f"oracle-{target}")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("keep ratio")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out response loss, mean over domains")
    axes[1].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_markdown(results: dict[str, Any], path: Path, plot: Path | None) -> None:
    c, d, s = results["config"], results["data"], results["summary"]
    half = results["halves"]
    lines = ["# Can any subset train as well as the full data? A learning curve and an influence heuristic", "",
             f"Written by `scripts/benchmark_bound.py` on {results['finished']} (commit `{results['commit'][:10]}`). "
             f"Every number comes from `{rel(results['out'])}` of that run (git-ignored); rerun the command to "
             "reproduce it.", "", "## Protocol", "",
             data_line(d),
             f"- **Trainer and recipe**: as scripts/benchmark_quality.py: SmolLM2-135M-Instruct, top "
             f"{c['train_blocks']} blocks trained from the pretrained weights on cached hidden states, AdamW lr "
             f"{c['lr']:g}, {schedule_words(c)}, batch {c['batch_size']}, {c['epochs']} epoch(s), response-token "
             f"loss, max {c['max_tokens']} tokens; {c['train_seeds']} shuffle(s) per subset (their mean).",
             f"- **Held-out halves**: A = {half['a']} rows, B = {half['b']} rows, half of each domain each (seed "
             f"{c['half_seed']}). Metric everywhere: mean over domains of the mean row loss.",
             f"- **Learning curve**: uniform random subsets at keep {', '.join(f'{k:.2f}' for k in c['keeps'])}, "
             f"{c['random_seeds']} seeds each, and full data.",
             f"- **Oracles** at keep {', '.join(f'{k:.2f}' for k in c['oracle_keeps'])}: the rows of highest "
             f"first-order influence, lr x <g_row, g_target / (sqrt(v) + eps)> summed over {c['checkpoints']} "
             "checkpoints of the full-data run (shuffle seed 0), v = AdamW's second moments there. Targets: "
             + "; ".join(f"`{t}`: {TARGETS[t]}" for t in c["targets"]) + ".", "",
             "## Machine", "", f"{results['machine_line']}", "", "## Command", "", "```sh", results["command"], "```",
             "", "## Results", "",
             "Held-out loss (lower is better). Random: mean ± sd over seeds [min, max].", "",
             "| subset | rows | all held-out rows | half A | half B |", "| --- | ---: | ---: | ---: | ---: |"]
    order = sorted(s.values(), key=lambda x: (x["kind"] != "pretrained", x["kind"] != "full",
                                                 x["kind"].startswith("oracle"), x["kind"], x["keep"]))
    for x in order:
        label = x["kind"] if x["kind"] in ("pretrained", "full") else f"{x['kind']} @ {x['keep']:.2f}"
        lines.append(f"| {label} | {x['rows']} | {fmt_cell(x['all'])} | {fmt_cell(x['a'])} | {fmt_cell(x['b'])} |")
    lines += ["", *findings(s, c["keeps"], c["oracle_keeps"], c["targets"]), ""]
    if plot is not None:
        lines += [f"![learning curve and oracles]({plot.name})", ""]
    red = results.get("redundancy")
    if red:
        q = red["quantiles"]
        lines += ["### Redundancy of the training rows", "",
                  "Cosine of each training row's nearest other row (all-MiniLM-L6-v2 embeddings of `slap embed`): "
                  + ", ".join(f"{k} {v:.3f}" for k, v in q.items()) + f". Rows whose nearest neighbour is above 0.9: "
                  f"{red['share_above_0.9']:.1%}; above 0.8: {red['share_above_0.8']:.1%}.", ""]
    inf = results.get("influence", {})
    if inf:
        lines += ["### Influence passes", ""]
        for t, v in inf.items():
            neg = ", ".join(f"step {ck['step']}: {ck['negative_share']:.0%}" for ck in v["checkpoints"])
            lines.append(f"- `{t}`: {v['seconds']:.0f} s{' (cached)' if v['cached'] else ''}; share of rows whose "
                         f"step would raise the target loss, per checkpoint: {neg}; overlap of its top "
                         f"{c['oracle_keeps'][0]:.0%} with the other target's: "
                         f"{v.get('overlap', float('nan')):.0%}.")
        lines.append("")
    analysis = results.get("analysis")
    if analysis and Path(analysis).is_file() and Path(analysis).read_text().strip():
        lines += ["## Reading (hand-written, kept in `" + rel(analysis) + "`)", "",
                  Path(analysis).read_text().strip(), ""]
    lines += ["## Wall times", "", "| stage | seconds |", "| --- | ---: |"]
    lines += [f"| {k} | {v:.0f} |" for k, v in results["wall"].items()]
    path.write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("work/quality"),
                   help="the quality benchmark's workdir (data, embeddings and prefix caches are shared)")
    add_data_options(p)  # as benchmark_quality.py
    add_recipe_options(p)
    p.add_argument("--keeps", type=floats, default=[0.5, 0.6, 0.7, 0.8, 0.9], help="learning-curve keep ratios")
    p.add_argument("--random-seeds", type=int, default=3, help="random subsets per keep")
    p.add_argument("--train-seeds", type=int, default=1, help="shuffles per subset (its loss is their mean)")
    p.add_argument("--oracle-keeps", type=floats, default=[0.7])
    p.add_argument("--targets", default=",".join(TARGETS),
                   help=f"influence targets, comma list of {', '.join(TARGETS)}; empty: no oracle")
    p.add_argument("--half-seed", type=int, default=0,
                   help="which held-out rows form half A (the held-out oracle's target); other seeds, other files")
    p.add_argument("--checkpoints", type=int, default=4, help="points of the full-data run where influence is taken")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--jobs", type=int, default=1, help="training runs at once (processes of --threads threads)")
    p.add_argument("--out", type=Path, default=None, help="results JSON (default <workdir>/bound.json)")
    p.add_argument("--docs", type=Path, default=None,
                   help="report (default docs/BOUND.md for the shared mix, <workdir>/BOUND.md for --train)")
    p.add_argument("--analysis", type=Path, default=None,
                   help="hand-written reading copied into the report (default docs/bound_analysis.md for the "
                        "shared mix)")
    args = p.parse_args(argv)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in args.targets if t not in TARGETS]
    if unknown:
        p.error(f"unknown target(s) {', '.join(unknown)}; known: {', '.join(TARGETS)}")
    if args.train is None and (args.heldout is not None or args.domain_field != "domain"):
        p.error("--heldout and --domain-field need --train")
    args.bf16 = False  # the shared trainer reads it; bf16 is ~20x slower on CPUs without avx512_bf16
    if args.docs is None:
        args.docs = ROOT / "docs" / "BOUND.md" if args.train is None else args.workdir / "BOUND.md"
    if args.analysis is None and args.train is None:
        args.analysis = ROOT / "docs" / "bound_analysis.md"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    workdir = args.workdir.resolve()
    for sub in ("logs", "runs"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    wall: dict[str, float] = {}
    data = build_data(args, workdir)
    train_file, heldout_file = workdir / "train.jsonl", workdir / "heldout.jsonl"
    log(f"data: {data['train_rows']} training rows {data['train_per_domain']}, {data['heldout_rows']} held-out")

    ensure_gguf_converted(resolve_model(DEFAULT_PROXY_MODEL))
    emb = workdir / "embeddings.parquet"
    stage = cached_stage("embed", ["embed", str(train_file), "-o", str(emb), "--max-tokens",
                                   str(args.max_tokens), "--device", "cpu", "--quiet"], emb, workdir)
    wall[f"slap embed (for redundancy){' (cached)' if stage['cached'] else ''}"] = stage["wall_s"]
    vectors = np.stack(pq.read_table(emb, columns=["embedding"])["embedding"].to_numpy(zero_copy_only=False))
    nn_cos = nearest_neighbour_cosine(vectors.astype(np.float32))
    redundancy = {"quantiles": {f"p{int(q * 100)}": float(np.quantile(nn_cos, q)) for q in (0.1, 0.5, 0.9, 0.99)},
                  "share_above_0.9": float((nn_cos > 0.9).mean()), "share_above_0.8": float((nn_cos > 0.8).mean())}

    ref, tokenizer, split, pad_id = load_split_proxy(args.train_blocks)
    prefix: dict[str, dict[str, Any]] = {}
    caches: dict[str, HiddenCache] = {}
    for key, path in (("train", train_file), ("heldout", heldout_file)):
        ckey = prefix_cache_key(path, ref.identity, split.split, args.max_tokens)
        t0 = time.perf_counter()
        prefix[key] = HiddenCache.build(workdir / f"prefix_{key}", path, split, tokenizer, args.max_tokens, ckey)
        caches[key] = HiddenCache(workdir / f"prefix_{key}")
        built = prefix[key]
        wall[f"prefix cache, {key} rows{' (cached)' if built['cached'] else ''}"] = (
            float(built.get("seconds", 0.0)) if built["cached"] else time.perf_counter() - t0)
    trainer = TopTrainer(split, pad_id, args)
    run_key = recipe_key(args, prefix)
    n = len(caches["train"])
    half_a = halves(caches["heldout"].domains, args.half_seed)
    held_domains = np.array(caches["heldout"].domains)

    # (kind, keep, rows, tag); the full-data run files are the quality benchmark's own (same tag and recipe key)
    subsets: list[tuple[str, float, np.ndarray | None, str]] = [("pretrained", 0.0, None, "pretrained"),
                                                               ("full", 1.0, np.arange(n), "full")]
    subsets += [("random", k, random_subset(n, k, s), f"lc_k{k:.2f}_s{s}") for k in args.keeps
                for s in range(args.random_seeds)]
    influence: dict[str, Any] = {}
    influence_threads = max(args.threads, args.jobs * args.threads)  # nothing else runs during these passes
    torch.set_num_threads(influence_threads)
    for target in args.targets:
        # Only the held-out target depends on which rows form half A; other half seeds get their own files.
        half_seed = args.half_seed if target == "heldout-a" else 0
        key = f"{run_key}:{target}:{args.checkpoints}:{half_seed}"
        suffix = f"_h{half_seed}" if half_seed else ""
        t0 = time.perf_counter()
        influence[target] = cached_influence(
            workdir / f"influence_{target}{suffix}.npz", key,
            lambda target=target: influence_scores(trainer, caches, target, half_a, args.checkpoints, 0))
        # A cached pass reports the seconds it took when it was computed, not the 0 s of loading it.
        wall[f"influence against {target}{' (cached)' if influence[target]['cached'] else ''}"] = (
            influence[target]["seconds"] if influence[target]["cached"] else time.perf_counter() - t0)
        subsets += [(f"oracle-{target}", k, top_rows(influence[target]["scores"], k),
                     f"oracle-{target}_k{k:.2f}{suffix}") for k in args.oracle_keeps]
    if len(args.targets) == 2 and args.oracle_keeps:
        tops = [set(top_rows(influence[t]["scores"], args.oracle_keeps[0]).tolist()) for t in args.targets]
        for t in args.targets:
            influence[t]["overlap"] = len(tops[0] & tops[1]) / max(1, len(tops[0]))

    torch.set_num_threads(args.threads)
    train_seeds = list(range(args.train_seeds))

    def usable(path: Path) -> bool:  # run files from before per-row losses were recorded are trained again
        return path.exists() and "heldout_rows" in json.loads(path.read_text())

    wanted = [(run_file(workdir, tag, ts, run_key), rows, ts) for _, _, rows, tag in subsets
              for ts in (train_seeds if rows is not None else [None])]
    pending = [w for w in wanted if not usable(w[0])]
    t0 = time.perf_counter()
    if args.jobs > 1 and len(pending) > 1:
        log(f"training {len(pending)} runs in {min(args.jobs, len(pending))} processes")
        run_in_parallel(pending, args, workdir)
    else:
        for i, (path, rows, ts) in enumerate(pending):
            write_run(path, train_and_evaluate(trainer, caches, rows, ts))
            log(f"  run {i + 1}/{len(pending)} {path.name}")
    wall[f"training and evaluation of {len(pending)} pending run(s), wall clock"] = time.perf_counter() - t0

    runs = []
    run_seconds = 0.0
    for kind, keep, rows, tag in subsets:
        for ts in (train_seeds if rows is not None else [None]):
            one = json.loads(run_file(workdir, tag, ts, run_key).read_text())
            run_seconds += float(one.get("train_wall_s", 0.0)) + float(one.get("eval_s", 0.0))
            losses = np.array(one["heldout_rows"])
            runs.append({"kind": kind, "keep": keep, "tag": tag, "train_seed": ts,
                         "rows": 0 if rows is None else len(rows),
                         "all": domain_mean(losses, held_domains, np.ones(len(losses), dtype=bool)),
                         "a": domain_mean(losses, held_domains, half_a),
                         "b": domain_mean(losses, held_domains, ~half_a)})
    wall[f"training and evaluation of all {len(runs)} runs, summed over run files"] = run_seconds
    # One subset = the mean over its shuffles, before random's spread over subsets is taken.
    merged: dict[str, dict[str, Any]] = {}
    for r in runs:
        m = merged.setdefault(r["tag"], {**r, "all": [], "a": [], "b": []})
        for part in ("all", "a", "b"):
            m[part].append(r[part])
    subset_runs = [{**m, **{part: float(np.mean(m[part])) for part in ("all", "a", "b")}} for m in merged.values()]

    out_path = args.out or workdir / "bound.json"
    m = machine_info()
    results = {
        "command": shlex.join([".venv/bin/python", "scripts/benchmark_bound.py", *(argv or sys.argv[1:])]),
        "commit": git("rev-parse", "HEAD"), "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "data": data,
        "machine": m, "machine_line": f"{m['nproc']} cores ({m['cpu_model']}), {m['memory_gib']} GiB, no GPU used; "
                                      f"torch {m['torch']}, transformers {m['transformers']}; training in "
                                      f"{args.jobs} process(es) of {args.threads} thread(s), influence passes on "
                                      f"{influence_threads} thread(s).",
        "halves": {"a": int(half_a.sum()), "b": int((~half_a).sum())}, "redundancy": redundancy,
        "influence": {t: {k: v for k, v in inf.items() if k != "scores"} for t, inf in influence.items()},
        "runs": runs, "summary": summarize(subset_runs), "out": str(out_path),
        "analysis": str(args.analysis) if args.analysis else None,
    }
    wall["this invocation, wall clock"] = time.perf_counter() - t_start
    results["wall"] = wall
    out_path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    for line in findings(results["summary"], args.keeps, args.oracle_keeps, args.targets):
        log(line)
    plot = args.docs.parent / f"{args.docs.stem.lower()}_curve.png"
    try:
        write_plot(results["summary"], plot, f"Top-{args.train_blocks}-block fine-tune, {args.epochs} epoch(s), "
                                             f"{data['train_rows']} training rows")
    except ImportError:
        plot = None
    write_markdown(results, args.docs, plot)
    log(f"report: {args.docs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
