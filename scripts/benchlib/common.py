"""What every benchmark module needs and nothing numeric: the repository root, the log line, comma lists."""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent  # the repository: scripts/benchlib/ is two levels down


def log(msg: str) -> None:
    """One timestamped line on stderr (stdout stays free for the scripts' own output)."""
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


def floats(text: str) -> list[float]:
    """A comma list of numbers, as `--keeps 0.6,0.7` gives it."""
    return [float(x) for x in text.split(",") if x.strip()]


def rel(path: str) -> str:
    """`path` relative to the repository when it lies inside it (reports name files that way), else as given."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return path
