"""Landmark time-to-event labels for outcomes: several prediction times per subject.

For each evaluation subject (`tasks.evaluation_subjects`), up to `landmarks` prediction times are
drawn, seeded, among its candidate times that lie at least one day after its birth day
(`tasks.birth_days`) and strictly before its last event, pairwise at least `min_gap_days` apart.
A candidate is a day with an event whose code starts with one of `landmark_codes` (default: any
event, so that any MEDS export works; `("Visit/",)` for visits of the synthetic data,
`("HOSPITAL_ADMISSION//",)` for admissions of a MIMIC-IV export), at the time of that day's last
such event: the prediction time is an event time, and the label may use everything up to and
including it (a later event the same day is future). The draw runs in `landmarks` rounds over
all subjects at once: each round takes, per subject, the remaining candidate with the smallest
random key, then drops that subject's candidates within `min_gap_days` of it.

Per outcome (a name and its codes, `tasks.outcome_matcher`), a landmark where the outcome already
happened (at or before the prediction time) is dropped; `event_time` is the outcome's first later
occurrence, else the label is censored at the subject's last event (`censor_time`; null when
there is an event). The result is one `LabelSet` of kind "time_to_event" per outcome, named after
it (see `ehrmotor.meds.labels` for the format). No label is an InputError of one line saying why
(no landmark-code event, none between birth and the last event, an outcome with no event in the
data, or every landmark prevalent); a label file is never written empty.
`write_landmark_labels` writes them, one parquet file per outcome, for `ehrmotor label`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl

from ehrmotor import __version__
from ehrmotor.artifacts import atomic_path, check_output, clean_stale_temporaries
from ehrmotor.errors import InputError, OutputError
from ehrmotor.evaluate.tasks import (
    DEFAULT_SPLITS,
    US_PER_DAY,
    Timelines,
    check_outcomes,
    evaluation_subjects,
    file_stem,
    read_timelines,
    subject_events,
)
from ehrmotor.meds.labels import LabelSet, write_label_set

log = logging.getLogger(__name__)

MARKER = "labels.json"  # what `write_landmark_labels` wrote, and that it wrote the folder
LANDMARK_SCHEMA = pl.Schema({"subject_id": pl.Int64(), "prediction_time": pl.Datetime("us"),
                             "last_time": pl.Datetime("us")})


@dataclass(frozen=True)
class LandmarkSettings:
    """How landmarks are drawn: at most `landmarks` per subject, `min_gap_days` apart, on days
    with an event whose code starts with one of `landmark_codes` (empty: any event); seeded by
    `seed`."""

    landmarks: int = 4
    min_gap_days: float = 180.0
    seed: int = 0
    landmark_codes: tuple[str, ...] = ()

    def check(self) -> None:
        """InputError naming the first setting that cannot work."""
        codes = self.landmark_codes
        if isinstance(codes, str) or not all(isinstance(c, str) and c for c in codes):
            raise InputError(f"landmark_codes must be a list of code prefixes such as "
                             f"['Visit/'], got {codes!r}")
        if self.landmarks < 1:
            raise InputError(f"landmarks must be at least 1, got {self.landmarks}")
        if not 0 <= self.min_gap_days < float("inf"):
            raise InputError(f"min_gap_days must be a number >= 0, got {self.min_gap_days}")
        if self.seed < 0:
            raise InputError(f"seed must be at least 0, got {self.seed}")


def draw_landmarks(timelines: Timelines, settings: LandmarkSettings) -> pl.DataFrame:
    """The landmarks of every subject (LANDMARK_SCHEMA), sorted; see the module docstring.

    Subjects without an eligible visit get none. Depends only on the data and the settings.
    """
    candidates = (
        timelines.landmark_times.join(timelines.subjects, on="subject_id")
        .filter((pl.col("time") >= pl.col("birth_day") + pl.duration(days=1))
                & (pl.col("time") < pl.col("last_time")))
        .select("subject_id", "time", "last_time")
        .sort("subject_id", "time")
    )
    keys = np.random.default_rng([settings.seed, 13]).random(candidates.height)
    candidates = candidates.with_columns(key=pl.Series(keys))
    gap_us = int(settings.min_gap_days * US_PER_DAY)
    chosen = []
    for _ in range(settings.landmarks):
        if candidates.is_empty():
            break
        picked = candidates.filter(pl.col("key") == pl.col("key").min().over("subject_id"))
        chosen.append(picked.select("subject_id", prediction_time="time", last_time="last_time"))
        distance = (pl.col("time") - pl.col("picked")).dt.total_microseconds().abs()
        candidates = (
            candidates.join(picked.select("subject_id", picked="time"), on="subject_id")
            .filter((pl.col("time") != pl.col("picked")) & (distance >= gap_us))
            .drop("picked")
        )
    if not chosen:
        return pl.DataFrame(schema=LANDMARK_SCHEMA)
    landmarks = pl.concat(chosen).cast(LANDMARK_SCHEMA).sort("subject_id", "prediction_time")
    left_out = timelines.subjects.height - landmarks["subject_id"].n_unique()
    if left_out:
        log.info("landmarks: %d of %d subjects have no landmark day between their birth day and "
                 "last event; left out", left_out, timelines.subjects.height)
    return landmarks


def outcome_label_set(landmarks: pl.DataFrame, outcome_events: pl.DataFrame,
                      name: str) -> LabelSet:
    """The time-to-event labels of one outcome at `landmarks` (LANDMARK_SCHEMA).

    `outcome_events`: subject_id, time of the outcome's events. Prevalent landmarks are dropped.
    """
    keys = ["subject_id", "prediction_time"]
    relative = (
        outcome_events.select("subject_id", "time")
        .join(landmarks.select(keys), on="subject_id")
        .group_by(keys)
        .agg(prevalent=(pl.col("time") <= pl.col("prediction_time")).any(),
             event_time=pl.col("time").filter(pl.col("time") > pl.col("prediction_time")).min())
    )
    frame = (
        landmarks.join(relative, on=keys, how="left")
        .filter(~pl.col("prevalent").fill_null(False))
        .select(*keys, event_time=pl.col("event_time").cast(pl.Datetime("us")),
                censor_time=pl.when(pl.col("event_time").is_null()).then(pl.col("last_time")))
        .sort(keys)
    )
    log.info("landmarks: %s: %d labels of %d subjects (%d prevalent landmarks dropped), "
             "%d events", name, frame.height, frame["subject_id"].n_unique(),
             landmarks.height - frame.height, frame["event_time"].count())
    return LabelSet(name=name, kind="time_to_event", frame=frame, files=())


def landmark_label_sets(meds_dir: Path, outcomes: Mapping[str, Sequence[str]],
                        settings: LandmarkSettings = LandmarkSettings(), *,
                        splits: Sequence[str] = DEFAULT_SPLITS,
                        splits_file: Path | None = None) -> list[LabelSet]:
    """One time-to-event `LabelSet` per outcome (name → codes) of the subjects of `splits` (of
    `splits_file`, default the MEDS one: `tasks.evaluation_subjects`).

    InputError for a malformed outcome or setting (before the data is read), for a dataset
    without the chosen splits, and when an outcome would get no label or has no event (one line
    saying why; see the module docstring).
    """
    settings.check()
    checked = check_outcomes(outcomes)
    meds_dir = Path(meds_dir)
    subjects = evaluation_subjects(meds_dir, splits, splits_file)
    timelines = read_timelines(meds_dir, subjects, checked, settings.landmark_codes)
    landmarks = draw_landmarks(timelines, settings)
    who = f"the {subjects.len()} evaluation subjects ({', '.join(splits)})"
    if landmarks.is_empty():
        raise InputError(_no_landmarks(meds_dir, timelines, settings, who, subjects))
    log.info("landmarks: %d prediction times of %d subjects (at most %d each, %g days apart)",
             landmarks.height, landmarks["subject_id"].n_unique(), settings.landmarks,
             settings.min_gap_days)
    label_sets = []
    for name, codes in checked.items():
        events = timelines.outcome_events.filter(pl.col("outcome") == name)
        if events.is_empty():
            raise InputError(
                f"outcome {name}: no event with code {', '.join(codes)} (or a code under it) "
                f"among {who}; expected a code of the data, whose codes start with "
                f"{_code_prefixes(meds_dir, subjects)}")
        label_set = outcome_label_set(landmarks, events, name)
        if label_set.frame.is_empty():
            raise InputError(
                f"outcome {name}: every one of the {landmarks.height} landmarks of "
                f"{landmarks['subject_id'].n_unique()} subjects is at or after an event of "
                f"{', '.join(codes)} (the subject already had the outcome); no label left: "
                "choose earlier landmark codes or another outcome")
        label_sets.append(label_set)
    return label_sets


def _no_landmarks(meds_dir: Path, timelines: Timelines, settings: LandmarkSettings, who: str,
                  subjects: pl.Series) -> str:
    """Why no landmark was drawn, in one line."""
    codes = ", ".join(settings.landmark_codes)
    if timelines.landmark_times.is_empty() and settings.landmark_codes:
        return (f"{meds_dir}: no event with a code starting with {codes} among {who}, so no "
                f"landmark; their codes start with {_code_prefixes(meds_dir, subjects)}: choose "
                "landmark codes (--landmark-codes) among them, or leave them out to use every "
                "day with an event")
    if timelines.landmark_times.is_empty():
        return f"{meds_dir}: {who} have no timed event, so no landmark"
    days = timelines.landmark_times.height
    return (f"{meds_dir}: none of the {days} landmark days ({codes or 'any event'}) of {who} "
            "falls after the day after the subject's birth day and before its last event, so "
            "no landmark")


def _code_prefixes(meds_dir: Path, subjects: pl.Series, shown: int = 8) -> str:
    """The code prefixes of `subjects`' events ("LAB//", "MEDS_BIRTH"), most subjects first."""
    prefix = pl.col("code").str.extract(r"^([^/]*/+)", 1).fill_null(pl.col("code"))
    parts = pl.collect_all([events.select("subject_id", prefix.alias("prefix")).unique()
                            for events in subject_events(meds_dir, subjects)])
    if not parts:
        return "(no event)"
    counts = (pl.concat(parts).group_by("prefix").len()
              .sort(["len", "prefix"], descending=[True, False]))
    names = counts["prefix"].head(shown).to_list()
    return ", ".join(names) + (" ..." if counts.height > shown else "") if names else "(no event)"


