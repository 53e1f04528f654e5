"""Output safety: nothing final-looking exists until a stage is complete, and one writer per output.

Every output is written under a temporary name in the destination folder and renamed over the final name
only at the end (os.replace is atomic on one file system), so a crash or SIGKILL leaves either the old
file or no file, never a truncated one. Only regular files are ever replaced: a character device or a FIFO
given as the output (`-o /dev/null`, `-o >(gzip)`) is written to directly. A lock file beside the output
(`fcntl.flock`) keeps a second command from writing the same output at the same time.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import glob
import gzip
import hashlib
import os
import stat
import sys
import tempfile
from collections.abc import Iterator, Sequence
from typing import BinaryIO

from slapcli.errors import UsageError

STDOUT = "-"
MAX_NAME_BYTES = 255  # one file name on ext4, xfs, btrfs, tmpfs, APFS
# Room a hidden companion needs around the output's name: "." + ".parts"/".lock" + mkstemp's "." + 8 chars + ".tmp".
_COMPANION_ROOM = 24
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
_NO_LOCKS = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP})

# Lock files this process holds exclusively (output_lock): a command reading what it also writes (`run`'s work
# folder) must not lock it a second time, which flock would refuse as if another command held it.
_held: set[str] = set()

# Outputs renamed into place by this process: absolute path -> (device, inode) of the file renamed there, so that
# a signal arriving just after the rename can tell that the output is complete (see `was_written`).
_written: dict[str, tuple[int, int]] = {}


def compression_from_name(path: str) -> str | None:
    """The compression an output name asks for (`.gz`, `.zst`), or None."""
    return next((kind for suffix, kind in COMPRESSIONS.items() if path.lower().endswith(suffix)), None)


def is_stream_target(output: str) -> bool:
    """A character device or FIFO (`/dev/null`, `>(gzip)`): written to directly, never replaced."""
    try:
        mode = os.stat(output).st_mode
    except OSError:
        return False
    return stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)


def same_file(a: str, b: str) -> bool:
    """Whether two paths name one file: by inode when both exist (symlinks, hard links), else by real path."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def check_name(path: str) -> None:
    """A path slap records or writes must be UTF-8: a name in another encoding (bytes Python keeps as surrogates,
    e.g. Latin-1 `caf\xe9.jsonl`) cannot go into an artifact's JSON record nor through pyarrow. Nor may it hold a
    control character: `out.jsonl\r` (a script with Windows line endings) is a mistake, and every message naming
    it would break in two."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        shown = path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        raise UsageError(f"{shown}: the name is not valid UTF-8 (artifacts record names as UTF-8, Parquet writes "
                         "them so); rename it") from None
    control = next((c for c in path if ord(c) < 32 or ord(c) == 127), None)
    if control is not None:
        hint = " (a script with Windows line endings?)" if control == "\r" else ""
        raise UsageError(f"{path!r}: the name holds a control character {control!r}{hint}; check the command")


def check_output_path(output: str, inputs: Sequence[str | None], force: bool, artifact: bool = False) -> None:
    """Refuse, before any work, an output that cannot or must not be written.

    Never an input (any file the command reads, or that its artifacts record as their source or upstream),
    with or without --force; never a directory or another non-regular file (a character device or FIFO is
    written to directly, except for artifacts, which are files); an existing file only with --force; and the
    folder must be one that can hold it.
    """
    check_name(output)
    folder_output = bool(output) and output.endswith(("/", os.sep)) and not artifact  # export -o DIR/
    if not output or (output.endswith(os.sep) and not folder_output):
        raise UsageError(f"-o {output!r}: give a file name")
    if output == STDOUT:
        if artifact:
            raise UsageError("-o -: an artifact is a Parquet file, not a stream; give a file name such as "
                             "work/out.parquet")
        if sys.stdout is None:  # started with stdout closed (`>&-`): found before the work, not at its end
            raise UsageError("-o -: stdout is closed; give a file name")
        return
    for source in inputs:
        if source and source != STDOUT and same_file(source, output):
            where = "" if os.path.normpath(source) == os.path.normpath(output) else f" ({source})"
            raise UsageError(f"{output}: the output path is the input path{where}; choose another output")
    if folder_output:  # one file per shard of a folder input (slapcli.io.shards), into a new folder
        if not any(source and (os.path.isdir(source) or glob.has_magic(source)) for source in inputs):
            raise UsageError(f"-o {output!r}: a folder output writes one file per shard of a folder input; the "
                             "input is one file, so give a file name")
        if os.path.lexists(output.rstrip("/" + os.sep)):
            raise UsageError(f"{output}: exists; -o DIR/ writes a new folder (remove it, or give another name)")
        _check_folder(output.rstrip("/" + os.sep))
        return
    name = os.path.basename(os.path.abspath(output))
    if len(os.fsencode(name)) > MAX_NAME_BYTES:
        raise UsageError(f"{output}: file name too long ({len(os.fsencode(name))} bytes, at most {MAX_NAME_BYTES})")
    try:
        mode: int | None = os.stat(output).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as e:  # e.g. a path through a file (ENOTDIR), a loop of symlinks
        raise UsageError(f"{output}: cannot be written ({e.strerror})") from None
    if mode is not None and stat.S_ISDIR(mode):
        raise UsageError(f"{output}: is a directory; give a file name")
    if mode is not None and (stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)):
        if artifact:
            raise UsageError(f"{output}: not a regular file; an artifact is a Parquet file, give a file name")
        return  # written to directly: nothing is replaced
    if mode is not None and not stat.S_ISREG(mode):
        raise UsageError(f"{output}: not a regular file (a block device or socket); give a file name")
    _check_folder(output)
    if (mode is not None or os.path.islink(output)) and not force:  # a dangling symlink is there too
        raise UsageError(f"{output}: exists; pass --force to overwrite it")


def _check_folder(output: str) -> None:
    """The nearest existing folder above `output` must be a writable directory (the rest is created)."""
    folder = os.path.dirname(os.path.abspath(output))
    while not os.path.lexists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise UsageError(f"{output}: cannot be written: {folder} is not a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{output}: cannot be written: no permission to write in {folder}")


def companion_path(output: str, suffix: str) -> str:
    """A hidden file or folder beside `output` (same file system): `.NAME{suffix}`.

    For a name too long to take the decoration within the file system's limit, `.slap-HASH{suffix}` instead.
    """
    folder, name = os.path.split(os.path.abspath(output))
    if len(os.fsencode(name)) + _COMPANION_ROOM > MAX_NAME_BYTES:
        name = "slap-" + hashlib.blake2b(os.fsencode(name), digest_size=12).hexdigest()
    return os.path.join(folder, f".{name}{suffix}")


@functools.lru_cache(maxsize=1)
def output_mode() -> int:
    """The permissions a new file gets under the process umask (mkstemp's are always 0600)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def temp_path_beside(output: str) -> str:
    """A fresh temporary file in the output's folder (same file system, so the final rename is atomic)."""
    folder = os.path.dirname(os.path.abspath(output))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(companion_path(output, ".")), suffix=".tmp", dir=folder)
    try:
        os.fchmod(fd, output_mode())
    finally:
        os.close(fd)
    return tmp


