"""The train/val split (prepare/split.py): the sha256 rule, bit-identical to femr's.

Hand-built inputs with hand-computed expectations."""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import polars as pl
import pytest

from ehrmotor.prepare.split import split_subjects


def reference_is_val(subject_id: int, seed: int, val_fraction: float) -> bool:
    digest = hashlib.sha256(struct.pack(">q", seed) + struct.pack(">q", subject_id)).digest()
    return int.from_bytes(digest, "big") % 65536 <= val_fraction * 65536


def test_split_matches_the_reference_sha256_formula() -> None:
    ids = [0, 1, 5, 8, 17, 42, -3, 10**12, 2**62, 123456789]
    split = split_subjects(np.array(ids), seed=97, val_fraction=0.1)
    expected = {i: "val" if reference_is_val(i, 97, 0.1) else "train" for i in ids}
    assert dict(split.iter_rows()) == expected


def test_split_of_ids_0_to_29_with_seed_97_is_the_known_list() -> None:
    split = split_subjects(np.arange(30), seed=97, val_fraction=0.1)
    assert split.filter(pl.col("split_name") == "val")["subject_id"].to_list() == [5, 8, 17]


def test_split_depends_on_the_seed() -> None:
    split = split_subjects(np.arange(30), seed=1, val_fraction=0.1)
    assert split.filter(pl.col("split_name") == "val")["subject_id"].to_list() == [27]


def test_split_is_per_subject_sorted_and_unique() -> None:
    split = split_subjects(np.array([17, 3, 17, 5, 3]), seed=97, val_fraction=0.1)
    assert split.columns == ["subject_id", "split_name"]
    assert split.rows() == [(3, "train"), (5, "val"), (17, "val")]


def test_split_val_share_is_about_ten_percent() -> None:
    split = split_subjects(np.arange(100_000), seed=97, val_fraction=0.1)
    share = (split["split_name"] == "val").mean()
    assert 0.09 <= share <= 0.11


def test_split_rejects_a_val_fraction_outside_0_1() -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        split_subjects(np.arange(3), seed=97, val_fraction=1.0)
