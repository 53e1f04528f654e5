"""Output safety: nothing final-looking exists until a stage is complete.

Every output is written under a temporary name in the destination folder and renamed over the final name
only at the end (os.replace is atomic on one file system), so a crash or SIGKILL leaves either the old
file or no file, never a truncated one.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from typing import BinaryIO

from slapcli.errors import UsageError

STDOUT = "-"


def check_output_path(output: str, inputs: list[str], force: bool) -> None:
    """Refuse to overwrite an existing file without --force, and never write over an input."""
    if output == STDOUT:
        return
    out_real = os.path.realpath(output)
    for source in inputs:
        if source not in (None, "-") and os.path.realpath(source) == out_real:
            raise UsageError(f"{output}: the output path is the input path; choose another output")
    if os.path.isdir(output):
        raise UsageError(f"{output}: is a directory; give a file name")
    if os.path.exists(output) and not force:
        raise UsageError(f"{output}: exists; pass --force to overwrite it")


def temp_path_beside(output: str) -> str:
    """A fresh temporary file in the output's folder (same file system, so the final rename is atomic)."""
    folder = os.path.dirname(os.path.abspath(output))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(output)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    return tmp


def discard(tmp: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)


@contextlib.contextmanager
def atomic_path(output: str) -> Iterator[str]:
    """Yield a temporary path beside `output`; rename it to `output` only if the block succeeds."""
    tmp = temp_path_beside(output)
    try:
        yield tmp
        os.replace(tmp, output)
    except BaseException:
        discard(tmp)
        raise


@contextlib.contextmanager
def open_output(output: str) -> Iterator[BinaryIO]:
    """A binary stream to `output` (atomically replaced at the end) or to stdout for '-'."""
    if output == STDOUT:
        stream = sys.stdout.buffer
        try:
            yield stream
        finally:
            with contextlib.suppress(BrokenPipeError):
                stream.flush()
        return
    with atomic_path(output) as tmp, open(tmp, "wb") as f:
        yield f
