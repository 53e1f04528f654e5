"""Streaming readers for instruction data: JSON Lines, JSON arrays, Parquet and Arrow; plain, gzip or zstd; a file,
a folder of shards, stdin or a pipe.

Every reader yields `SourceRecord`s one at a time, so memory stays flat whatever the file size, and
fingerprints the bytes it reads (size + BLAKE2b of the file as stored, compressed or not) so that later
stages can refuse artifacts made from other data.

A folder (a Hugging Face snapshot's `data/`, a Spark output, `datasets.save_to_disk`) or a glob pattern is one
dataset: its `.parquet`, `.jsonl`/`.ndjson` (plain, `.gz`, `.zst`) and `.arrow` files in sorted name order, each
fingerprinted; hidden files and Spark's `_SUCCESS`-style markers are not data. A FIFO or a process substitution
(`<(zcat f.gz)`) is read once, like stdin.

JSON is read strictly: an object with a key twice (a trainer that keeps the first would train on text that was
never scored), a lone surrogate escape (`"\\ud800"`, not Unicode) and an integer too long to convert are data
errors naming file and line, skippable like any bad row.
"""

from __future__ import annotations

import codecs
import contextlib
import glob
import hashlib
import io
import json
import os
import re
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from slapcli.errors import DataError, UsageError
from slapcli.io.layouts import (
    LAYOUTS,
    Example,
    FieldError,
    FieldMap,
    detect_layout,
    field_map_from_dataset_info,
    json_type,
    parse_example,
    parse_field_map,
    parse_mapped,
)

CONTAINERS = ("jsonl", "json", "parquet", "arrow")
MIXED = "mixed"  # the container (or compression) recorded for a folder whose shards differ in it
# What a folder's data files are called; anything else in it (README.md, dataset_info.json, _SUCCESS) is not data.
SHARD_SUFFIXES = (".parquet", ".arrow", ".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz", ".jsonl.zst", ".ndjson.zst",
                  ".jsonl.zstd", ".ndjson.zstd")
BAD_LINE_POLICIES = ("error", "skip")
ID_FIELD = "id"  # a row's identifier, when the data has one; two rows with one id are a data error
STDIN = "-"
_CHUNK = 1 << 20
_GZIP_MAGIC = b"\x1f\x8b"
_BOM = b"\xef\xbb\xbf"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_PARQUET_MAGIC = b"PAR1"
_ARROW_FILE_MAGIC = b"ARROW1"
_ARROW_STREAM_MAGIC = b"\xff\xff\xff\xff"  # the continuation marker an Arrow IPC stream starts with
# A JSON escape of a UTF-16 surrogate: only then can a parsed string hold a lone one (a valid pair decodes whole).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE_ESCAPE_TEXT = re.compile(r"\\u[dD][89a-fA-F]")


def _decompression_errors() -> tuple[type[BaseException], ...]:
    """Every exception a damaged gzip or zstd stream can raise (not all are OSErrors)."""
    import zlib

    import zstandard

    return (OSError, EOFError, zlib.error, zstandard.ZstdError)


@dataclass(frozen=True)
class Fingerprint:
    """Identity of an input: its size and content hash as stored on disk (or as read from stdin)."""

    size: int
    blake2b: str

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "blake2b": self.blake2b}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Fingerprint:
        return cls(int(d["size"]), str(d["blake2b"]))


@dataclass(frozen=True)
class SourceRecord:
    index: int  # position among all records of the source, bad ones included (0-based)
    line: int  # 1-based: the physical line (JSON Lines), the element's first line (JSON), the row (Parquet)
    raw: bytes  # JSON Lines: the line's exact bytes without its newline; otherwise the compact JSON of the row
    value: Any
    file: str | None = None  # the shard it came from, when the source is a folder (line counts in that file)


@dataclass
class ReadStats:
    records: int = 0
    bad_skipped: int = 0
    bad_examples: list[str] = field(default_factory=list)
    non_text_parts: int = 0  # content parts without text (images, audio): not scored, but never dropped silently
    rows_with_non_text_parts: int = 0

    def skip(self, error: DataError) -> None:
        self.bad_skipped += 1
        if len(self.bad_examples) < 5:
            self.bad_examples.append(str(error))


