"""Prediction points, training windows and sparse MOTOR labels for one shard (whole-frame polars).

- Prediction points: positions after the birth-day position, one per distinct timestamp (the last
  position at that time, so the representation has seen every event of that time), excluding the
  subject's last event time (nothing can be predicted from there).
- Windows: `ehrmotor.prepare.windows.training_windows` (consecutive windows of at most `max_window`
  positions, each position 0 followed by up to `max_window - 1` later ones; no history dropped).
- Sampling: in each window, max(5, positions / 10) of its prediction points (all when fewer),
  chosen by a seeded hash of (subject, position), so the choice is deterministic.
- Task events: events without a numeric or text value, expanded to their ontology ancestors, whose
  code is a task code. Static events never count.
- Labels at a point at time t: per task, the days from t to its next occurrence strictly after t,
  when there is one; otherwise the task is censored at the subject's last event time. In sparse
  form: per point `censor_days`, and (task, days) pairs only for tasks that occur.

The label cache, a temporary of the MOTOR-task step: the train shards' positions and labels,
for the datasets.

The MOTOR task is fitted on the labels of train subjects for the candidate tasks; the train dataset
needs the same positions, points and labels for the kept tasks. The task step's workers write
what they computed here, and the train dataset step reads it instead of labelling the shards again.

Folder `WORK/pretraining_files/.train_labels/` (written through a temporary, like an artifact):

    candidates.arrow            task, code, entry of the candidate tasks (`candidate_tasks`)
    shard-XXXXX-of-NNNNN/       one per MEDS shard (Arrow IPC files, zstd):
        positions.arrow, points.arrow, censoring.arrow, pairs.arrow
                                the frames of `ShardLabels` (pairs of candidate tasks)
        events.json             `EventCounts` of the shard's train events

Its manifest `.train_labels.manifest.json` holds CACHE_FORMAT_VERSION, the digest of the manifest of
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

import numpy as np
import polars as pl

from ehrmotor.artifacts import manifest_path, record, remove
from ehrmotor.config import WindowSettings
from ehrmotor.errors import InputError
from ehrmotor.prepare.motor_task import MotorTask
from ehrmotor.prepare.ontology import Ontology
from ehrmotor.prepare.positions import count_before_birth
from ehrmotor.prepare.windows import training_window

US_PER_DAY = 86_400_000_000
MIN_POINTS_PER_WINDOW = 5
POINT_FRACTION = 10  # one sampled point per this many positions


def prediction_points(positions: pl.DataFrame, last_time: pl.DataFrame) -> pl.DataFrame:
    """subject_id, position, time (µs) of every prediction point.

    `last_time`: subject_id, last_time (µs) of the subject's last event.
    """
    return (
        positions.filter(pl.col("position") > 0)
        .group_by("subject_id", "time").agg(pl.col("position").max())
        .join(last_time, on="subject_id", how="inner")
        .filter(pl.col("time") < pl.col("last_time"))
        .select("subject_id", "position", "time")
        .sort("subject_id", "position")
    )


def sample_points(points: pl.DataFrame, positions: pl.DataFrame, max_window: int,
                  seed: int) -> pl.DataFrame:
    """The sampled prediction points of each window: subject_id, window, position, time."""
    sizes = positions.filter(pl.col("position") > 0).group_by(
        "subject_id", window=training_window(max_window)).agg(
        wanted=pl.max_horizontal(pl.lit(MIN_POINTS_PER_WINDOW), pl.len() // POINT_FRACTION)
    )
    keyed = points.with_columns(window=training_window(max_window))
    keyed = keyed.with_columns(
        key=pl.struct("subject_id", "position").hash(seed)
    ).join(sizes, on=["subject_id", "window"], how="inner")
    return (
        keyed.filter(pl.col("key").rank("ordinal").over("subject_id", "window")
                     <= pl.col("wanted"))
        .select("subject_id", "window", "position", "time")
        .sort("subject_id", "position")
    )


def task_events(events: pl.DataFrame, ontology: Ontology, task_codes: pl.DataFrame
                ) -> pl.DataFrame:
    """subject_id, task, time (µs) of every distinct task occurrence.

    `task_codes`: code, task (index). Valued events and static events never count.
    """
    plain = events.filter(
        pl.col("numeric_value").is_null() & pl.col("text_value").is_null()
        & pl.col("time").is_not_null()
    ).select("subject_id", "code", time=pl.col("time").dt.epoch("us"))
    return (
        ontology.expand(plain.unique())
        .join(task_codes.rename({"code": "ancestor"}), on="ancestor", how="inner")
        .select("subject_id", "task", "time")
        .unique()
        .sort("subject_id", "task", "time")
    )


def _first_point_at_or_after(frame: pl.DataFrame, column: str, points: pl.DataFrame) -> pl.Series:
    """Global index of each row's first point (same subject) with time >= frame[column]."""
    found = frame.with_row_index("row").sort("subject_id", column).join_asof(
        points.select("subject_id", "pidx", point_time="time"), left_on=column,
        right_on="point_time", by="subject_id", strategy="forward", check_sortedness=False,
    )
    return found.sort("row")["pidx"]


