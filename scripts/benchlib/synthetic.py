"""Synthetic rows and a tiny random encoder: what the scale benchmarks push through the pipeline when the point is
the pipeline (memory, per-row overhead, engines), not the model's speed."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ["data", "model", "train", "loss", "row", "batch", "token", "code", "list", "sort", "parse", "write", "read",
         "file", "value", "error", "test", "function", "class", "method", "string", "number", "array", "graph",
         "tree", "node", "edge", "path", "search", "query"]


def encoder_dir() -> str:
    """The default encoder's folder (its tokenizer is the tiny encoder's)."""
    from slapcli.models import DEFAULT_EMBED_MODEL, resolve_model

    ref = resolve_model(DEFAULT_EMBED_MODEL)
    assert ref.path is not None
    return ref.path


def write_synthetic_rows(path: Path, n: int, seed: int) -> None:
    """`n` Alpaca-shaped rows of 8-40 words, each distinct (its number is in it)."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40)))
            f.write(json.dumps({"instruction": f"Task {i}: explain {words[:40]}", "input": "",
                                "output": f"{words}. Row {i}."}) + "\n")


def tiny_encoder(workdir: Path) -> Path:
    """A 2-layer, 64-wide BERT with random weights and the real MiniLM tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    out = workdir / "tiny_encoder"
    if not (out / "config.json").exists():
        import torch

        torch.manual_seed(0)
        tok = AutoTokenizer.from_pretrained(encoder_dir())
        config = BertConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=128, max_position_embeddings=512)
        BertModel(config).save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
    return out
