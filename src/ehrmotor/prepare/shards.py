"""The per-shard work of `prepare`, run in worker processes (one MEDS data file per job).

Each function takes a picklable `ShardJob` and, as keywords (bound with `functools.partial`), the
paths of the artifacts it reads and the step's settings; it reads its shard lazily, keeps the
subjects it needs and returns small results for the reduce in `ehrmotor.prepare.steps`. Fitted
artifacts are loaded once per process.

A shard's training rows (`label_shard`, then `window_rows`), one per training window with
sampled points (windows: `ehrmotor.prepare.windows`; points and labels: `ehrmotor.prepare.labels`),
are the rows of the train/val datasets:

    subject_id      int64
    window          int32      0-based window of the subject
    first_events    int32      events of position 0 (its static and birth-day events)
    event_items     list<u16>  items of each event of the positions (position 0's events first,
                               then one event per later position)
    items           list<u16>  their items (vocabulary entries, `ehrmotor.prepare.bags`;
                               list<u32> when the vocabulary has more than 65536 entries); the
                               positions' bags and weights are expanded from them at collate
    times           list<i64>  position timestamps, µs since 1970 (position 0: birth)
    age_days        list<f32>  days since birth (drives the rotary encoding)
    age, log_age, log_delta  list<f32>  normalised time features
    points          list<i32>  window-local indices of the sampled prediction points
    censor_days     list<f32>  per point: days to the subject's last event
    task_ids        list<i32>  the task occurrences that label the points (each the next one
    task_times      list<i64>  of its task after at least one point): candidate task index
                               (`candidate_tasks`; `MotorTask.task_map` gives the model's task)
                               and time (µs), sorted by task and time

The (point, task, days) labels are derived from the last four columns when batches are collated
(`ehrmotor.batching`): a point's label of task k is its first occurrence of k after the point's
time, else censored.

Windows without sampled prediction points are skipped and counted. DATASET_FORMAT_VERSION is the
version of this layout, recorded in the datasets' manifests.

Each worker writes its shard's rows as an Arrow IPC stream, `data-XXXXX-of-NNNNN.arrow` in the
dataset folder (`write_shard_table`); the reduce (`finish_dataset`) only writes `dataset.json`,
the shard files in order, so the rows are written once and never read back by the driver: its
memory and time do not grow with the data. `load_prepared` memory-maps the files with
`datasets.Dataset.from_file` and concatenates them (torch format). The same input gives the same
files whatever the number of workers or the executor.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import polars as pl
import pyarrow as pa

from ehrmotor.config import TokenizerSettings, WindowSettings
from ehrmotor.errors import InputError
from ehrmotor.meds import scan_shard
from ehrmotor.prepare.bags import OLDER_LAYOUT, BagTable
from ehrmotor.prepare.labels import (
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
from ehrmotor.prepare.motor_task import TaskCounts, candidate_tasks, count_tasks
from ehrmotor.prepare.ontology import Ontology
from ehrmotor.prepare.positions import build_positions, concat_ranges, time_moments
from ehrmotor.prepare.split import read_split
from ehrmotor.prepare.tokenizer import ShardCounts, Tokenizer, count_bins, count_shard
from ehrmotor.prepare.windows import local_index, training_windows, window_sequences

if TYPE_CHECKING:
    import datasets

L = TypeVar("L")
DATASET_FORMAT_VERSION = 4
INDEX = "dataset.json"
ROW_SCHEMA = pa.schema([
    ("subject_id", pa.int64()), ("window", pa.int32()), ("first_events", pa.int32()),
    ("event_items", pa.list_(pa.uint16())), ("items", pa.list_(pa.uint16())),
    ("times", pa.list_(pa.int64())),
    ("age_days", pa.list_(pa.float32())), ("age", pa.list_(pa.float32())),
    ("log_age", pa.list_(pa.float32())), ("log_delta", pa.list_(pa.float32())),
    ("points", pa.list_(pa.int32())), ("censor_days", pa.list_(pa.float32())),
    ("task_ids", pa.list_(pa.int32())), ("task_times", pa.list_(pa.int64())),
])


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
    code_tasks: `labels.task_codes_of` the tasks; with the bag `table`, positions also hold
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
    candidates = candidate_tasks(tokenizer, spec.settings.num_tasks).select("code", "task")
    code_tasks = _once(("code_tasks", spec.ontology, spec.tokenizer, spec.settings.num_tasks),
                       partial(task_codes_of, ontology, candidates))
    table = _once(("bags", spec.tokenizer), partial(BagTable.load, spec.tokenizer))
    labelled = label_shard(events, tokenizer, ontology, code_tasks, spec.settings.max_window,
                           spec.settings.seed, table)
    windows = window_rows(labelled, spec.settings.max_window)
    rows = windows.rows
    write_shard_table(rows.to_arrow(), spec.output_dir / shard_file_name(job.index, job.shards),
                      row_schema(table.size))
    used = set(expanded_entries(rows["items"].explode().drop_nulls().unique().to_numpy(),
                                table).tolist())
    tasks = (count_tasks(labelled.points, labelled.runs, labelled.last_time, spec.settings.seed)
             if spec.task_statistics else None)
    return ShardDataset(rows.height, int(rows["points"].list.len().sum() or 0),
                        windows.windows_skipped, windows.subjects_skipped, used,
                        EventCounts.of(events), tasks)


def shard_file_name(index: int, count: int) -> str:
    """The data file the worker of shard `index` (of `count`) writes, in the dataset folder."""
    return f"data-{index:05d}-of-{count:05d}.arrow"


def row_schema(vocabulary: int) -> pa.Schema:
    """ROW_SCHEMA, its items u32 when u16 cannot number `vocabulary` entries."""
    if vocabulary <= 1 << 16:
        return ROW_SCHEMA
    return ROW_SCHEMA.set(ROW_SCHEMA.get_field_index("items"),
                          pa.field("items", pa.list_(pa.uint32())))


def expanded_entries(items: np.ndarray, table: BagTable) -> np.ndarray:
    """The distinct entries of the bag rows of `items` (the vocabulary entries they use)."""
    items = np.asarray(items, dtype=np.int64)
    starts = table.offsets[items]
    return np.unique(table.members[concat_ranges(starts, table.offsets[items + 1] - starts)])


def write_shard_table(table: pa.Table, path: Path, schema: pa.Schema = ROW_SCHEMA) -> None:
    """Write one shard's rows (any table castable to `schema`) as an Arrow IPC stream."""
    table = table.select(schema.names).cast(schema)
    path.parent.mkdir(parents=True, exist_ok=True)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        writer.write_table(table, max_chunksize=1024)


