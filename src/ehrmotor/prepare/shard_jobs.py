"""The per-shard work of `prepare`, run in worker processes (one MEDS data file per job).

Each function takes a picklable `ShardJob` and, as keywords (bound with `functools.partial`), the
paths of the artifacts it reads and the step's settings; it reads its shard lazily, keeps the
subjects it needs and returns small results for the reduce in `ehrmotor.prepare.steps`. Fitted
artifacts are loaded once per process.

A shard's training rows (`label_shard`, then `window_rows`), one per training window with
sampled points (windows: `ehrmotor.sequences.windows`; points and labels:
`ehrmotor.motor_task.occurrences`), are the rows of the train/val datasets, in the layout of
`ehrmotor.sequences.shards`; `shard_dataset` writes them there. Windows without sampled prediction
points are skipped and counted.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import polars as pl

from ehrmotor.config import TokenizerSettings, WindowSettings
from ehrmotor.meds import scan_shard
from ehrmotor.motor_task.occurrences import (
    EventCounts,
    ShardLabels,
    censor_days,
    last_event_times,
    occurrence_runs,
    prediction_points,
    sample_points,
    task_codes_of,
    task_events,
    window_occurrences,
)
from ehrmotor.motor_task.tasks import TaskCounts, candidate_tasks, count_tasks
from ehrmotor.prepare.split import read_split
from ehrmotor.sequences.positions import build_positions, time_moments
from ehrmotor.sequences.shards import (
    expanded_entries,
    row_schema,
    shard_file_name,
    write_shard_table,
)
from ehrmotor.sequences.windows import local_index, training_windows, window_sequences
from ehrmotor.vocabulary.bags import BagTable
from ehrmotor.vocabulary.ontology import Ontology
from ehrmotor.vocabulary.tokenizer import ShardCounts, Tokenizer, count_bins, count_shard

L = TypeVar("L")


@dataclass(frozen=True)
class ShardJob:
    """One MEDS data file, the `index`-th of `shards`."""

    path: Path
    index: int = 0
    shards: int = 1


_MADE: dict[Hashable, Any] = {}


def _once(key: Hashable, make: Callable[[], L]) -> L:
    """`make()`, once per process for each `key`."""
    if key not in _MADE:
        _MADE[key] = make()
    made: L = _MADE[key]
    return made


def _load(path: Path, load: Callable[[Path], L]) -> L:
    """`load(path)`, once per process."""
    return _once(path, partial(load, path))


def _events(job: ShardJob, split: Path, split_name: str) -> pl.DataFrame:
    """The shard's events of the subjects of one split of `split` (split.csv)."""
    wanted = _load(split, read_split).filter(pl.col("split_name") == split_name)
    return scan_shard(job.path).join(wanted.lazy().select("subject_id"), on="subject_id",
                                     how="semi").collect()


def shard_codes(job: ShardJob) -> pl.DataFrame:
    """Distinct codes of the shard (all subjects: held-out ones are embedded later)."""
    return scan_shard(job.path).select("code").unique().collect()


def shard_subjects(job: ShardJob, *, excluded: np.ndarray) -> pl.DataFrame:
    """Distinct subjects of the shard, but the `excluded` ones (never used for pretraining)."""
    return (scan_shard(job.path).select("subject_id")
            .filter(~pl.col("subject_id").is_in(pl.Series(excluded).implode()))
            .unique().collect())


def shard_tokenizer_counts(job: ShardJob, *, split: Path, ontology: Path,
                           settings: TokenizerSettings) -> tuple[ShardCounts, np.ndarray]:
    events = _events(job, split, "train")
    counts = count_shard(events.lazy(), _load(ontology, Ontology.load),
                         settings.numeric_sample_size, settings.seed)
    return counts, time_moments(events)


def shard_tokenizer_bins(job: ShardJob, *, split: Path,
                         edges: dict[str, list[float]]) -> pl.DataFrame:
    return count_bins(_events(job, split, "train").lazy(), edges)


