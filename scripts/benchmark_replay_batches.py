"""Wall time of the replay's two row passes (frozen prefix, gradient features) per token budget.

The replay runs each pass on the rows of one step: ~8-24 candidates, 64 target rows. This script takes
--rows random rows of a data file, feeds them in calls of --call-rows rows (as the replay's candidate passes
do), and times the prefix pass and the gradient-feature pass of the default proxy under each token budget
(`PrefixCache.token_budget`; "none" = batches of FEATURE_BATCH rows whatever their size, the accelerator
setting, and for a call of 16 rows the same padding as the unsorted batches before grouping). Budgets are
interleaved and repeated, and the minimum over repeats is reported, so load from other work hurts all alike.
The padding ratio (padded tokens per real token) is counted, not timed.

    .venv/bin/python scripts/benchmark_replay_batches.py --data work/q1000/train.jsonl --out work/replay_batches.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from slapcli.io.readers import SourceReader, iter_examples
from slapcli.models import DEFAULT_PROXY_MODEL, load_causal_lm, resolve_model
from slapcli.proxy import PrefixCache, SplitProxy, encode_examples, row_features
from slapcli.slapmath import GradientProjector


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--rows", type=int, default=48)
    p.add_argument("--call-rows", type=int, default=16)
    p.add_argument("--budgets", default="none,2048,512")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    tokenizer, model = load_causal_lm(resolve_model(DEFAULT_PROXY_MODEL), torch.device("cpu"), torch.float32)
    with SourceReader(str(args.data)) as reader:
        examples = [row.example for row in iter_examples(reader)]
    pick = np.random.default_rng(args.seed).choice(len(examples), min(args.rows, len(examples)), replace=False)
    encoded = dict(enumerate(encode_examples(tokenizer, [examples[i] for i in pick.tolist()], args.max_tokens)))
    keys = list(encoded)
    calls = [keys[s:s + args.call_rows] for s in range(0, len(keys), args.call_rows)]
    split = SplitProxy(model, 2)
    model.train()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    budgets = [sys.maxsize if b == "none" else int(b) for b in args.budgets.split(",")]
    times: dict[str, dict[str, list[float]]] = {}
    padding: dict[str, float] = {}
    for _ in range(args.repeats):
        for budget in budgets:
            name = "none" if budget == sys.maxsize else str(budget)
            cache = PrefixCache(split, encoded, pad_id, torch.device("cpu"))
            cache.token_budget = budget
            real = sum(len(e.input_ids) for e in encoded.values())
            padded = sum(len(g) * max(len(encoded[c[i]].input_ids) for i in g) for c in calls for g in cache.groups(c))
            padding[name] = round(padded / real, 3)
            projector = GradientProjector(model, split.linears, 1024, seed=args.seed)
            try:
                t0 = time.perf_counter()
                for call in calls:
                    cache.ensure(call)
                t1 = time.perf_counter()
                for call in calls:
                    row_features(split, cache, projector, call, "unit")
                t2 = time.perf_counter()
            finally:
                projector.close()
                cache.close()
            entry = times.setdefault(name, {"prefix_s": [], "features_s": []})
            entry["prefix_s"].append(round(t1 - t0, 2))
            entry["features_s"].append(round(t2 - t1, 2))
            print(f"budget {name}: padding {padding[name]}, prefix {t1 - t0:.1f} s, features {t2 - t1:.1f} s",
                  file=sys.stderr, flush=True)
    result = {"rows": len(keys), "call_rows": args.call_rows, "threads": args.threads, "data": str(args.data),
              "padding": padding, "times": times,
              "min": {n: {k: min(v) for k, v in t.items()} for n, t in times.items()}}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
