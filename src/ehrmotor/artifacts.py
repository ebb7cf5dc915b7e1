"""Artifacts of the pipeline: atomic writes and the manifests that make steps idempotent.

Every artifact (a file or a folder) is written to a temporary sibling path and renamed into place
only when complete, so an interrupted step leaves nothing half-written. Each artifact has a
manifest (`<artifact>.manifest.json` beside it) recording what produced it: the step, its format
version, the relevant config and a fingerprint of its inputs. A step whose artifact exists with an
identical manifest is loaded, not rebuilt; a different manifest is reported, naming what changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ehrmotor import __version__


class ArtifactMismatch(RuntimeError):
    """An existing artifact was produced from other inputs or settings; one line message."""


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write `path` (file or folder) into; rename it when done.

    On an exception the temporary path is removed and `path` is left as it was.
    """
    path = Path(path)
    tmp = _temporary(path)
    remove(tmp)
    try:
        yield tmp
        if path.exists():
            remove(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            remove(tmp)


def write_json(path: Path, value: Any) -> None:
    """Write strict JSON (no NaN/Infinity) atomically, keys sorted for stable bytes."""
    text = json.dumps(value, indent=2, sort_keys=True, allow_nan=False) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def manifest_path(artifact: Path) -> Path:
    return artifact.with_name(artifact.name + ".manifest.json")


def make_manifest(step: str, format_version: int, config: dict[str, Any],
                  inputs: dict[str, Any]) -> dict[str, Any]:
    return {"step": step, "format_version": format_version, "config": config,
            "inputs": inputs, "ehrmotor_version": __version__}


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    changed = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.append(f"{prefix}{key} ({a!r} -> {b!r})")
    return changed


def is_current(artifact: Path, manifest: dict[str, Any]) -> bool:
    """True when `artifact` exists with this manifest; False when it is absent.

    Raises ArtifactMismatch naming what changed when it exists with another manifest.
    """
    recorded = manifest_path(artifact)
    if not artifact.exists() or not recorded.exists():
        return False
    old = json.loads(recorded.read_text())
    if old == manifest:
        return True
    changed = [c for c in _differences(old, manifest) if not c.startswith("ehrmotor_version")]
    if not changed:  # only the package version differs: the artifact format is unchanged
        return True
    raise ArtifactMismatch(
        f"{artifact} was built with different inputs or settings: {'; '.join(changed[:5])}. "
        "Rerun with --force to rebuild, or use another --out"
    )


def record(artifact: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest of a finished artifact (after the artifact itself is in place)."""
    write_json(manifest_path(artifact), manifest)


def fingerprint_files(files: list[Path], root: Path) -> str:
    """SHA-256 over each file's relative path, size and last MiB (parquet footers live there)."""
    digest = hashlib.sha256()
    for path in sorted(files):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(root).as_posix()}\0{size}\0".encode())
        with path.open("rb") as f:
            f.seek(max(0, size - (1 << 20)))
            digest.update(f.read())
    return digest.hexdigest()
