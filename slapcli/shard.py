"""`--shard i/N`: which slice of a stage's chunks this process runs, and what its part file is called.

Light on purpose (no numpy, no pyarrow): the CLI parses `--shard` with it while the options are read. Reading,
checking and merging parts is `slapcli.parts`.

A stage cuts its rows into the chunks it always uses (embed: `--chunk-rows` rows; the proxy loss pass:
LOSS_CHUNK_ROWS rows) and shard i of N takes the chunks c with c % N == i. Whole chunks, because a chunk is what
the models see at once (rows sorted by length and padded together): the same chunks give the same bits, so the
parts together hold exactly what one unsharded run computes. Round-robin rather than N contiguous ranges: a shard
streams without knowing the row count first, and long and short rows (datasets are often sorted) spread evenly.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass

from slapcli.errors import UsageError

EMBED_PART = "part"  # slap embed --shard: OUTPUT.part-0001-of-0004, an embeddings artifact of its chunks
LOSS_PART = "loss-part"  # slap stratify --shard: OUTPUT.loss-part-0001-of-0004, the proxy loss terms of its chunks
_PART_NAME = re.compile(r"^(?P<base>.+)\.(?P<kind>part|loss-part)-(?P<index>\d+)-of-(?P<count>\d+)$")
MAX_SHARDS = 100_000


@dataclass(frozen=True)
class Shard:
    index: int  # 0-based, as Slurm's $SLURM_ARRAY_TASK_ID and Kubernetes' $JOB_COMPLETION_INDEX count
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """`i/N` with 0 <= i < N; anything else is one line naming the option."""
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if match is None:
            raise UsageError(f"--shard {text!r}: expected i/N, e.g. 0/4 (shard i of N, counted from 0)")
        index, count = int(match.group(1)), int(match.group(2))
        if not 1 <= count <= MAX_SHARDS:
            raise UsageError(f"--shard {text}: N must be in [1, {MAX_SHARDS}]")
        if index >= count:
            raise UsageError(f"--shard {text}: i must be in [0, {count - 1}] (shards are counted from 0)")
        return cls(index, count)

    def owns(self, chunk: int) -> bool:
        return chunk % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def to_dict(self) -> dict[str, int]:
        return {"index": self.index, "count": self.count}


def part_path(output: str, shard: Shard, kind: str = EMBED_PART) -> str:
    """Where shard `shard` of the run writing `output` puts its part: beside it, numbered so names sort."""
    width = max(4, len(str(shard.count)))
    return f"{output}.{kind}-{shard.index:0{width}d}-of-{shard.count:0{width}d}"


def parse_part_name(path: str) -> tuple[str, str, Shard] | None:
    """(the output the part belongs to, its kind, its shard) from a part's file name; None for any other name."""
    match = _PART_NAME.match(path)
    if match is None:
        return None
    index, count = int(match.group("index")), int(match.group("count"))
    if index >= count or count < 1:
        return None
    return match.group("base"), match.group("kind"), Shard(index, count)


def is_part_argument(path: str) -> bool:
    """Whether a stage's artifact argument names parts (a part, a folder or a pattern) rather than one artifact."""
    if glob.has_magic(path) and not os.path.exists(path):
        return True
    return os.path.isdir(path) or parse_part_name(path) is not None


def expand_part_arguments(arguments: list[str], kind: str = EMBED_PART) -> list[str]:
    """The part files that files, folders (their parts of `kind`) and quoted glob patterns name, in name order."""
    found: list[str] = []
    for argument in arguments:
        if os.path.isdir(argument):
            names = sorted(n for n in os.listdir(argument) if (p := parse_part_name(n)) and p[1] == kind)
            if not names:
                raise UsageError(f"{argument}: a folder with no {kind} files (NAME.{kind}-I-of-N)")
            found += [os.path.join(argument, n) for n in names]
        elif glob.has_magic(argument) and not os.path.exists(argument):
            files = sorted(f for f in glob.glob(argument) if os.path.isfile(f))
            if not files:
                raise UsageError(f"{argument}: no file matches this pattern")
            found += files
        elif not os.path.isfile(argument):
            raise UsageError(f"{argument}: no such file")
        else:
            found.append(argument)
    return found