def sparse_labels(points: pl.DataFrame, occurrences: pl.DataFrame,
                  last_time: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Labels of each point (points: subject_id, position, time µs; one per time per subject).

    Returns (censoring, pairs): censoring has subject_id, position, censor_days, one row per
    point sorted by (subject_id, position); pairs has subject_id, position, task, days (to the
    task's next occurrence after the point) and `point`, the row of its point in `censoring`.
    Pairs come in (subject_id, task, occurrence time) order, each occurrence's points in time
    order, not sorted by point (sorting 10⁷ rows is avoided).

    Each occurrence is the next one for exactly the points in [previous occurrence, occurrence),
    a contiguous run of the time-sorted points found with two as-of joins; expanding the runs
    gives the pairs directly, in time and memory proportional to the output.
    """
    points = points.sort("subject_id", "time").with_row_index("pidx")
    censoring = points.join(last_time, on="subject_id", how="left", maintain_order="left").select(
        "subject_id", "position",
        censor_days=((pl.col("last_time") - pl.col("time")) / US_PER_DAY).cast(pl.Float32),
    )
    bounds = points.group_by("subject_id").agg(first=pl.col("pidx").min(),
                                               end=pl.col("pidx").max() + 1)
    # Kept order: the pairs of a subset of the tasks are then those of all tasks, filtered, in the
    # same order (the label cache relies on it).
    spans = (
        occurrences.sort("subject_id", "task", "time")  # `previous` needs time order
        .with_columns(previous=pl.col("time").shift(1).over("subject_id", "task"))
        .join(bounds, on="subject_id", how="inner", maintain_order="left")
    )
    spans = spans.with_columns(
        stop=_first_point_at_or_after(spans, "time", points),
        start=_first_point_at_or_after(spans.with_columns(pl.col("previous").fill_null(
            pl.col("time").min() - 1)), "previous", points),
    ).with_columns(
        stop=pl.col("stop").fill_null(pl.col("end")),
        start=pl.when(pl.col("previous").is_null()).then(pl.col("first"))
        .otherwise(pl.col("start").fill_null(pl.col("end"))),
    ).filter(pl.col("stop") > pl.col("start"))
    runs = spans.select("task", event_time="time",
                        pidx=pl.int_ranges("start", "stop", dtype=pl.UInt32)).explode("pidx")
    pidx = runs["pidx"].to_numpy()
    pairs = pl.DataFrame({
        "subject_id": points["subject_id"].to_numpy()[pidx],
        "position": points["position"].to_numpy()[pidx],
        "task": runs["task"],
        "point": pidx,
        "days": ((runs["event_time"].to_numpy() - points["time"].to_numpy()[pidx])
                 / US_PER_DAY).astype(np.float32),
    })
    return censoring, pairs


def last_event_times(events: pl.DataFrame) -> pl.DataFrame:
    """subject_id, last_time (µs) of each subject's last timed event."""
    return events.group_by("subject_id").agg(last_time=pl.col("time").max().dt.epoch("us"))


@dataclass(frozen=True)
class ShardLabels:
    """A shard's positions and the sampled points' sparse labels."""

    positions: pl.DataFrame
    points: pl.DataFrame  # subject_id, window, position, time
    censoring: pl.DataFrame  # subject_id, position, censor_days (rows in the order of points)
    pairs: pl.DataFrame  # point (row in censoring), task, days


CACHE_FORMAT_VERSION = 1
CACHE_NAME = ".train_labels"
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


def cache_folder(out: Path) -> Path:
    """The cache folder in `out` (WORK/pretraining_files)."""
    return Path(out) / CACHE_NAME


def cache_shard_folder(cache: Path, index: int, count: int) -> Path:
    return cache / f"shard-{index:05d}-of-{count:05d}"


def write_candidates(cache: Path, candidates: pl.DataFrame) -> None:
    """Create `cache` and write the candidate tasks (task, code, entry) into it."""
    cache.mkdir(parents=True, exist_ok=True)
    candidates.select("task", "code", "entry").write_ipc(cache / CANDIDATES, compression="zstd")


def write_cached_shard(shard: Path, labelled: ShardLabels, counts: EventCounts) -> None:
    shard.mkdir(parents=True, exist_ok=True)
    for name in FRAMES:
        getattr(labelled, name).write_ipc(shard / f"{name}.arrow", compression="zstd")
    (shard / COUNTS).write_text(json.dumps(asdict(counts)))


def read_cached_shard(shard: Path, renumbered: pl.DataFrame) -> tuple[ShardLabels, EventCounts]:
    """A shard's labels for the kept tasks (`renumbering`), and its event counts."""
    frames = {name: pl.read_ipc(shard / f"{name}.arrow") for name in FRAMES[:-1]}
    # Filtered while read: the candidates' pairs are never all in memory beside the kept ones.
    pairs = keep_tasks(pl.scan_ipc(shard / f"{FRAMES[-1]}.arrow"), renumbered).collect()
    counts = EventCounts(**json.loads((shard / COUNTS).read_text()))
    return ShardLabels(**frames, pairs=pairs), counts


def _manifest(task_digest: str, windows: WindowSettings) -> dict[str, Any]:
    return {"format_version": CACHE_FORMAT_VERSION, "motor_task": task_digest,
            "windows": asdict(windows)}


def record_cache(cache: Path, task_digest: str, windows: WindowSettings) -> None:
    """Mark the complete `cache` as written with the task whose manifest digest is given, its
    labels at the points sampled with `windows`."""
    record(cache, _manifest(task_digest, windows))


def cache_is_current(cache: Path, task_digest: str, windows: WindowSettings) -> bool:
    """True when `cache` is complete and was written with that task and these windows."""
    recorded = manifest_path(cache)
    if not cache.is_dir() or not recorded.is_file():
        return False
    try:
        manifest = json.loads(recorded.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return bool(manifest == _manifest(task_digest, windows))


def discard_cache(cache: Path) -> None:
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
