"""The per-shard work of `prepare`, run in worker processes (one MEDS data file per job).

Each function takes a picklable `ShardJob`, reads its shard lazily, keeps the subjects it needs and
returns small results for the reduce in `ehrmotor.prepare`. Fitted artifacts are loaded from the
work folder once per process.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ehrmotor.config import PrepareConfig
from ehrmotor.meds import scan_shard
from ehrmotor.prepare.datasets import shard_file_name, write_shard_table
from ehrmotor.prepare.examples import label_shard, window_rows
from ehrmotor.prepare.motor_task import MotorTask, TaskCounts, candidate_tasks, count_tasks
from ehrmotor.prepare.ontology import Ontology
from ehrmotor.prepare.positions import count_before_birth, time_moments
from ehrmotor.prepare.split import read_split
from ehrmotor.prepare.tokenizer import ShardCounts, Tokenizer, count_bins, count_shard


@dataclass(frozen=True)
class ShardJob:
    path: Path
    meds_dir: Path
    work: Path  # WORK/pretraining_files
    excluded: np.ndarray  # subject ids never used for pretraining
    config: PrepareConfig
    index: int = 0
    shards: int = 1
    split_name: str = "train"
    edges: dict[str, list[float]] = field(default_factory=dict)
    output_dir: Path | None = None

    def with_edges(self, edges: dict[str, list[float]]) -> ShardJob:
        return dataclasses.replace(self, edges=edges)

    def for_split(self, split_name: str, output_dir: Path | None = None) -> ShardJob:
        return dataclasses.replace(self, split_name=split_name, output_dir=output_dir)


_CACHE: dict[tuple[str, Path], Any] = {}


def _cached(kind: str, path: Path, load: Any) -> Any:
    key = (kind, path)
    if key not in _CACHE:
        _CACHE[key] = load(path)
    return _CACHE[key]


def _events(job: ShardJob, split_name: str | None) -> pl.DataFrame:
    """The shard's events of pretraining subjects (of one split of split.csv when given)."""
    events = scan_shard(job.path)
    if split_name is None:
        events = events.filter(~pl.col("subject_id").is_in(pl.Series(job.excluded).implode()))
    else:
        split = _cached("split", job.work / "split.csv", read_split)
        wanted = split.filter(pl.col("split_name") == split_name).select("subject_id")
        events = events.join(wanted.lazy(), on="subject_id", how="semi")
    return events.collect()


def shard_codes(job: ShardJob) -> pl.DataFrame:
    """Distinct codes of the shard (all subjects: held-out ones are embedded later)."""
    return scan_shard(job.path).select("code").unique().collect()


def shard_subjects(job: ShardJob) -> pl.DataFrame:
    return _events(job, None).select("subject_id").unique()


def shard_tokenizer_counts(job: ShardJob) -> tuple[ShardCounts, np.ndarray]:
    events = _events(job, "train")
    ontology = _cached("ontology", job.work / "ontology", Ontology.load)
    counts = count_shard(events.lazy(), ontology, job.config.numeric_sample_size, job.config.seed)
    return counts, time_moments(events)


def shard_tokenizer_bins(job: ShardJob) -> pl.DataFrame:
    return count_bins(_events(job, "train").lazy(), job.edges)


def _label(job: ShardJob, split_name: str, task_codes: pl.DataFrame
           ) -> tuple[Any, pl.DataFrame]:
    events = _events(job, split_name)
    tokenizer = _cached("tokenizer", job.work / "tokenizer", Tokenizer.load)
    ontology = _cached("ontology", job.work / "ontology", Ontology.load)
    return label_shard(events, tokenizer, ontology, task_codes, job.config.max_window,
                       job.config.seed), events


def shard_task_counts(job: ShardJob) -> TaskCounts:
    tokenizer = _cached("tokenizer", job.work / "tokenizer", Tokenizer.load)
    candidates = candidate_tasks(tokenizer, job.config.num_tasks)
    labelled, _ = _label(job, "train", candidates.select("code", "task"))
    return count_tasks(labelled.censoring, labelled.pairs, job.config.seed)


@dataclass(frozen=True)
class ShardDataset:
    windows: int
    points: int
    events: int
    skipped_windows: int
    skipped_subjects: int
    entries_used: set[int]
    subjects_born_late: int  # subjects with timed events before their MEDS_BIRTH event
    events_before_birth: int  # those events, folded into position 0


def shard_dataset(job: ShardJob) -> ShardDataset:
    """Write the shard's window rows for `job.split_name` to `job.output_dir`."""
    if job.output_dir is None:
        raise ValueError("shard_dataset needs job.output_dir")
    task = _cached("task", job.work / "motor_task.json", MotorTask.load)
    labelled, events = _label(job, job.split_name, task.task_codes())
    windows = window_rows(labelled, job.config.max_window)
    rows = windows.rows
    write_shard_table(rows.to_arrow(), job.output_dir / shard_file_name(job.index, job.shards))
    used = set(rows["entries"].explode().unique().to_list()) if rows.height else set()
    born_late, before_birth = count_before_birth(events)
    return ShardDataset(rows.height, int(rows["points"].list.len().sum() or 0), events.height,
                        windows.windows_skipped, windows.subjects_skipped, used, born_late,
                        before_birth)
