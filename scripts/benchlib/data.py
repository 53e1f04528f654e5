"""The benchmarks' data: draws of the shared Alpaca + CodeAlpaca mix, a user's own files, and the train and
held-out files every later step reads (`train.jsonl`, `heldout.jsonl` in the workdir, each row with a `domain`)."""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

from benchlib.common import log
from slapcli.errors import SlapError
from slapcli.io.readers import ReadStats, SourceReader, iter_examples, record_value

SHARED_DATA = Path("/work/shared/data")
DOMAIN_FILES = {"general": "alpaca_5000.jsonl", "code": "code_alpaca_2k.jsonl"}
TRAIN_ROWS = 300  # rows of a shared-mix draw unless --train-rows
HELDOUT_PER_DOMAIN = 60  # held-out rows per domain unless --heldout-per-domain


def add_data_options(p: argparse.ArgumentParser) -> None:
    """The options build_data reads, with one set of defaults for every benchmark that trains on a draw."""
    p.add_argument("--train", type=Path, default=None, metavar="FILE",
                   help="your training data (any container and layout slap reads); default: the shared mix")
    p.add_argument("--heldout", type=Path, default=None, metavar="FILE",
                   help="your held-out data; default: split off --train, --heldout-per-domain rows per domain")
    p.add_argument("--domain-field", default="domain",
                   help="field of --train/--heldout rows naming their domain (rows without it: domain 'all')")
    p.add_argument("--on-bad-line", choices=["error", "skip"], default="error",
                   help="a --train/--heldout row slap cannot use (malformed, no response): stop, or skip and count it")
    p.add_argument("--train-rows", type=int, default=None,
                   help=f"training rows (default: {TRAIN_ROWS} of the shared mix, all rows of --train)")
    p.add_argument("--heldout-per-domain", type=int, default=None,
                   help=f"held-out rows per domain (default: {HELDOUT_PER_DOMAIN}; all rows of a --heldout file)")
    p.add_argument("--code-share", type=float, default=None,
                   help="share of code rows in the training file (default: as in the shared files, ~29%%)")
    p.add_argument("--data-seed", type=int, default=0)


def usable_rows(path: Path) -> list[dict[str, str]]:
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


def jsonl_bytes(rows: list[dict[str, Any]]) -> bytes:
    """Rows as JSON Lines, exactly as the benchmarks have always written them (cached artifacts hash these bytes)."""
    return b"".join(json.dumps(r, ensure_ascii=False, default=str).encode() + b"\n" for r in rows)


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
    new = {p: jsonl_bytes(rows) for p, rows in ((train_path, train), (heldout_path, heldout))}
    if any(p.exists() and p.read_bytes() != b for p, b in new.items()):
        # Other data than the cached artifacts were made from: start the whole workdir over.
        raise SystemExit(f"{workdir} holds data built with other settings; use another --workdir or remove it")
    for p, b in new.items():
        if not p.exists():
            p.write_bytes(b)
    (workdir / "data.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def shared_data(args: argparse.Namespace) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """One seeded draw of the shared mix: reads `code_share`, `train_rows`, `heldout_per_domain`, `data_seed`."""
    pools = {d: usable_rows(SHARED_DATA / f) for d, f in DOMAIN_FILES.items()}
    total = sum(len(p) for p in pools.values())
    share = args.code_share if args.code_share is not None else len(pools["code"]) / total
    train_rows = TRAIN_ROWS if args.train_rows is None else args.train_rows
    per_domain = HELDOUT_PER_DOMAIN if args.heldout_per_domain is None else args.heldout_per_domain
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
        per_domain = HELDOUT_PER_DOMAIN if args.heldout_per_domain is None else args.heldout_per_domain
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


def read_rows(path: Path) -> tuple[list[Any], list[str]]:
    """Parsed examples (as slapcli reads them) and each row's domain."""
    with SourceReader(str(path)) as reader:
        examples = [p.example for p in iter_examples(reader)]
    with path.open() as f:
        domains = [json.loads(line).get("domain", "all") for line in f if line.strip()]
    if len(domains) != len(examples):
        raise SystemExit(f"{path}: {len(examples)} rows parsed but {len(domains)} lines")
    return examples, domains


def _usable_lines(path: Path) -> list[bytes]:
    """Lines of a JSON Lines file whose `output` is non-blank (`slap embed` would stop on the others)."""
    with path.open("rb") as f:
        return [ln.rstrip(b"\n") for ln in f if ln.strip() and json.loads(ln)["output"].strip()]


def build_excerpt(rows: int, seed: int, out: Path) -> dict[str, Any]:
    """A seeded mix of general and code rows in the ratio of the two shared files (about 71/29), as raw lines: the
    cost benchmarks' excerpt (the same seed gives the same bytes)."""
    general, code = (_usable_lines(SHARED_DATA / DOMAIN_FILES[d]) for d in ("general", "code"))
    if rows > len(general) + len(code):
        raise SystemExit(f"--rows {rows}: the shared files hold only {len(general) + len(code)} usable rows")
    n_code = round(rows * len(code) / (len(general) + len(code)))
    n_general = rows - n_code
    rng = random.Random(seed)
    mixed = rng.sample(general, n_general) + rng.sample(code, n_code)
    rng.shuffle(mixed)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(b"".join(ln + b"\n" for ln in mixed))
    return {"path": str(out), "rows": rows, "general_rows": n_general, "code_rows": n_code,
            "sources": [str(SHARED_DATA / DOMAIN_FILES[d]) for d in ("general", "code")], "seed": seed}
