"""The benchmarks' shared library; each scripts/benchmark_*.py is a command over it (options, the plan of runs,
the report's words). Data flows down this list, and a module imports only those above it:

- `common`: the repository root, the log line, comma lists, repository-relative paths.
- `report`: git and machine descriptions, spreads over seeds, number formats, the protocol's shared sentences,
  matplotlib on demand.
- `data`: draws of the shared Alpaca + CodeAlpaca mix, a user's `--train`/`--heldout` files, the workdir's
  `train.jsonl` and `heldout.jsonl`.
- `synthetic`: distinct synthetic rows and a tiny random encoder with the real tokenizer, for scale runs.
- `stages`: `slap embed/stratify/select` as timed subprocesses, cached with a timing record; a selection's rows.
- `trainer`: the prefix cache of hidden states, the top-block trainer and its recipe, held-out evaluation, run
  files named by `recipe_key`, parallel training processes. Built on slapcli.proxy (why it keeps its own cache:
  its docstring).
- `influence`: per-row gradient signals through the trainer (alignment with the held-out gradient, TracIn).

The scripts run as `python scripts/benchmark_X.py`, which puts scripts/ first on sys.path, so `import benchlib`
needs no path juggling; tests add scripts/ to sys.path themselves.
"""