def label_shard(events: pl.DataFrame, tokenizer: Tokenizer, ontology: Ontology,
                code_tasks: pl.DataFrame, max_window: int, seed: int,
                table: BagTable | None = None) -> ShardLabels:
    """Positions, sampled prediction points and their labels for the subjects in `events`;
    code_tasks: `occurrences.task_codes_of` the tasks; with the bag `table`, positions also hold
    their events' items (`build_positions`)."""
    positions = build_positions(events, tokenizer, ontology, table)
    last_time = last_event_times(events)
    points = sample_points(prediction_points(positions, last_time), positions, max_window, seed)
    points = points.with_columns(censor_days=censor_days(points, last_time))
    runs = occurrence_runs(points, task_events(events, code_tasks))
    return ShardLabels(positions, points, runs, last_time)


@dataclass(frozen=True)
class ShardWindows:
    rows: pl.DataFrame
    windows_skipped: int
    subjects_skipped: int


def window_rows(labelled: ShardLabels, max_window: int) -> ShardWindows:
    """One row per (subject, window) with sampled points, in the layout of the module docstring."""
    windows = training_windows(labelled.positions, max_window)
    points = labelled.points.join(
        windows.select("subject_id", "window", "start"), on=["subject_id", "window"],
        how="left", maintain_order="left").with_columns(local=local_index())
    point_lists = points.group_by("subject_id", "window", maintain_order=True).agg(
        points=pl.col("local"), censor_days=pl.col("censor_days"))
    occurrence_lists = window_occurrences(labelled.runs, points["window"]).group_by(
        "subject_id", "window", maintain_order=True).agg(task_ids="task", task_times="time")
    kept = windows.join(point_lists.select("subject_id", "window"), on=["subject_id", "window"],
                        how="semi", maintain_order="left")
    rows = (
        window_sequences(labelled.positions, kept)
        .join(point_lists, on=["subject_id", "window"], how="inner")
        .join(occurrence_lists, on=["subject_id", "window"], how="left")
        .with_columns([pl.col(c).fill_null(pl.lit([], dtype=dtype)) for c, dtype in (
            ("task_ids", pl.List(pl.Int32)), ("task_times", pl.List(pl.Int64)))])
        .sort("subject_id", "window")
    )
    subjects = labelled.positions["subject_id"].n_unique()
    return ShardWindows(rows=rows, windows_skipped=windows.height - rows.height,
                        subjects_skipped=subjects - rows["subject_id"].n_unique())


@dataclass(frozen=True)
class DatasetSpec:
    """What `shard_dataset` needs besides its shard: the split, where to write, the artifacts."""

    split_name: str
    output_dir: Path  # the dataset's temporary folder
    settings: WindowSettings
    split: Path
    ontology: Path
    tokenizer: Path
    task_statistics: bool = False  # also count the candidate tasks (the train split's)


@dataclass(frozen=True)
class ShardDataset:
    windows: int
    points: int
    skipped_windows: int
    skipped_subjects: int
    entries_used: set[int]
    events: EventCounts
    tasks: TaskCounts | None  # the candidate tasks' statistics, when the spec asks for them


def shard_dataset(job: ShardJob, *, spec: DatasetSpec) -> ShardDataset:
    """Write the shard's window rows of `spec.split_name` into `spec.output_dir` (task ids:
    the candidate tasks, `candidate_tasks`) and return its statistics."""
    events = _events(job, spec.split, spec.split_name)
    tokenizer = _load(spec.tokenizer, Tokenizer.load)
    ontology = _load(spec.ontology, Ontology.load)
    candidates = candidate_tasks(tokenizer, spec.settings.candidate_tasks).select("code", "task")
    code_tasks = _once(("code_tasks", spec.ontology, spec.tokenizer, spec.settings.candidate_tasks),
                       partial(task_codes_of, ontology, candidates))
    table = _once(("bags", spec.tokenizer), partial(BagTable.load, spec.tokenizer))
    labelled = label_shard(events, tokenizer, ontology, code_tasks, spec.settings.max_window,
                           spec.settings.seed, table)
    windows = window_rows(labelled, spec.settings.max_window)
    rows = windows.rows
    write_shard_table(rows.to_arrow(), spec.output_dir / shard_file_name(job.index, job.shards),
                      row_schema(table.size, candidates.height))
    used = set(expanded_entries(rows["items"].explode().drop_nulls().unique().to_numpy(),
                                table).tolist())
    tasks = (count_tasks(labelled.points, labelled.runs, labelled.last_time, spec.settings.seed)
             if spec.task_statistics else None)
    return ShardDataset(rows.height, int(rows["points"].list.len().sum() or 0),
                        windows.windows_skipped, windows.subjects_skipped, used,
                        EventCounts.of(events), tasks)
