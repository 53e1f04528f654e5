"""The `slap` command line: thin commands that parse options into a config and call one stage.

Data goes to stdout only (`export -o -`); progress, logs and errors go to stderr.
Exit codes: 0 done, 1 runtime failure, 2 usage or data error, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM).

Only light modules are imported here: option defaults come from the config dataclasses (`slapcli.config`), the
methods from their registry; a command imports its stage (torch, transformers) when it runs, so `slap --help`
starts in a fraction of a second. Signal handling is `slapcli.signals`.
"""

from __future__ import annotations

from slapcli.signals import STOP_SIGNALS, exit_at_once, finished, importing, on_stop_signals, stop_message, stop_once

# A Ctrl-C or SIGTERM while the CLI starts gets the same one line and exit code as during a command.
with on_stop_signals(exit_at_once):
    import contextlib
    import errno
    import fnmatch
    import functools
    import glob
    import json
    import math
    import os
    import shutil
    import signal
    import sys
    from collections.abc import Callable
    from dataclasses import asdict
    from typing import Any, TypeVar

    import typer
    from rich.console import Console
    from rich.markup import escape
    from typer.core import TyperGroup

    from slapcli import __version__
    from slapcli.budgets import ALLOCATIONS
    from slapcli.config import (
        DEFAULT_PROXY_MODEL,
        ORDERS,
        TARGET_RANKINGS,
        DiagnoseConfig,
        EmbedConfig,
        EngineConfig,
        ExportConfig,
        ReportConfig,
        RuntimeConfig,
        SelectConfig,
        StratifyConfig,
    )
    from slapcli.engine import check_engine, make_engine
    from slapcli.errors import EXIT_FAILURE, EXIT_INTERRUPTED, SlapError, Stopped, UsageError
    from slapcli.io.layouts import LAYOUTS
    from slapcli.io.readers import (
        BAD_LINE_POLICIES,
        CONTAINERS,
        STDIN,
        field_map,
        file_fingerprint,
        is_stream,
        list_shards,
    )
    from slapcli.io.writers import (
        MAX_NAME_BYTES,
        STDOUT,
        atomic_path,
        check_name,
        check_output_path,
        forget_written,
        output_lock,
        read_lock,
        was_written,
    )
    from slapcli.methods.registry import method_entry, method_names, methods_help, methods_where
    from slapcli.progress import Reporter, stderr_console
    from slapcli.runtime import apply as apply_runtime
    from slapcli.shard import LOSS_PART, Shard, expand_part_arguments, is_part_argument, part_path

# Click's own exceptions, found through one typer exports (typer vendors click in some versions, imports it in
# others): a usage mistake caught by the parser (a missing -o, `--keep abc`, an unknown option).
_CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


