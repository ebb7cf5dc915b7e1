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
import re
import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ehrmotor import __version__
from ehrmotor.errors import ArtifactMismatch, EhrmotorError, OutputError, environment_message

__all__ = ["ArtifactMismatch", "atomic_path", "is_current", "record", "write_json"]



TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)$")


def _temporary(path: Path, kind: str = "tmp") -> Path:
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}")


def pid_alive(pid: int) -> bool:
    """True when a process with this pid exists on this host (ours or another user's)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove(path: Path) -> None:
    """Remove a file or folder this package created (never call it on a user's path)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def remove_atomically(path: Path) -> None:
    """Remove a folder this package created, renaming it first to a temporary (`.NAME.old-PID`)
    so that an interrupted removal leaves a stale temporary, not half a folder."""
    old = _temporary(path, "old")
    remove(old)
    try:
        os.replace(path, old)
    except FileNotFoundError:
        return
    remove(old)


def clean_stale_temporaries(folder: Path) -> list[Path]:
    """Remove `.NAME.tmp-PID` / `.NAME.old-PID` entries in `folder` whose process is dead.

    These are the temporaries of `atomic_path`; a live owner's (or our own) are left alone.
    Returns what was removed.
    """
    removed: list[Path] = []
    if not Path(folder).is_dir():
        return removed
    for entry in sorted(Path(folder).iterdir()):
        match = TEMPORARY.match(entry.name)
        if match is None:
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or pid_alive(pid):
            continue
        remove(entry)
        removed.append(entry)
    return removed


def remove_empty_folders(folders: list[Path]) -> None:
    """Remove those of `folders` (created by this run, innermost last) that are still empty."""
    for folder in reversed(folders):
        with contextlib.suppress(OSError):  # not empty, or already gone
            folder.rmdir()


def check_writable(folder: Path) -> None:
    """Raise OutputError when a file cannot be created in `folder` (read-only, forbidden)."""
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".ehrmotor-probe-"):
            pass
    except OSError as error:
        message = environment_message(error, folder)
        if message is None:
            raise
        raise OutputError(f"{message}; cannot write there") from error


def _kind(path: Path) -> str:
    return "folder" if path.is_dir() and not path.is_symlink() else "file"


def followed(path: Path) -> Path:
    """`path`, or the folder it links to when it is a symbolic link to a folder (an output
    folder given as a link is written through it: the lock and temporaries go beside the real
    folder)."""
    path = Path(path)
    return path.resolve() if path.is_symlink() and path.is_dir() else path


def inside(path: Path, folder: Path) -> bool:
    """Whether `path` is `folder` or lies under it, links and `..` resolved."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def check_output(path: Path, kind: str) -> None:
    """Raise OutputError unless `path` is absent or a `kind` ("file" or "folder") to replace;
    a link to a folder counts as that folder."""
    path = followed(path)
    if path.parent.exists() and not path.parent.is_dir():
        raise OutputError(f"{path.parent}: is a file; expected a folder to write {path.name} in")
    if (path.exists() or path.is_symlink()) and _kind(path) != kind:
        raise OutputError(f"{path}: exists and is a {_kind(path)}; expected a {kind} "
                          "(nothing was changed; choose another path)")


@contextlib.contextmanager
def atomic_path(path: Path, *, replace_folder: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write `path` (file or folder) into; rename it when done.

    An existing file at `path` is replaced by a file. An existing folder is replaced by a folder
    only with `replace_folder` (for artifacts inside a work folder this package owns); a file never
    replaces a folder nor a folder a file (OutputError). On an exception the temporary path is
    removed and `path` is left as it was.
    """
    path = followed(path)  # a link to a folder: its folder is replaced, the link kept
    tmp = _temporary(path)
    remove(tmp)  # our own pid's leftover
    try:
        yield tmp
        if path.exists() or path.is_symlink():
            check_output(path, _kind(tmp))
            if _kind(path) == "folder":
                if not replace_folder:
                    raise OutputError(f"{path}: folder exists; refusing to replace it")
                old = _temporary(path, "old")
                remove(old)
                os.replace(path, old)
                os.replace(tmp, path)
                remove(old)
                return
        os.replace(tmp, path)
    except Exception as error:
        message = None if isinstance(error, EhrmotorError) else environment_message(error, path)
        if message is not None:
            raise OutputError(f"{message} (while writing it; it was left as it was)") from error
        raise
    finally:
        if tmp.exists() or tmp.is_symlink():
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


def _file_digest(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def fingerprint_files(files: list[Path], root: Path) -> str:
    """SHA-256 over each file's relative path and the SHA-256 of its whole content.

    Files are hashed on threads (hashlib releases the GIL), so the cost is one read of the
    inputs at disk or memory speed; any edit anywhere in a file changes the fingerprint.
    """
    ordered = sorted(files)
    with ThreadPoolExecutor(min(8, max(1, len(ordered)))) as pool:
        digests = list(pool.map(_file_digest, ordered))
    digest = hashlib.sha256()
    for path, content in zip(ordered, digests, strict=True):
        digest.update(f"{path.relative_to(root).as_posix()}\0{content}\0".encode())
    return digest.hexdigest()


PARQUET_MAGIC = b"PAR1"


def check_parquet_output(path: Path) -> None:
    """Refuse an --out that exists and is not a parquet file (we replace only those), or that
    cannot be written (checked before the work, not after)."""
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; expected the path of a parquet file to write "
                          "(nothing was changed)")
    if path.exists():
        with path.open("rb") as f:
            if f.read(4) != PARQUET_MAGIC:
                raise OutputError(f"{path}: exists and is not a parquet file; refusing to "
                                  "replace it (choose another --out)")
    existing = path.absolute().parent
    while not existing.exists():  # write_embeddings creates the missing folders
        existing = existing.parent
    check_writable(existing)
