"""A temporary of the MOTOR-task step: the train shards' positions and labels, for the datasets.

The MOTOR task is fitted on the labels of train subjects for the candidate tasks; the train dataset
needs the same positions, points and labels for the kept tasks. The task step's workers write
what they computed here, and the train dataset step reads it instead of labelling the shards again.

Folder `WORK/pretraining_files/.train_labels/` (written through a temporary, like an artifact):

    candidates.arrow            task, code, entry of the candidate tasks (`candidate_tasks`)
    shard-XXXXX-of-NNNNN/       one per MEDS shard (Arrow IPC files, zstd):
        positions.arrow, points.arrow, censoring.arrow, pairs.arrow
                                the frames of `examples.ShardLabels` (pairs of candidate tasks)
        events.json             `EventCounts` of the shard's train events

Its manifest `.train_labels.manifest.json` holds FORMAT_VERSION, the digest of the manifest of
the `motor_task.json` built with it and the window settings of its points: the cache is read only
while that task is the current one and the dataset has those settings (else each dataset shard
labels itself, with the same result). The run removes the cache once both
datasets are complete; a run that stops before keeps it for the next.

Keeping the kept tasks' labels: a task's labels do not depend on the other tasks, and the kept
tasks are numbered in candidate order, so filtering the candidates' pairs to the kept tasks and
renumbering them (`keep_tasks`) gives the pairs `label_shard` computes for the kept tasks, in
the same order.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import polars as pl

from ehrmotor.artifacts import manifest_path, record, remove
from ehrmotor.config import WindowSettings
from ehrmotor.errors import InputError
from ehrmotor.prepare.examples import ShardLabels
from ehrmotor.prepare.motor_task import MotorTask
from ehrmotor.prepare.positions import count_before_birth

FORMAT_VERSION = 1
NAME = ".train_labels"
CANDIDATES = "candidates.arrow"
FRAMES = ("positions", "points", "censoring", "pairs")
COUNTS = "events.json"


@dataclass(frozen=True)
class EventCounts:
    """What the dataset statistics need of a shard's events."""

    events: int
    subjects_born_late: int  # subjects with timed events before their MEDS_BIRTH event
    events_before_birth: int  # those events, folded into position 0

    @classmethod
    def of(cls, events: pl.DataFrame) -> EventCounts:
        return cls(events.height, *count_before_birth(events))


def folder(out: Path) -> Path:
    """The cache folder in `out` (WORK/pretraining_files)."""
    return Path(out) / NAME


def shard_folder(cache: Path, index: int, count: int) -> Path:
    return cache / f"shard-{index:05d}-of-{count:05d}"


def write_candidates(cache: Path, candidates: pl.DataFrame) -> None:
    """Create `cache` and write the candidate tasks (task, code, entry) into it."""
    cache.mkdir(parents=True, exist_ok=True)
    candidates.select("task", "code", "entry").write_ipc(cache / CANDIDATES, compression="zstd")


def write_shard(shard: Path, labelled: ShardLabels, counts: EventCounts) -> None:
    shard.mkdir(parents=True, exist_ok=True)
    for name in FRAMES:
        getattr(labelled, name).write_ipc(shard / f"{name}.arrow", compression="zstd")
    (shard / COUNTS).write_text(json.dumps(asdict(counts)))


def read_shard(shard: Path, renumbered: pl.DataFrame) -> tuple[ShardLabels, EventCounts]:
    """A shard's labels for the kept tasks (`renumbering`), and its event counts."""
    frames = {name: pl.read_ipc(shard / f"{name}.arrow") for name in FRAMES[:-1]}
    # Filtered while read: the candidates' pairs are never all in memory beside the kept ones.
    pairs = keep_tasks(pl.scan_ipc(shard / f"{FRAMES[-1]}.arrow"), renumbered).collect()
    counts = EventCounts(**json.loads((shard / COUNTS).read_text()))
    return ShardLabels(**frames, pairs=pairs), counts


def _manifest(task_digest: str, windows: WindowSettings) -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "motor_task": task_digest,
            "windows": asdict(windows)}


def record_current(cache: Path, task_digest: str, windows: WindowSettings) -> None:
    """Mark the complete `cache` as written with the task whose manifest digest is given, its
    labels at the points sampled with `windows`."""
    record(cache, _manifest(task_digest, windows))


def is_current(cache: Path, task_digest: str, windows: WindowSettings) -> bool:
    """True when `cache` is complete and was written with that task and these windows."""
    recorded = manifest_path(cache)
    if not cache.is_dir() or not recorded.is_file():
        return False
    try:
        manifest = json.loads(recorded.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return bool(manifest == _manifest(task_digest, windows))


def discard(cache: Path) -> None:
    """Remove the cache and its manifest (the manifest first: a half-removed cache is not read)."""
    remove(manifest_path(cache))
    remove(cache)


def renumbering(cache: Path, task: MotorTask) -> pl.DataFrame:
    """candidate, task: the kept tasks' indices among the cache's candidates and in the model."""
    candidates = pl.read_ipc(cache / CANDIDATES)
    kept = task.tasks.select("code", "entry", "task").join(
        candidates.select("code", "entry", candidate="task"), on=["code", "entry"], how="left",
        maintain_order="left")
    if kept["candidate"].null_count():
        missing = kept.filter(pl.col("candidate").is_null())["code"][0]
        raise InputError(f"{cache}: MOTOR task {missing!r} is not among the cached candidates")
    return kept.select(pl.col("candidate").cast(pl.Int32), pl.col("task").cast(pl.Int32))


def keep_tasks(pairs: pl.LazyFrame, renumbered: pl.DataFrame) -> pl.LazyFrame:
    """The `pairs` of kept tasks, renumbered (`renumbering`), in the same order."""
    return pairs.with_columns(task=pl.col("task").replace_strict(
        renumbered["candidate"], renumbered["task"], default=None, return_dtype=pl.Int32,
    )).filter(pl.col("task").is_not_null())