class _OneLineUsageErrors(TyperGroup):
    """The parser's usage errors as one line on stderr and exit code 2, like every other mistake (typer prints
    the usage, a hint and a boxed message)."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            # Not standalone: typer returns the exit code of a typer.Exit instead of calling sys.exit itself.
            code = super().main(*args, standalone_mode=False, **kwargs)
        except _CLICK_ERROR as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # `slap` alone: the help, as before
                e.show()
            else:
                where = f" (see {e.ctx.command_path} --help)" if getattr(e, "ctx", None) is not None else ""
                stderr_console().print(f"error: {e.format_message()}{where}", markup=False, soft_wrap=True)
            sys.exit(e.exit_code)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=_OneLineUsageErrors,
    name="slap",
    help="Prune an instruction-tuning dataset to a coreset with SLAP (Stratified Loss-based Pruning).\n\n"
         "Pipeline: slap embed DATA -o e.parquet; slap stratify e.parquet -o s.parquet; "
         "slap select s.parquet -o sel.parquet --keep 0.7; slap export sel.parquet -o pruned.jsonl. "
         "Or all four: slap run DATA -o pruned.jsonl --keep 0.7.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_WORKDIR = "slap_work"
# OS errors that are about the machine rather than a bug: one line and exit 1, not a traceback.
_ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG, errno.EACCES,
                                 errno.EPERM, errno.EMFILE, errno.ENFILE})

SCREEN = typer.Option(StratifyConfig.screen, "--screen/--no-screen",
                      help="Drop answers that ignore their prompt, stop mid-sentence or repeat themselves (found with "
                           "the proxy; one more proxy pass). Never below the budget.")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bars or log lines (errors still print).")
FORCE = typer.Option(False, "--force", "-f", help="Overwrite the output if it exists.")
# [0, 2^31): numpy refuses a negative seed and faiss's k-means takes a C int.
SEED = typer.Option(SelectConfig.seed, "--seed", min=0, max=2**31 - 1,
                    help="Seed for every random choice; the same seed gives the same bytes.")


def _check_device(value: str) -> str:
    """A device this machine has, checked while the options are parsed (before any data is read)."""
    if value.strip().lower() != "auto":
        with importing():
            from slapcli.models import pick_device  # torch: only for a device other than auto
        try:
            pick_device(value)
        except UsageError as e:
            raise typer.BadParameter(str(e)) from None
    return value


DEVICE = typer.Option(EmbedConfig.device, "--device", callback=_check_device,
                      help="auto, cpu, cuda or cuda:N (auto: CUDA with bf16 when present).")
# Where embed's chunks and the proxy loss passes run (slapcli.engine); every engine writes the same bytes.
SCALE_PANEL = "Scale out (docs/SCALING.md)"
ENGINE = typer.Option(EngineConfig.engine, "--engine", rich_help_panel=SCALE_PANEL,
                      help="local (this process) or ray (workers on a Ray cluster; pip install 'slapcli\\[ray]').")
WORKERS = typer.Option(EngineConfig.workers, "--workers", rich_help_panel=SCALE_PANEL,
                       help="Ray workers, each holding the models and computing with --threads threads on as many CPUs "
                            "(default: as many as the cluster holds; --threads 1: one per CPU).")
NUM_GPUS = typer.Option(EngineConfig.num_gpus, "--num-gpus", rich_help_panel=SCALE_PANEL,
                        help="GPUs per Ray worker (e.g. 1, or 0.5 for two per GPU); 0: the workers run on CPUs.")
RAY_ADDRESS = typer.Option(EngineConfig.address, "--ray-address", rich_help_panel=SCALE_PANEL,
                           help="Ray cluster to join: auto (the one `ray start` runs here), HOST:6379, or local (a "
                                "Ray of this command's own). Default: RAY_ADDRESS, else a cluster running here, else "
                                "a Ray started for the command.")


def _check_shard(value: str | None) -> str | None:
    if value is not None:
        try:
            Shard.parse(value)
        except UsageError as e:
            raise typer.BadParameter(str(e)) from None
    return value


THREADS = typer.Option(RuntimeConfig.threads, "--threads", min=1, rich_help_panel=SCALE_PANEL,
                       help="torch, BLAS and OpenMP threads (default: one per physical core; 1 is faster when "
                            "other jobs keep the cores busy). The same count gives the same bytes.")
CACHE_DIR = typer.Option(RuntimeConfig.cache_dir, "--cache-dir", rich_help_panel=SCALE_PANEL,
                         help="Folder for big scratch files: the frozen prefix states stratify keeps for select "
                              "(DIR/prefix: give both the same DIR) and the replay's own prefix cache (1,152 bytes "
                              "per token with the default proxy, docs/PERFORMANCE.md), temporary spools. Default: "
                              "the slapcli cache, beside the output, $TMPDIR.")
# Panels of `select --help` that a user does not need: tuning the replay, and the ablations the benchmarks run.
REPLAY_PANEL = "Replay tuning"
ABLATION_PANEL = "Advanced: ablations of the batch score (for the benchmarks)"
PROXY = typer.Option(DEFAULT_PROXY_MODEL, "--proxy-model",
                     help="Proxy causal LM: the packaged default, a local Hugging Face folder, a .gguf file "
                          "or a hub id.")


def _handle_errors(func: F) -> F:
    """Turn SlapErrors into one message on stderr and their exit code; Ctrl-C or SIGTERM into one line and
    128 + the signal number (130, 143)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        console = stderr_console()
        finished.clear()
        forget_written()
        with on_stop_signals(stop_once):
            try:
                with contextlib.ExitStack() as claims:  # the output locks taken by _claim_output
                    _claims.append(claims)
                    try:
                        result = func(*args, **kwargs)
                    finally:
                        _claims.pop()
                finished.set()
                return result
            except SlapError as e:
                # Escaped: a message may hold brackets (`pip install 'slapcli[report]'`, a file name).
                console.print(f"[red]error:[/red] {escape(str(e))}", markup=True, soft_wrap=True)
                raise typer.Exit(e.exit_code) from None
            except KeyboardInterrupt as e:
                # By now every writer has removed its temporary file; what a rerun can resume from is kept.
                signum = e.signum if isinstance(e, Stopped) else signal.SIGINT
                output = kwargs.get("output")
                if isinstance(output, str) and output != STDOUT and was_written(output):
                    # The signal came after the final rename: the output is complete, and that is success.
                    finished.set()
                    console.print(f"wrote {output} (stopped by {signal.Signals(signum).name} after it was "
                                  "complete)", markup=False, soft_wrap=True)
                    return None
                console.print(stop_message(signum), markup=False, soft_wrap=True)
                raise typer.Exit(e.exit_code if isinstance(e, Stopped) else EXIT_INTERRUPTED) from None
            except BrokenPipeError:
                # The reader of our stdout went away (e.g. `| head`): not an error of ours.
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
                raise typer.Exit(0) from None
            except OSError as e:
                if e.errno not in _ENVIRONMENT_ERRNOS:
                    raise
                # The machine, not slap or the data: a full disk, a quota, a read-only or failing file system,
                # a file we may not read. Temporary files are gone by now; a rerun resumes.
                output = kwargs.get("output")
                where = e.filename or (output if isinstance(output, str) and output != STDOUT else None)
                console.print(f"error: {where + ': ' if where else ''}{e.strerror or e}; nothing was written",
                              markup=False, soft_wrap=True)
                raise typer.Exit(EXIT_FAILURE) from None

    return wrapper  # type: ignore[return-value]


def _reporter(quiet: bool, input_path: str | None = None) -> Reporter:
    # No progress bar while reading stdin (it would only fight the producer for the terminal); log lines and the
    # final line still print.
    return Reporter(quiet=quiet, bars=input_path != STDIN)


_claims: list[contextlib.ExitStack] = []


def _claim_output(output: str, inputs: list[str | None], force: bool, artifact: bool = False) -> None:
    """Check `output` before any work and lock it for the rest of the command.

    `inputs` are the files the command reads; the files their artifacts record as source or upstream are added,
    so no output ever replaces data something was made from, with or without --force.
    """
    from slapcli.artifacts import recorded_inputs  # pyarrow: only once a command runs

    records = {source: recorded_inputs(source) for source in inputs if source and _is_artifact_name(source)}
    recorded = [path for paths in records.values() for path in paths]
    sources = [path for path in (*inputs, *recorded) if path and path != STDIN]
    shards = [shard for path in sources for shard in _shards_of(path)]
    check_output_path(output, [*sources, *shards], force, artifact=artifact)
    if output != STDOUT:
        for folder in sources:
            if _would_be_a_shard_of(output, folder):
                raise UsageError(f"{output}: inside the data folder or pattern {folder}, where a later read would take "
                                 "it for one more shard of the data; choose an output outside it")
    _claims[-1].enter_context(output_lock(output))
    for artifact, recorded_here in records.items():  # no command replaces an artifact while this one reads it
        if recorded_here:
            _claims[-1].enter_context(read_lock(artifact))


def _shards_of(path: str) -> list[str]:
    """The data files of a folder or glob pattern input (none for a file): each is an input as well."""
    if not (os.path.isdir(path) or glob.has_magic(path)):
        return []
    with contextlib.suppress(SlapError):
        return list_shards(path) or []
    return []


def _would_be_a_shard_of(output: str, data: str) -> bool:
    """Whether `output` lies in folder `data` (its top level: where the shards are looked for), or matches pattern
    `data`, so that reading the data again would find it."""
    if os.path.isdir(data):
        return os.path.dirname(os.path.realpath(output)) == os.path.realpath(data)
    return glob.has_magic(data) and fnmatch.fnmatch(os.path.abspath(output), os.path.abspath(data))


def _is_artifact_name(path: str) -> bool:
    return path != STDIN and path.lower().endswith(".parquet") and os.path.isfile(path)


