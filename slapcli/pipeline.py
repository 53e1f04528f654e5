"""`slap run`: the four stages in a work folder, recomputing only what its inputs or config changed."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from slapcli.artifacts import ArtifactMeta, read_meta
from slapcli.errors import SlapError
from slapcli.io.readers import Fingerprint, file_fingerprint
from slapcli.progress import Reporter


def artifact_is_current(path: str, config: dict[str, Any], source: Fingerprint | None = None,
                        upstream: str | None = None) -> bool:
    """True when `path` holds an artifact made with this config from this source / upstream artifact."""
    return os.path.exists(path) and not why_stale(path, config, source, upstream)


def why_stale(path: str, config: dict[str, Any], source: Fingerprint | None = None,
              upstream: str | None = None) -> str:
    """Why the artifact at `path` cannot be reused ("" when it can), in words for a log line."""
    try:
        meta = read_meta(path)
    except SlapError as e:
        return f"unreadable ({e})"
    changed = [f"{key} {meta.config.get(key)!r} -> {value!r}" for key, value in config.items()
               if meta.config.get(key) != value]
    if changed:
        return "made with " + ", ".join(changed)
    if source is not None and meta.source_fingerprint != source:
        return "made from other data"
    if upstream is not None:
        if meta.upstream is None or not os.path.exists(upstream):
            return "its upstream artifact is missing"
        if Fingerprint.from_dict(meta.upstream["fingerprint"]) != file_fingerprint(upstream):
            return f"made from an older {upstream}"
    return ""


def reuse_or_run(path: str, config: dict[str, Any], reporter: Reporter, produce: Callable[[], ArtifactMeta],
                 source: Fingerprint | None = None, upstream: str | None = None) -> None:
    if os.path.exists(path):
        reason = why_stale(path, config, source, upstream)
        if not reason:
            reporter.log(f"reusing {path} (same input and config)")
            return
        # Said, not silent: the work folder holds one artifact per stage, and this run's settings replace it.
        reporter.log(f"replacing {path}: {reason}")
    produce()
