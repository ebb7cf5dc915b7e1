"""Collated training batches of a prepared synthetic dataset equal a committed reference.

The reference (`data/collate/batches.npz`) was written by the layout that stored each position's
expanded ancestor bags; the layout that stores codes and expands them at collate must give the
same batches bit for bit (checked when the layout changed). It was written again once since, on
purpose, when the tokenizer began rounding its scores (ties that differed in the last bit between
CPU kinds reordered the vocabulary: this test caught it on an AMD EPYC). Regenerate it only on
purpose: EHRMOTOR_WRITE_COLLATE_REFERENCE=1.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from ehrmotor.cli import main
from ehrmotor.motor_task.tasks import MotorTask
from ehrmotor.sequences.batching import collate_windows
from ehrmotor.sequences.shards import load_prepared
from ehrmotor.vocabulary.bags import BagTable

REFERENCE = Path(__file__).parent / "data" / "collate" / "batches.npz"
CHUNK = 48


@pytest.fixture(scope="module")
def prepared(synthetic_meds: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("collate_reference")
    assert main(["prepare", "--meds", str(synthetic_meds), "--athena",
                 str(synthetic_meds / "athena"), "--out", str(work), "--vocab-size", "2000",
                 "--candidate-tasks", "300", "--workers", "1"]) == 0
    return work / "pretraining_files"


def collated(prepared: Path) -> dict[str, np.ndarray]:
    """Every key of every batch (train then val, CHUNK windows each), concatenated, with the
    batch sizes of each key (`<key>/sizes`)."""
    task_map = torch.from_numpy(MotorTask.load(prepared / "motor_task.json").task_map())
    bags = BagTable.load(prepared / "tokenizer")
    parts: dict[str, list[np.ndarray]] = {}
    for split in ("train_batches", "val_batches"):
        dataset = load_prepared(prepared / split)
        for start in range(0, len(dataset), CHUNK):
            rows = [dataset[i] for i in range(start, min(start + CHUNK, len(dataset)))]
            for key, value in collate_windows(rows, True, task_map, bags).items():
                parts.setdefault(key, []).append(value.numpy())
    out = {}
    for key, values in parts.items():
        out[key] = np.concatenate(values)
        out[f"{key}/sizes"] = np.array([len(v) for v in values], dtype=np.int64)
    return out


def stored(batches: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What the reference keeps: the large label arrays (derived from columns this layout change
    leaves alone) as sha256 digests of their bytes, integers in their smallest type."""
    out = {}
    for key, value in batches.items():
        if key.startswith("label_"):
            out[key] = np.frombuffer(hashlib.sha256(value.tobytes()).digest(), dtype=np.uint8)
        elif value.dtype.kind == "i":
            smallest = np.result_type(*(np.min_scalar_type(v) for v in (value.min(), value.max())))
            out[key] = value.astype(smallest)
        else:
            out[key] = value
    return out


def test_collated_batches_equal_the_reference(prepared: Path) -> None:
    batches = collated(prepared)
    assert batches["entries"].size > 10_000  # a real workload, not an empty one
    if os.environ.get("EHRMOTOR_WRITE_COLLATE_REFERENCE") == "1":
        REFERENCE.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(REFERENCE, **stored(batches))
    with np.load(REFERENCE, allow_pickle=False) as reference:
        assert sorted(reference.files) == sorted(batches)
        for key, got in stored(batches).items():
            expected = reference[key]
            assert expected.shape == got.shape, key
            if got.dtype.kind in "iu":  # narrowed: compare values (exact for integers)
                assert np.array_equal(expected, got), key
            else:  # bitwise: the raw bytes (NaN-safe, -0.0 differs from 0.0)
                assert expected.dtype == got.dtype and expected.tobytes() == got.tobytes(), key
        for key in ("entries", "bag_offsets", "point_indices", "segment_ids"):
            assert batches[key].dtype == np.int64, key
        for key in ("weights", "time_features", "age_days", "censor_days", "label_days"):
            assert batches[key].dtype == np.float32, key
