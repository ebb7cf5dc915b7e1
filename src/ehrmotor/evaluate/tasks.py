"""Downstream tasks for `ehrmotor.evaluate`: who is evaluated, and on which labels.

Evaluation subjects are those of the chosen splits of `metadata/subject_splits.parquet`, or of
another MEDS split file (the one `prepare --held-out-fraction` wrote) (`held_out` and `tuning` by
default; never `train`, which pretraining saw). Their events are read
one shard at a time (`subject_events`); `read_timelines` gathers what landmark labels need
(`ehrmotor.evaluate.landmarks`), and the count features (`ehrmotor.evaluate.counts`) share
`birth_days`.

A `Task` is one label set made ready for the protocol (`tasks_from_label_sets`): labels of
evaluation subjects only, on or after the day after the subject's birth day (the embeddings
refuse earlier ones); each label set is checked first (`ehrmotor.meds.labels.check_label_set`:
time-to-event rules, one row per (subject_id, prediction_time)). Its `labels` frame:

    subject_id       Int64
    prediction_time  Datetime(us)
    time_days        Float64   time_to_event: days to the event or to censoring
    event            Boolean   time_to_event: the event was observed
    label            Boolean   binary: the label (a MEDS boolean_value)
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from ehrmotor.errors import InputError
from ehrmotor.meds import data_files, read_splits_file, scan_shard
from ehrmotor.meds.labels import LabelSet, check_label_set, time_to_event_days
from ehrmotor.meds.read import (
    BIRTH_CODE,
    SPLITS_FILE,
    US_PER_DAY,
    subjects_in_several_splits,
)

log = logging.getLogger(__name__)

DEFAULT_SPLITS = ("held_out", "tuning")
PRETRAINING_SPLIT = "train"
TIME_TO_EVENT, BINARY = "time_to_event", "binary"
UNSUPPORTED_KINDS = ("integer", "float", "categorical")


def file_stem(name: str) -> str:
    """A task or outcome name as a file name: characters other than letters, digits, '.', '-'
    and '_' become '_' (ICD10CM/I50 -> ICD10CM_I50)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "_"


def outcome_matcher(codes: Sequence[str]) -> pl.Expr:
    """Boolean expression on `code` marking the events of an outcome given by its `codes`.

    An event matches a code when its code is that code or lies under it in the code's own
    notation: `ICD10CM/I50` matches `ICD10CM/I50`, `ICD10CM/I50.9` and `ICD10CM/I50/x` (not
    `ICD10CM/I509`); `MEDS_DEATH` matches itself; `HOSPITAL_ADMISSION` matches
    `HOSPITAL_ADMISSION//ICU`; a code ending in "/" (`HOSPITAL_ADMISSION//`) is a prefix.
    """
    under = [pl.col("code").str.starts_with(code if code.endswith("/") else f"{code}{sep}")
             for code in codes for sep in (".", "/")]
    return pl.any_horizontal(pl.col("code").is_in(list(codes)), *under)


def landmark_matcher(prefixes: Sequence[str]) -> pl.Expr:
    """Boolean expression on `code`: events whose code starts with one of `prefixes`; every
    event when there is none."""
    if not prefixes:
        return pl.lit(True)
    return pl.any_horizontal(*[pl.col("code").str.starts_with(prefix) for prefix in prefixes])


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
    """What task building needs from the data: per subject, its landmark days and outcome
    events."""

    subjects: pl.DataFrame  # subject_id, birth_day, last_time
    landmark_times: pl.DataFrame  # subject_id, time: per day, its last landmark-code event
    outcome_events: pl.DataFrame  # outcome, subject_id, time


