"""Performance of each stage on this machine (issue 5): embed speed, scale without a proxy, flat memory.

Every number is a whole `slap` subprocess (interpreter start, imports, model load and artifact I/O count, as
they do for a user), timed with its own rusage (wall, CPU, peak RSS). Parts, each with `--only`:

- `embed`: `slap embed` on N real rows (default 2,000, the shared two-domain excerpt) against the plain way
  of doing it, also a whole process: transformers AutoModel, rows in file order, batches of 32, mean
  pooling, torch defaults. Runs alternate (plain, slap, plain, slap, ...) so load drifts hit both; the
  medians are compared. Also reports rows/s, encoder tokens/s and the worst cosine between the two
  processes' vectors for the same row (the speed must not come from computing something else).
- `scale`: 1,000,000 synthetic 384-dim unit vectors (200 Gaussian centres) written as an embeddings
  artifact, then `slap stratify --no-proxy-loss` and `slap select --method embedding`: wall time and peak
  RSS of each (target: together < 3 min, each < 4 GB).
- `memory`: peak RSS of `slap embed` and `slap export` on synthetic rows at two sizes (default 20k and 200k),
  with a tiny randomly initialised encoder (the real tokenizer), so the pipeline's memory, not the model's
  speed, is measured (target: the larger within 1.5x of the smaller).

- `threads`: `slap embed --threads T` on sample_data (400 rows) for T = 1 and 2, alternating, median wall and CPU
  seconds: what `--threads` defaults to (issue 19).
- `prefix`: the disk the replay's prefix cache takes (`select --cache-dir`): every sample_data row's frozen-bottom
  hidden states written through the replay's own PrefixCache, bytes per 1,000 rows.

- `losspeak`: peak RSS of the proxy loss pass (stratify's) on the longest batch of the embed part's excerpt (the 16
  rows with the most tokens), the LM head scored in one piece vs `HEAD_CHUNK_TOKENS` at a time, each a process of
  its own, alternating: what bounds stratify's memory as pools grow (issue 19). Also the peak after loading the
  proxy and the losses' largest difference between the two ways (0, or float rounding of the shorter products).
  A batch with fewer scored tokens than a piece runs the same code both ways: the spread between such runs is the
  allocator's noise (~300 MiB).

- `startup`: `slap --help` and `slap inspect ARTIFACT` (the scale part's artifact, or a small one made here),
  median of a few runs: the CLI imports its stages only when a command runs (target: well under a second).

The cost of stratify + select against one epoch of fine-tuning is `scripts/benchmark_cost.py`.

Usage (from the repository root):

    .venv/bin/python scripts/benchmark_perf.py --out work/perf/results.json
    .venv/bin/python scripts/benchmark_perf.py --only scale --scale-rows 1000000
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib.data import build_excerpt
from benchlib.report import code_version, machine_info
from benchlib.stages import run_stage
from benchlib.synthetic import encoder_dir, tiny_encoder, write_synthetic_rows

PARTS = ("embed", "scale", "memory", "startup", "threads", "prefix", "losspeak")
SAMPLE = Path(__file__).resolve().parent.parent / "sample_data" / "mixed_400.jsonl"
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}

# The plain way, run as its own process: what a user would write with transformers alone.
PLAIN_EMBED = r'''
import json, sys, numpy as np, torch
from transformers import AutoModel, AutoTokenizer
data, model_dir, out = sys.argv[1:4]
texts = []
with open(data, encoding="utf-8") as f:
    for line in f:
        row = json.loads(line)
        texts.append("\n\n".join(t for t in (row.get("instruction", ""), row.get("input", ""), row["output"]) if t))
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModel.from_pretrained(model_dir).eval()
vectors = []
with torch.no_grad():
    for i in range(0, len(texts), 32):
        enc = tok(texts[i:i + 32], padding=True, truncation=True, max_length=256, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        vectors.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
np.save(out, np.concatenate(vectors))
'''


# One loss pass over the longest batch of a data file, in a process of its own: argv = data, head chunk (0 = one
# piece), out.npy; writes beside it (out.json) the peak RSS after loading the proxy (KiB), so the batch's own share
# can be read, and the batch's token counts.
LOSS_PEAK = r'''
import json, resource, sys, numpy as np, torch
from slapcli.config import EmbedConfig, SelectConfig, StratifyConfig
from slapcli.io.readers import ReadStats, SourceReader, iter_examples
from slapcli.models import load_causal_lm, resolve_model
from slapcli.proxy import loss
from slapcli.proxy.chat import encode_examples
torch.set_num_threads(1)
data, chunk, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
loss.HEAD_CHUNK_TOKENS = chunk or 1 << 62
with SourceReader(data) as reader:
    examples = [r.example for r in iter_examples(reader, "auto", "error", ReadStats())]
tokenizer, model = load_causal_lm(resolve_model(SelectConfig.proxy_model), torch.device("cpu"), torch.float32)
encoded = encode_examples(tokenizer, examples, EmbedConfig.max_tokens)
size = StratifyConfig.loss_batch_size
longest = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))[:size]
with open(out[:-4] + ".json", "w") as f:
    json.dump({"after_load_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
               "tokens": sum(len(encoded[i]) for i in longest), "longest": max(len(encoded[i]) for i in longest),
               "response_tokens": sum(sum(encoded[i].response_mask[1:]) for i in longest)}, f)
terms = loss.compute_loss_terms(model, tokenizer, [examples[i] for i in longest], EmbedConfig.max_tokens, size,
                                torch.device("cpu"))
np.save(out, terms)
'''


def run_python(stage: str, code: str, args: list[str], log_dir: Path) -> dict[str, Any]:
    """Like run_stage, for a `python -c` process (same rusage accounting)."""
    return vars(run_stage(stage, ["-c", code, *args], log_dir, executable=sys.executable))


def bench_embed(workdir: Path, rows: int, repeats: int, seed: int) -> dict[str, Any]:
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    data = workdir / f"embed_{rows}.jsonl"
    excerpt = build_excerpt(rows, seed, data)
    model = encoder_dir()
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    plain_runs, slap_runs = [], []
    for i in range(repeats):
        plain_runs.append(run_python(f"plain_embed_{i}", PLAIN_EMBED, [str(data), model, str(workdir / "plain.npy")],
                                     logs))
        slap_runs.append(vars(run_stage(f"slap_embed_{i}", ["embed", str(data), "-o", str(workdir / "e.parquet"),
                                                             "--force", "--no-resume", "-q"], logs)))
    tok = AutoTokenizer.from_pretrained(model)
    texts = [json.loads(ln) for ln in data.read_text(encoding="utf-8").splitlines()]
    joined = ["\n\n".join(t for t in (r.get("instruction", ""), r.get("input", ""), r["output"]) if t) for r in texts]
    n_tokens = sum(len(ids) for ids in tok(joined, truncation=True, max_length=256)["input_ids"])
    plain = np.load(workdir / "plain.npy")
    column = pq.read_table(workdir / "e.parquet", columns=["embedding"])["embedding"].combine_chunks()
    ours = column.flatten().to_numpy().reshape(len(column), -1)
    cosine = (plain * ours).sum(1)
    plain_s = statistics.median(r["wall_s"] for r in plain_runs)
    slap_s = statistics.median(r["wall_s"] for r in slap_runs)
    return {
        "data": excerpt, "encoder_tokens": n_tokens, "repeats": repeats,
        "plain": {"median_wall_s": plain_s, "rows_per_s": rows / plain_s, "tokens_per_s": n_tokens / plain_s,
                  "runs": plain_runs},
        "slap": {"median_wall_s": slap_s, "rows_per_s": rows / slap_s, "tokens_per_s": n_tokens / slap_s,
                 "runs": slap_runs},
        "speedup": plain_s / slap_s,
        "min_cosine": float(cosine.min()),
    }


def write_synthetic_embeddings(path: Path, n: int, dim: int, seed: int) -> None:
    """n unit vectors around 200 Gaussian centres, as an embeddings artifact, written in slices."""
    import pyarrow as pa

    from slapcli.artifacts import ArtifactMeta, ArtifactWriter, embeddings_schema

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(200, dim)).astype(np.float32)
    with ArtifactWriter(str(path), embeddings_schema(dim)) as writer:
        for start in range(0, n, 65_536):
            m = min(65_536, n - start)
            x = centres[rng.integers(0, 200, m)] + 0.5 * rng.normal(size=(m, dim)).astype(np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            idx = np.arange(start, start + m)
            writer.write(pa.table({
                "row": idx, "line": idx + 1,
                "content_hash": [f"{i:032x}" for i in idx],
                "n_prompt_tokens": np.full(m, 10, np.int32), "n_response_tokens": np.full(m, 20, np.int32),
                "truncated": np.zeros(m, bool),
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), dim),
            }))
        writer.finish(ArtifactMeta(kind="embeddings", command="benchmark_perf synthetic", config={"seed": seed},
                                   source={"path": "synthetic", "fingerprint": {"size": 0, "blake2b": "0"}},
                                   stats={"rows": n, "dim": dim}))


def bench_scale(workdir: Path, rows: int, seed: int) -> dict[str, Any]:
    emb, strata, sel = (workdir / f"scale_{name}.parquet" for name in ("embeddings", "strata", "selection"))
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    write_synthetic_embeddings(emb, rows, 384, seed)
    generate_s = time.perf_counter() - start
    stratify = vars(run_stage("scale_stratify", ["stratify", str(emb), "-o", str(strata), "--no-proxy-loss",
                                                 "--keep", "0.7", "--force", "-q"], logs))
    select = vars(run_stage("scale_select", ["select", str(strata), "-o", str(sel), "--method", "embedding",
                                             "--force", "-q"], logs))
    for path in (emb, strata, sel):
        path.unlink()  # 1.4 GB of vectors: do not leave them in the workdir
    total = stratify["wall_s"] + select["wall_s"]
    return {"rows": rows, "dim": 384, "generate_s": generate_s, "stratify": stratify, "select": select,
            "total_wall_s": total, "peak_rss_mib": max(stratify["max_rss_mib"], select["max_rss_mib"])}


def bench_startup(workdir: Path, repeats: int, seed: int) -> dict[str, Any]:
    """Wall time of `slap --help` and of `slap inspect` on a small embeddings artifact (median of `repeats`)."""
    out = workdir / "startup"
    out.mkdir(parents=True, exist_ok=True)
    artifact = out / "embeddings.parquet"
    if not artifact.exists():
        write_synthetic_embeddings(artifact, 1000, 384, seed)
    results: dict[str, Any] = {}
    for name, args in (("help", ["--help"]), ("inspect", ["inspect", str(artifact)])):
        walls = [run_stage(f"startup_{name}", args, out).wall_s for _ in range(repeats)]
        results[name] = {"median_wall_s": statistics.median(walls), "walls_s": walls}
    return results


def bench_threads(workdir: Path, data: Path, counts: list[int], repeats: int) -> dict[str, Any]:
    """`slap embed --threads T` for each T, runs alternating (so a neighbour's load drifts over all of them)."""
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    runs: dict[int, list[dict[str, Any]]] = {t: [] for t in counts}
    for i in range(repeats):
        for t in counts:
            runs[t].append(vars(run_stage(f"threads_{t}_{i}", ["embed", str(data), "-o", str(workdir / "t.parquet"),
                                                                "--threads", str(t), "--force", "--no-resume", "-q"],
                                          logs)))
    rows = sum(1 for _ in data.open(encoding="utf-8"))
    return {"data": str(data), "rows": rows, "repeats": repeats, "load_note": "see each run's load_avg (before, after)",
            "threads": {str(t): {"median_wall_s": statistics.median(r["wall_s"] for r in rs),
                                 "median_cpu_s": statistics.median(r["cpu_s"] for r in rs), "runs": rs}
                        for t, rs in runs.items()}}


def bench_prefix(workdir: Path, data: Path) -> dict[str, Any]:
    """Bytes the replay's prefix cache writes for every row of `data` (default proxy, default --max-tokens)."""
    import torch

    from slapcli.config import EmbedConfig, SelectConfig
    from slapcli.io.readers import ReadStats, SourceReader, iter_examples
    from slapcli.models import load_causal_lm, resolve_model
    from slapcli.proxy.chat import encode_examples
    from slapcli.proxy.split import PrefixCache, SplitProxy

    torch.set_num_threads(1)  # a shared machine: the bytes are the point, not the speed
    with SourceReader(str(data)) as reader:
        examples = [r.example for r in iter_examples(reader, "auto", "error", ReadStats())]
    cpu = torch.device("cpu")
    tokenizer, model = load_causal_lm(resolve_model(SelectConfig.proxy_model), cpu, torch.float32)
    encoded = dict(enumerate(encode_examples(tokenizer, examples, EmbedConfig.max_tokens)))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    spill = workdir / "prefix"
    spill.mkdir(parents=True, exist_ok=True)
    cache = PrefixCache(SplitProxy(model, SelectConfig.trainable_blocks), encoded, pad_id, cpu, spill_dir=str(spill))
    start = time.perf_counter()
    cache.ensure(list(encoded))
    seconds = time.perf_counter() - start
    written = cache.hidden._end  # bytes appended to the anonymous file: nothing else is in it
    cache.hidden.close()
    tokens = sum(len(e.input_ids) for e in encoded.values())
    hidden = int(model.config.hidden_size)
    assert written == tokens * hidden * 2, "the store holds float16 [tokens, hidden] per row, nothing more"
    return {"data": str(data), "rows": len(encoded), "tokens": tokens, "hidden_size": hidden, "bytes": written,
            "bytes_per_1000_rows": written * 1000 / len(encoded), "mean_tokens_per_row": tokens / len(encoded),
            "prefix_seconds": seconds}


def bench_losspeak(workdir: Path, rows: int, repeats: int, seed: int) -> dict[str, Any]:
    """Peak RSS of stratify's loss pass on the longest batch of the excerpt: the LM head in one piece vs in pieces."""
    from slapcli.proxy.loss import HEAD_CHUNK_TOKENS

    data = workdir / f"embed_{rows}.jsonl"
    build_excerpt(rows, seed, data)
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict[str, Any]]] = {"one_piece": [], "pieces": []}
    for i in range(repeats):
        for name, chunk in (("one_piece", 0), ("pieces", HEAD_CHUNK_TOKENS)):
            run = run_python(f"losspeak_{name}_{i}", LOSS_PEAK, [str(data), str(chunk), str(workdir / f"{name}.npy")],
                             logs)
            batch = json.loads((workdir / f"{name}.json").read_text())
            runs[name].append({**run, "after_load_mib": round(batch["after_load_kib"] / 1024, 1),
                               "batch_tokens": batch["tokens"], "longest_row_tokens": batch["longest"],
                               "response_tokens": batch["response_tokens"]})
    diff = float(np.abs(np.load(workdir / "one_piece.npy") - np.load(workdir / "pieces.npy")).max())
    return {"data": str(data), "head_chunk_tokens": HEAD_CHUNK_TOKENS, "runs": runs, "max_loss_difference": diff,
            "peak_mib": {k: [r["max_rss_mib"] for r in v] for k, v in runs.items()}}