def _check_input(path: str | None, option: str = "", data: bool = False) -> None:
    """A data file or artifact the command will read exists and is not a folder: one line, before any work.

    Data (`data`, `--input`, `--target`) may also be a folder or glob pattern of shards, read as one dataset.
    """
    if path == STDIN and sys.stdin is None:  # started with stdin closed (`<&-`)
        raise UsageError("-: stdin is closed; pipe the data in or give a file name")
    if path is None or path == STDIN:
        return
    check_name(path)
    where = f" ({option})" if option else ""
    data = data or option in ("--input", "--target")
    if data and (os.path.isdir(path) or (glob.has_magic(path) and not os.path.exists(path))):
        list_shards(path)  # one line when the folder or pattern holds no data file
        return
    if not os.path.exists(path):
        raise UsageError(f"{path}: no such file{where}")
    if os.path.isdir(path):
        raise UsageError(f"{path}: is a directory, expected a file{where}")


def _check_choice(option: str, value: str | None, choices: tuple[str, ...] | list[str]) -> None:
    if value is not None and value not in choices:
        raise UsageError(f"{option} {value!r}: expected one of {', '.join(choices)}")


def _check_method(method: str, target: str | None) -> None:
    """A registered method, with a --target when it needs one: before any model loads (in `run`, before embed)."""
    _check_choice("--method", method, method_names())
    if method_entry(method).needs.target == "required" and not target:
        raise UsageError(f"--method {method} needs a --target dev file (rows like the downstream task): "
                         "give --target FILE")


def _check_range(option: str, value: float | None, low: float, high: float = math.inf,
                 low_open: bool = False, high_open: bool = False) -> None:
    """`value` (when given) finite and within [low, high], with open ends as asked; NaN is never in range."""
    if value is None:
        return
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (above and below and math.isfinite(value)):
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        if high != math.inf:
            bounds = f"in {left}{low:g}, {high:g}{right}"
        elif low == -math.inf:
            bounds = "a finite number"
        else:
            finite = "" if math.isfinite(value) else "a finite number "
            bounds = f"{finite}{'>' if low_open else '>='} {low:g}"
        raise UsageError(f"{option} {value:g}: must be {bounds}")


def _check_budget(keep: float | None, budget: int | None) -> None:
    """--keep a share in (0, 1] and --budget at least one row: a budget of nothing is a mistake, not a result."""
    _check_range("--keep", keep, 0.0, 1.0, low_open=True)
    _check_range("--budget", budget, 1)


def _check_rows(reporter: Reporter, rows: int, keep: float | None, budget: int | None, where: str) -> None:
    """Once the row count is known (before any proxy work): refuse a budget of no row, say when it keeps all."""
    if budget is not None:
        if budget > rows:
            reporter.warn(f"--budget {budget:,} is more than the {rows:,} rows of {where}: every row is kept")
        return
    if keep is not None and rows and round(keep * rows) == 0:
        raise UsageError(f"--keep {keep:g} keeps no row of the {rows:,} rows of {where}; give a larger share "
                         "or --budget")


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"slapcli {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    pass


@app.command("embed", epilog="Example: cat data.jsonl | slap embed - -o work/embeddings.parquet")
@_handle_errors
def embed_cmd(
    input: str = typer.Argument(..., help="Data file (JSON Lines, JSON array, Parquet or Arrow; .gz/.zst ok), "
                                          "a folder of shards, or - for stdin."),
    output: str = typer.Option(..., "--output", "-o", help="Embeddings artifact to write (.parquet)."),
    embed_model: str = typer.Option(EmbedConfig.embed_model, "--embed-model",
                                    help="Sentence encoder: the packaged default, a local folder or a hub id."),
    proxy_model: str = PROXY,
    layout: str = typer.Option(EmbedConfig.layout, "--format",
                               help="Row layout: auto, alpaca, sharegpt, openai, preference, prompt_completion, "
                                    "prompt_response or text."),
    fields: str | None = typer.Option(None, "--fields",
                                      help="Your own field names instead of a layout, e.g. "
                                           "prompt=question,response=answer[,system=persona]; also query, "
                                           "history, tools, messages, chosen, rejected; or "
                                           "dataset_info.json:NAME (a LLaMA-Factory entry)."),
    input_format: str | None = typer.Option(None, "--input-format",
                                            help="jsonl, json, parquet or arrow (default: from the file name)."),
    on_bad_line: str = typer.Option(EmbedConfig.on_bad_line, "--on-bad-line",
                                    help="error (stop) or skip (count and go on)."),
    max_tokens: int = typer.Option(EmbedConfig.max_tokens, "--max-tokens",
                                   help="Proxy tokens per row; longer rows are truncated."),
    batch_size: int = typer.Option(EmbedConfig.batch_size, "--batch-size", help="Encoder batch size."),
    chunk_rows: int = typer.Option(EmbedConfig.chunk_rows, "--chunk-rows", min=1,
                                   help="Rows per streamed chunk: the unit a killed run resumes from."),
    resume: bool = typer.Option(EmbedConfig.resume, "--resume/--no-resume",
                                help="Reuse the chunks a killed run finished (kept in .OUTPUT.parts beside the "
                                     "output) when they were made from the same data and settings."),
    device: str = DEVICE,
    engine: str = ENGINE,
    workers: int | None = WORKERS,
    num_gpus: float = NUM_GPUS,
    ray_address: str | None = RAY_ADDRESS,
    shard: str | None = typer.Option(None, "--shard", callback=_check_shard, rich_help_panel=SCALE_PANEL,
                                     help="i/N: embed only chunks c with c % N == i, into OUTPUT.part-I-of-N; "
                                          "`slap merge` (or stratify) reads the N parts as one artifact."),
    threads: int | None = THREADS,
    force: bool = FORCE,
    quiet: bool = QUIET,
) -> None:
    """Stage 1: embed every row, count its proxy tokens and hash its content."""
    _runtime(threads, None)
    with importing():
        from slapcli.stages.embed import embed
    engine_config = _engine_config(engine, workers, num_gpus, ray_address)
    _check_input(input, data=True)
    _check_read_options(layout, input_format, on_bad_line, max_tokens)
    field_map(fields, layout)
    _check_range("--batch-size", batch_size, 1)
    this_shard = _shard(shard, input)
    target = part_path(output, this_shard) if this_shard is not None else output
    _claim_output(target, [input], force, artifact=True)
    config = EmbedConfig(embed_model=embed_model, proxy_model=proxy_model, layout=layout, input_format=input_format,
                         on_bad_line=on_bad_line, max_tokens=max_tokens, batch_size=batch_size,
                         chunk_rows=chunk_rows, device=device, resume=resume, fields=fields)
    reporter = _reporter(quiet, input)
    meta = embed(input, target, config, reporter, engine=make_engine(engine_config), shard=this_shard)
    _report_read_stats(reporter, meta.stats, max_tokens)
    reporter.log(f"wrote {target}: {meta.stats['rows']:,} rows"
                 + (f" (shard {this_shard}; merge the parts with `slap merge`, or pass them to stratify)"
                    if this_shard is not None else ""))


