"""`slap embed` with the local engine against `--engine ray` with 1 and 2 workers (issue 19, docs/PERFORMANCE.md).

Every run is a whole `slap embed` subprocess with the default encoder, measured over its process tree: with Ray
the work happens in processes the command starts (Ray's GCS and raylet, one worker per `--workers`), not in the
command itself, so its own rusage would miss it. The tree is polled every 0.2 s: wall time, CPU seconds (user +
system of every process of the tree, as last seen alive: a process's last 0.2 s before it exits may be missed)
and peak memory (the largest sum of the tree's PSS, where shared pages count once; the command's own peak RSS
is reported beside it). Each run writes its artifact; every artifact must equal the local engine's byte for byte,
which holds only for artifacts of one commit (the metadata names it), so the rows are compared as well: the same
schema and the same values in every column (`same_table_as_local`), which also holds against an older local run.

Data: sample_data/mixed_400.jsonl, and the same rows repeated to `--rows` with a counter in each row's text
(distinct rows: embed encodes an exact copy once, which would flatter every engine). With `--synthetic`, `--rows`
synthetic rows and a tiny random encoder with the real tokenizer (benchlib.synthetic) instead: the path's own
per-row cost (reading, tokenising, hashing, writing, shipping chunks to workers) at 100k-1M rows, which the default
encoder would bury under hours of model time on this machine.

Usage (from the repository root; needs the `ray` extra):

    .venv/bin/python scripts/benchmark_ray.py --rows 10000 --out work/perf/ray.json
    .venv/bin/python scripts/benchmark_ray.py --synthetic --rows 100000 --threads 1 --out work/perf/ray_100k.json
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pyarrow.parquet as pq
from benchlib.synthetic import tiny_encoder, write_synthetic_rows

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample_data" / "mixed_400.jsonl"
# `--ray-address local`: each run starts a Ray of its own, as a command does on a machine without a cluster, even
# when a `ray start` cluster runs here (which a plain run would join).
ENGINES = (("local", []), ("ray1", ["--engine", "ray", "--workers", "1", "--ray-address", "local"]),
           ("ray2", ["--engine", "ray", "--workers", "2", "--ray-address", "local"]))
POLL_S = 0.2


def write_repeated(path: Path, rows: int) -> None:
    """`rows` rows: sample_data's rows in turn, each with its copy number in its instruction and its output."""
    source = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()]
    with path.open("w", encoding="utf-8") as f:
        for i in range(rows):
            row = dict(source[i % len(source)])
            copy = i // len(source)
            if copy:
                row["instruction"] = f"{row['instruction']} (copy {copy})"
                row["output"] = f"{row['output']} (copy {copy})"
            f.write(json.dumps(row) + "\n")


def run_tree(command: list[str], log: Path) -> dict[str, Any]:
    """Wall, CPU and peak memory of `command` and every process it starts."""
    cpu: dict[tuple[int, float], float] = {}
    peak_pss = peak_rss = 0
    load_before = os.getloadavg()[0]
    with log.open("wb") as err:
        start = time.perf_counter()
        proc = psutil.Popen(command, stdout=subprocess.DEVNULL, stderr=err)
        while proc.poll() is None:
            pss = 0
            for p in [proc, *proc.children(recursive=True)]:
                try:
                    with p.oneshot():
                        times = p.cpu_times()
                        memory = p.memory_full_info()
                        cpu[(p.pid, p.create_time())] = times.user + times.system
                except psutil.Error:  # gone between the listing and the reading
                    continue
                pss += memory.pss
                if p.pid == proc.pid:
                    peak_rss = max(peak_rss, memory.rss)
            peak_pss = max(peak_pss, pss)
            time.sleep(POLL_S)
        wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"`{' '.join(command)}` exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
    return {"wall_s": round(wall, 2), "cpu_s": round(sum(cpu.values()), 2), "processes": len(cpu),
            "peak_tree_pss_mib": round(peak_pss / 2**20), "peak_command_rss_mib": round(peak_rss / 2**20),
            "load_avg": (round(load_before, 2), round(os.getloadavg()[0], 2))}