def bench_memory(workdir: Path, sizes: list[int], seed: int) -> dict[str, Any]:
    encoder = tiny_encoder(workdir)
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    for n in sizes:
        data = workdir / f"mem_{n}.jsonl"
        write_synthetic_rows(data, n, seed)
        emb, strata, sel, out = (workdir / f"mem_{n}_{k}" for k in ("e.parquet", "s.parquet", "sel.parquet",
                                                                   "pruned.jsonl"))
        # One thread: memory is the point here, and on a shared 2-core machine two spinning OpenMP threads
        # made the tiny model 10x slower.
        embed = vars(run_stage(f"mem_embed_{n}", ["embed", str(data), "-o", str(emb), "--embed-model", str(encoder),
                                                  "--force", "--no-resume", "-q"], logs, env=ONE_THREAD))
        subprocess.run([sys.executable, "-m", "slapcli", "stratify", str(emb), "-o", str(strata), "--no-proxy-loss",
                        "--force", "-q"], check=True)
        subprocess.run([sys.executable, "-m", "slapcli", "select", str(strata), "-o", str(sel), "--method", "random",
                        "--force", "-q"], check=True)
        export = vars(run_stage(f"mem_export_{n}", ["export", str(sel), "-o", str(out), "--force", "-q"], logs,
                                env=ONE_THREAD))
        results[str(n)] = {"embed": embed, "export": export}
        for path in (data, emb, strata, sel, out):
            path.unlink()
    small, large = (results[str(n)] for n in (min(sizes), max(sizes)))
    return {"sizes": sizes, "runs": results,
            "embed_rss_ratio": large["embed"]["max_rss_mib"] / small["embed"]["max_rss_mib"],
            "export_rss_ratio": large["export"]["max_rss_mib"] / small["export"]["max_rss_mib"]}


