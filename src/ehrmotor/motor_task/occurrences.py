"""Prediction points, training windows and sparse MOTOR labels for one shard (whole-frame polars).

- Prediction points: positions after the birth-day position, one per distinct timestamp (the last
  position at that time, so the representation has seen every event of that time), excluding the
  subject's last event time (nothing can be predicted from there).
- Windows: `ehrmotor.sequences.windows.training_windows` (consecutive windows of at most
  `max_window` positions, each position 0 followed by up to `max_window - 1` later ones; no
  history dropped).
- Sampling: in each window, max(5, positions / 10) of its prediction points (all when fewer),
  chosen by a seeded hash of (subject, position), so the choice is deterministic.
- Task events: events without a numeric or text value, expanded to their ontology ancestors, whose
  code is a task code. Static events never count.
- Labels at a point at time t: per task, the days from t to its next occurrence strictly after t,
  when there is one; otherwise the task is censored at the subject's last event time
  (`censor_days` per point). They are not stored: each occurrence is the next one for a run of
  consecutive points (`occurrence_runs`), so a window stores its points and the occurrences that
  label them (`window_occurrences`), and the collate step derives the (point, task, days) pairs
  (`ehrmotor.sequences.batching`); the MOTOR-task statistics come from the runs directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from ehrmotor.meds.read import US_PER_DAY
from ehrmotor.sequences.positions import count_before_birth
from ehrmotor.sequences.windows import training_window
from ehrmotor.vocabulary.ontology import Ontology

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


def task_events(events: pl.DataFrame, code_tasks: pl.DataFrame) -> pl.DataFrame:
    """subject_id, task, time (µs) of every task occurrence, in no particular order; one
    repeated (same task and time) may come more than once (`occurrence_runs` gives a repeat an
    empty run, so they are not removed here).

    `code_tasks`: `task_codes_of` the tasks. Valued events and static events never count.
    """
    return events.lazy().filter(
        pl.col("numeric_value").is_null() & pl.col("text_value").is_null()
        & pl.col("time").is_not_null()
    ).select("subject_id", "code", time=pl.col("time").dt.epoch("us")).join(
        code_tasks.lazy(), on="code", how="inner").select("subject_id", "task", "time").collect()


def censor_days(points: pl.DataFrame, last_time: pl.DataFrame) -> pl.Series:
    """Per point (subject_id, time µs), days to its subject's last event (Float32)."""
    return points.join(last_time, on="subject_id", how="left", maintain_order="left").select(
        censor_days=((pl.col("last_time") - pl.col("time")) / US_PER_DAY).cast(pl.Float32)
    ).to_series()


def occurrence_runs(points: pl.DataFrame, occurrences: pl.DataFrame) -> pl.DataFrame:
    """For each task occurrence, the run of points whose next occurrence of that task it is.

    points: subject_id, time (µs), sorted by subject and time, one per time per subject; row i
    is point i. occurrences: subject_id, task, time (`task_events`; any order, repeats allowed:
    a repeat's run is empty). Returns subject_id, task,
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


@dataclass(frozen=True)
class EventCounts:
    """What the dataset statistics need of a shard's events."""

    events: int
    subjects_born_late: int  # subjects with timed events before their MEDS_BIRTH event
    events_before_birth: int  # those events, folded into position 0

    @classmethod
    def of(cls, events: pl.DataFrame) -> EventCounts:
        return cls(events.height, *count_before_birth(events))