def _engine_config(engine: str, workers: int | None, num_gpus: float, address: str | None) -> EngineConfig:
    """The engine options, checked before any data is read or model loaded (--engine ray without Ray: how to
    install it)."""
    config = EngineConfig(engine=engine, workers=workers, num_gpus=num_gpus, address=address)
    check_engine(config)
    return config


def _runtime(threads: int | None, cache_dir: str | None) -> None:
    """--threads and --cache-dir, set before the stage's modules load (their thread pools read the environment
    once); neither changes what is written."""
    if cache_dir is not None and os.path.lexists(cache_dir) and not os.path.isdir(cache_dir):
        raise UsageError(f"--cache-dir {cache_dir}: not a directory")
    with importing():
        apply_runtime(RuntimeConfig(threads=threads, cache_dir=cache_dir))


def _shard(value: str | None, input: str | None = None) -> Shard | None:
    if value is None:
        return None
    if input is not None and is_stream(input):
        raise UsageError(f"--shard {value}: every shard reads the whole input, so it must be a file or a folder, "
                         f"not {'stdin' if input == STDIN else input}")
    return Shard.parse(value)


def _check_read_options(layout: str, input_format: str | None, on_bad_line: str, max_tokens: int | None) -> None:
    _check_choice("--format", layout, ("auto", *LAYOUTS))
    _check_choice("--input-format", input_format, CONTAINERS)
    _check_choice("--on-bad-line", on_bad_line, BAD_LINE_POLICIES)
    _check_range("--max-tokens", max_tokens, 1)


def _report_read_stats(reporter: Reporter, stats: dict[str, Any], max_tokens: int) -> None:
    if stats.get("bad_skipped"):
        reporter.warn(f"skipped {stats['bad_skipped']:,} bad rows, e.g. {stats['bad_examples'][0]}")
    if stats.get("truncated"):
        reporter.warn(f"{stats['truncated']:,} of {stats['rows']:,} rows exceed --max-tokens ({max_tokens}) "
                      "and were truncated for the proxy")
    if stats.get("non_text_parts"):
        reporter.warn(f"{stats['non_text_parts']:,} non-text content parts (images, audio, files) in "
                      f"{stats['rows_with_non_text_parts']:,} rows are not scored: only their text is")


@app.command("stratify", epilog="Example: slap stratify work/embeddings.parquet -o work/strata.parquet --clusters 64")
@_handle_errors
def stratify_cmd(
    embeddings: str = typer.Argument(..., help="Embeddings artifact from `slap embed`."),
    output: str = typer.Option(..., "--output", "-o", help="Strata artifact to write."),
    clusters: int | None = typer.Option(None, "--clusters", help="k-means clusters (default sqrt(N/2) in [8, 1024])."),
    loss_bins: int = typer.Option(StratifyConfig.loss_bins, "--loss-bins",
                                  help="Loss-quantile bins inside each cluster."),
    proxy_loss: bool = typer.Option(StratifyConfig.proxy_loss, "--proxy-loss/--no-proxy-loss",
                                    help="Bin by the untrained proxy's loss (off: clusters alone, no proxy pass)."),
    proxy_model: str = PROXY,
    keep: float | None = typer.Option(StratifyConfig.keep, "--keep",
                                      help="Share of rows to keep (budget for the strata)."),
    budget: int | None = typer.Option(None, "--budget", help="Rows to keep (overrides --keep)."),
    allocation: str = typer.Option(StratifyConfig.allocation, "--allocation", help=", ".join(ALLOCATIONS) + "."),
    dedup: bool = typer.Option(StratifyConfig.dedup, "--dedup/--no-dedup",
                               help="Drop exact duplicates (same prompt and response)."),
    prune_hardest: float = typer.Option(StratifyConfig.prune_hardest, "--prune-hardest",
                                        help="Drop this fraction of highest-loss rows."),
    near_dup_cosine: float = typer.Option(StratifyConfig.near_dup_cosine, "--near-dup-cosine",
                                          help="Embedding cosine at which a row is a near-copy of an earlier row of "
                                               "its cluster and is dropped (0: off)."),
    screen: bool = SCREEN,
    input: str | None = typer.Option(None, "--input", help="Data file, if not at the path recorded by embed."),
    seed: int = SEED,
    device: str = DEVICE,
    engine: str = ENGINE,
    workers: int | None = WORKERS,
    num_gpus: float = NUM_GPUS,
    ray_address: str | None = RAY_ADDRESS,
    shard: str | None = typer.Option(None, "--shard", callback=_check_shard, rich_help_panel=SCALE_PANEL,
                                     help="i/N: run only this shard's chunks of the proxy loss pass, into "
                                          "OUTPUT.loss-part-I-of-N; the same command without --shard then reads "
                                          "the N parts and does the rest."),
    threads: int | None = THREADS,
    cache_dir: str | None = CACHE_DIR,
    force: bool = FORCE,
    quiet: bool = QUIET,
) -> None:
    """Stage 2: cluster, bin by proxy loss, drop duplicates and damaged rows, and split the row budget over strata."""
    _runtime(threads, cache_dir)
    with importing():
        from slapcli.artifacts import read_meta
        from slapcli.stages.stratify import stratify
    engine_config = _engine_config(engine, workers, num_gpus, ray_address)
    this_shard = _shard(shard)
    if is_part_argument(embeddings):  # the parts of a sharded embed: merged once into the artifact they make up
        embeddings = _merged_parts(embeddings, _reporter(quiet))
    _check_input(embeddings)
    _check_input(input, "--input")
    _check_range("--clusters", clusters, 1)
    _check_range("--loss-bins", loss_bins, 1)
    _check_budget(keep, budget)
    _check_choice("--allocation", allocation, ALLOCATIONS)
    _check_range("--prune-hardest", prune_hardest, 0.0, 1.0, high_open=True)
    target = part_path(output, this_shard, LOSS_PART) if this_shard is not None else output
    _claim_output(target, [embeddings, input], force, artifact=True)
    config = StratifyConfig(clusters=clusters, loss_bins=loss_bins, proxy_loss=proxy_loss, proxy_model=proxy_model,
                            keep=keep, budget=budget, allocation=allocation, dedup=dedup,
                            prune_hardest=prune_hardest, near_dup_cosine=near_dup_cosine, screen=screen, seed=seed,
                            device=device)
    reporter = _reporter(quiet)
    _check_rows(reporter, read_meta(embeddings, "embeddings").stats["rows"], keep, budget, embeddings)
    meta = stratify(embeddings, output, config, reporter, input_override=input, engine=make_engine(engine_config),
                    shard=this_shard)
    if meta is None:
        reporter.log(f"wrote {target}: shard {this_shard} of the proxy loss pass; once every shard is written, run "
                     "the same command without --shard")
        return
    reporter.log(f"wrote {output}: {meta.stats['rows']:,} rows, {meta.config['clusters_used']} clusters, "
                 f"{meta.stats['duplicates']:,} duplicates, budget {meta.stats['budget']:,}")


