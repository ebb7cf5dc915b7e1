"""The per-shard work of `prepare`, run in worker processes (one MEDS data file per job).

Each function takes a picklable `ShardJob` and, as keywords (bound with `functools.partial`), the
paths of the artifacts it reads and the step's settings; it reads its shard lazily, keeps the
subjects it needs and returns small results for the reduce in `ehrmotor.prepare.steps`. Fitted
artifacts are loaded once per process.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import polars as pl

from ehrmotor.config import TaskSettings, TokenizerSettings, WindowSettings
from ehrmotor.meds import scan_shard
from ehrmotor.prepare import label_cache
from ehrmotor.prepare.datasets import shard_file_name, write_shard_table
from ehrmotor.prepare.examples import ShardLabels, label_shard, window_rows
from ehrmotor.prepare.label_cache import EventCounts
from ehrmotor.prepare.motor_task import MotorTask, TaskCounts, candidate_tasks, count_tasks
from ehrmotor.prepare.ontology import Ontology
from ehrmotor.prepare.positions import time_moments
from ehrmotor.prepare.split import read_split
from ehrmotor.prepare.tokenizer import ShardCounts, Tokenizer, count_bins, count_shard

L = TypeVar("L")


@dataclass(frozen=True)
class ShardJob:
    """One MEDS data file, the `index`-th of `shards`."""

    path: Path
    index: int = 0
    shards: int = 1


_LOADED: dict[Path, Any] = {}


def _load(path: Path, load: Callable[[Path], L]) -> L:
    """`load(path)`, once per process."""
    if path not in _LOADED:
        _LOADED[path] = load(path)
    loaded: L = _LOADED[path]
    return loaded


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


def _label(events: pl.DataFrame, ontology: Path, tokenizer: Path, task_codes: pl.DataFrame,
           max_window: int, seed: int) -> ShardLabels:
    return label_shard(events, _load(tokenizer, Tokenizer.load), _load(ontology, Ontology.load),
                       task_codes, max_window, seed)


def shard_task_labels(job: ShardJob, *, split: Path, ontology: Path, tokenizer: Path,
                      settings: TaskSettings, cache: Path) -> TaskCounts:
    """Label the shard's train subjects for the candidate tasks; write the labels to the
    `label_cache` folder `cache` and return their task statistics."""
    events = _events(job, split, "train")
    candidates = candidate_tasks(_load(tokenizer, Tokenizer.load), settings.num_tasks)
    labelled = _label(events, ontology, tokenizer, candidates.select("code", "task"),
                      settings.max_window, settings.seed)
    label_cache.write_shard(label_cache.shard_folder(cache, job.index, job.shards), labelled,
                            EventCounts.of(events))
    return count_tasks(labelled.censoring, labelled.pairs, settings.seed)


@dataclass(frozen=True)
class DatasetSpec:
    """What `shard_dataset` needs besides its shard: the split, where to write, the artifacts."""

    split_name: str
    output_dir: Path  # the dataset's temporary folder
    settings: WindowSettings
    split: Path
    ontology: Path
    tokenizer: Path
    task: Path
    labels: Path | None = None  # a current `label_cache` of this split's subjects
    renumbered: pl.DataFrame | None = None  # its `label_cache.renumbering`


@dataclass(frozen=True)
class ShardDataset:
    windows: int
    points: int
    skipped_windows: int
    skipped_subjects: int
    entries_used: set[int]
    events: EventCounts


def _labelled(job: ShardJob, spec: DatasetSpec) -> tuple[ShardLabels, EventCounts]:
    """The shard's labels for the kept tasks: from the label cache when there is one."""
    if spec.labels is not None and spec.renumbered is not None:
        return label_cache.read_shard(
            label_cache.shard_folder(spec.labels, job.index, job.shards), spec.renumbered)
    events = _events(job, spec.split, spec.split_name)
    task = _load(spec.task, MotorTask.load)
    labelled = _label(events, spec.ontology, spec.tokenizer, task.task_codes(),
                      spec.settings.max_window, spec.settings.seed)
    return labelled, EventCounts.of(events)


def shard_dataset(job: ShardJob, *, spec: DatasetSpec) -> ShardDataset:
    """Write the shard's window rows of `spec.split_name` into `spec.output_dir`."""
    labelled, counts = _labelled(job, spec)
    windows = window_rows(labelled, spec.settings.max_window)
    rows = windows.rows
    write_shard_table(rows.to_arrow(), spec.output_dir / shard_file_name(job.index, job.shards))
    used = set(rows["entries"].explode().unique().to_list()) if rows.height else set()
    return ShardDataset(rows.height, int(rows["points"].list.len().sum() or 0),
                        windows.windows_skipped, windows.subjects_skipped, used, counts)
