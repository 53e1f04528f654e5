"""The quality benchmark's data step (scripts/benchlib/data.py) on a user's files (issue 4: it is to be rerun on
data we have not seen), with benchmark_quality.py's options."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import benchmark_quality as bq
from benchlib.data import build_data, read_rows
from benchlib.report import data_line

from slapcli.io.readers import SourceReader, iter_examples


def sharegpt(i: int, source: str | None, answer: str | None = None) -> dict:
    row = {"conversations": [{"from": "human", "value": f"question {i}"},
                             {"from": "gpt", "value": f"answer {i}" if answer is None else answer}]}
    if source is not None:
        row["source"] = source
    return row


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_back(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def contents(path: Path) -> list[tuple]:
    with SourceReader(str(path)) as reader:
        return [tuple((t.role, t.text) for t in p.example.turns) for p in iter_examples(reader)]


def test_split_off_the_training_file_balances_heldout_per_domain(tmp_path: Path) -> None:
    rows = [sharegpt(i, "math" if i % 3 == 0 else "chat") for i in range(60)]
    rows.append(sharegpt(0, "math"))  # exact repeat of row 0
    rows.append(sharegpt(99, "chat", answer="  "))  # blank response
    src = write_jsonl(tmp_path / "mine.jsonl", rows)
    work = tmp_path / "work"
    work.mkdir()
    common = ["--train", str(src), "--domain-field", "source", "--heldout-per-domain", "5", "--workdir", str(work)]
    # As slap itself does, a row with no response stops the run, naming file and line, unless told to skip it.
    with pytest.raises(SystemExit, match=r"mine\.jsonl:62: .*no response.*--on-bad-line skip"):
        build_data(bq.parse_args(common), work)
    args = bq.parse_args([*common, "--on-bad-line", "skip"])
    info = build_data(args, work)

    assert info["dropped"]["train"] == {"bad_row": 1, "duplicate": 1}
    assert info["heldout_by_domain"] == {"chat": 5, "math": 5}
    assert info["train_per_domain"] == {"chat": 35, "math": 15} and info["train_rows"] == 50
    assert not set(contents(work / "train.jsonl")) & set(contents(work / "heldout.jsonl"))
    assert [r["domain"] for r in read_back(work / "heldout.jsonl")].count("math") == 5
    # The report of user data goes to the workdir, not over docs/RESULTS.md, and borrows no analysis.
    assert args.docs == work / "RESULTS.md" and args.analysis is None
    assert "split off the same file, 5 rows per domain" in data_line(info)


def test_split_needs_more_rows_than_heldout_per_domain(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "mine.jsonl", [sharegpt(i, "a" if i < 50 else "b") for i in range(53)])
    work = tmp_path / "work"
    work.mkdir()
    args = bq.parse_args(["--train", str(src), "--domain-field", "source", "--heldout-per-domain", "3",
                          "--workdir", str(work)])
    with pytest.raises(SystemExit, match="domain 'b' has 3 usable rows"):
        build_data(args, work)


def test_heldout_file_is_used_whole_and_leaks_leave_the_training_rows(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [sharegpt(i, None) for i in range(30)])
    held = write_jsonl(tmp_path / "held.jsonl", [sharegpt(i, None) for i in range(25, 40)])
    work = tmp_path / "work"
    work.mkdir()
    args = bq.parse_args(["--train", str(train), "--heldout", str(held), "--workdir", str(work)])
    info = build_data(args, work)

    assert info["dropped"]["train"]["in_heldout"] == 5
    assert info["train_rows"] == 25 and info["heldout_rows"] == 15
    assert info["train_per_domain"] == {"all": 25} and info["heldout_by_domain"] == {"all": 15}
    train_rows, held_rows = contents(work / "train.jsonl"), contents(work / "heldout.jsonl")
    assert not set(train_rows) & set(held_rows)
    # The written files are still the user's layout, which slap and the trainer read back.
    assert all("conversations" in r and r["domain"] == "all" for r in read_back(work / "train.jsonl"))
    examples, domains = read_rows(work / "train.jsonl")
    assert len(examples) == 25 and set(domains) == {"all"}


def test_train_rows_samples_and_a_rerun_with_other_settings_is_refused(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [sharegpt(i, None) for i in range(40)])
    held = write_jsonl(tmp_path / "held.jsonl", [sharegpt(i, None) for i in range(100, 110)])
    work = tmp_path / "work"
    work.mkdir()
    common = ["--train", str(train), "--heldout", str(held), "--workdir", str(work)]
    info = build_data(bq.parse_args([*common, "--train-rows", "12"]), work)
    assert info["train_rows"] == 12
    again = build_data(bq.parse_args([*common, "--train-rows", "12"]), work)  # same data: the cache stands
    assert again["train_rows"] == 12
    with pytest.raises(SystemExit, match="holds data built with other settings"):
        build_data(bq.parse_args([*common, "--train-rows", "13"]), work)
    with pytest.raises(SystemExit, match="only 40 usable training rows"):
        build_data(bq.parse_args([*common, "--train-rows", "41", "--workdir", str(tmp_path)]), tmp_path)


def test_a_bad_row_names_file_and_line(tmp_path: Path) -> None:
    src = tmp_path / "bad.jsonl"
    src.write_text(json.dumps(sharegpt(0, None)) + "\n" + '{"conversations": "oops"}\n')
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(SystemExit, match=r"bad\.jsonl.*2"):
        build_data(bq.parse_args(["--train", str(src), "--workdir", str(work)]), work)


def test_options_of_user_data_are_checked() -> None:
    with pytest.raises(SystemExit):
        bq.parse_args(["--heldout", "x.jsonl"])
    with pytest.raises(SystemExit):
        bq.parse_args(["--train", "x.jsonl", "--code-share", "0.5"])
    with pytest.raises(SystemExit):
        bq.parse_args(["--on-bad-line", "skip"])
    shared = bq.parse_args([])
    assert shared.docs.name == "RESULTS_clean300.md" and shared.analysis.name == "results_analysis.md"
