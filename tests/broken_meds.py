"""Broken MEDS datasets: how each case breaks the valid dataset of meds_builders and what
validation must report (used by test_validate and test_reliability)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
from meds_builders import (
    HELD_OUT,
    TRAIN,
    replace_column,
    rewrite,
    rows_table,
    set_value,
    subject_rows,
    write_meds,
    write_table,
)


@dataclass(frozen=True)
class Broken:
    """One broken-input case: how to break the valid dataset and what must be reported.

    `breaks` gets the valid dataset's directory and returns the directory to validate.
    The report must contain a finding (an error, or a warning when `warning`) with
    exactly this file, column, row and subject whose text contains every `says` piece.
    """

    breaks: Callable[[Path], Path]
    file: str
    says: tuple[str, ...]
    column: str | None = None
    row: int | None = None
    subject_id: int | None = None
    warning: bool = False


def _delete(rel: str) -> Callable[[Path], Path]:
    """Break the dataset by deleting `rel` (file or folder)."""

    def breaks(root: Path) -> Path:
        target = root / rel
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink()
        return root

    return breaks


def _empty_data(root: Path) -> Path:
    shutil.rmtree(root / "data")
    (root / "data/train").mkdir(parents=True)
    return root


def _write(rel: str, content: bytes) -> Callable[[Path], Path]:
    """Break the dataset by writing raw bytes to `rel`."""

    def breaks(root: Path) -> Path:
        (root / rel).write_bytes(content)
        return root

    return breaks


def _change(rel: str, change: Callable[[pa.Table], pa.Table]) -> Callable[[Path], Path]:
    """Break the dataset by rewriting the parquet file `rel` through `change`."""

    def breaks(root: Path) -> Path:
        rewrite(root, rel, change)
        return root

    return breaks


def _retype(name: str, dtype: pa.DataType) -> Callable[[pa.Table], pa.Table]:
    """Table change: cast column `name` to `dtype`."""
    return lambda t: replace_column(t, name, t[name].cast(dtype))


def _swap_rows(first: int, second: int) -> Callable[[pa.Table], pa.Table]:
    """Table change: swap two rows."""

    def change(table: pa.Table) -> pa.Table:
        order = list(range(table.num_rows))
        order[first], order[second] = order[second], order[first]
        return table.take(order)

    return change


def _move_row_to_end(row: int) -> Callable[[pa.Table], pa.Table]:
    """Table change: move one row to the end of the table."""

    def change(table: pa.Table) -> pa.Table:
        order = [i for i in range(table.num_rows) if i != row] + [row]
        return table.take(order)

    return change


def _subject_in_both_shards(root: Path) -> Path:
    """Give held_out/0.parquet a row of subject 2, who lives in train/0.parquet."""
    rows = subject_rows(3) + [{"subject_id": 2, "time": None, "code": "GENDER//F"}]
    write_table(root / HELD_OUT, rows_table(rows))
    return root


BROKEN = {
    "meds_dir missing": Broken(
        lambda root: root / "nope", "nope", ("directory does not exist", "expected a MEDS")
    ),
    "data missing": Broken(_delete("data"), "data", ("directory is missing", "expected data/")),
    "data empty": Broken(_empty_data, "data", ("no parquet files", "expected data/**/*.parquet")),
    "non-parquet file": Broken(
        _write("data/train/notes.csv", b"a,b\n1,2\n"),
        "data/train/notes.csv",
        ("not a parquet file", "expected only *.parquet"),
    ),
    "corrupt parquet": Broken(
        _write("data/train/1.parquet", b"definitely not parquet"),
        "data/train/1.parquet",
        ("cannot read parquet file", "expected a readable Parquet file"),
    ),
    "missing code": Broken(
        _change(TRAIN, lambda t: t.drop_columns(["code"])),
        TRAIN,
        ("required column is missing", "expected a 'code' column"),
        column="code",
    ),
    "missing subject_id": Broken(
        _change(HELD_OUT, lambda t: t.drop_columns(["subject_id"])),
        HELD_OUT,
        ("required column is missing", "expected a 'subject_id' column"),
        column="subject_id",
    ),
    "time as string": Broken(
        _change(TRAIN, _retype("time", pa.string())),
        TRAIN,
        ("column has type string", "expected a timestamp"),
        column="time",
    ),
    "subject_id as string": Broken(
        _change(TRAIN, _retype("subject_id", pa.string())),
        TRAIN,
        ("column has type string", "expected int64"),
        column="subject_id",
    ),
    "code as int": Broken(
        _change(
            TRAIN, lambda t: replace_column(t, "code", pa.array(range(t.num_rows), pa.int64()))
        ),
        TRAIN,
        ("column has type int64", "expected string"),
        column="code",
    ),
    "numeric_value as string": Broken(
        _change(HELD_OUT, _retype("numeric_value", pa.string())),
        HELD_OUT,
        ("column has type string", "expected float32"),
        column="numeric_value",
    ),
    "text_value as int": Broken(
        _change(
            HELD_OUT,
            lambda t: replace_column(t, "text_value", pa.array([1] * t.num_rows, pa.int32())),
        ),
        HELD_OUT,
        ("column has type int32", "expected string"),
        column="text_value",
    ),
    "null subject_id": Broken(
        _change(TRAIN, lambda t: set_value(t, "subject_id", 7, None)),
        TRAIN,
        ("null subject_id", "expected a non-null int64"),
        column="subject_id",
        row=7,
    ),
    "null code": Broken(
        _change(TRAIN, lambda t: set_value(set_value(t, "code", 6, None), "code", 8, None)),
        TRAIN,
        ("null code", "expected a non-null string"),
        column="code",
        row=6,
    ),
    "unsorted times": Broken(
        _change(TRAIN, _swap_rows(6, 9)),  # subject 2's diagnosis and note swap places
        TRAIN,
        ("time is earlier than the previous row", "expected static rows (null time) first"),
        column="time",
        row=7,
        subject_id=2,
    ),
    "static row after dated row": Broken(
        _change(TRAIN, _swap_rows(5, 6)),  # subject 2's static row after its birth
        TRAIN,
        ("time is earlier than the previous row", "non-decreasing times"),
        column="time",
        row=6,
        subject_id=2,
    ),
    "non-contiguous subject": Broken(
        _change(TRAIN, _move_row_to_end(4)),  # subject 1's last row after subject 2
        TRAIN,
        ("not contiguous", "expected all rows of a subject to be adjacent"),
        column="subject_id",
        row=9,
        subject_id=1,
    ),
    "subject in two shards": Broken(
        _subject_in_both_shards,
        HELD_OUT,  # held_out sorts before train, so it is the first file named
        ("also appears in data/train/0.parquet", "expected each subject's rows in exactly one"),
        column="subject_id",
        subject_id=2,
    ),
    "unreadable dataset.json": Broken(
        _write("metadata/dataset.json", b'{"meds_version": "0.4.1",'),
        "metadata/dataset.json",
        ("cannot parse JSON", "expected a JSON object"),
    ),
    "codes.parquet without code": Broken(
        _change("metadata/codes.parquet", lambda t: t.drop_columns(["code"])),
        "metadata/codes.parquet",
        ("required column is missing", "expected a 'code' column"),
        column="code",
    ),
    "corrupt codes.parquet": Broken(
        _write("metadata/codes.parquet", b"nope"),
        "metadata/codes.parquet",
        ("cannot read parquet file",),
    ),
    "subject_splits without split": Broken(
        _change("metadata/subject_splits.parquet", lambda t: t.drop_columns(["split"])),
        "metadata/subject_splits.parquet",
        ("required column is missing", "expected a 'split' column"),
        column="split",
    ),
    "codes not covered (warning)": Broken(
        lambda root: write_meds(root, codes=["MEDS_BIRTH", "GENDER//F"]),
        "metadata/codes.parquet",
        ("3 code(s) used in the data are not listed", "'ICD10CM//E11.9'", "expected every"),
        column="code",
        warning=True,
    ),
    "dataset.json missing (warning)": Broken(
        _delete("metadata/dataset.json"),
        "metadata/dataset.json",
        ("file is missing", "expected a JSON object with 'meds_version'"),
        warning=True,
    ),
    "int32 subject_id (warning)": Broken(
        _change(TRAIN, _retype("subject_id", pa.int32())),
        TRAIN,
        ("column has type int32", "expected int64"),
        column="subject_id",
        warning=True,
    ),
}