def finish_dataset(directory: Path, count: int) -> None:
    """Complete the dataset in `directory` from its `count` shard files: an index naming them in
    order (the rows are not read or copied again)."""
    files = [shard_file_name(i, count) for i in range(count)]
    missing = [name for name in files if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{directory}: shard files missing: {', '.join(missing[:3])}")
    (directory / INDEX).write_text(json.dumps({"format_version": DATASET_FORMAT_VERSION,
                                               "files": files}, indent=1) + "\n")


def load_prepared(path: Path) -> datasets.Dataset:
    """A prepared train/val dataset in torch format: its shard files memory-mapped
    (`datasets.Dataset.from_file`) and concatenated in shard order."""
    import datasets

    index = json.loads((path / INDEX).read_text())
    if index.get("format_version") != DATASET_FORMAT_VERSION:
        raise InputError(f"{path / INDEX}: format_version {index.get('format_version')!r}, "
                         f"expected {DATASET_FORMAT_VERSION}; {OLDER_LAYOUT}")
    with pa.ipc.open_stream(str(path / index["files"][0])) as reader:
        schema = reader.schema
    info = datasets.DatasetInfo(features=datasets.Features.from_arrow_schema(schema))
    parts = [datasets.Dataset.from_file(str(path / name), info=info) for name in index["files"]]
    return datasets.concatenate_datasets(parts, info=info).with_format("torch")
