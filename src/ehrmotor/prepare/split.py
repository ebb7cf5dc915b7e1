"""Step 2 of `prepare`: the deterministic train/val split of pretraining subjects.

Artifact `split.csv`: header `subject_id,split_name`, one row per subject sorted by subject_id,
split_name `train` or `val`.

A subject is `val` when SHA-256 of (seed as big-endian signed 64-bit integer, then subject_id as
big-endian signed 64-bit integer), read as a big-endian integer, modulo 65,536 is at most
`val_fraction` × 65,536. This is the reference implementation's hash split, bit for bit, so the
same subjects land in val for the same seed. The hash is per subject, not per event.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import numpy as np
import polars as pl

HASH_BUCKETS = 1 << 16


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