def discard(tmp: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)


def replace_into(tmp: str, output: str) -> None:
    """Rename the finished `tmp` over `output`, remembering which file that was (see `was_written`)."""
    with contextlib.suppress(OSError):  # a file replaced with --force keeps its permissions
        old = os.stat(output)
        if stat.S_ISREG(old.st_mode):
            os.chmod(tmp, stat.S_IMODE(old.st_mode))
    info = os.stat(tmp)
    _written[os.path.abspath(output)] = (info.st_dev, info.st_ino)
    os.replace(tmp, output)


def forget_written() -> None:
    """Start a command's record afresh (an earlier command in this process may have written the same path)."""
    _written.clear()


def was_written(output: str) -> bool:
    """Whether `output` is now the complete file this process renamed there.

    A signal can land between the rename and the lines after it; the file's identity, not a flag set after the
    rename, tells whether the rename happened.
    """
    expected = _written.get(os.path.abspath(output))
    try:
        info = os.stat(output)
    except OSError:
        return False
    return expected == (info.st_dev, info.st_ino)


@contextlib.contextmanager
def atomic_path(output: str) -> Iterator[str]:
    """Yield a temporary path beside `output`; rename it to `output` only if the block succeeds.

    A character device or FIFO is yielded as it is: it is written to, never replaced.
    """
    if is_stream_target(output):
        yield output
        return
    tmp = temp_path_beside(output)
    try:
        yield tmp
        replace_into(tmp, output)
    except BaseException:
        discard(tmp)
        raise


@contextlib.contextmanager
def open_output(output: str) -> Iterator[BinaryIO]:
    """A binary stream to `output` (atomically replaced at the end) or to stdout for '-'."""
    if output == STDOUT:
        if sys.stdout is None:  # started with stdout closed (`>&-`): Python has no stream to give
            raise UsageError("-o -: stdout is closed; give a file name")
        stream = sys.stdout.buffer
        try:
            yield stream
        finally:
            with contextlib.suppress(BrokenPipeError):
                stream.flush()
        return
    with atomic_path(output) as tmp, open(tmp, "wb") as f:
        yield f