class _HashingReader(io.RawIOBase):
    """Passes bytes through while hashing them, so fingerprinting costs no second pass."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self.hasher = hashlib.blake2b(digest_size=16)
        self.size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._raw.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self.hasher.update(data)
        self.size += n
        return n

    def drain(self) -> Fingerprint:
        while self.readinto(bytearray(_CHUNK)):
            pass
        return Fingerprint(self.size, self.hasher.hexdigest())


def is_stream(path: str) -> bool:
    """Stdin, a FIFO or a process substitution (/dev/fd/N): data that can be read only once."""
    if path == STDIN:
        return True
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not stat.S_ISREG(mode) and not stat.S_ISDIR(mode)


# `train-00000-of-00004.parquet` (or `train_sft-00000-of-00003-5e2e4b3c.parquet`): the split comes first in a
# Hugging Face hub shard's name.
_HUB_SHARD = re.compile(r"^(.+?)-\d{5}-of-\d{5}[-.]")


_SPLIT_NAMES = frozenset({"train", "test", "validation", "valid", "val", "dev", "eval"})


def _split_of(name: str) -> tuple[str, str] | None:
    """(split, glob pattern of its files) when a data file's name says which split it holds, else None."""
    hub = _HUB_SHARD.match(name)
    if hub:
        return hub.group(1), f"{hub.group(1)}-*"
    stem = name.split(".")[0]
    return (stem, f"{stem}.*") if stem.lower() in _SPLIT_NAMES else None


def _is_shard_name(name: str) -> bool:
    return not name.startswith((".", "_")) and name.lower().endswith(SHARD_SUFFIXES)


def list_shards(path: str) -> list[str] | None:
    """The data files of a folder or glob pattern, in sorted order; None when `path` is one file (or stdin).

    Raises UsageError when a folder holds no data file (naming the subfolders that do) or a pattern matches none.
    """
    if path == STDIN or os.path.isfile(path) or is_stream(path):
        return None
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if _is_shard_name(n) and os.path.isfile(os.path.join(path, n)))
        splits = {split: pattern for n in names if (found := _split_of(n)) for split, pattern in [found]}
        if len(splits) > 1:  # e.g. a Hugging Face snapshot's data/ with train and test shards side by side
            last = sorted(splits)[-1]
            raise UsageError(f"{path}: holds the splits {', '.join(sorted(splits))}, which are not one dataset; "
                             f"pass one split as a quoted pattern, e.g. '{os.path.join(path, splits[last])}'")
        if names:
            return [os.path.join(path, n) for n in names]
        below = sorted({os.path.relpath(os.path.dirname(f), path)
                        for f in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                        if _is_shard_name(os.path.basename(f)) and os.path.isfile(f)})
        hint = f"; these subfolders have some: {', '.join(below[:5])} (pass one of them)" if below else ""
        raise UsageError(f"{path}: a folder with no data files (.parquet, .arrow, .jsonl[.gz|.zst]){hint}")
    if glob.has_magic(path):
        files = sorted(f for f in glob.glob(path) if os.path.isfile(f))
        if not files:
            raise UsageError(f"{path}: no file matches this pattern")
        return files
    return None


def _combined_fingerprint(shards: list[tuple[str, Fingerprint]]) -> Fingerprint:
    """One fingerprint for a folder: its shards' names, sizes and hashes, in order."""
    listing = json.dumps([[name, fp.size, fp.blake2b] for name, fp in shards], separators=(",", ":"))
    return Fingerprint(sum(fp.size for _, fp in shards), hashlib.blake2b(listing.encode(), digest_size=16).hexdigest())


def _shard_label(path: str, shard: str) -> str:
    """A shard's name in fingerprints: relative to the folder, or to the folder a glob pattern starts in, so that
    `data/` and `data/*.parquet` name the same files the same way wherever the data sits."""
    root = path
    if not os.path.isdir(path):
        parts = path.split(os.sep)
        fixed = next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts) - 1)
        root = os.sep.join(parts[:fixed]) or os.curdir
    return os.path.relpath(shard, root)


def file_fingerprint(path: str) -> Fingerprint:
    shards = list_shards(path)
    if shards is not None:
        return _combined_fingerprint([(_shard_label(path, s), file_fingerprint(s)) for s in shards])
    hasher = hashlib.blake2b(digest_size=16)
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            hasher.update(chunk)
            size += len(chunk)
    return Fingerprint(size, hasher.hexdigest())


