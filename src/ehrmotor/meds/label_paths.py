"""Where the labels of a task are: MEDS label files and the folders that hold them.

ACES and the MEDS-DEV task pipelines write one task as one file (`COHORT.parquet`) or as shards
in split folders beside their logs (`COHORT/<split>/<shard>.parquet`, `COHORT/.logs/`);
`ehrmotor label` writes one file per outcome in one folder (`death.parquet`,
`heart_failure.parquet`, `labels.json`). `label_tasks` tells the tasks of a folder apart; reading
them is `ehrmotor.meds.labels`'.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ehrmotor.errors import InputError

# MEDS split folders that ACES's sharded output nests the shards in (COHORT/train/0.parquet).
SPLIT_FOLDERS = ("train", "tuning", "held_out")
# File stems that name a shard rather than a task: 0, shard_0, part-00000-..., data-00000-of-00001.
SHARD_STEM = re.compile(r"shard[-_]?\d+|part[-_]\d+.*|(?:data[-_])?\d+(?:-of-\d+)?", re.IGNORECASE)
SHOWN = 5  # task names shown in an error message


def label_files(path: Path) -> list[Path]:
    """The parquet file `path`, or every *.parquet under the folder `path`, sorted.

    In a folder, files and folders whose names start with "." or "_" are skipped (ACES writes
    its logs to COHORT/.logs/). Raises InputError when there is nothing to read.
    """
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise InputError(f"labels file {path}: not found; expected a parquet file or a folder "
                         "of parquet files")
    files = sorted(file for file in path.rglob("*.parquet") if file.is_file() and not any(
        part.startswith((".", "_")) for part in file.relative_to(path).parts))
    if not files:
        raise InputError(f"labels folder {path}: holds no parquet files (names starting with "
                         "'.' or '_' are skipped); expected MEDS label files *.parquet")
    return files


def _is_shard_stem(stem: str) -> bool:
    """Whether a file stem names a shard or a split (train.parquet) rather than a task."""
    return bool(SHARD_STEM.fullmatch(stem)) or stem in SPLIT_FOLDERS


def label_tasks(path: str | Path) -> list[tuple[str, list[Path]]]:
    """(task name, its files) of each task in the label file or folder `path`, by name.

    In a folder, a file belongs to the task named by its stem unless the stem names a shard or
    a split (`0`, `shard_0`, `train`): then to the task of the folder it is in, split folders
    (train, tuning, held_out) not counting. Files of the folder's own task are named by
    `task_name_of(path)`. InputError when there is nothing to read, or when two tasks in
    different subfolders share a name.
    """
    path = Path(path)
    files = label_files(path)
    if path.is_file():
        return [(task_name_of(path), files)]
    tasks: dict[tuple[str, ...], list[Path]] = {}
    for file in files:
        key = [part for part in file.relative_to(path).parent.parts if part not in SPLIT_FOLDERS]
        if not _is_shard_stem(file.stem):
            key.append(file.stem)
        tasks.setdefault(tuple(key), []).append(file)
    named = [(key[-1] if key else task_name_of(path), found) for key, found in tasks.items()]
    names = [name for name, _ in named]
    if len(set(names)) < len(names):
        twice = sorted({name for name in names if names.count(name) > 1})
        raise InputError(f"labels folder {path}: two tasks are named {twice[0]} (in different "
                         "subfolders); give each task's folder as a --labels path of its own")
    return sorted(named)


def one_task(path: str | Path, tasks: list[tuple[str, list[Path]]]) -> tuple[str, list[Path]]:
    """The name and files of the one task in `tasks` (see `label_tasks`); InputError when there
    are several, naming them."""
    if len(tasks) == 1:
        return tasks[0]
    names = [name for name, _ in tasks]
    shown = ", ".join(names[:SHOWN]) + (" ..." if len(names) > SHOWN else "")
    raise InputError(f"labels folder {path}: holds {len(tasks)} tasks ({shown}), one per file; "
                     f"expected one task here: give one task's file, e.g. {tasks[0][1][0]}")


def task_name_of(path: str | Path) -> str:
    """A task's name from its label path: a file's stem, or the folder's name.

    A stem that names a shard (`0`, `shard_0`, `data-00000-of-00001`) gives way to the folder it is
    in, and a MEDS split folder (train, tuning, held_out) to the folder above it.
    """
    path = Path(os.path.abspath(path))
    if path.is_file() and not SHARD_STEM.fullmatch(path.stem):
        return path.stem
    folder = path if path.is_dir() else path.parent
    while folder.name in SPLIT_FOLDERS and folder.parent.name:
        folder = folder.parent
    return folder.name or path.stem
