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
  when there is one; otherwise the task is censored at the subject's last event time
  (`censor_days` per point). They are not stored: each occurrence is the next one for a run of
  consecutive points (`occurrence_runs`), so a window stores its points and the occurrences that
  label them (`window_occurrences`), and the collate step derives the (point, task, days) pairs
  (`ehrmotor.batching`); the MOTOR-task statistics come from the runs directly.

The label cache, a temporary of the MOTOR-task step: the train shards' positions, points and
occurrence runs, for the datasets.

The MOTOR task is fitted on the labels of train subjects for the candidate tasks; the train dataset
needs the same positions, points and labels for the kept tasks. The task step's workers write
what they computed here, and the train dataset step reads it instead of encoding the shards again.

Folder `WORK/pretraining_files/.train_labels/` (written through a temporary, like an artifact):

    candidates.arrow            task, code, entry of the candidate tasks (`candidate_tasks`)
    shard-XXXXX-of-NNNNN/       one per MEDS shard (Arrow IPC files, zstd):
        positions.arrow, points.arrow, last_time.arrow, runs.arrow
                                the frames of `ShardLabels` (runs of candidate tasks)
        events.json             `EventCounts` of the shard's train events

Its manifest `.train_labels.manifest.json` holds CACHE_FORMAT_VERSION, the digest of the manifest of
the `motor_task.json` built with it and the window settings of its points: the cache is read only
while that task is the current one and the dataset has those settings (else each dataset shard
labels itself, with the same result). The run removes the cache once both
datasets are complete; a run that stops before keeps it for the next.

Keeping the kept tasks' runs: a task's runs do not depend on the other tasks, and the kept tasks
are numbered in candidate order, so filtering the candidates' runs to the kept tasks and
renumbering them (`keep_tasks`) gives the runs `label_shard` finds for the kept tasks, in the
same order.
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


def task_codes_of(ontology: Ontology, task_codes: pl.DataFrame) -> pl.DataFrame:
    """code, task: every code that counts as an occurrence of a task (the task's code and its
    ontology descendants; a code the ontology does not know counts for itself only)."""
    known = ontology.ancestors.select("code", "ancestor").join(
        task_codes.rename({"code": "ancestor"}), on="ancestor", how="inner")
    unknown = task_codes.join(ontology.ancestors.select("code").unique(), on="code", how="anti")
    return pl.concat([known.select("code", "task"), unknown.select("code", "task")]).unique()


def task_events(events: pl.DataFrame, ontology: Ontology, task_codes: pl.DataFrame
                ) -> pl.DataFrame:
    """subject_id, task, time (µs) of every distinct task occurrence.

    `task_codes`: code, task (index). Valued events and static events never count.
    """
    plain = events.lazy().filter(
        pl.col("numeric_value").is_null() & pl.col("text_value").is_null()
        & pl.col("time").is_not_null()
    ).select("subject_id", "code", time=pl.col("time").dt.epoch("us"))
    return (
        plain.join(task_codes_of(ontology, task_codes).lazy(), on="code", how="inner")
        .select("subject_id", "task", "time")
        .unique()
        .sort("subject_id", "task", "time")
        .collect()
    )


def censor_days(points: pl.DataFrame, last_time: pl.DataFrame) -> pl.Series:
    """Per point (subject_id, time µs), days to its subject's last event (Float32)."""
    return points.join(last_time, on="subject_id", how="left", maintain_order="left").select(
        censor_days=((pl.col("last_time") - pl.col("time")) / US_PER_DAY).cast(pl.Float32)
    ).to_series()


def occurrence_runs(points: pl.DataFrame, occurrences: pl.DataFrame) -> pl.DataFrame:
    """For each task occurrence, the run of points whose next occurrence of that task it is.

    points: subject_id, time (µs), sorted by subject and time, one per time per subject; row i
    is point i. occurrences: subject_id, task, time (`task_events`). Returns subject_id, task,
    time, start, stop: points start..stop-1 (start < stop; occurrences that are no point's next
    are left out) have this occurrence as their next one of the task, at `time`, in (subject_id,
    task, time) order.

    Each occurrence is the next one for exactly the points in [previous occurrence, occurrence):
    `stop` is the number of points before the occurrence (same subject, earlier time; subjects in
    order), counted in one sort of points and occurrences together, and `start` is the previous
    occurrence's `stop` (the subject's first point for a task's first occurrence). The work is
    proportional to the occurrences, not to the (point, task) pairs they label.
    """
    marks = pl.concat([
        occurrences.select("subject_id", "time", pl.col("task").cast(pl.Int32),
                           point=pl.lit(0, pl.UInt32)),
        points.select("subject_id", "time", task=pl.lit(None, pl.Int32),
                      point=pl.lit(1, pl.UInt32)),
    ]).sort("subject_id", "time", "point")  # an occurrence before a point at the same time
    marks = marks.with_columns(before=(pl.col("point").cum_sum() - pl.col("point")).cast(pl.Int64))
    marks = marks.with_columns(first=pl.col("before").min().over("subject_id"))
    runs = marks.filter(pl.col("point") == 0).sort("subject_id", "task", "time")
    same = ((pl.col("subject_id") == pl.col("subject_id").shift(1))
            & (pl.col("task") == pl.col("task").shift(1)))
    return runs.select(
        "subject_id", "task", "time",
        start=pl.when(same).then(pl.col("before").shift(1)).otherwise(pl.col("first")),
        stop="before",
    ).filter(pl.col("stop") > pl.col("start"))