def display_name(path: str) -> str:
    return "<stdin>" if path == STDIN else path


def _strip_compression_suffix(name: str) -> str:
    for suffix in (".gz", ".zst", ".zstd"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def container_from_name(path: str) -> str | None:
    """The container an extension promises; None when the name says nothing (stdin, .txt, ...)."""
    name = _strip_compression_suffix(path.lower())
    if name.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    if name.endswith(".json"):
        return "json"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".arrow"):
        return "arrow"
    return None


class SourceReader:
    """One pass over an input. Use as a context manager; `fingerprint` is known after iteration ends."""

    def __init__(self, path: str, container: str | None = None, *, allow_empty: bool = False) -> None:
        if container == MIXED:
            container = None  # recorded for a folder of several containers: each shard's name says what it is
        if container is not None and container not in CONTAINERS:
            raise UsageError(f"unknown input format {container!r}; expected one of {', '.join(CONTAINERS)}")
        self.shards = list_shards(path)  # a folder's (or pattern's) data files; None for one file
        if self.shards is None and path != STDIN and not os.path.exists(path):
            raise UsageError(f"{path}: no such file")
        if path == STDIN and sys.stdin is None:  # started with stdin closed (`<&-`)
            raise UsageError("-: stdin is closed; pipe the data in or give a file name")
        self.path = path
        self.name = display_name(path)
        self.stream = is_stream(path)  # read once, like stdin: never opened or fingerprinted a second time
        self.requested_container = container
        self.fingerprint: Fingerprint | None = None
        self.container: str | None = None
        self.compression: str | None = None
        self.shard_fingerprints: list[dict[str, Any]] | None = None  # per shard, after iteration
        self._allow_empty = allow_empty  # an empty shard of a folder is no error (Spark writes them)
        self._stack = contextlib.ExitStack()
        self._hashing: _HashingReader | None = None
        self._shard_reader: SourceReader | None = None
        self._shards_done_bytes = 0
        if self.shards is not None:
            self.total_bytes: int | None = sum(os.path.getsize(s) for s in self.shards)
            self._init_folder_container(container)
        else:
            self.total_bytes = None if self.stream else os.path.getsize(path)

    def _init_folder_container(self, requested: str | None) -> None:
        assert self.shards is not None
        containers = {container_from_name(s) for s in self.shards}
        compressions = {{".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}.get(os.path.splitext(s)[1].lower())
                        for s in self.shards}
        self.container = containers.pop() if len(containers) == 1 else MIXED
        self.compression = compressions.pop() if len(compressions) == 1 else MIXED
        if requested is not None and requested != self.container:
            raise UsageError(f"{self.name}: --input-format {requested} does not apply to a folder; its files' "
                             "names say what they hold")

    @property
    def bytes_read(self) -> int:
        """Stored (compressed) bytes consumed so far: progress against `total_bytes`."""
        if self.shards is not None:
            current = self._shard_reader.bytes_read if self._shard_reader is not None else 0
            return self._shards_done_bytes + current
        return self._hashing.size if self._hashing is not None else 0

    @property
    def files(self) -> list[str]:
        """The files read, in order: a folder's shards, or the one file."""
        return self.shards if self.shards is not None else [self.path]

    def __enter__(self) -> SourceReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def records(self) -> Iterator[SourceRecord]:
        if self.shards is not None:
            yield from self._shard_records()
            return
        raw = sys.stdin.buffer if self.path == STDIN else self._stack.enter_context(open(self.path, "rb"))
        hashing = self._hashing = _HashingReader(raw)
        stream = io.BufferedReader(hashing, buffer_size=_CHUNK)
        magic = stream.peek(6)[:6]
        if not magic:
            if self._allow_empty:
                self.fingerprint = hashing.drain()
                return
            raise DataError("empty input: the file has no rows", self.name)
        if magic.startswith(_PARQUET_MAGIC):
            self.container = self._check_container("parquet")
            yield from self._parquet_records(stream, hashing)
            return
        # An Arrow stream's first 4 bytes (0xFFFFFFFF) are too weak a sign alone: believed when the name says .arrow.
        if magic.startswith(_ARROW_FILE_MAGIC) or (magic.startswith(_ARROW_STREAM_MAGIC)
                                                    and self._expected_container() == "arrow"):
            self.container = self._check_container("arrow")
            yield from self._arrow_records(stream, hashing, magic.startswith(_ARROW_FILE_MAGIC))
            return
        text_stream: BinaryIO = stream
        if magic.startswith(_GZIP_MAGIC):
            import gzip

            self.compression = "gzip"
            text_stream = io.BufferedReader(gzip.GzipFile(fileobj=stream), buffer_size=_CHUNK)  # type: ignore[arg-type]
        elif magic.startswith(_ZSTD_MAGIC):
            self.compression = "zstd"
            text_stream = io.BufferedReader(_ZstdReader(stream), buffer_size=_CHUNK)
        try:
            first, blank_lines = _first_non_space(text_stream)
        except _decompression_errors() as e:  # corrupt gzip/zstd stream
            raise DataError(f"cannot decompress ({self.compression}): {e}", self.name) from None
        if first is None:
            if self._allow_empty:
                self.fingerprint = hashing.drain()
                return
            raise DataError("empty input: the file has no rows", self.name)
        sniffed = "json" if first == b"[" else "jsonl"
        self.container = self._check_container(sniffed)
        try:
            if self.container == "json":
                yield from self._json_array_records(text_stream, 1 + blank_lines)
            else:
                yield from self._jsonl_records(text_stream, 1 + blank_lines)
        except _decompression_errors() as e:
            raise DataError(f"cannot decompress ({self.compression}): {e}", self.name) from None
        self.fingerprint = hashing.drain()

    def _shard_records(self) -> Iterator[SourceRecord]:
        """Every shard in order as one dataset: record indices run on across shards, lines count per shard."""
        assert self.shards is not None
        offset = 0
        prints: list[tuple[str, Fingerprint]] = []
        for shard in self.shards:
            with SourceReader(shard, allow_empty=True) as reader:
                self._shard_reader = reader
                count = 0
                for record in reader.records():
                    yield SourceRecord(offset + record.index, record.line, record.raw, record.value, reader.name)
                    count += 1
                offset += count
                assert reader.fingerprint is not None
                prints.append((_shard_label(self.path, shard), reader.fingerprint))
                self._shards_done_bytes += reader.total_bytes or 0
                self._shard_reader = None
        self.shard_fingerprints = [{"path": name, **fp.to_dict()} for name, fp in prints]
        self.fingerprint = _combined_fingerprint(prints)

    def _expected_container(self) -> str | None:
        return self.requested_container or (None if self.path == STDIN else container_from_name(self.path))

    def _check_container(self, sniffed: str) -> str:
        expected = self._expected_container()
        if expected is None or expected == sniffed:
            return sniffed
        hints = {
            "jsonl": "JSON Lines (one object per line)",
            "json": "a JSON array",
            "parquet": "Parquet",
            "arrow": "Arrow IPC",
        }
        raise DataError(
            f"expected {hints[expected]} from the file name or --input-format, but the content is "
            f"{hints[sniffed]}; rename the file or pass --input-format {sniffed}",
            self.name,
            1,
        )

    def _jsonl_records(self, stream: BinaryIO, first_line: int = 1) -> Iterator[SourceRecord]:
        index = 0
        for line_no, line in enumerate(stream, start=first_line):
            raw = line[:-1] if line.endswith(b"\n") else line
            if line_no == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM):]  # a byte-order mark is not part of the first row
            if not raw.strip():
                continue  # blank lines are not rows
            yield SourceRecord(index, line_no, raw, _LazyJSON(raw, self.name, line_no))
            index += 1

    def _json_array_records(self, stream: BinaryIO, first_line: int = 1) -> Iterator[SourceRecord]:
        utf8 = codecs.getincrementaldecoder("utf-8")()
        buf, pos, line, eof = "", 0, first_line, False

        def fill() -> bool:
            nonlocal buf, pos, eof
            chunk = stream.read(_CHUNK)
            try:
                text = utf8.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                raise DataError(f"not valid UTF-8 ({e.reason})", self.name, line) from None
            buf, pos = buf[pos:] + text, 0
            eof = not chunk
            return bool(text)

        def skip_space() -> None:
            nonlocal pos, line
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    line += buf[pos] == "\n"
                    pos += 1
                if pos < len(buf) or eof or not fill():
                    return

        skip_space()
        if buf.startswith("\ufeff", pos):
            pos += 1  # a byte-order mark
            skip_space()
        pos += 1  # the opening "[" (sniffed already)
        index = 0
        skip_space()
        if pos < len(buf) and buf[pos] == "]":
            raise DataError("empty input: the JSON array has no rows", self.name, line)
        while True:
            skip_space()
            while True:
                try:
                    value, end = _decode_element(buf, pos, self.name, line)
                    if end == len(buf) and not eof and fill():
                        continue  # a number may continue past the chunk: decode again with more text
                    break
                except RecursionError:
                    raise DataError("JSON nested too deeply", self.name, line) from None
                except json.JSONDecodeError as e:
                    if not eof and fill():
                        continue
                    raise DataError(f"malformed JSON array element: {e.msg}", self.name,
                                    line + buf.count("\n", pos, e.pos)) from None
            if isinstance(value, _Invalid):
                raw = buf[pos:end].encode("utf-8", "surrogatepass")  # never exported: the row is bad
            else:
                raw = json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
            yield SourceRecord(index, line, raw, value)
            index += 1
            line += buf.count("\n", pos, end)
            pos = end
            skip_space()
            if pos >= len(buf):
                raise DataError("malformed JSON array: it ends without ']'", self.name, line)
            if buf[pos] == "]":
                pos += 1
                skip_space()
                if pos < len(buf):
                    raise DataError("unexpected data after the JSON array's closing ']'", self.name, line)
                return
            if buf[pos] != ",":
                raise DataError(f"malformed JSON array: expected ',' or ']', found {buf[pos]!r}", self.name, line)
            pos += 1

    def _random_access(self, stream: BinaryIO) -> Any:
        """A path or file that can be read at any offset: the file itself, or a spooled copy of a stream."""
        if not self.stream:
            return self.path
        # Parquet and Arrow files need random access: spool the stream to a temporary file (hashing as we go).
        spool = self._stack.enter_context(tempfile.TemporaryFile())
        shutil.copyfileobj(stream, spool, _CHUNK)
        spool.seek(0)
        return spool

    def _table_records(self, batches: Iterator[Any], hashing: _HashingReader) -> Iterator[SourceRecord]:
        index = 0
        for batch in batches:
            for row in batch.to_pylist():
                raw = json.dumps(row, ensure_ascii=False, separators=(",", ":"), default=str).encode()
                yield SourceRecord(index, index + 1, raw, row)
                index += 1
        if index == 0 and not self._allow_empty:
            kind = "Parquet" if self.container == "parquet" else "Arrow"
            raise DataError(f"empty input: the {kind} file has no rows", self.name)
        self.fingerprint = hashing.drain() if self.stream else file_fingerprint(self.path)

    def _parquet_records(self, stream: BinaryIO, hashing: _HashingReader) -> Iterator[SourceRecord]:
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(self._random_access(stream))
        except Exception as e:  # pyarrow raises ArrowInvalid and friends
            raise DataError(f"not a readable Parquet file: {e}", self.name) from None
        recorded = (parquet.metadata.metadata or {}).get(b"slapcli")  # slapcli.artifacts.META_KEY
        if recorded is not None:  # a stage's output given as data: its columns are no layout
            try:
                kind = str(json.loads(recorded).get("kind", "")) + " "
            except (ValueError, AttributeError):
                kind = ""
            raise DataError(f"a slapcli {kind}artifact, not data; give the data file it was made from (`slap "
                            f"inspect {self.name}` shows it)", self.name)
        yield from self._table_records(_arrow_batches(parquet.iter_batches(batch_size=4096), self.name), hashing)

    def _arrow_records(self, stream: BinaryIO, hashing: _HashingReader, file_format: bool) -> Iterator[SourceRecord]:
        """An Arrow IPC file or stream (what `datasets.save_to_disk` writes), batch by batch."""
        import pyarrow as pa

        source = self._random_access(stream)
        try:
            handle = pa.memory_map(source) if isinstance(source, str) else pa.PythonFile(source, mode="r")
            if file_format:
                reader = pa.ipc.open_file(handle)
                batches: Iterator[Any] = (reader.get_batch(i) for i in range(reader.num_record_batches))
            else:
                batches = iter(pa.ipc.open_stream(handle))
        except Exception as e:  # ArrowInvalid and friends
            raise DataError(f"not a readable Arrow file: {e}", self.name) from None
        yield from self._table_records(_arrow_batches(batches, self.name), hashing)


