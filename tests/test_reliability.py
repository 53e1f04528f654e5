"""Interrupted runs and bad input through the real CLI: SIGKILL and resume, Ctrl-C, the bad-input corpus.

The kill tests run `slap` in a subprocess (a real process, really killed); the model work is slowed down in
that process only, so that the test can choose a moment in the middle of the run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from slapcli.artifacts import read_meta
from slapcli.cli import app
from slapcli.stages import embed as embed_module

BAD_DIR = Path(__file__).resolve().parent / "data" / "bad"
BAD_EXPECTED = json.loads((BAD_DIR / "expected.json").read_text(encoding="utf-8"))
BAD_ERRORS = sorted(name for name, e in BAD_EXPECTED.items() if e.get("outcome", "error") == "error")

ROWS, CHUNK_ROWS = 40, 4  # ten chunks, so there is a middle to stop in
CHUNKS = ROWS // CHUNK_ROWS

# Runs `slap` with some functions slowed down: argv[1] is a JSON {"slow": [[module, name, seconds]], "argv": [...]}.
# Torch gets one thread, as in this test process, so that both compute the same bits.
_RUNNER = '''
import importlib, json, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored
spec = json.loads(sys.argv[1])
import torch
torch.set_num_threads(1)
def slowed(real, seconds):
    def run(*args, **kwargs):
        time.sleep(seconds)
        return real(*args, **kwargs)
    return run
for module, name, seconds in spec["slow"]:
    mod = importlib.import_module(module)
    setattr(mod, name, slowed(getattr(mod, name), seconds))
sys.argv = ["slap", *spec["argv"]]
from slapcli.cli import main
main()
'''

runner = CliRunner()


def invoke(args: list) -> object:
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture()
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"id": i, "instruction": f"Explain topic {i} in {i % 5 + 1} words",
                                        "output": f"Topic {i} is " + "very " * (i % 7) + "simple."}) + "\n"
                            for i in range(ROWS)))
    return path


@pytest.fixture()
def models(tiny_encoder_dir: Path, tiny_proxy_dir: Path) -> list[str]:
    return ["--embed-model", str(tiny_encoder_dir), "--proxy-model", str(tiny_proxy_dir)]


def embed_args(data: Path, out: Path, models: list[str], *extra: str) -> list[str]:
    return ["embed", str(data), "-o", str(out), *models, "--chunk-rows", str(CHUNK_ROWS), "-q", *extra]


def parts_of(out: Path) -> Path:
    return out.parent / f".{out.name}.parts"


def part_files(out: Path) -> list[str]:
    folder = parts_of(out)
    return sorted(p.name for p in folder.glob("part-*.parquet")) if folder.is_dir() else []


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


def start_slap(tmp_path: Path, argv: list[str], slow: list[tuple[str, str, float]],
               stdin: int | None = None) -> subprocess.Popen:
    script = tmp_path / "run_slap.py"
    script.write_text(_RUNNER)
    spec = json.dumps({"slow": slow, "argv": argv})
    return subprocess.Popen([sys.executable, str(script), spec], stdin=stdin, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})


def wait_for(condition, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    """Poll until `condition()`; fail if the process ends first (it would have had nothing left to interrupt)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"slap ended (rc {proc.returncode}) before the test could interrupt it: "
                                 f"{proc.stderr.read().decode()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for slap to get going")
        time.sleep(0.02)


