"""Streaming readers for instruction data: JSON Lines, JSON arrays and Parquet; plain, gzip or zstd; file or stdin.

Every reader yields `SourceRecord`s one at a time, so memory stays flat whatever the file size, and
fingerprints the bytes it reads (size + BLAKE2b of the file as stored, compressed or not) so that later
stages can refuse artifacts made from other data.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from slapcli.errors import DataError, UsageError
from slapcli.io.layouts import LAYOUTS, Example, FieldError, detect_layout, parse_example

CONTAINERS = ("jsonl", "json", "parquet")
BAD_LINE_POLICIES = ("error", "skip")
ID_FIELD = "id"  # a row's identifier, when the data has one; two rows with one id are a data error
STDIN = "-"
_CHUNK = 1 << 20
_GZIP_MAGIC = b"\x1f\x8b"
_BOM = b"\xef\xbb\xbf"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_PARQUET_MAGIC = b"PAR1"


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


@dataclass
class ReadStats:
    records: int = 0
    bad_skipped: int = 0
    bad_examples: list[str] = field(default_factory=list)

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


def file_fingerprint(path: str) -> Fingerprint:
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
    return None


class SourceReader:
    """One pass over an input. Use as a context manager; `fingerprint` is known after iteration ends."""

    def __init__(self, path: str, container: str | None = None) -> None:
        if container is not None and container not in CONTAINERS:
            raise UsageError(f"unknown input format {container!r}; expected one of {', '.join(CONTAINERS)}")
        if path != STDIN and not os.path.exists(path):
            raise UsageError(f"{path}: no such file")
        if path != STDIN and os.path.isdir(path):
            raise UsageError(f"{path}: is a directory, expected a data file")
        self.path = path
        self.name = display_name(path)
        self.requested_container = container
        self.fingerprint: Fingerprint | None = None
        self.container: str | None = None
        self.compression: str | None = None
        self._stack = contextlib.ExitStack()
        self._hashing: _HashingReader | None = None
        self.total_bytes: int | None = None if path == STDIN else os.path.getsize(path)

    @property
    def bytes_read(self) -> int:
        """Stored (compressed) bytes consumed so far: progress against `total_bytes`."""
        return self._hashing.size if self._hashing is not None else 0

    def __enter__(self) -> SourceReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def records(self) -> Iterator[SourceRecord]:
        raw = sys.stdin.buffer if self.path == STDIN else self._stack.enter_context(open(self.path, "rb"))
        hashing = self._hashing = _HashingReader(raw)
        stream = io.BufferedReader(hashing, buffer_size=_CHUNK)
        magic = stream.peek(4)[:4]
        if not magic:
            raise DataError("empty input: the file has no rows", self.name)
        if magic.startswith(_PARQUET_MAGIC):
            self.container = self._check_container("parquet")
            yield from self._parquet_records(stream, hashing)
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

    def _check_container(self, sniffed: str) -> str:
        expected = self.requested_container or (None if self.path == STDIN else container_from_name(self.path))
        if expected is None or expected == sniffed:
            return sniffed
        hints = {
            "jsonl": "JSON Lines (one object per line)",
            "json": "a JSON array",
            "parquet": "Parquet",
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
        decoder = json.JSONDecoder()
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
                    value, end = decoder.raw_decode(buf, pos)
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

    def _parquet_records(self, stream: BinaryIO, hashing: _HashingReader) -> Iterator[SourceRecord]:
        import pyarrow.parquet as pq

        if self.path == STDIN:
            # Parquet needs random access: spool stdin to a temporary file first (hashing as we go).
            spool = self._stack.enter_context(tempfile.TemporaryFile())
            shutil.copyfileobj(stream, spool, _CHUNK)
            spool.seek(0)
            source: Any = spool
        else:
            source = self.path
        try:
            parquet = pq.ParquetFile(source)
        except Exception as e:  # pyarrow raises ArrowInvalid and friends
            raise DataError(f"not a readable Parquet file: {e}", self.name) from None
        if parquet.metadata.num_rows == 0:
            raise DataError("empty input: the Parquet file has no rows", self.name)
        index = 0
        for batch in parquet.iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                raw = json.dumps(row, ensure_ascii=False, separators=(",", ":"), default=str).encode()
                yield SourceRecord(index, index + 1, raw, row)
                index += 1
        if self.path == STDIN:
            self.fingerprint = hashing.drain()
        else:
            self.fingerprint = file_fingerprint(self.path)


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
            return json.loads(text)
        except RecursionError:
            raise DataError("JSON nested too deeply", self.name, self.line) from None
        except json.JSONDecodeError as e:
            raise DataError(f"malformed JSON: {e.msg} (column {e.colno})", self.name, self.line) from None


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
    return record.value.parse() if isinstance(record.value, _LazyJSON) else record.value


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


@dataclass(frozen=True)
class ParsedRow:
    record: SourceRecord
    example: Example


def iter_examples(reader: SourceReader, layout: str = "auto", on_bad_line: str = "error",
                  stats: ReadStats | None = None) -> Iterator[ParsedRow]:
    """Parse every record into an Example, enforcing one layout per file.

    The layout is detected from the first good row unless given. A row that does not fit raises a
    DataError naming file, line and field, or is counted and skipped under `on_bad_line="skip"`.
    """
    if layout != "auto" and layout not in LAYOUTS:
        raise UsageError(f"unknown layout {layout!r}; expected auto or one of {', '.join(LAYOUTS)}")
    if on_bad_line not in BAD_LINE_POLICIES:
        raise UsageError(f"--on-bad-line must be one of {', '.join(BAD_LINE_POLICIES)}")
    stats = stats if stats is not None else ReadStats()
    file_layout = None if layout == "auto" else layout
    layout_line = 0
    # id -> line of its first row. It grows with the input (only for data that has ids), as any duplicate
    # check must; the ids are short next to the rows they stand for.
    seen_ids: dict[str, int] = {}
    for record in reader.records():
        stats.records += 1
        try:
            value = record_value(record)
            if not isinstance(value, dict):
                raise DataError(f"expected a JSON object, got {type(value).__name__}", reader.name, record.line)
            if file_layout is None:
                file_layout = detect_layout(value)
                if file_layout is None:
                    fields = ", ".join(sorted(value)) if isinstance(value, dict) else type(value).__name__
                    raise UsageError(
                        f"{reader.name}:{record.line}: unknown layout (fields: {fields}); expected Alpaca "
                        "(instruction/input/output), ShareGPT (conversations), OpenAI chat (messages), "
                        "prompt/completion, prompt/response or text; pass --format to choose"
                    )
                layout_line = record.line
            try:
                example = parse_example(value, file_layout)
            except FieldError as e:
                other = detect_layout(value)
                if other is not None and other != file_layout:
                    raise DataError(
                        f"row is in the {other!r} layout but the file is {file_layout!r} "
                        f"(from line {layout_line or 'the --format option'}); mixed layouts are not supported",
                        reader.name, record.line) from None
                raise DataError(e.message, reader.name, record.line, e.field) from None
            _check_unique_id(value, seen_ids, reader.name, record.line)
        except DataError as e:
            if on_bad_line == "skip":
                stats.skip(e)
                continue
            raise
        yield ParsedRow(record, example)
    if stats.records - stats.bad_skipped == 0:
        raise DataError("no usable rows" + (f" ({stats.bad_skipped} bad rows skipped)" if stats.bad_skipped else ""),
                        reader.name)