def _arrow_batches(batches: Iterator[Any], name: str) -> Iterator[Any]:
    """Record batches, with a damaged page or column (found only when read) as a DataError, not a traceback."""
    import pyarrow as pa

    try:
        yield from batches
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"cannot read the data (damaged file?): {e}", name) from None


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object's keys must be unique: JSON readers disagree on which of two values wins."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))  # type: ignore[func-returns-value]
    return obj


_STRICT_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys)
_LENIENT_DECODER = json.JSONDecoder(parse_int=str)  # only finds where a bad element ends


class _Invalid:
    """A record that was read but cannot be a row (its DataError is raised when the row is used)."""

    __slots__ = ("error",)

    def __init__(self, error: DataError) -> None:
        self.error = error


def _value_error(e: ValueError) -> str:
    text = str(e)
    if "Exceeds the limit" in text and "integer" in text:
        digits = re.search(r"value has (\d+) digits", text)
        size = f" ({digits.group(1)} digits)" if digits else ""
        return f"an integer too long to read{size}; the limit is {sys.get_int_max_str_digits()} digits"
    return f"malformed JSON: {text}"


def _surrogate_path(value: Any, path: str = "") -> str | None:
    """Where a string holding a lone surrogate sits in a parsed value (a dotted path; '(row)' for the top)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "(row)"
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if _surrogate_path(key) is not None:
                return where.encode("utf-8", "backslashreplace").decode()
            found = _surrogate_path(item, where)
            if found is not None:
                return found
    if isinstance(value, list):
        for i, item in enumerate(value):
            found = _surrogate_path(item, f"{path}[{i}]")
            if found is not None:
                return found
    return None


def _checked(value: Any, escaped: bool, name: str, line: int) -> Any:
    """The parsed value, or an _Invalid when a string in it is not Unicode (a lone surrogate escape)."""
    if escaped:
        where = _surrogate_path(value)
        if where is not None:
            return _Invalid(DataError("a lone surrogate escape (like \\ud800): not Unicode text", name, line, where))
    return value


def _decode_element(buf: str, pos: int, name: str, line: int) -> tuple[Any, int]:
    """One JSON array element from `buf` at `pos`: (value or _Invalid, end). JSONDecodeError when malformed."""
    try:
        value, end = _STRICT_DECODER.raw_decode(buf, pos)
    except _DuplicateKey as e:
        _, end = _LENIENT_DECODER.raw_decode(buf, pos)
        return _Invalid(_duplicate_key_error(e, name, line)), end
    except json.JSONDecodeError:
        raise
    except ValueError as e:  # an integer too long to convert
        _, end = _LENIENT_DECODER.raw_decode(buf, pos)
        return _Invalid(DataError(_value_error(e), name, line)), end
    return _checked(value, _SURROGATE_ESCAPE_TEXT.search(buf, pos, end) is not None, name, line), end


def _duplicate_key_error(e: _DuplicateKey, name: str, line: int) -> DataError:
    return DataError("the key appears twice in one JSON object (readers disagree on which value counts); "
                     "keep one", name, line, e.key)


class _LazyJSON:
    """Defers parsing so that a bad line is reported (or skipped) where it is consumed, not where it is read."""

    __slots__ = ("line", "name", "raw")

    def __init__(self, raw: bytes, name: str, line: int) -> None:
        self.raw, self.name, self.line = raw, name, line

    def parse(self) -> Any:
        try:
            text = self.raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"not valid UTF-8 (byte {e.start + 1} of the line)", self.name, self.line) from None
        try:
            value = _STRICT_DECODER.decode(text)
        except RecursionError:
            raise DataError("JSON nested too deeply", self.name, self.line) from None
        except _DuplicateKey as e:
            raise _duplicate_key_error(e, self.name, self.line) from None
        except json.JSONDecodeError as e:
            raise DataError(f"malformed JSON: {e.msg} (column {e.colno})", self.name, self.line) from None
        except ValueError as e:  # an integer too long to convert
            raise DataError(_value_error(e), self.name, self.line) from None
        value = _checked(value, _SURROGATE_ESCAPE.search(self.raw) is not None, self.name, self.line)
        if isinstance(value, _Invalid):
            raise value.error
        return value


def _first_non_space(stream: BinaryIO) -> tuple[bytes | None, int]:
    """The first byte that is not whitespace (None for a blank input), and how many newlines were consumed.

    Leading whitespace that fills whole buffers is consumed here, so the row loop must start counting lines
    after the newlines in it.
    """
    peek = getattr(stream, "peek", None)
    consumed_newlines = 0
    while True:
        head = peek(_CHUNK) if peek else b""
        if not head:
            return None, consumed_newlines
        stripped = head.lstrip(b" \t\r\n\xef\xbb\xbf")  # whitespace and a UTF-8 byte-order mark
        if stripped:
            return stripped[:1], consumed_newlines
        consumed_newlines += head.count(b"\n")
        stream.read(len(head))  # all whitespace: consume it and look further


class _ZstdReader(io.RawIOBase):
    """Decompresses a zstd stream of one or more frames, and fails on a stream that ends inside a frame.

    zstandard's stream_reader ends quietly at a truncated frame, which would read as a shorter (or empty)
    file; one decompression object per frame tells whether the frame was complete (`eof`).
    """

    # Compressed bytes per call: zstd can expand ~32,000x, so this bounds the memory one call can take.
    _PIECE = 4096

    def __init__(self, raw: BinaryIO) -> None:
        import zstandard

        self._raw = raw
        self._dctx = zstandard.ZstdDecompressor()
        self._frame: Any = None  # the decompression object of the frame being read
        self._input = memoryview(b"")  # compressed bytes read but not yet decompressed
        self._output = memoryview(b"")  # decompressed bytes not yet returned

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._output:
            if not self._decompress_piece():
                return 0
        n = min(len(buffer), len(self._output))
        buffer[:n] = self._output[:n]
        self._output = self._output[n:]
        return n

    def _decompress_piece(self) -> bool:
        """Decompress the next piece of input; False at the end of a stream whose last frame is complete."""
        import zstandard

        if not self._input:
            self._input = memoryview(self._raw.read(_CHUNK))
            if not self._input:
                if self._frame is not None and not self._frame.eof:
                    raise zstandard.ZstdError("truncated stream: the input ends inside a zstd frame")
                return False
        if self._frame is None or self._frame.eof:
            self._frame = self._dctx.decompressobj()
        piece = self._input[: self._PIECE]
        self._output = memoryview(self._frame.decompress(piece))
        # At a frame's end the rest of the piece belongs to the next frame.
        used = len(piece) - (len(self._frame.unused_data) if self._frame.eof else 0)
        self._input = self._input[used:]
        return True


def record_value(record: SourceRecord) -> Any:
    """The record's parsed row; a DataError (file and line) when it is not a usable JSON value."""
    if isinstance(record.value, _LazyJSON):
        return record.value.parse()
    if isinstance(record.value, _Invalid):
        raise record.value.error
    return record.value