@contextlib.contextmanager
def compressed(stream: BinaryIO, compression: str | None) -> Iterator[BinaryIO]:
    """`stream`, or a gzip/zstd writer over it (closed, so complete, at the end of the block).

    gzip without a timestamp or file name: the same rows give the same bytes.
    """
    if compression is None:
        yield stream
    elif compression == "gzip":
        with gzip.GzipFile(fileobj=stream, mode="wb", mtime=0, filename="") as z:
            yield z  # type: ignore[misc]
    else:
        import zstandard

        with zstandard.ZstdCompressor().stream_writer(stream, closefd=False) as z:
            yield z  # type: ignore[misc]


@contextlib.contextmanager
def output_lock(output: str) -> Iterator[None]:
    """Hold an exclusive lock on `output` for the block; a second holder is refused with one line.

    The lock is a hidden file beside the output, removed on the way out. A command that opened it just before
    the holder removed it would lock a file nobody else sees: so after locking, the file must still be the
    one at the path, else try again.
    """
    if output == STDOUT or is_stream_target(output):
        yield
        return
    check_name(output)  # `run`'s artifacts come here unchecked: a work folder's name
    path = companion_path(output, ".lock")
    folder = os.path.dirname(path)
    created = _missing_folders(folder)
    try:
        os.makedirs(folder, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, output_mode())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in _NO_LOCKS:  # a file system without locks (some NFS mounts): write unguarded
                    break
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    doing = "reading" if _only_readers(fd) else "writing"
                    os.close(fd)
                    raise UsageError(f"{output}: another slap command is {doing} it (lock {path}); wait for it "
                                     "to finish or choose another output") from None
                os.close(fd)
                raise
            with contextlib.suppress(FileNotFoundError):
                held, there = os.fstat(fd), os.stat(path)
                if (held.st_dev, held.st_ino) == (there.st_dev, there.st_ino):
                    break
            os.close(fd)
    except OSError as e:
        _remove_empty(created)
        raise UsageError(f"{output}: cannot write beside it ({e.strerror})") from None
    _held.add(path)
    try:
        yield
    finally:
        _held.discard(path)
        discard(path)  # while still holding the lock
        os.close(fd)
        if not os.path.lexists(output):
            _remove_empty(created)  # a failed command leaves no folder it made


@contextlib.contextmanager
def read_lock(artifact: str) -> Iterator[None]:
    """Hold a shared lock on an artifact the command reads, so that no command replaces it meanwhile: a stage
    reads its input more than once (its rows, then its fingerprint for the record), and a replacement in between
    would mix two runs. Readers share the lock; a writer holding it (output_lock) is one line, and a writer
    arriving later stops the same way. Where no lock file can be made (a read-only folder) or locks are not
    supported, the read goes unguarded. The last reader out removes the lock file.
    """
    path = companion_path(artifact, ".lock")
    fd = -1
    if path not in _held:
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, output_mode())
            except OSError:
                break  # a read-only folder or file system: nobody can replace the artifact from here either
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                fd = -1
                if e.errno in _NO_LOCKS:
                    break
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise UsageError(f"{artifact}: another slap command is writing it (lock {path}); wait for it "
                                     "to finish, then run this again") from None
                raise
            with contextlib.suppress(FileNotFoundError):
                held, there = os.fstat(fd), os.stat(path)
                if (held.st_dev, held.st_ino) == (there.st_dev, there.st_ino):
                    break
            os.close(fd)  # removed by the last holder meanwhile: lock the file now at the path
            fd = -1
    try:
        yield
    finally:
        if fd >= 0:
            try:
                # Nobody else holds it (no reader, no writer waiting to start): the file can go.
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                discard(path)
            except OSError:
                pass  # another reader holds it; the last one out removes it
            os.close(fd)


def _only_readers(fd: int) -> bool:
    """Whether the lock on `fd`'s file that refused us is held by readers only (read_lock): a shared lock is
    then granted (and dropped again with `fd`)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _missing_folders(folder: str) -> list[str]:
    """The folders `os.makedirs(folder)` would create, deepest first."""
    missing = []
    while folder and not os.path.lexists(folder):
        missing.append(folder)
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    return missing


def _remove_empty(folders: list[str]) -> None:
    for folder in folders:
        try:
            os.rmdir(folder)
        except OSError:
            return
