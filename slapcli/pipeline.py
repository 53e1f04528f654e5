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
    if not os.path.exists(path):
        return False
    try:
        meta = read_meta(path)
    except SlapError:
        return False
    if any(meta.config.get(key) != value for key, value in config.items()):
        return False
    if source is not None and meta.source_fingerprint != source:
        return False
    if upstream is not None:
        if meta.upstream is None or not os.path.exists(upstream):
            return False
        if Fingerprint.from_dict(meta.upstream["fingerprint"]) != file_fingerprint(upstream):
            return False
    return True


def reuse_or_run(path: str, config: dict[str, Any], reporter: Reporter, produce: Callable[[], ArtifactMeta],
                 source: Fingerprint | None = None, upstream: str | None = None) -> None:
    if artifact_is_current(path, config, source, upstream):
        reporter.log(f"reusing {path} (same input and config)")
        return
    produce()