def _check_unique_id(row: dict[str, Any], seen: dict[str, int], name: str, line: int) -> None:
    """Two rows with one id mean a merge or a join went wrong upstream: say so before pruning keeps either.

    Ids compare as JSON values (1 and "1" differ); a missing or null id is no id.
    """
    if row.get(ID_FIELD) is None:
        return
    key = json.dumps(row[ID_FIELD], sort_keys=True, ensure_ascii=False, default=str)
    first = seen.get(key)
    if first is not None:
        shown = key if len(key) <= 60 else key[:57] + "..."
        raise DataError(f"duplicate id {shown}: the row at line {first} has the same id", name, line, ID_FIELD)
    seen[key] = line


def _parse_row(value: dict[str, Any], layout: str, layout_line: int, name: str, line: int) -> Example:
    try:
        return parse_example(value, layout)
    except FieldError as e:
        other = detect_layout(value)
        if other is not None and other != layout:
            raise DataError(
                f"row is in the {other!r} layout but the file is {layout!r} "
                f"(from line {layout_line or 'the --format option'}); mixed layouts are not supported",
                name, line) from None
        raise DataError(e.message, name, line, e.field) from None


@dataclass(frozen=True)
class ParsedRow:
    record: SourceRecord
    example: Example


def field_map(fields: str | None, layout: str = "auto") -> FieldMap | None:
    """The `--fields` option as a FieldMap (None when not given); a UsageError says what is wrong with it.

    `ROLE=FIELD,...`, or `dataset_info.json:NAME`: the entry NAME of a LLaMA-Factory dataset_info.json.
    """
    if fields is None:
        return None
    if layout != "auto":
        raise UsageError("--fields and --format cannot be used together: the mapping sets the layout")
    try:
        if "=" not in fields and ":" in fields:
            path, _, name = fields.rpartition(":")
            return field_map_from_dataset_info(_read_dataset_info(path), name)
        return parse_field_map(fields)
    except ValueError as e:
        raise UsageError(f"--fields {fields!r}: {e}") from None


