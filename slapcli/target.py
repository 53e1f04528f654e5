"""The `--target` dev file: rows like the downstream task, read once and embedded like the pool.

`select` uses it two ways: `slap` chooses among the pool rows nearest to them, with stratum budgets where the
nearest rows fall, and aims its replay at their proxy gradients (select.target_scope); the `nearest` baseline
takes the pool rows nearest to them in embedding space.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from slapcli.errors import UsageError
from slapcli.io.layouts import Example
from slapcli.io.readers import SourceReader, iter_examples


def read_target_examples(path: str, limit: int) -> list[Example]:
    """The first `limit` rows (SelectConfig.target_rows) of the dev file, in any container and layout slap reads;
    bad rows stop with file/line."""
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
    from slapcli.models import DEFAULT_EMBED_MODEL, load_encoder, pick_device, resolve_model
    from slapcli.stages.embed import encode_texts

    torch_device = pick_device(device)
    tokenizer, encoder = load_encoder(resolve_model(embed_config.get("embed_model", DEFAULT_EMBED_MODEL)),
                                      torch_device)
    return encode_texts(tokenizer, encoder, [e.full_text for e in examples], int(embed_config.get("batch_size", 64)),
                        int(embed_config.get("encoder_max_tokens", 256)), torch_device)