def write_landmark_labels(meds_dir: Path, out: Path, outcomes: Mapping[str, Sequence[str]],
                          settings: LandmarkSettings = LandmarkSettings(), *,
                          splits: Sequence[str] = DEFAULT_SPLITS,
                          splits_file: Path | None = None) -> list[Path]:
    """Write `out/<outcome>.parquet` (`write_label_set`) for each outcome, and `out/labels.json`
    (the outcomes' codes and the settings); return the label files.

    The folder is written whole to a temporary sibling and renamed into place. OutputError when
    `out` is a file, or a non-empty folder that this function did not write (no labels.json).
    """
    out = Path(out)
    check_output(out, "folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise OutputError(f"{out}: exists and is not a folder written by `ehrmotor label` (no "
                          f"{MARKER}); refusing to replace it (choose another --out)")
    names = [f"{file_stem(name)}.parquet" for name in outcomes]
    if len(set(names)) < len(names):
        raise InputError(f"outcomes {', '.join(outcomes)}: two of them share a file name")
    label_sets = landmark_label_sets(meds_dir, outcomes, settings, splits=splits,
                                     splits_file=splits_file)
    record = {"written_by": "ehrmotor label", "ehrmotor_version": __version__,
              "meds": str(Path(meds_dir).absolute()), "splits": list(splits),
              "splits_file": str(Path(splits_file).absolute()) if splits_file else None,
              "outcomes": {name: list(codes) for name, codes in outcomes.items()},
              "files": dict(zip(outcomes, names, strict=True)), **asdict(settings)}
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(out.parent)
    with atomic_path(out, replace_folder=True) as tmp:
        tmp.mkdir()
        for label_set, name in zip(label_sets, names, strict=True):
            write_label_set(label_set, tmp / name)
        (tmp / MARKER).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return [out / name for name in names]
