"""Helpers that write tiny MEDS datasets with pyarrow for tests.

The default dataset (`write_meds`) has three subjects in two shards:

    data/train/0.parquet     subjects 1 (rows 0-4) and 2 (rows 5-9)
    data/held_out/0.parquet  subject 3 (rows 0-4)

Each subject has a static row (null time), MEDS_BIRTH, a diagnosis, a lab with a
numeric_value and a note with a text_value, in that (sorted) order.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

DATA_SCHEMA = pa.schema(
    [
        ("subject_id", pa.int64()),
        ("time", pa.timestamp("us")),
        ("code", pa.string()),
        ("numeric_value", pa.float32()),
        ("text_value", pa.large_string()),
    ]
)

TRAIN = "data/train/0.parquet"
HELD_OUT = "data/held_out/0.parquet"
SHARDS = {TRAIN: [1, 2], HELD_OUT: [3]}
CODES = ["GENDER//F", "MEDS_BIRTH", "ICD10CM//E11.9", "LOINC//2345-7", "NOTE//discharge"]
ROWS_PER_SUBJECT = 5


def subject_rows(subject_id: int) -> list[dict[str, Any]]:
    """The five sorted events of one subject, as dicts keyed by data column."""
    year = 1950 + subject_id
    return [
        {"subject_id": subject_id, "time": None, "code": "GENDER//F"},
        {"subject_id": subject_id, "time": datetime(year, 1, 1), "code": "MEDS_BIRTH"},
        {"subject_id": subject_id, "time": datetime(2010, 3, 1, 9), "code": "ICD10CM//E11.9"},
        {
            "subject_id": subject_id,
            "time": datetime(2010, 3, 1, 9),
            "code": "LOINC//2345-7",
            "numeric_value": 5.4 + subject_id,
        },
        {
            "subject_id": subject_id,
            "time": datetime(2011, 7, 2),
            "code": "NOTE//discharge",
            "text_value": f"note {subject_id}",
        },
    ]


def rows_table(rows: list[dict[str, Any]], schema: pa.Schema = DATA_SCHEMA) -> pa.Table:
    """Table from row dicts; keys absent from a row become nulls."""
    return pa.Table.from_pylist(rows, schema=schema)


def write_table(path: Path, table: pa.Table) -> Path:
    """Write `table` as parquet at `path`, creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def write_meds(
    root: Path,
    *,
    meds_version: str = "0.4.1",
    text_value: bool = True,
    codes: list[str] | None = None,
) -> Path:
    """Write the default valid dataset under `root`; return `root`.

    `text_value=False` writes 0.3-style shards without that column; `codes` overrides
    the codes listed in metadata/codes.parquet.
    """
    schema = (
        DATA_SCHEMA if text_value else DATA_SCHEMA.remove(DATA_SCHEMA.get_field_index("text_value"))
    )
    for rel, subjects in SHARDS.items():
        rows = [row for sid in subjects for row in subject_rows(sid)]
        if not text_value:
            rows = [{k: v for k, v in row.items() if k != "text_value"} for row in rows]
        write_table(root / rel, rows_table(rows, schema))

    listed = CODES if codes is None else codes
    codes_table = pa.table(
        {
            "code": pa.array(listed, pa.string()),
            "description": pa.array([f"about {c}" for c in listed], pa.string()),
            "parent_codes": pa.array([[] for _ in listed], pa.list_(pa.string())),
        }
    )
    write_table(root / "metadata/codes.parquet", codes_table)
    splits = pa.table(
        {
            "subject_id": pa.array([1, 2, 3], pa.int64()),
            "split": pa.array(["train", "train", "held_out"], pa.string()),
        }
    )
    write_table(root / "metadata/subject_splits.parquet", splits)
    (root / "metadata/dataset.json").write_text(
        json.dumps({"dataset_name": "tiny", "meds_version": meds_version}), encoding="utf-8"
    )
    return root


def rewrite(root: Path, rel: str, change: Callable[[pa.Table], pa.Table]) -> None:
    """Replace the parquet file `root/rel` by `change(its table)`."""
    path = root / rel
    write_table(path, change(pq.read_table(path)))


def replace_column(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    """`table` with column `name` replaced by `values` (same position)."""
    return table.set_column(table.schema.get_field_index(name), name, values)


def set_value(table: pa.Table, name: str, row: int, value: Any) -> pa.Table:
    """`table` with one cell changed, keeping the column's type."""
    values = table.column(name).to_pylist()
    values[row] = value
    return replace_column(table, name, pa.array(values, table.schema.field(name).type))