def same_table(a: Path, b: Path, batch_rows: int = 65_536) -> bool:
    """Whether two Parquet files hold the same schema (metadata aside) and the same rows, read a batch at a time
    (a million rows of embeddings are ~1.5 GB a file)."""
    fa, fb = pq.ParquetFile(a), pq.ParquetFile(b)
    if fa.metadata.num_rows != fb.metadata.num_rows or not fa.schema_arrow.equals(fb.schema_arrow):
        return False
    return all(x.equals(y) for x, y in zip(fa.iter_batches(batch_rows), fb.iter_batches(batch_rows), strict=True))


def output_path(data: Path, workdir: Path, engine: str) -> Path:
    return workdir / f"{data.stem}.{engine}.parquet"


def bench(data: Path, workdir: Path, chunk_rows: int | None, engines: list[str],
          extra: list[str]) -> dict[str, Any]:
    slap = str(Path(sys.executable).parent / "slap")
    results: dict[str, Any] = {}
    embed_options = [*extra, *([] if chunk_rows is None else ["--chunk-rows", str(chunk_rows)])]
    for name, options in ENGINES:
        if name not in engines:
            continue
        out = output_path(data, workdir, name)
        command = [slap, "embed", str(data), "-o", str(out), "--force", "--no-resume", "-q", *embed_options, *options]
        results[name] = run_tree(command, workdir / f"{out.stem}.stderr.txt")
        # Against the local engine's artifact, of this run or of an earlier one in the same folder.
        local = output_path(data, workdir, "local")
        # filecmp compares sizes, then reads both in blocks: not two whole 1.5 GB files in memory at 1M rows.
        results[name]["same_bytes_as_local"] = local.exists() and filecmp.cmp(out, local, shallow=False)
        results[name]["same_table_as_local"] = local.exists() and same_table(out, local)
        print(name, results[name], flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000, help="rows of the repeated file (0: sample_data only)")
    # A chunk goes to one worker: embed's default 2,048-row chunks give sample_data's 400 rows one chunk, so a
    # second worker has nothing to do; smaller chunks spread small files (the same for every engine compared).
    parser.add_argument("--chunk-rows", type=int, default=None, help="embed --chunk-rows (default: embed's)")
    parser.add_argument("--engines", default=",".join(name for name, _ in ENGINES),
                        help="which to run, comma-separated (default: all)")
    parser.add_argument("--workdir", type=Path, default=ROOT / "work" / "perf" / "ray")
    parser.add_argument("--skip-sample", action="store_true", help="only the repeated file")
    parser.add_argument("--synthetic", action="store_true",
                        help="synthetic rows and a tiny random encoder (the path's cost, not the model's)")
    parser.add_argument("--threads", type=int, default=None, help="embed --threads (each Ray worker's too)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    engines = args.engines.split(",")
    if unknown := set(engines) - {name for name, _ in ENGINES}:
        parser.error(f"--engines: unknown {sorted(unknown)}; choose from {[name for name, _ in ENGINES]}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    extra = [] if args.threads is None else ["--threads", str(args.threads)]
    if args.synthetic:
        extra += ["--embed-model", str(tiny_encoder(args.workdir))]
        files = [args.workdir / f"synthetic_{args.rows}.jsonl"]
        write_synthetic_rows(files[0], args.rows, seed=0)
    else:
        files = [SAMPLE] if args.rows <= 0 or not args.skip_sample else []
        if args.rows:
            files.append(args.workdir / f"repeated_{args.rows}.jsonl")
            write_repeated(files[-1], args.rows)
    results = {"cpus": os.cpu_count(), "chunk_rows": args.chunk_rows, "synthetic": args.synthetic,
               "threads": args.threads, "files": {}}
    for data in files:
        rows = sum(1 for _ in data.open(encoding="utf-8"))
        results["files"][data.name] = {"rows": rows, "engines": bench(data, args.workdir, args.chunk_rows, engines,
                                                                      extra)}
        if args.synthetic:  # hundreds of MB each: keep the numbers, not the data
            data.unlink()
    text = json.dumps(results, indent=2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