def _merged_parts(argument: str, reporter: Reporter) -> str:
    """The embeddings artifact the parts `argument` names make up (OUTPUT for OUTPUT.part-I-of-N): merged here
    unless an earlier command already did."""
    with importing():
        from slapcli.parts import merge_embeddings, merged_path, parts_match
    paths = expand_part_arguments([argument])
    merged = merged_path(paths)
    if os.path.lexists(merged):
        if parts_match(merged, paths):
            reporter.log(f"reading {merged}, merged from these {len(paths)} parts before")
            return merged
        raise UsageError(f"{merged}: exists and is not the merge of the parts {argument}; pass it instead of the "
                         "parts, or remove it")
    _claim_output(merged, paths, False, artifact=True)
    merge_embeddings(paths, merged, reporter)
    reporter.log(f"merged {len(paths)} parts into {merged}")
    return merged


@app.command("merge", epilog="Example: slap merge 'work/embeddings.parquet.part-*' -o work/embeddings.parquet")
@_handle_errors
def merge_cmd(
    parts: list[str] = typer.Argument(..., help="The parts of `slap embed --shard i/N`: files, a folder or a quoted "
                                                "pattern."),
    output: str = typer.Option(..., "--output", "-o", help="Embeddings artifact to write (.parquet)."),
    force: bool = FORCE,
    quiet: bool = QUIET,
) -> None:
    """Merge the parts of a sharded embed into the artifact one unsharded run writes (byte for byte); a missing,
    doubled or foreign part is refused."""
    with importing():
        from slapcli.parts import merge_embeddings
    paths = expand_part_arguments(parts)
    _claim_output(output, paths, force, artifact=True)
    reporter = _reporter(quiet)
    meta = merge_embeddings(paths, output, reporter)
    reporter.log(f"wrote {output}: {meta.stats['rows']:,} rows from {len(paths)} parts")