def read_timelines(meds_dir: Path, subject_ids: pl.Series,
                   outcomes: Mapping[str, Sequence[str]],
                   landmark_codes: Sequence[str] = ()) -> Timelines:
    """Birth days, last event times, landmark times and outcome event times (`outcomes`: name →
    codes) of `subject_ids`. Landmark times: on each day with an event whose code starts with
    one of `landmark_codes` (any event when empty), the last such event's time."""
    subjects, visits, outcome_events = [], [], []
    for events in subject_events(meds_dir, subject_ids):
        timed = events.filter(pl.col("time").is_not_null())
        parts = [
            birth_days(events),
            timed.filter(landmark_matcher(landmark_codes))
            .group_by("subject_id", pl.col("time").dt.truncate("1d").alias("day"))
            .agg(pl.col("time").max()).select("subject_id", "time"),
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


def evaluation_subjects(meds_dir: Path, splits: Sequence[str] = DEFAULT_SPLITS,
                        splits_file: Path | None = None) -> pl.Series:
    """Subject ids of the `splits` of `splits_file` (default metadata/subject_splits.parquet of
    `meds_dir`), sorted.

    InputError when `splits` is empty or names `train`, when the file is missing, lists a
    subject under two splits, or holds no subject in `splits`.
    """
    if not splits or PRETRAINING_SPLIT in splits:
        raise InputError(f"evaluation splits {list(splits)}: choose among held_out and tuning "
                         "(the train split is what pretraining saw)")
    path = Path(splits_file) if splits_file is not None else Path(meds_dir) / SPLITS_FILE
    if not path.is_file():
        hint = ("" if splits_file is not None else "; give --splits-file (e.g. "
                "WORK/subject_splits.parquet of `ehrmotor prepare --held-out-fraction`)")
        raise InputError(f"{path}: not found; evaluation needs its {' and '.join(splits)} "
                         f"subjects{hint}")
    table = read_splits_file(path)
    several = subjects_in_several_splits(table)
    if several.height:  # a held-out subject may also have been pretrained on
        raise InputError(f"{path}: subject {several['subject_id'][0]} is listed under "
                         f"{', '.join(several['splits'][0])} ({several.height} subject(s) under "
                         "more than one split); expected each subject in exactly one split")
    ids = table.filter(pl.col("split").is_in(list(splits)))["subject_id"].unique().sort()
    if ids.is_empty():
        found = ", ".join(sorted(table["split"].drop_nulls().unique().to_list())) or "none"
        raise InputError(f"{path}: has no subject in {', '.join(splits)} (splits found: "
                         f"{found})")
    return ids


@dataclass(frozen=True)
class Task:
    """One label set ready for the protocol; see the module docstring for `labels`."""

    name: str
    kind: str  # TIME_TO_EVENT or BINARY
    labels: pl.DataFrame
    from_outcome: bool  # landmark labels of an outcome (the oracle may know its hazard)

    @property
    def target(self) -> str:
        """The column the test set's events (or positives) are counted in."""
        return "event" if self.kind == TIME_TO_EVENT else "label"


def check_label_kinds(label_sets: Sequence[LabelSet]) -> None:
    """InputError for a label set of a kind the protocol does not evaluate yet."""
    for label_set in label_sets:
        if label_set.kind in UNSUPPORTED_KINDS:
            where = ", ".join(str(f) for f in label_set.files) or label_set.name
            raise InputError(f"{where}: {label_set.kind} labels are not evaluated yet; give "
                             "boolean_value or time-to-event labels")


def tasks_from_label_sets(meds_dir: Path, label_sets: Sequence[LabelSet], subjects: pl.Series,
                          from_outcomes: bool) -> list[Task]:
    """The `Task` of each label set, restricted to `subjects` (see the module docstring).

    InputError for a label set that breaks a label rule (`check_label_set`: a repeated
    (subject_id, prediction_time) included). Labels left out (other subjects, too early) are
    counted in a log line.
    """
    check_label_kinds(label_sets)
    for label_set in label_sets:
        check_label_set(label_set)
    if not label_sets:
        return []
    labelled = pl.concat([ls.frame.select("subject_id") for ls in label_sets])["subject_id"]
    wanted = labelled.unique().sort()
    wanted = wanted.filter(wanted.is_in(subjects.implode()))
    births = [birth_days(events).collect() for events in subject_events(meds_dir, wanted)]
    birth = pl.concat(births) if births else pl.DataFrame(
        schema={"subject_id": pl.Int64(), "birth_day": pl.Datetime("us"),
                "last_time": pl.Datetime("us")})
    tasks = []
    for label_set in label_sets:
        frame = label_set.frame
        if label_set.kind == TIME_TO_EVENT:
            frame = time_to_event_days(frame).select(
                "subject_id", "prediction_time", "time_days", "event")
        else:
            frame = frame.select("subject_id", "prediction_time", label="boolean_value")
        usable = (
            frame.drop_nulls()
            .join(birth.select("subject_id", "birth_day"), on="subject_id")
            .filter(pl.col("prediction_time") >= pl.col("birth_day") + pl.duration(days=1))
            .drop("birth_day")
            .sort("subject_id", "prediction_time")
        )
        if usable.height < frame.height:
            log.info("evaluate: %s: %d of %d labels left out (a subject outside the "
                     "evaluation splits, or on or before the birth day)",
                     label_set.name, frame.height - usable.height, frame.height)
        kind = TIME_TO_EVENT if label_set.kind == TIME_TO_EVENT else BINARY
        tasks.append(Task(label_set.name, kind, usable, from_outcomes))
    return tasks