def _read_dataset_info(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except OSError as e:
        raise ValueError(f"cannot read {path} ({e.strerror})") from None
    except ValueError as e:  # malformed JSON, bad UTF-8
        raise ValueError(f"{path} is not a JSON file ({e})") from None
    if not isinstance(info, dict):
        raise ValueError(f"{path} is not a JSON object of dataset entries")
    return info


def iter_examples(reader: SourceReader, layout: str = "auto", on_bad_line: str = "error",
                  stats: ReadStats | None = None, fields: str | None = None) -> Iterator[ParsedRow]:
    """Parse every record into an Example, enforcing one layout per file.

    The layout is detected from the first good row unless given, or set by a `fields` mapping
    (`prompt=question,response=answer`). A row that does not fit raises a DataError naming file, line and
    field, or is counted and skipped under `on_bad_line="skip"`.
    """
    if layout != "auto" and layout not in LAYOUTS:
        raise UsageError(f"unknown layout {layout!r}; expected auto or one of {', '.join(LAYOUTS)}")
    if on_bad_line not in BAD_LINE_POLICIES:
        raise UsageError(f"--on-bad-line must be one of {', '.join(BAD_LINE_POLICIES)}")
    mapping = field_map(fields, layout)
    stats = stats if stats is not None else ReadStats()
    file_layout = None if layout == "auto" else layout
    layout_line = 0
    # id -> line of its first row. It grows with the input (only for data that has ids), as any duplicate
    # check must; the ids are short next to the rows they stand for.
    seen_ids: dict[str, int] = {}
    for record in reader.records():
        stats.records += 1
        name = record.file or reader.name
        try:
            value = record_value(record)
            if not isinstance(value, dict):
                raise DataError(f"expected a JSON object, got {json_type(value)}", name, record.line)
            if mapping is not None:
                try:
                    example = parse_mapped(value, mapping)
                except FieldError as e:
                    raise DataError(e.message, name, record.line, e.field) from None
            elif file_layout is None:
                file_layout = detect_layout(value)
                if file_layout is None:
                    found = ", ".join(sorted(value))
                    raise UsageError(
                        f"{name}:{record.line}: unknown layout (fields: {found}); expected Alpaca "
                        "(instruction/input/output), ShareGPT (conversations), OpenAI chat (messages), "
                        "preference (prompt/chosen/rejected), prompt/completion, prompt/response or text; pass "
                        "--format to choose, or map your fields with --fields prompt=FIELD,response=FIELD"
                    )
                layout_line = record.line
            if mapping is None:
                example = _parse_row(value, file_layout, layout_line, name, record.line)
            _check_unique_id(value, seen_ids, name, record.line)
        except DataError as e:
            if on_bad_line == "skip":
                stats.skip(e)
                continue
            raise
        if example.non_text_parts:
            stats.non_text_parts += example.non_text_parts
            stats.rows_with_non_text_parts += 1
        yield ParsedRow(record, example)
    if stats.records - stats.bad_skipped == 0:
        raise DataError("no usable rows" + (f" ({stats.bad_skipped} bad rows skipped)" if stats.bad_skipped else ""),
                        reader.name)