@app.command("select", epilog="Example: slap select work/strata.parquet -o work/selection.parquet --keep 0.7")
@_handle_errors
def select_cmd(
    strata: str = typer.Argument(..., help="Strata artifact from `slap stratify`."),
    output: str = typer.Option(..., "--output", "-o", help="Selection artifact to write."),
    method: str = typer.Option(SelectConfig.method, "--method", help=methods_help()),
    keep: float | None = typer.Option(SelectConfig.keep, "--keep",
                                      help="Share of rows to keep (default: as stratified)."),
    budget: int | None = typer.Option(SelectConfig.budget, "--budget", help="Rows to keep (overrides --keep)."),
    allocation: str | None = typer.Option(SelectConfig.allocation, "--allocation",
                                          help=", ".join(ALLOCATIONS) + " (default: as stratified)."),
    batch_size: int = typer.Option(SelectConfig.batch_size, "--batch-size", help="Rows per replay batch."),
    pool_factor: int = typer.Option(SelectConfig.pool_factor, "--pool-factor", rich_help_panel=REPLAY_PANEL,
                                    help="Candidates per batch, as a multiple of the batch size."),
    diversity: float = typer.Option(SelectConfig.diversity, "--diversity", rich_help_panel=REPLAY_PANEL,
                                    help="Weight (gamma) of the relative-distance diversity."),
    proj_dim: int = typer.Option(SelectConfig.proj_dim, "--proj-dim", rich_help_panel=REPLAY_PANEL,
                                 help="Dimension of the projected gradient features."),
    refresh: int = typer.Option(SelectConfig.refresh, "--refresh", rich_help_panel=REPLAY_PANEL,
                                help="Replay steps a candidate's gradient feature is reused."),
    target_refresh: int = typer.Option(SelectConfig.target_refresh, "--target-refresh", rich_help_panel=REPLAY_PANEL,
                                       help="Replay steps between recomputations of the target direction."),
    lr: float = typer.Option(SelectConfig.lr, "--lr", rich_help_panel=REPLAY_PANEL,
                             help="AdamW learning rate of the proxy replay."),
    feature_norm: str = typer.Option(SelectConfig.feature_norm, "--feature-norm", rich_help_panel=ABLATION_PANEL,
                                     help="unit: score gradient directions (cosine); tokens: directions weighted "
                                          "by sqrt(response tokens / mean); raw: inner products."),
    eta: str = typer.Option(SelectConfig.eta, "--eta", rich_help_panel=ABLATION_PANEL,
                            help="Step of the batch score: target (Newton step along the target) or row."),
    eta_scale: float = typer.Option(SelectConfig.eta_scale, "--eta-scale", rich_help_panel=ABLATION_PANEL,
                                    help="Multiplier of that step: above 1 the curvature term weighs more "
                                         "(batches of less redundant gradients)."),
    length_prior: float = typer.Option(SelectConfig.length_prior, "--length-prior", rich_help_panel=ABLATION_PANEL,
                                       help="Weight of log(response tokens / mean) in the batch score, in units of "
                                            "the pool's score spread (longer rows of a stratum teach more)."),
    curvature: bool = typer.Option(SelectConfig.curvature, "--curvature/--no-curvature",
                                   rich_help_panel=ABLATION_PANEL,
                                   help="Keep the second-order (curvature) term of the batch score."),
    max_tokens: int | None = typer.Option(SelectConfig.max_tokens, "--max-tokens",
                                          help="Proxy tokens per row (default: as embedded)."),
    target: str | None = typer.Option(SelectConfig.target, "--target",
                                      help="Dev file of rows like the downstream task."),
    target_candidates: float = typer.Option(SelectConfig.target_candidates, "--target-candidates",
                                            rich_help_panel=REPLAY_PANEL,
                                            help="With --target: slap chooses among this many rows nearest the dev "
                                                 "rows per kept row."),
    target_ranking: str = typer.Option(SelectConfig.target_ranking, "--target-ranking",
                                       rich_help_panel=REPLAY_PANEL,
                                       help="With --target: rank those rows round-robin over the dev rows "
                                            "(round-robin), by their best similarity to any dev row (max), or by "
                                            "a dev-vs-pool classifier on the embeddings (classifier)."),
    proxy_model: str = PROXY,
    input: str | None = typer.Option(None, "--input", help="Data file, if not at the path recorded by embed."),
    embeddings: str | None = typer.Option(None, "--embeddings", help="Embeddings artifact, if moved."),
    resume: bool = typer.Option(SelectConfig.resume, "--resume/--no-resume",
                                help="Continue from OUTPUT.ckpt when it was written with the same settings."),
    checkpoint_minutes: float = typer.Option(SelectConfig.checkpoint_seconds / 60.0, "--checkpoint-minutes",
                                             help="How often the replay saves OUTPUT.ckpt."),
    timings: bool = typer.Option(SelectConfig.record_timings, "--timings", rich_help_panel=ABLATION_PANEL,
                                 help="Store the replay's per-phase wall times in the artifact's stats."),
    seed: int = SEED,
    device: str = DEVICE,
    threads: int | None = THREADS,
    cache_dir: str | None = CACHE_DIR,
    force: bool = FORCE,
    quiet: bool = QUIET,
) -> None:
    """Stage 3: choose the coreset batch by batch (the proxy-training replay for --method slap)."""
    _runtime(threads, cache_dir)
    with importing():
        from slapcli.artifacts import read_meta
        from slapcli.replay import checkpoint_path
        from slapcli.stages.select import select
        from slapcli.summary import selection_summary
    _check_input(strata)
    _check_input(input, "--input")
    _check_input(embeddings, "--embeddings")
    _check_input(target, "--target")
    _check_method(method, target)
    _check_budget(keep, budget)
    _check_choice("--allocation", allocation, ALLOCATIONS)
    for option, value in (("--batch-size", batch_size), ("--pool-factor", pool_factor), ("--proj-dim", proj_dim),
                          ("--refresh", refresh), ("--target-refresh", target_refresh), ("--max-tokens", max_tokens)):
        _check_range(option, value, 1)
    _check_range("--lr", lr, 0.0, low_open=True)
    _check_range("--checkpoint-minutes", checkpoint_minutes, 0.0)
    _check_range("--eta-scale", eta_scale, 0.0, low_open=True)
    _check_range("--length-prior", length_prior, 0.0)
    _check_range("--diversity", diversity, -math.inf)  # any finite weight
    _check_range("--target-candidates", target_candidates, 1.0)
    _check_choice("--target-ranking", target_ranking, TARGET_RANKINGS)
    if len(os.fsencode(os.path.basename(checkpoint_path(output)))) > MAX_NAME_BYTES:
        raise UsageError(f"{output}: file name too long for its resume checkpoint OUTPUT.ckpt (at most "
                         f"{MAX_NAME_BYTES - len('.ckpt')} bytes)")
    _claim_output(output, [strata, input, embeddings, target], force, artifact=True)
    config = SelectConfig(method=method, keep=keep, budget=budget, allocation=allocation, batch_size=batch_size,
                          pool_factor=pool_factor, diversity=diversity, proj_dim=proj_dim, refresh=refresh,
                          target_refresh=target_refresh, lr=lr,
                          feature_norm=feature_norm, eta=eta, eta_scale=eta_scale, length_prior=length_prior,
                          curvature=curvature,
                          max_tokens=max_tokens, target=target, target_candidates=target_candidates,
                          target_ranking=target_ranking,
                          proxy_model=proxy_model, embeddings=embeddings,
                          seed=seed, device=device, resume=resume, checkpoint_seconds=60.0 * checkpoint_minutes,
                          record_timings=timings)
    reporter = _reporter(quiet)
    _check_rows(reporter, read_meta(strata, "strata").stats["rows"], keep, budget, strata)
    meta = select(strata, output, config, reporter, input_override=input)
    selection_summary(output, strata, reporter.console)
    reporter.log(f"wrote {output}: {meta.stats['kept']:,} of {meta.stats['rows']:,} rows kept")


@app.command("export", epilog="Example: slap export work/selection.parquet -o - | head -n 3")
@_handle_errors
def export_cmd(
    selection: str = typer.Argument(..., help="Selection artifact from `slap select`."),
    output: str = typer.Option(..., "--output", "-o", help="Pruned data file (.jsonl, .parquet) or - for stdout."),
    order: str = typer.Option(ExportConfig.order, "--order", help="source (input order) or selection (order chosen)."),
    input: str | None = typer.Option(None, "--input", help="Data file, if not at the path recorded by embed."),
    force: bool = FORCE,
    quiet: bool = QUIET,
) -> None:
    """Stage 4: write the kept rows exactly as they were in the input."""
    with importing():
        from slapcli.stages.export import export
    _check_input(selection)
    _check_input(input, "--input")
    _check_choice("--order", order, ORDERS)
    _claim_output(output, [selection, input], force)
    result = export(selection, output, ExportConfig(order=order, input=input), _reporter(quiet, input))
    _reporter(quiet).log(f"wrote {result.rows_written:,} of {result.rows_in_source:,} rows to "
                         f"{'stdout' if output == '-' else output}")


