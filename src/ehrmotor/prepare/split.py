"""Step 2 of `prepare`: the deterministic train/val split of pretraining subjects.

Artifact `split.csv`: header `subject_id,split_name`, one row per subject sorted by subject_id,
split_name `train` or `val`.

A subject is `val` when SHA-256 of (seed as big-endian signed 64-bit integer, then subject_id as
big-endian signed 64-bit integer), read as a big-endian integer, modulo 65,536 is at most
`val_fraction` × 65,536. This is the reference implementation's hash split, bit for bit, so the
same subjects land in val for the same seed. The hash is per subject, not per event.

Without a MEDS split file, `prepare --held-out-fraction F` first writes its own, with the same
hash under its own seed (`held_out_splits`): `WORK/subject_splits.parquet` (HELD_OUT_FILE), MEDS
format (subject_id int64, split string: `train` or `held_out`, sorted by subject_id). `pretrain`
copies it into the model bundle, where `evaluate` finds the held-out subjects.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

HASH_BUCKETS = 1 << 16
SPLITS_SCHEMA = pa.schema([("subject_id", pa.int64()), ("split", pa.string())])


def hash_buckets(subject_ids: np.ndarray, seed: int) -> np.ndarray:
    """Bucket in [0, 65536) of each subject id for `seed` (see the module docstring)."""
    prefix = struct.pack(">q", seed)
    buckets = np.empty(len(subject_ids), dtype=np.int64)
    for i, subject_id in enumerate(np.asarray(subject_ids, dtype=np.int64).tolist()):
        digest = hashlib.sha256(prefix + struct.pack(">q", subject_id)).digest()
        buckets[i] = int.from_bytes(digest[-2:], "big")  # == big-endian integer mod 2**16
    return buckets


def split_subjects(subject_ids: np.ndarray, seed: int = 97, val_fraction: float = 0.10
                   ) -> pl.DataFrame:
    """`subject_id`, `split_name` (train/val) for the unique subject ids, sorted by id."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    ids = np.unique(np.asarray(subject_ids, dtype=np.int64))
    is_val = hash_buckets(ids, seed) <= val_fraction * HASH_BUCKETS
    return pl.DataFrame({
        "subject_id": ids,
        "split_name": np.where(is_val, "val", "train"),
    })


def write_split(split: pl.DataFrame, path: Path) -> None:
    split.write_csv(path)


def read_split(path: Path) -> pl.DataFrame:
    return pl.read_csv(path, schema={"subject_id": pl.Int64, "split_name": pl.String})


def held_out_splits(subject_ids: np.ndarray, seed: int, fraction: float) -> pl.DataFrame:
    """`subject_id`, `split` (train/held_out) for the unique subject ids, sorted by id: a
    subject is held_out when its hash bucket for `seed` is at most `fraction` × 65,536."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"held-out fraction must be in (0, 1), got {fraction}")
    ids = np.unique(np.asarray(subject_ids, dtype=np.int64))
    held_out = hash_buckets(ids, seed) <= fraction * HASH_BUCKETS
    return pl.DataFrame({"subject_id": ids, "split": np.where(held_out, "held_out", "train")})


def write_held_out_splits(splits: pl.DataFrame, path: Path) -> None:
    """Write a `held_out_splits` table as a MEDS subject_splits.parquet (no statistics or
    timestamps vary between runs: the same subjects give the same bytes)."""
    pq.write_table(splits.to_arrow().cast(SPLITS_SCHEMA), path)
