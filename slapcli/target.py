"""The `--target` dev file: rows like the downstream task, read once and embedded like the pool.

`select` uses it two ways: `slap` aims its replay at the rows' proxy gradients and moves stratum budgets toward
the clusters they fall in; the `nearest` baseline takes the pool rows nearest to them in embedding space.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from slapcli.errors import UsageError
from slapcli.io.layouts import Example
from slapcli.io.readers import SourceReader, iter_examples

TARGET_ROWS = 64  # rows of the dev file that are used; LESS-style dev sets are a few dozen rows


def read_target_examples(path: str, limit: int = TARGET_ROWS) -> list[Example]:
    """The first `limit` rows of the dev file (any container and layout slap reads); bad rows stop with file/line."""
    examples = []
    with SourceReader(path) as reader:
        for row in iter_examples(reader):
            examples.append(row.example)
            if len(examples) == limit:
                break
    if not examples:
        raise UsageError(f"{path}: the --target file holds no rows")
    return examples


def embed_target(examples: list[Example], embed_config: dict[str, Any], device: str) -> np.ndarray:
    """Unit-norm embeddings of the dev rows with the encoder and settings the pool was embedded with."""
    from slapcli.embed import encode_texts
    from slapcli.models import DEFAULT_EMBED_MODEL, load_encoder, pick_device, resolve_model

    torch_device = pick_device(device)
    tokenizer, encoder = load_encoder(resolve_model(embed_config.get("embed_model", DEFAULT_EMBED_MODEL)),
                                      torch_device)
    return encode_texts(tokenizer, encoder, [e.full_text for e in examples], int(embed_config.get("batch_size", 64)),
                        int(embed_config.get("encoder_max_tokens", 256)), torch_device)


def target_cluster_share(target_emb: np.ndarray, embeddings: np.ndarray, cluster: np.ndarray,
                         eligible: np.ndarray) -> np.ndarray:
    """Share of the dev rows per cluster: each dev row counts for the cluster of its nearest eligible pool row."""
    positions = np.flatnonzero(eligible)
    share = np.zeros(int(cluster.max()) + 1 if len(cluster) else 0)
    if len(positions) == 0 or len(target_emb) == 0:
        return share
    nearest = positions[np.argmax(target_emb @ embeddings[positions].T, axis=1)]
    np.add.at(share, cluster[nearest], 1.0)
    return share / share.sum()