def summary_lines(results: dict[str, Any]) -> list[str]:
    lines = []
    if "embed" in results:
        e = results["embed"]
        lines.append(f"embed {e['data']['rows']} rows: plain {e['plain']['median_wall_s']:.1f} s "
                     f"({e['plain']['rows_per_s']:.1f} rows/s, {e['plain']['tokens_per_s']:.0f} tok/s), slap "
                     f"{e['slap']['median_wall_s']:.1f} s ({e['slap']['rows_per_s']:.1f} rows/s, "
                     f"{e['slap']['tokens_per_s']:.0f} tok/s): {e['speedup']:.2f}x, min cosine {e['min_cosine']:.5f}")
    if "scale" in results:
        s = results["scale"]
        lines.append(f"scale {s['rows']:,} rows: stratify {s['stratify']['wall_s']:.1f} s "
                     f"({s['stratify']['max_rss_mib']:.0f} MiB), select {s['select']['wall_s']:.1f} s "
                     f"({s['select']['max_rss_mib']:.0f} MiB), total {s['total_wall_s']:.1f} s")
    if "startup" in results:
        st = results["startup"]
        lines.append(f"startup: slap --help {st['help']['median_wall_s']:.2f} s, "
                     f"slap inspect {st['inspect']['median_wall_s']:.2f} s")
    if "memory" in results:
        m = results["memory"]
        for n, r in m["runs"].items():
            lines.append(f"memory {int(n):,} rows: embed {r['embed']['max_rss_mib']:.0f} MiB "
                         f"({r['embed']['wall_s']:.1f} s), export {r['export']['max_rss_mib']:.0f} MiB")
        lines.append(f"memory ratio largest/smallest: embed {m['embed_rss_ratio']:.2f}, "
                     f"export {m['export_rss_ratio']:.2f}")
    if "threads" in results:
        t = results["threads"]
        lines.append(f"threads, embed {t['rows']} rows: " + ", ".join(
            f"{n} thread(s) {r['median_wall_s']:.1f} s wall / {r['median_cpu_s']:.1f} s CPU"
            for n, r in t["threads"].items()))
    if "losspeak" in results:
        lp = results["losspeak"]
        first = lp["runs"]["one_piece"][0]
        peak = lp["peak_mib"]
        lines.append(f"loss pass, longest batch ({first['batch_tokens']} tokens, {first['response_tokens']} scored, "
                     f"longest row {first['longest_row_tokens']}): peak {peak['one_piece']} MiB in one piece, "
                     f"{peak['pieces']} MiB in pieces of {lp['head_chunk_tokens']} (after loading the proxy "
                     f"{first['after_load_mib']} MiB); largest loss difference {lp['max_loss_difference']}")
    if "prefix" in results:
        p = results["prefix"]
        lines.append(f"prefix cache: {p['bytes'] / 2**20:.0f} MiB for {p['rows']} rows ({p['mean_tokens_per_row']:.0f} "
                     f"tokens/row): {p['bytes_per_1000_rows'] / 2**30:.2f} GiB per 1,000 rows")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(PARTS), help=f"Comma-separated parts: {', '.join(PARTS)}.")
    parser.add_argument("--workdir", type=Path, default=Path("work/perf"))
    parser.add_argument("--out", type=Path, default=Path("work/perf/results.json"))
    parser.add_argument("--embed-rows", type=int, default=2000)
    parser.add_argument("--embed-repeats", type=int, default=2)
    parser.add_argument("--scale-rows", type=int, default=1_000_000)
    parser.add_argument("--memory-rows", default="20000,200000")
    parser.add_argument("--startup-repeats", type=int, default=5)
    parser.add_argument("--threads-counts", default="1,2")
    parser.add_argument("--threads-repeats", type=int, default=3)
    parser.add_argument("--threads-data", type=Path, default=SAMPLE)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise SystemExit(f"--only: unknown parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": machine_info(), "code": code_version(), "argv": sys.argv}
    if "embed" in parts:
        results["embed"] = bench_embed(args.workdir, args.embed_rows, args.embed_repeats, args.seed)
    if "scale" in parts:
        results["scale"] = bench_scale(args.workdir, args.scale_rows, args.seed)
    if "memory" in parts:
        results["memory"] = bench_memory(args.workdir, [int(n) for n in args.memory_rows.split(",")], args.seed)
    if "startup" in parts:
        results["startup"] = bench_startup(args.workdir, args.startup_repeats, args.seed)
    if "threads" in parts:
        results["threads"] = bench_threads(args.workdir, args.threads_data,
                                           [int(t) for t in args.threads_counts.split(",")], args.threads_repeats)
    if "prefix" in parts:
        results["prefix"] = bench_prefix(args.workdir, args.threads_data)
    if "losspeak" in parts:
        results["losspeak"] = bench_losspeak(args.workdir, args.embed_rows, args.embed_repeats, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    for line in summary_lines(results):
        print(line)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