class CountingEncoder:
    """Counts the chunks the model really embeds (reused parts must not reach it)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail_at: int | None = None) -> None:
        self.calls = 0
        self.fail_at = fail_at
        self._real = embed_module.encode_texts
        monkeypatch.setattr(embed_module, "encode_texts", self)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt  # what Ctrl-C raises in the middle of the model work
        return self._real(*args, **kwargs)


# --- SIGKILL and resume --------------------------------------------------------------------------------------------


def test_killed_embed_resumes_to_the_same_bytes(tmp_path, data_file, models, monkeypatch):
    full = tmp_path / "full" / "e.parquet"
    r = invoke(embed_args(data_file, full, models))
    assert r.exit_code == 0, r.stderr
    assert not parts_of(full).exists()  # an uninterrupted run leaves only the artifact

    out = tmp_path / "run" / "e.parquet"
    proc = start_slap(tmp_path, embed_args(data_file, out, models), [("slapcli.stages.embed", "encode_texts", 0.3)])
    wait_for(lambda: len(part_files(out)) >= 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    done = len(part_files(out))
    assert 3 <= done < CHUNKS
    # Nothing final-looking: the folder holds only the hidden parts folder (and the killed run's lock file, which
    # no process holds any more: the next run on this output takes it and removes it).
    left = sorted(p.name for p in out.parent.iterdir())
    assert left == sorted([parts_of(out).name, f".{out.name}.lock"])

    counter = CountingEncoder(monkeypatch)
    r = invoke(embed_args(data_file, out, models))  # the same command again
    assert r.exit_code == 0, r.stderr
    assert counter.calls == CHUNKS - done  # the finished chunks were not embedded again
    assert out.read_bytes() == full.read_bytes()
    assert not parts_of(out).exists() and not temp_files(tmp_path)
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # the stale lock file is gone too


def test_interrupted_embed_resumes_and_force_keeps_the_old_output_until_done(tmp_path, data_file, models,
                                                                               monkeypatch):
    out = tmp_path / "e.parquet"
    r = invoke(embed_args(data_file, out, models))
    assert r.exit_code == 0, r.stderr
    first = out.read_bytes()
    data_file.write_text(data_file.read_text().replace("simple", "plain"))  # new data: rerun with --force

    CountingEncoder(monkeypatch, fail_at=4)
    r = invoke(embed_args(data_file, out, models, "--force"))
    assert r.exit_code == 130
    assert out.read_bytes() == first  # the old artifact stays until the new one is complete
    assert len(part_files(out)) == 3 and not temp_files(tmp_path)

    counter = CountingEncoder(monkeypatch)
    r = invoke(embed_args(data_file, out, models, "--force"))
    assert r.exit_code == 0, r.stderr
    assert counter.calls == CHUNKS - 3  # --force replaces the output; it does not throw away the finished chunks
    fresh = tmp_path / "fresh.parquet"
    assert invoke(embed_args(data_file, fresh, models)).exit_code == 0
    assert out.read_bytes() == fresh.read_bytes()


@pytest.mark.parametrize("change", ["settings", "data", "no-resume"])
def test_parts_from_other_data_or_settings_are_not_reused(tmp_path, data_file, models, monkeypatch, change):
    out = tmp_path / "e.parquet"
    CountingEncoder(monkeypatch, fail_at=5)
    assert invoke(embed_args(data_file, out, models)).exit_code == 130
    assert len(part_files(out)) == 4

    extra: list[str] = []
    if change == "settings":
        extra = ["--max-tokens", "16"]
    elif change == "data":
        data_file.write_text(data_file.read_text().replace("topic 3 ", "topic three "))
    else:
        extra = ["--no-resume"]
    counter = CountingEncoder(monkeypatch)
    r = invoke(embed_args(data_file, out, models, *extra))
    assert r.exit_code == 0, r.stderr
    assert counter.calls == CHUNKS  # everything embedded again
    assert not parts_of(out).exists()
    reference = tmp_path / "reference.parquet"
    assert invoke(embed_args(data_file, reference, models, *extra)).exit_code == 0
    assert out.read_bytes() == reference.read_bytes()


def test_a_run_on_bad_data_leaves_no_parts(tmp_path, data_file, models):
    data_file.write_text(data_file.read_text() + '{"instruction": "q", "output": ""}\n')  # bad last row
    out = tmp_path / "e.parquet"
    r = invoke(embed_args(data_file, out, models))
    assert r.exit_code == 2
    assert f"{data_file}:{ROWS + 1}: field 'output'" in r.stderr
    assert {p.name for p in tmp_path.iterdir()} - {"slap-cache"} == {"data.jsonl"}  # no output, parts or temps


# --- Ctrl-C --------------------------------------------------------------------------------------------------------


STOPPED = {signal.SIGINT: (130, "interrupted"), signal.SIGTERM: (143, "terminated")}
STOP_SIGNALS = pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])


def assert_clean_interrupt(proc: subprocess.Popen, signum: int = signal.SIGINT) -> None:
    stdout, stderr = proc.communicate(timeout=60)
    text = stderr.decode()
    code, word = STOPPED[signum]
    assert proc.returncode == code, text
    assert stdout == b""
    assert "Traceback" not in text and "KeyboardInterrupt" not in text
    assert text.splitlines() == [f"{word}: no output was written; rerun the same command to continue"]


def loading_torch(pid: int) -> bool:
    """True once the process has mapped libtorch: it is in the middle of `import torch`."""
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc to see the import under way")
@STOP_SIGNALS
def test_a_signal_while_torch_is_imported_gives_one_line(tmp_path, data_file, models, signum):
    out = tmp_path / "e.parquet"
    # What the installed `slap` script runs: the handling must be in place before slapcli.cli imports torch.
    # SIGINT back to its default first: a test run started as a background job inherits it ignored, and slap
    # rightly leaves an ignored SIGINT ignored.
    entry = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
             "from slapcli.cli import main; sys.exit(main())")
    proc = subprocess.Popen([sys.executable, "-c", entry, *embed_args(data_file, out, models)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(lambda: loading_torch(proc.pid), proc, timeout=60)
    proc.send_signal(signum)
    assert_clean_interrupt(proc, signum)
    assert not out.exists() and not temp_files(tmp_path)


@STOP_SIGNALS
def test_a_signal_stops_embed_cleanly(tmp_path, data_file, models, signum):
    out = tmp_path / "run" / "e.parquet"
    proc = start_slap(tmp_path, embed_args(data_file, out, models), [("slapcli.stages.embed", "encode_texts", 0.3)])
    wait_for(lambda: len(part_files(out)) >= 1, proc)
    proc.send_signal(signum)
    assert_clean_interrupt(proc, signum)
    assert not out.exists() and not temp_files(tmp_path)
    assert part_files(out)  # kept: the same command resumes from them


@STOP_SIGNALS
def test_a_signal_while_a_part_is_written_leaves_no_temporary_file(tmp_path, data_file, models, signum):
    out = tmp_path / "run" / "e.parquet"
    # Slow Parquet writes, so that the signal lands while a part's temporary file exists.
    proc = start_slap(tmp_path, embed_args(data_file, out, models), [("pyarrow.parquet", "write_table", 0.5)])
    manifest = parts_of(out) / "manifest.json"
    # The manifest goes in first, through a temporary file of its own: wait past it, or under load the signal
    # can land while the manifest itself is being written and there is no resume state to check.
    wait_for(lambda: manifest.exists() and bool(temp_files(tmp_path)), proc)
    proc.send_signal(signum)
    assert_clean_interrupt(proc, signum)
    assert not out.exists() and not temp_files(tmp_path)
    assert manifest.exists()  # resume state is kept


@STOP_SIGNALS
def test_a_signal_stops_select_cleanly(tmp_path, data_file, models, signum):
    emb, strata, out = tmp_path / "e.parquet", tmp_path / "s.parquet", tmp_path / "sel" / "sel.parquet"
    assert invoke(embed_args(data_file, emb, models)).exit_code == 0
    r = invoke(["stratify", emb, "-o", strata, "--proxy-model", models[3], "--clusters", "3", "--keep", "0.5", "-q"])
    assert r.exit_code == 0, r.stderr
    argv = ["select", str(strata), "-o", str(out), "--proxy-model", models[3], "--proj-dim", "32",
            "--batch-size", "2", "--checkpoint-minutes", "0", "-q"]
    proc = start_slap(tmp_path, argv, [("slapcli.replay", "train_step", 0.3)])
    checkpoint = Path(str(out) + ".ckpt")
    wait_for(checkpoint.exists, proc)
    proc.send_signal(signum)
    assert_clean_interrupt(proc, signum)
    assert not out.exists() and not temp_files(tmp_path)


def test_ctrl_c_while_run_copies_stdin_leaves_no_temporary_file(tmp_path, data_file, models):
    work = tmp_path / "work"
    argv = ["run", "-", "-o", str(tmp_path / "out.jsonl"), "--workdir", str(work), *models, "-q"]
    proc = start_slap(tmp_path, argv, [], stdin=subprocess.PIPE)
    assert proc.stdin is not None
    proc.stdin.write(data_file.read_bytes()[:100])  # part of the data; stdin stays open, so the copy waits
    proc.stdin.flush()
    wait_for(lambda: bool(temp_files(work)) if work.exists() else False, proc)
    proc.send_signal(signal.SIGINT)
    assert_clean_interrupt(proc)
    proc.stdin.close()
    assert not temp_files(tmp_path) and not (work / "input.stdin").exists()


def test_run_on_stdin_warns_about_skipped_and_truncated_rows(tmp_path, data_file, models):
    long_row = {"instruction": "Repeat", "output": "word " * 3000}  # far over the default --max-tokens (1024)
    data = data_file.read_bytes() + b"not json\n" + json.dumps(long_row).encode() + b"\n"
    out = tmp_path / "out.jsonl"
    argv = ["run", "-", "-o", out, "--workdir", tmp_path / "work", *models, "--method", "random",
            "--on-bad-line", "skip", "-q"]
    for attempt in ("fresh", "reused"):
        r = runner.invoke(app, [str(a) for a in argv], input=data, catch_exceptions=False)
        assert r.exit_code == 0, (attempt, r.stderr)
        text = r.stderr.replace("\n", "")  # the console wraps long warnings (keeping the space at a break)
        assert f"warning: skipped 1 bad rows, e.g. {tmp_path / 'work' / 'input.stdin'}:{ROWS + 1}: malformed" \
            in text, (attempt, text)
        assert f"warning: 1 of {ROWS + 1:,} rows exceed --max-tokens (1024)" in text, (attempt, text)
        argv.append("--force")  # the second run reuses the artifacts and rewrites the output


# --- the bad-input corpus through the CLI --------------------------------------------------------------------------


@pytest.mark.parametrize("name", BAD_ERRORS)
def test_bad_corpus_through_embed(tmp_path, models, name):
    expected = BAD_EXPECTED[name]
    out = tmp_path / "e.parquet"
    r = invoke(["embed", BAD_DIR / name, "-o", out, *models, "-q"])
    assert r.exit_code == 2, r.stderr
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {BAD_DIR / name}"), r.stderr
    assert expected["message_contains"] in lines[0]
    if expected["line"] is not None:
        assert f"{BAD_DIR / name}:{expected['line']}: " in lines[0]
    if expected["field"] is not None:
        assert f"field '{expected['field']}'" in lines[0]
    assert {p.name for p in tmp_path.iterdir()} - {"slap-cache"} == set()  # no output, parts or temps


def test_row_over_max_tokens_is_truncated_and_counted(tmp_path, models):
    expected = BAD_EXPECTED["over_max_tokens.jsonl"]
    out = tmp_path / "e.parquet"
    r = invoke(["embed", BAD_DIR / "over_max_tokens.jsonl", "-o", out, *models, "-q"])
    assert r.exit_code == 0, r.stderr
    assert expected["message_contains"] in r.stderr
    assert read_meta(str(out)).stats["truncated"] == expected["truncated"]
    table = pq.read_table(out, columns=["line", "truncated", "n_prompt_tokens", "n_response_tokens"]).to_pylist()
    assert [row["line"] for row in table if row["truncated"]] == [expected["line"]]
    long_row = table[expected["line"] - 1]
    assert long_row["n_prompt_tokens"] + long_row["n_response_tokens"] <= 1024
