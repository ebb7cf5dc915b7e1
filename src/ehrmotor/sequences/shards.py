"""The prepared datasets' rows (train_batches/, val_batches/): their layout, files and loading.

One row per training window with sampled points (written by `prepare`'s per-shard work,
`ehrmotor.prepare.shard_jobs`; windows: `ehrmotor.sequences.windows`; points and labels:
`ehrmotor.motor_task.occurrences`):

    subject_id      int64
    window          int32      0-based window of the subject
    first_events    int32      events of position 0 (its static and birth-day events)
    previous_time   int64      µs time of the subject's position before the window's first later
                               position (position 0's time in window 0)
    event_items     list<u16>  items of each event of the positions (position 0's events first,
                               then one event per later position)
    items           list<u16>  their items (vocabulary entries, `ehrmotor.vocabulary.bags`;
                               list<u32> when the vocabulary has more than 65536 entries); the
                               positions' bags and weights are expanded from them at collate
    times           list<i64>  position timestamps, µs since 1970 (position 0: birth); the age
                               and time features are computed from them at collate
                               (`ehrmotor.sequences.time_features`, statistics in the bag table)
    points          list<i32>  window-local indices of the sampled prediction points
    censor_days     list<f32>  per point: days to the subject's last event
    task_ids        list<u16>  the task occurrences that label the points (each the next one
    task_times      list<i64>  of its task after at least one point): candidate task index
                               (`candidate_tasks`; `MotorTask.task_map` gives the model's task;
                               list<u32> beyond 65536 candidates) and time (µs), sorted by task
                               and time

The (point, task, days) labels are derived from the last four columns when batches are collated
(`ehrmotor.sequences.batching`): a point's label of task k is its first occurrence of k after
the point's time, else censored.

DATASET_FORMAT_VERSION is the version of this layout, recorded in the datasets' manifests.

Each worker writes its shard's rows as an Arrow IPC stream, `data-XXXXX-of-NNNNN.arrow` in the
dataset folder (`write_shard_table`); the reduce (`finish_dataset`) only writes `dataset.json`,
the shard files in order, so the rows are written once and never read back by the driver: its
memory and time do not grow with the data. `load_prepared` memory-maps the files with
`datasets.Dataset.from_file` and concatenates them (torch format). The same input gives the same
files whatever the number of workers or the executor.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from ehrmotor.errors import InputError
from ehrmotor.sequences.positions import concat_ranges
from ehrmotor.vocabulary.bags import OLDER_LAYOUT, BagTable

if TYPE_CHECKING:
    import datasets

DATASET_FORMAT_VERSION = 5
INDEX = "dataset.json"
ROW_SCHEMA = pa.schema([
    ("subject_id", pa.int64()), ("window", pa.int32()), ("first_events", pa.int32()),
    ("previous_time", pa.int64()),
    ("event_items", pa.list_(pa.uint16())), ("items", pa.list_(pa.uint16())),
    ("times", pa.list_(pa.int64())),
    ("points", pa.list_(pa.int32())), ("censor_days", pa.list_(pa.float32())),
    ("task_ids", pa.list_(pa.uint16())), ("task_times", pa.list_(pa.int64())),
])
WIDE = pa.list_(pa.uint32())


def shard_file_name(index: int, count: int) -> str:
    """The data file the worker of shard `index` (of `count`) writes, in the dataset folder."""
    return f"data-{index:05d}-of-{count:05d}.arrow"


def row_schema(vocabulary: int, tasks: int) -> pa.Schema:
    """ROW_SCHEMA, its items (task ids) u32 when u16 cannot number `vocabulary` entries (`tasks`
    candidate tasks)."""
    schema = ROW_SCHEMA
    for name, count in (("items", vocabulary), ("task_ids", tasks)):
        if count > 1 << 16:
            schema = schema.set(schema.get_field_index(name), pa.field(name, WIDE))
    return schema


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
