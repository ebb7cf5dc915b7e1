"""Downstream tasks for `ehrmotor.evaluate`: the labels each feature set is probed on.

Each evaluation subject gets one prediction time: a seeded random visit time (`Visit/*`
events) at least one day after its birth day (the `MEDS_BIRTH` time, else its first event,
truncated to the day) and strictly before its last event. For each outcome (a name and its codes:
see `outcome_matcher`), subjects with the outcome at or before the prediction time are dropped
(prevalent); the time to event is the days from the prediction time to the outcome's first later
occurrence, else the subject is censored at its last event time. The binary label at a horizon
is True when the event comes within the horizon, False when the subject is followed past the
horizon without it, and null (excluded) when it is censored earlier.

Task table (`TASK_SCHEMA`, written as labels.parquet), one row per (outcome, label):

    outcome             String    outcome name (for a label file: the file's stem)
    subject_id          Int64
    prediction_time     Datetime(us)
    time_to_event_days  Float64   days to the event or to censoring; null for a label file
    event               Boolean   the event was observed; null for a label file
    boolean_value       Boolean   binary label at the horizon; null when excluded

The events of the evaluation subjects are read one shard at a time (`subject_events`); the
count features (`ehrmotor.evaluate.counts`) read them the same way and share `birth_days`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from ehrmotor.errors import InputError
from ehrmotor.meds import data_files, read_subject_splits, scan_shard

log = logging.getLogger(__name__)

US_PER_DAY = 86_400_000_000
BIRTH_CODE = "MEDS_BIRTH"
VISIT_PREFIX = "Visit/"

TASK_SCHEMA = pl.Schema({
    "outcome": pl.String(),
    "subject_id": pl.Int64(),
    "prediction_time": pl.Datetime("us"),
    "time_to_event_days": pl.Float64(),
    "event": pl.Boolean(),
    "boolean_value": pl.Boolean(),
})


def outcome_matcher(codes: Sequence[str]) -> pl.Expr:
    """Boolean expression on `code` marking the events of an outcome given by its `codes`.

    An event matches a code when its code is that code or lies under it in the code's own
    notation: `ICD10CM/I50` matches `ICD10CM/I50` and `ICD10CM/I50.9` (not `ICD10CM/I509`);
    `MEDS_DEATH` matches itself.
    """
    return pl.any_horizontal(pl.col("code").is_in(list(codes)),
                             *[pl.col("code").str.starts_with(f"{code}.") for code in codes])


def check_outcomes(outcomes: Mapping[str, Sequence[str]]) -> dict[str, tuple[str, ...]]:
    """`outcomes` (name → codes) as a plain dict; InputError for an empty name or code list."""
    checked = {}
    for name, codes in outcomes.items():
        if (not isinstance(name, str) or not name or isinstance(codes, str)
                or not codes or not all(isinstance(c, str) and c for c in codes)):
            raise InputError(f"outcome {name!r}: expected a name and a non-empty list of codes "
                             f"such as ['ICD10CM/I50'], got {codes!r}")
        checked[name] = tuple(codes)
    return checked


def days_between(start: str, end: str) -> pl.Expr:
    """(end - start) in days, as Float64."""
    return (pl.col(end) - pl.col(start)).dt.total_microseconds().cast(pl.Float64) / US_PER_DAY


def subject_events(meds_dir: Path, subject_ids: pl.Series) -> list[pl.LazyFrame]:
    """One lazy frame per data shard with the events of `subject_ids` (memory bounded by shard)."""
    wanted = subject_ids.implode()
    return [scan_shard(path).filter(pl.col("subject_id").is_in(wanted))
            for path in data_files(meds_dir)]


def birth_days(events: pl.LazyFrame) -> pl.LazyFrame:
    """subject_id, birth_day (Datetime us, midnight), last_time: per subject of `events`."""
    timed = pl.col("time").filter(pl.col("time").is_not_null())
    birth = pl.col("time").filter(pl.col("code") == BIRTH_CODE).min()
    return events.group_by("subject_id").agg(
        birth_day=pl.coalesce(birth, timed.min()).dt.truncate("1d"), last_time=timed.max(),
    )


@dataclass(frozen=True)
class Timelines:
    """What task building needs from the data: per subject, its visits and outcome events."""

    subjects: pl.DataFrame  # subject_id, birth_day, last_time
    visits: pl.DataFrame  # subject_id, time: distinct Visit/* event times
    outcome_events: pl.DataFrame  # outcome, subject_id, time


def read_timelines(meds_dir: Path, subject_ids: pl.Series,
                   outcomes: Mapping[str, Sequence[str]]) -> Timelines:
    """Birth days, last event times, visit times and outcome event times (`outcomes`: name →
    codes) of `subject_ids`."""
    subjects, visits, outcome_events = [], [], []
    for events in subject_events(meds_dir, subject_ids):
        timed = events.filter(pl.col("time").is_not_null())
        parts = [
            birth_days(events),
            timed.filter(pl.col("code").str.starts_with(VISIT_PREFIX))
            .select("subject_id", "time").unique(),
            pl.concat([
                timed.filter(outcome_matcher(codes))
                .select(pl.lit(outcome).alias("outcome"), "subject_id", "time")
                for outcome, codes in outcomes.items()
            ]) if outcomes else pl.LazyFrame(schema={"outcome": pl.String(),
                                                      "subject_id": pl.Int64(),
                                                      "time": pl.Datetime("us")}),
        ]
        shard_subjects, shard_visits, shard_outcomes = pl.collect_all(parts)
        subjects.append(shard_subjects)
        visits.append(shard_visits)
        outcome_events.append(shard_outcomes)
    return Timelines(pl.concat(subjects).sort("subject_id"),
                     pl.concat(visits).sort("subject_id", "time"),
                     pl.concat(outcome_events).sort("outcome", "subject_id", "time"))


def evaluation_subjects(meds_dir: Path) -> pl.Series:
    """Subject ids of the `held_out` split (else `tuning`, with a warning), sorted.

    Raises InputError when metadata/subject_splits.parquet is missing or both splits are empty.
    """
    splits = read_subject_splits(meds_dir)
    if splits is None:
        raise InputError(f"{meds_dir}: metadata/subject_splits.parquet is missing; evaluation "
                         "needs a held_out (or tuning) split")
    for split in ("held_out", "tuning"):
        ids = splits.filter(pl.col("split") == split)["subject_id"].unique().sort()
        if ids.len():
            if split != "held_out":
                log.warning("evaluate: the held_out split is empty; evaluating on the %s split "
                            "(its subjects may have been used for pretraining)", split)
            return ids
    raise InputError(f"{meds_dir}: metadata/subject_splits.parquet has no held_out or tuning "
                     "subjects")


def draw_prediction_times(timelines: Timelines, seed: int) -> pl.DataFrame:
    """One seeded random eligible visit time per subject: subject_id, prediction_time, last_time.

    Eligible: at least one day after the birth day and strictly before the last event. Subjects
    without an eligible visit are left out. The draw depends only on the data and `seed`.
    """
    candidates = (
        timelines.visits.join(timelines.subjects, on="subject_id")
        .filter((pl.col("time") >= pl.col("birth_day") + pl.duration(days=1))
                & (pl.col("time") < pl.col("last_time")))
        .sort("subject_id", "time")
    )
    keys = np.random.default_rng([seed, 11]).random(candidates.height)
    chosen = (
        candidates.with_columns(key=pl.Series(keys))
        .group_by("subject_id")
        .agg(prediction_time=pl.col("time").sort_by("key").last(), last_time=pl.col("last_time")
             .first())
        .sort("subject_id")
    )
    dropped = timelines.subjects.height - chosen.height
    if dropped:
        log.info("evaluate: %d of %d subjects have no visit between their birth day and last "
                 "event; left out", dropped, timelines.subjects.height)
    return chosen


def outcome_tasks(points: pl.DataFrame, timelines: Timelines, outcomes: Sequence[str],
                  horizon_days: float) -> pl.DataFrame:
    """The task table (TASK_SCHEMA) of `outcomes` at `points` (subject_id, prediction_time,
    last_time); prevalent subjects of each outcome are left out of its rows."""
    events = timelines.outcome_events
    frames = []
    for outcome in outcomes:
        relative = (
            events.filter(pl.col("outcome") == outcome).drop("outcome")
            .join(points.select("subject_id", "prediction_time"), on="subject_id")
            .group_by("subject_id")
            .agg(prevalent=(pl.col("time") <= pl.col("prediction_time")).any(),
                 event_time=pl.col("time").filter(pl.col("time") > pl.col("prediction_time"))
                 .min())
        )
        task = (
            points.join(relative, on="subject_id", how="left")
            .filter(~pl.col("prevalent").fill_null(False))
            .with_columns(event=pl.col("event_time").is_not_null(),
                          end=pl.coalesce("event_time", "last_time"))
            .with_columns(time_to_event_days=days_between("prediction_time", "end"))
        )
        within = pl.col("event") & (pl.col("time_to_event_days") <= horizon_days)
        followed = pl.col("time_to_event_days") > horizon_days
        frames.append(task.select(
            outcome=pl.lit(outcome), subject_id="subject_id", prediction_time="prediction_time",
            time_to_event_days="time_to_event_days", event="event",
            boolean_value=pl.when(within).then(True).when(followed).then(False),
        ).cast(TASK_SCHEMA))
        log.info("evaluate: %s: %d subjects (%d prevalent left out), %d events, %d binary "
                 "labels", outcome, task.height, points.height - task.height,
                 int(task["event"].sum()), int(frames[-1]["boolean_value"].count()))
    return pl.concat(frames) if frames else pl.DataFrame(schema=TASK_SCHEMA)


def held_out_tasks(meds_dir: Path, outcomes: Mapping[str, Sequence[str]], *,
                   horizon_days: float, seed: int) -> pl.DataFrame:
    """The task table of `outcomes` (name → codes, see `outcome_matcher`) for the evaluation
    subjects (see the module docstring). InputError for a malformed outcome."""
    outcomes = check_outcomes(outcomes)  # fails before the data is read
    timelines = read_timelines(meds_dir, evaluation_subjects(meds_dir), outcomes)
    points = draw_prediction_times(timelines, seed)
    return outcome_tasks(points, timelines, list(outcomes), horizon_days)


def label_file_task(meds_dir: Path, labels_path: Path) -> pl.DataFrame:
    """A MEDS label parquet (subject_id, prediction_time, boolean_value) as one binary task.

    The task is named after the file's stem. Labels with a null value, of subjects absent from
    the data, or on or before the subject's birth day are dropped with a warning; of labels with
    the same subject and time only the first is kept.
    """
    labels_path = Path(labels_path)
    try:
        raw = pl.read_parquet(labels_path)
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise InputError(f"{labels_path}: cannot read the label parquet "
                         f"({' '.join(str(exc).split())})") from exc
    for column in ("subject_id", "prediction_time", "boolean_value"):
        if column not in raw.columns:
            raise InputError(f"{labels_path}: column {column!r} is missing; expected MEDS labels "
                             "(subject_id, prediction_time, boolean_value)")
    try:
        labels = raw.select(
            pl.col("subject_id").cast(pl.Int64), pl.col("prediction_time").cast(pl.Datetime("us")),
            pl.col("boolean_value").cast(pl.Boolean),
        ).drop_nulls()
    except pl.exceptions.PolarsError as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"{labels_path}: a column of the wrong type ({reason}); expected MEDS "
                         "labels (subject_id integer, prediction_time timestamp, boolean_value "
                         "boolean)") from exc
    birth = pl.concat([birth_days(events).collect() for events in
                       subject_events(meds_dir, labels["subject_id"].unique())])
    usable = labels.join(birth, on="subject_id").filter(
        pl.col("prediction_time") >= pl.col("birth_day") + pl.duration(days=1))
    usable = usable.sort("subject_id", "prediction_time", maintain_order=True).unique(
        ["subject_id", "prediction_time"], keep="first", maintain_order=True)
    if usable.height < raw.height:
        log.warning("evaluate: %s: %d of %d labels dropped (null, duplicate, unknown subject or "
                    "on/before the birth day)", labels_path, raw.height - usable.height,
                    raw.height)
    return usable.select(
        outcome=pl.lit(labels_path.stem), subject_id="subject_id",
        prediction_time="prediction_time", time_to_event_days=pl.lit(None, pl.Float64),
        event=pl.lit(None, pl.Boolean), boolean_value="boolean_value",
    ).cast(TASK_SCHEMA)
