"""Going back to the source data an artifact was made from, and refusing data that is not it."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator

from slapcli.artifacts import ArtifactMeta, check_source
from slapcli.errors import UsageError
from slapcli.io.readers import (
    STDIN,
    ParsedRow,
    ReadStats,
    SourceReader,
    file_fingerprint,
    is_stream,
    iter_examples,
    list_shards,
)


def source_path(meta: ArtifactMeta, override: str | None, artifact_name: str) -> str:
    """The data file to read: `--input` if given, else the path recorded in the artifact."""
    path = override or meta.source["path"]
    if override is None and (path == STDIN or meta.source.get("stream")):
        raise UsageError(f"{artifact_name} was made from stdin or a pipe ({path}); pass --input FILE (the same "
                         "data) to read it again")
    sharded = meta.source.get("shards") is not None  # made from a folder or pattern of shards
    if sharded and (os.path.isdir(path) or glob.has_magic(path)):
        list_shards(path)  # one line when the folder or pattern holds no data file (any more)
    elif path != STDIN and (not os.path.exists(path) or os.path.isdir(path)):
        if override is not None:
            what = "is a directory" if os.path.isdir(path) else "no such file"
            raise UsageError(f"{path}: {what} (--input)")
        # Older artifacts recorded the path as given, relative to the folder the command ran in.
        raise UsageError(f"{artifact_name}: its source data {path} is missing or not a file (moved or deleted?); "
                         "pass --input FILE with the same data")
    return path


def verify_source(meta: ArtifactMeta, path: str, artifact_name: str) -> None:
    """Fail fast, before any model work, when a file on disk is not the recorded data (a pipe is checked at EOF)."""
    if not is_stream(path):
        check_source(meta, file_fingerprint(path), path, artifact_name)


def iter_source_rows(meta: ArtifactMeta, path: str, artifact_name: str,
                     wanted: set[int] | None = None) -> Iterator[ParsedRow]:
    """Parse the source again with the options it was embedded with, yielding only the `wanted` rows."""
    verify_source(meta, path, artifact_name)
    config = meta.config
    with SourceReader(path, meta.source.get("container")) as reader:
        for row in iter_examples(reader, config.get("layout", "auto"), config.get("on_bad_line", "error"),
                                 ReadStats(), meta.source.get("fields")):  # the source record travels on
            if wanted is None or row.record.index in wanted:
                yield row
        if reader.stream:
            assert reader.fingerprint is not None
            check_source(meta, reader.fingerprint, reader.name, artifact_name)
