"""A small MEDS dataset coded the way real exports code it, for tests of "any export".

`write_mimic_like` writes what a MEDS-Transforms extraction of MIMIC-IV looks like, in miniature:
no `Visit/*` codes; stays coded `ED_REGISTRATION//...`, `HOSPITAL_ADMISSION//...`,
`ICU_ADMISSION//...`, `HOSPITAL_DISCHARGE//...`; labs `LAB//<itemid>//<unit>` with values;
diagnoses `DIAGNOSIS//ICD//10//<code>` at discharge; `MEDS_BIRTH` and, for some, `MEDS_DEATH` as
the last event. Subject ids are MIMIC-sized (10,000,001 on). Deterministic in (subjects, seed):

    data/0.parquet, data/1.parquet      the subjects in two halves, sorted by subject and time
    metadata/dataset.json               dataset_name, meds_version
    metadata/codes.parquet              code, description, parent_codes (empty)
    metadata/subject_splits.parquet     train / tuning / held_out (8:1:1), unless split_file=False
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from meds_builders import rows_table, write_table

FIRST_SUBJECT = 10_000_001
ADMISSION_TYPES = ("EW EMER.", "URGENT", "ELECTIVE")
ICU_UNITS = ("MICU", "CVICU")
LABS = (("50912", "mg/dL", 1.0), ("50971", "mEq/L", 4.2), ("51222", "g/dL", 12.0))
DIAGNOSES = ("I50.9", "E11.9", "N18.3", "J44.9", "I10")
DISCHARGES = ("HOME", "SKILLED NURSING FACILITY")


def split_of(index: int) -> str:
    """The split of the index-th subject (0-based): 8 train, 1 tuning, 1 held_out per ten."""
    return {0: "held_out", 1: "tuning"}.get(index % 10, "train")


def _stay(subject_id: int, rng: np.random.Generator, admitted: datetime) -> list[dict[str, Any]]:
    """The events of one hospital stay starting at `admitted`, in time order."""
    rows: list[dict[str, Any]] = []
    if rng.random() < 0.6:  # through the emergency department, hours before admission
        rows.append({"time": admitted - timedelta(hours=3), "code": "ED_REGISTRATION//EMERGENCY"})
    kind = ADMISSION_TYPES[int(rng.integers(len(ADMISSION_TYPES)))]
    rows.append({"time": admitted, "code": f"HOSPITAL_ADMISSION//{kind}"})
    for hours, (item, unit, mean) in zip((2, 2, 5), LABS, strict=True):
        rows.append({"time": admitted + timedelta(hours=hours), "code": f"LAB//{item}//{unit}",
                     "numeric_value": round(mean * float(rng.lognormal(0.0, 0.2)), 2)})
    if rng.random() < 0.25:
        unit = ICU_UNITS[int(rng.integers(len(ICU_UNITS)))]
        rows.append({"time": admitted + timedelta(hours=8), "code": f"ICU_ADMISSION//{unit}"})
    discharged = admitted + timedelta(days=int(rng.integers(1, 9)), hours=4)
    picked = rng.random(len(DIAGNOSES)) < 0.3
    rows += [{"time": discharged, "code": f"DIAGNOSIS//ICD//10//{code}"}
             for code, chosen in zip(DIAGNOSES, picked, strict=True) if chosen]
    place = DISCHARGES[int(rng.integers(len(DISCHARGES)))]
    rows.append({"time": discharged, "code": f"HOSPITAL_DISCHARGE//{place}"})
    return [{"subject_id": subject_id, **row} for row in rows]


def subject_events(index: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    """The sorted events of the index-th subject: static sex, birth, 1-6 stays, maybe death."""
    subject_id = FIRST_SUBJECT + index
    birth = datetime(1940, 1, 1) + timedelta(days=int(rng.integers(0, 40 * 365)))
    rows: list[dict[str, Any]] = [
        {"subject_id": subject_id, "time": None, "code": f"GENDER//{'FM'[index % 2]}"},
        {"subject_id": subject_id, "time": birth, "code": "MEDS_BIRTH"},
    ]
    admitted = datetime(2010, 1, 1) + timedelta(days=int(rng.integers(0, 700)), hours=10)
    for _ in range(int(rng.integers(1, 7))):
        rows += _stay(subject_id, rng, admitted)
        admitted = rows[-1]["time"] + timedelta(days=int(rng.integers(30, 500)), hours=6)
    if rng.random() < 0.3:
        died = rows[-1]["time"] + timedelta(days=int(rng.integers(1, 400)))
        rows.append({"subject_id": subject_id, "time": died, "code": "MEDS_DEATH"})
    return rows


def write_mimic_like(root: Path, subjects: int = 120, *, seed: int = 0,
                     split_file: bool = True) -> Path:
    """Write the dataset of the module docstring under `root`; return `root`."""
    rng = np.random.default_rng(seed)
    people = [subject_events(index, rng) for index in range(subjects)]
    half = (subjects + 1) // 2
    for shard, chosen in enumerate((people[:half], people[half:])):
        if chosen:
            write_table(root / "data" / f"{shard}.parquet",
                        rows_table([row for rows in chosen for row in rows]))
    codes = sorted({row["code"] for rows in people for row in rows})
    write_table(root / "metadata" / "codes.parquet", pa.table({
        "code": pa.array(codes, pa.string()),
        "description": pa.array([code.replace("//", " ") for code in codes], pa.string()),
        "parent_codes": pa.array([[] for _ in codes], pa.list_(pa.string()))}))
    (root / "metadata" / "dataset.json").write_text(json.dumps(
        {"dataset_name": "mimic_like", "dataset_version": "0", "etl_name": "tests",
         "etl_version": "0", "meds_version": "0.4.1"}) + "\n")
    if split_file:
        write_table(root / "metadata" / "subject_splits.parquet", pa.table({
            "subject_id": pa.array([FIRST_SUBJECT + i for i in range(subjects)], pa.int64()),
            "split": pa.array([split_of(i) for i in range(subjects)], pa.string())}))
    return root
