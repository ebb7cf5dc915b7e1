"""Turn per-shard parquet parts into a Hugging Face dataset on disk (torch format).

The parts are memory-mapped through pyarrow and saved with `Dataset.save_to_disk`; the dataset's
fingerprint is a hash of the parts' bytes, so the same input gives the same files.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
from datasets.table import InMemoryTable

MAX_SHARD_SIZE = "500MB"


def _fingerprint(parts: list[Path]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.read_bytes())
    return digest.hexdigest()[:16]


def write_hf_dataset(parts: list[Path], out_dir: Path) -> None:
    """Concatenate the parquet `parts` (same schema) into a dataset saved at `out_dir`."""
    parts = sorted(parts)
    if parts:
        table = pa.concat_tables(pq.read_table(p) for p in parts)
    else:
        table = pa.table({"subject_id": pa.array([], pa.int64())})
    dataset = datasets.Dataset(InMemoryTable(table), fingerprint=_fingerprint(parts))
    dataset = dataset.with_format("torch")
    progress = datasets.utils.logging.is_progress_bar_enabled()
    datasets.utils.logging.disable_progress_bar()
    try:
        dataset.save_to_disk(str(out_dir), max_shard_size=MAX_SHARD_SIZE)
    finally:
        if progress:
            datasets.utils.logging.enable_progress_bar()


def load_prepared(path: Path) -> datasets.Dataset:
    """A prepared train/val dataset, in torch format."""
    return datasets.load_from_disk(str(path))
