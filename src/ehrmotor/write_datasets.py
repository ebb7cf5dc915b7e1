"""Write prepared windows as a Hugging Face dataset on disk, one Arrow file per MEDS shard.

Workers write their shard's rows straight into the dataset folder as `data-XXXXX-of-NNNNN.arrow`
(Arrow IPC streams, the files `Dataset.save_to_disk` makes); the reduce writes `state.json` and
`dataset_info.json`. Memory stays bounded by one shard, and the fingerprint is a hash of the
files' bytes, so the same input gives the same folder. `datasets.load_from_disk` reads it back in
torch format.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import datasets
import pyarrow as pa

ROW_SCHEMA = pa.schema([
    ("subject_id", pa.int64()), ("window", pa.int32()),
    ("bag_sizes", pa.list_(pa.int32())), ("entries", pa.list_(pa.uint32())),
    ("weights", pa.list_(pa.float32())), ("times", pa.list_(pa.int64())),
    ("age_days", pa.list_(pa.float32())), ("age", pa.list_(pa.float32())),
    ("log_age", pa.list_(pa.float32())), ("log_delta", pa.list_(pa.float32())),
    ("points", pa.list_(pa.int32())), ("censor_days", pa.list_(pa.float32())),
    ("label_point", pa.list_(pa.int32())), ("label_task", pa.list_(pa.int32())),
    ("label_days", pa.list_(pa.float32())),
])


def shard_file_name(index: int, count: int) -> str:
    return f"data-{index:05d}-of-{count:05d}.arrow"


def write_shard_table(table: pa.Table, path: Path) -> None:
    """Write one shard's rows (any table castable to ROW_SCHEMA) as an Arrow IPC stream."""
    table = table.select(ROW_SCHEMA.names).cast(ROW_SCHEMA)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, ROW_SCHEMA) as writer:
        writer.write_table(table, max_chunksize=1024)


def finish_dataset(directory: Path, count: int) -> None:
    """Write the metadata that makes `directory`'s shard files one dataset (torch format)."""
    names = [shard_file_name(i, count) for i in range(count)]
    digest = hashlib.sha256()
    for name in names:
        digest.update((directory / name).read_bytes())
    state: dict[str, object] = {
        "_data_files": [{"filename": name} for name in names],
        "_fingerprint": digest.hexdigest()[:16],
        "_format_columns": None, "_format_kwargs": {}, "_format_type": "torch",
        "_output_all_columns": False, "_split": None,
    }
    (directory / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    info = datasets.DatasetInfo(features=datasets.Features.from_arrow_schema(ROW_SCHEMA))
    info.write_to_directory(str(directory))


def load_prepared(path: Path) -> datasets.Dataset:
    """A prepared train/val dataset, in torch format."""
    return datasets.load_from_disk(str(path))