def run_pairs(runs: pl.DataFrame, point_times: np.ndarray, pair_index: np.ndarray
              ) -> pl.DataFrame:
    """The (point, task, days) labels numbered `pair_index` among all pairs of `runs`
    (`occurrence_runs`; pair i is the i-th point of the runs taken in order). point_times: µs
    per point row. days: from the point to the occurrence (Float32)."""
    counts = (runs["stop"] - runs["start"]).to_numpy()
    ends = np.cumsum(counts)
    run = np.searchsorted(ends, pair_index, side="right")
    point = runs["start"].to_numpy()[run] + (pair_index - (ends - counts)[run])
    days = (runs["time"].to_numpy()[run] - point_times[point]) / US_PER_DAY
    return pl.DataFrame({"point": point, "task": runs["task"].to_numpy()[run],
                         "days": days.astype(np.float32)})


def window_occurrences(runs: pl.DataFrame, point_windows: pl.Series) -> pl.DataFrame:
    """subject_id, window, task, time: the occurrences each training window needs to label its
    points (those that are the next occurrence for at least one of its points), sorted by
    subject, window, task and time. point_windows: the window of each point row of `runs`."""
    window = point_windows.cast(pl.Int32)
    return (
        runs.with_columns(first=window.gather(runs["start"]),
                          last=window.gather(runs["stop"] - 1))
        .select("subject_id", "task", "time", window=pl.int_ranges(
            "first", pl.col("last") + 1, dtype=pl.Int32))
        .explode("window")
        .sort("subject_id", "window", "task", "time")
        .select("subject_id", "window", "task", "time")
    )


def last_event_times(events: pl.DataFrame) -> pl.DataFrame:
    """subject_id, last_time (µs) of each subject's last timed event."""
    return events.group_by("subject_id").agg(
        last_time=pl.col("time").max().dt.epoch("us")).sort("subject_id")


@dataclass(frozen=True)
class ShardLabels:
    """A shard's positions, sampled points and what their labels are derived from."""

    positions: pl.DataFrame
    points: pl.DataFrame  # subject_id, window, position, time, censor_days (by subject, position)
    runs: pl.DataFrame  # `occurrence_runs` of the points (rows of `points`)
    last_time: pl.DataFrame  # subject_id, last_time (`last_event_times`)


CACHE_FORMAT_VERSION = 2
CACHE_NAME = ".train_labels"
CANDIDATES = "candidates.arrow"
FRAMES = ("positions", "points", "last_time", "runs")
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
    # Filtered while read: the candidates' runs are never all in memory.
    runs = keep_tasks(pl.scan_ipc(shard / f"{FRAMES[-1]}.arrow"), renumbered).collect()
    counts = EventCounts(**json.loads((shard / COUNTS).read_text()))
    return ShardLabels(**frames, runs=runs), counts


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


def renumbering(cache: Path, tasks: pl.DataFrame) -> pl.DataFrame:
    """candidate, task: the kept tasks' indices among the cache's candidates and in the model.

    tasks: code, entry, task of the kept tasks (`MotorTask.tasks`)."""
    candidates = pl.read_ipc(cache / CANDIDATES)
    kept = tasks.select("code", "entry", "task").join(
        candidates.select("code", "entry", candidate="task"), on=["code", "entry"], how="left",
        maintain_order="left")
    if kept["candidate"].null_count():
        missing = kept.filter(pl.col("candidate").is_null())["code"][0]
        raise InputError(f"{cache}: MOTOR task {missing!r} is not among the cached candidates")
    return kept.select(pl.col("candidate").cast(pl.Int32), pl.col("task").cast(pl.Int32))


def keep_tasks(frame: pl.LazyFrame, renumbered: pl.DataFrame) -> pl.LazyFrame:
    """The rows of `frame` (column task) of kept tasks, renumbered (`renumbering`), in the same
    order."""
    return frame.with_columns(task=pl.col("task").replace_strict(
        renumbered["candidate"], renumbered["task"], default=None, return_dtype=pl.Int32,
    )).filter(pl.col("task").is_not_null())