@app.command("inspect", epilog="Example: slap inspect data.jsonl (diagnosis); slap inspect work/strata.parquet --json")
@_handle_errors
def inspect_cmd(
    path: str = typer.Argument(..., help="A slapcli artifact, or a data file to diagnose before pruning."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (schema in the README)."),
    embeddings: str | None = typer.Option(None, "--embeddings",
                                          help="Data file only: reuse this embeddings artifact of the same data "
                                               "instead of running the encoder."),
    strata: str | None = typer.Option(None, "--strata",
                                      help="Data file only: a strata artifact of the same data, to flag "
                                           "proxy-loss outliers (for --prune-hardest)."),
    near_duplicate: float = typer.Option(DiagnoseConfig.near_duplicate, "--near-duplicate",
                                         help="Embedding cosine at or above which distinct rows are near "
                                              "duplicates."),
    embed_model: str = typer.Option(DiagnoseConfig.embed_model, "--embed-model",
                                    help="Sentence encoder (as `slap embed`)."),
    layout: str = typer.Option(DiagnoseConfig.layout, "--format", help="Row layout (see `slap embed --help`)."),
    fields: str | None = typer.Option(None, "--fields", help="Your own field names (see `slap embed --help`)."),
    input_format: str | None = typer.Option(None, "--input-format", help="jsonl, json or parquet."),
    device: str = DEVICE,
    quiet: bool = QUIET,
) -> None:
    """An artifact's metadata and summary; or, for a data file, a diagnosis before pruning: duplicates, near
    duplicates, nearest-neighbour cosines, suspected damaged rows and the flags they suggest. On stdout."""
    if sys.stdout is None:  # started with `>&-`: what inspect prints would go nowhere; say so before a diagnosis
        raise UsageError("stdout is closed; `slap inspect` prints there (redirect it to a file instead)")
    with importing():
        from slapcli.summary import artifact_summary, describe_artifact, is_artifact, print_diagnosis
    if is_artifact(path):
        if as_json:
            typer.echo(json.dumps(artifact_summary(path), indent=2, ensure_ascii=False))
        else:
            describe_artifact(path, Console(soft_wrap=True, highlight=False))
        return
    with importing():
        from slapcli.report.diagnose import diagnose
    config = DiagnoseConfig(layout=layout, fields=fields, input_format=input_format, embed_model=embed_model,
                            embeddings=embeddings, strata=strata, near_duplicate=near_duplicate, device=device)
    diagnosis = diagnose(path, config, _reporter(quiet, path))
    if as_json:
        typer.echo(json.dumps(diagnosis.to_dict(), indent=2, ensure_ascii=False))
    else:
        print_diagnosis(diagnosis, Console(soft_wrap=True, highlight=False))


@app.command("report", epilog="Example: slap report demo_out/work -o demo_out/report.html --png demo_out/figures")
@_handle_errors
def report_cmd(
    artifacts: list[str] = typer.Argument(..., help="A work folder (`slap run --workdir`) or artifact files; "
                                                    "upstream artifacts are found from the selection's record."),
    output: str = typer.Option(..., "--output", "-o", help="HTML page to write (self-contained: opens from disk), "
                                                           "or - for stdout."),
    png: str | None = typer.Option(None, "--png", help="Also write each figure as a PNG into this folder."),
    near_duplicate: float = typer.Option(ReportConfig.near_duplicate, "--near-duplicate",
                                         help="Embedding cosine at or above which rows are near duplicates."),
    examples: int = typer.Option(ReportConfig.examples, "--examples", min=0,
                                 help="Rows shown per pruning reason and as most / least valuable kept rows."),
    map_method: str = typer.Option(ReportConfig.map_method, "--map",
                                   help="auto (UMAP when umap-learn is installed, else PCA), pca or umap."),
    input: str | None = typer.Option(None, "--input", help="Data file, if not at the path recorded by embed."),
    seed: int = SEED,
    force: bool = FORCE,
    quiet: bool = QUIET,
) -> None:
    """One HTML page of what a run kept and why: kept share per stratum, a map, distributions, the replay's
    loss, duplicate groups and example rows (needs the `report` extra: matplotlib)."""
    with importing():
        from slapcli.report.build import MAP_METHODS, build_report
        from slapcli.report.inputs import find_artifacts
    _check_choice("--map", map_method, MAP_METHODS)
    if png is not None and os.path.lexists(png) and not os.path.isdir(png):
        raise UsageError(f"--png {png}: not a folder; give a folder for the figures (it is made if missing)")
    found = find_artifacts(list(artifacts))  # metadata only: the files the page is made from
    # Never over those artifacts or the data they record, with or without --force (a work folder itself is no
    # input here: the page may go inside it).
    _claim_output(output, [found.selection, found.strata, found.embeddings, input], force)
    config = ReportConfig(near_duplicate=near_duplicate, examples=examples, map_method=map_method, input=input,
                          seed=seed)
    reporter = _reporter(quiet)
    result = build_report(list(artifacts), output, config, reporter, png_dir=png)
    if result.png_paths:
        reporter.log(f"wrote {len(result.png_paths)} figures to {png}")
    reporter.log(f"wrote {'stdout' if output == '-' else output}")


@app.command("run", epilog="Example: slap run data.jsonl -o pruned.jsonl --keep 0.7 --workdir work")
@_handle_errors
def run_cmd(
    input: str = typer.Argument(..., help="Data file or - for stdin."),
    output: str = typer.Option(..., "--output", "-o", help="Pruned data file or - for stdout."),
    keep: float | None = typer.Option(StratifyConfig.keep, "--keep", help="Share of rows to keep."),
    budget: int | None = typer.Option(None, "--budget", help="Rows to keep (overrides --keep)."),
    workdir: str | None = typer.Option(None, "--workdir",
                                       help=f"Where the artifacts go (default {DEFAULT_WORKDIR}); valid ones are "
                                            "reused."),
    method: str = typer.Option(SelectConfig.method, "--method", help=methods_help()),
    layout: str = typer.Option(EmbedConfig.layout, "--format", help="Row layout (see `slap embed --help`)."),
    fields: str | None = typer.Option(None, "--fields",
                                      help="Your own field names instead of a layout, e.g. "
                                           "prompt=question,response=answer[,system=persona]; also query, "
                                           "history, tools, messages, chosen, rejected; or "
                                           "dataset_info.json:NAME (a LLaMA-Factory entry)."),
    input_format: str | None = typer.Option(None, "--input-format",
                                            help="jsonl, json, parquet or arrow (default: from the file name)."),
    on_bad_line: str = typer.Option(EmbedConfig.on_bad_line, "--on-bad-line", help="error or skip."),
    max_tokens: int = typer.Option(EmbedConfig.max_tokens, "--max-tokens",
                                   help="Proxy tokens per row; longer rows are truncated."),
    embed_model: str = typer.Option(EmbedConfig.embed_model, "--embed-model", help="Sentence encoder."),
    proxy_model: str = PROXY,
    proxy_loss: bool = typer.Option(StratifyConfig.proxy_loss, "--proxy-loss/--no-proxy-loss",
                                    help="Bin strata by proxy loss."),
    screen: bool = SCREEN,
    target: str | None = typer.Option(None, "--target", help="Dev file of rows like the downstream task."),
    order: str = typer.Option(ExportConfig.order, "--order", help="source or selection."),
    seed: int = SEED,
    device: str = DEVICE,
    engine: str = ENGINE,
    workers: int | None = WORKERS,
    num_gpus: float = NUM_GPUS,
    ray_address: str | None = RAY_ADDRESS,
    threads: int | None = THREADS,
    cache_dir: str | None = CACHE_DIR,
    force: bool = FORCE,
    quiet: bool = QUIET,
) -> None:
    """All four stages; artifacts in --workdir whose inputs and config are unchanged are reused."""
    _runtime(threads, cache_dir)
    with importing():
        from slapcli.artifacts import read_meta
        from slapcli.pipeline import reuse_or_run
        from slapcli.stages.embed import embed
        from slapcli.stages.export import export
        from slapcli.stages.select import select
        from slapcli.stages.stratify import stratify
        from slapcli.summary import selection_summary
    _check_input(input, data=True)
    _check_input(target, "--target")
    _check_budget(keep, budget)
    _check_method(method, target)
    engine_config = _engine_config(engine, workers, num_gpus, ray_address)
    _check_read_options(layout, input_format, on_bad_line, max_tokens)
    field_map(fields, layout)
    _check_choice("--order", order, ORDERS)
    reporter = _reporter(quiet)
    if workdir is None:
        workdir = DEFAULT_WORKDIR
        reporter.log(f"work folder: {os.path.abspath(workdir)} (reused by a rerun; --workdir to choose another)")
    if not workdir or (os.path.lexists(workdir) and not os.path.isdir(workdir)):
        raise UsageError(f"--workdir {workdir!r}: not a directory")
    paths = {k: os.path.join(workdir, f"{k}.parquet") for k in ("embeddings", "strata", "selection")}
    stdin_copy = os.path.join(workdir, "input.stdin")
    for path in paths.values():  # one run per work folder at a time: each artifact has one writer
        _check_artifact_path(path)
        _claims[-1].enter_context(output_lock(path))
    _claim_output(output, [input, target, stdin_copy, *paths.values()], force)
    if is_stream(input):  # stdin, a FIFO, <(...): read once, into the work folder, for every stage
        input = _copy_stdin(stdin_copy, input)
        _claims[-1].push(_drop_on_error(stdin_copy))
    embed_config = EmbedConfig(embed_model=embed_model, proxy_model=proxy_model, layout=layout,
                               input_format=input_format, on_bad_line=on_bad_line, max_tokens=max_tokens,
                               device=device, fields=fields)
    strat_config = StratifyConfig(proxy_loss=proxy_loss and method in methods_where(proxy_losses=True),
                                  proxy_model=proxy_model, keep=keep, budget=budget, screen=screen,
                                  seed=seed, device=device)
    select_config = SelectConfig(method=method, target=target, proxy_model=proxy_model, seed=seed, device=device)
    run_engine = make_engine(engine_config)  # embed and stratify's loss passes; the replay is one process
    reuse_or_run(paths["embeddings"], asdict(embed_config), reporter,
                 lambda: embed(input, paths["embeddings"], embed_config, reporter, engine=run_engine),
                 source=file_fingerprint(input))
    # Also when the embeddings were reused: the skipped and truncated rows shape this run's output as well.
    embed_stats = read_meta(paths["embeddings"], "embeddings").stats
    _report_read_stats(reporter, embed_stats, embed_config.max_tokens)
    _check_rows(reporter, embed_stats["rows"], keep, budget, input)
    reuse_or_run(paths["strata"], asdict(strat_config), reporter,
                 lambda: stratify(paths["embeddings"], paths["strata"], strat_config, reporter, input_override=input,
                                  engine=run_engine),
                 upstream=paths["embeddings"])
    reuse_or_run(paths["selection"], asdict(select_config), reporter,
                 lambda: select(paths["strata"], paths["selection"], select_config, reporter, input_override=input),
                 upstream=paths["strata"])
    result = export(paths["selection"], output, ExportConfig(order=order, input=input), reporter)
    selection_summary(paths["selection"], paths["strata"], reporter.console)
    reporter.log(f"wrote {result.rows_written:,} of {result.rows_in_source:,} rows to "
                 f"{'stdout' if output == '-' else output}")


def _check_artifact_path(path: str) -> None:
    """A work-folder artifact is replaced by the stage that makes it: it may only be a file (or nothing yet)."""
    if os.path.lexists(path) and not os.path.isfile(path):
        raise UsageError(f"{path}: not a regular file; the work folder must hold only slapcli artifacts there")


def _drop_on_error(path: str) -> Callable[..., bool]:
    """An exit callback removing `path` when the command fails on bad data or options: a copy of stdin that
    led to an error is nothing a rerun could use, so it is not left behind (an interrupt keeps it)."""

    def drop(exc_type: object, exc: BaseException | None, tb: object) -> bool:
        if isinstance(exc, SlapError):
            with contextlib.suppress(OSError):
                os.unlink(path)
        return False  # the error goes on

    return drop


def _copy_stdin(copy: str, source: str = STDIN) -> str:
    """Keep stdin or a pipe in the work folder (later stages read the data again); a stopped copy leaves no file."""
    with atomic_path(copy) as tmp, open(tmp, "wb") as f, \
            (contextlib.nullcontext(sys.stdin.buffer) if source == STDIN else open(source, "rb")) as src:
        shutil.copyfileobj(src, f)
    return copy


def main() -> None:
    try:
        # Until a command's own handling takes over, a signal exits with one line (typer would print "Aborted!").
        with on_stop_signals(exit_at_once):
            app()
    except UsageError as e:  # raised outside a command (should not happen, but never show a traceback)
        stderr_console().print(f"error: {e}")
        sys.exit(e.exit_code)
    finally:
        if finished.is_set():
            # The command is complete: a signal while the interpreter shuts down must not turn its exit code 0
            # into a KeyboardInterrupt traceback.
            for signum in STOP_SIGNALS:
                signal.signal(signum, signal.SIG_IGN)
