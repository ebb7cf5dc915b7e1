"""Write prepared windows as a Hugging Face dataset on disk, from one Arrow file per MEDS shard.

Workers write their shard's rows as an Arrow IPC stream, `parts/rows-XXXXX-of-NNNNN.arrow` in the
dataset folder (`write_shard_table`). The reduce (`finish_dataset`) opens the parts with
`datasets.Dataset.from_file` (memory-mapped), concatenates them in shard order and writes the
folder with `Dataset.save_to_disk` (`data-XXXXX-of-NNNNN.arrow`, `state.json`,
`dataset_info.json`; torch format), then removes `parts/`. The dataset's fingerprint is a hash of
the parts' bytes, so the same input gives the same folder whatever the number of workers. Memory
stays bounded by one shard; the disk holds the rows twice while the reduce runs.
`load_prepared` (`datasets.load_from_disk`) reads the folder back in torch format.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

if TYPE_CHECKING:
    import datasets

PARTS = "parts"
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
    """Where the worker of shard `index` (of `count`) writes its rows, relative to the dataset
    folder."""
    return f"{PARTS}/rows-{index:05d}-of-{count:05d}.arrow"


def write_shard_table(table: pa.Table, path: Path) -> None:
    """Write one shard's rows (any table castable to ROW_SCHEMA) as an Arrow IPC stream."""
    table = table.select(ROW_SCHEMA.names).cast(ROW_SCHEMA)
    path.parent.mkdir(parents=True, exist_ok=True)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, ROW_SCHEMA) as writer:
        writer.write_table(table, max_chunksize=1024)


def finish_dataset(directory: Path, count: int) -> None:
    """Turn the `count` shard files in `directory` into one saved dataset (torch format)."""
    import datasets  # not in the workers, which only write Arrow files

    paths = [directory / shard_file_name(i, count) for i in range(count)]
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
    info = datasets.DatasetInfo(features=datasets.Features.from_arrow_schema(ROW_SCHEMA))
    parts = [datasets.Dataset.from_file(str(path), info=info) for path in paths]
    dataset = datasets.concatenate_datasets(parts, info=info).with_format("torch")
    # A fingerprint from the content (the default would hash the parts' paths).
    dataset = dataset.select_columns(ROW_SCHEMA.names, new_fingerprint=digest.hexdigest()[:16])
    quiet = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # prepare reports its own progress
    try:
        dataset.save_to_disk(str(directory), num_shards=count)
    finally:
        if not quiet:
            datasets.enable_progress_bars()
    del dataset, parts
    shutil.rmtree(directory / PARTS)


def load_prepared(path: Path) -> datasets.Dataset:
    """A prepared train/val dataset, in torch format."""
    import datasets

    return datasets.load_from_disk(str(path))
