"""Tests for ehrmotor.meds.read: reading shards and metadata, normalising MEDS 0.3 files."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest
from meds_builders import (
    DATA_SCHEMA,
    ROWS_PER_SUBJECT,
    TRAIN,
    rows_table,
    subject_rows,
    write_table,
)

from ehrmotor.meds import (
    DATA_COLUMNS,
    MedsError,
    read_codes_metadata,
    read_dataset_metadata,
    read_subject_splits,
    scan_shard,
    validate_dataset,
)

# --------------------------------------------------------------------------- reading


def test_scan_shard_normalises_03_style_file(tmp_path: Path) -> None:
    schema = pa.schema(
        [
            ("subject_id", pa.int32()),
            ("time", pa.timestamp("ns")),
            ("code", pa.large_string()),
            ("numeric_value", pa.float64()),
            ("site", pa.string()),
        ]
    )
    rows = [{**row, "site": "a"} for row in subject_rows(1)]
    for row in rows:
        row.pop("text_value", None)
    path = write_table(tmp_path / "shard.parquet", rows_table(rows, schema))

    df = scan_shard(path).collect()
    assert tuple(df.columns) == DATA_COLUMNS
    assert df.schema == pl.Schema(
        {
            "subject_id": pl.Int64,
            "time": pl.Datetime("us"),
            "code": pl.String,
            "numeric_value": pl.Float32,
            "text_value": pl.String,
        }
    )
    assert df["text_value"].null_count() == df.height
    assert df["time"][0] is None
    assert df["code"].to_list() == [r["code"] for r in rows]
    assert df["numeric_value"][3] == pytest.approx(6.4)


def test_scan_shard_keeps_04_values(meds_dir: Path) -> None:
    df = scan_shard(meds_dir / TRAIN).collect()
    assert df.height == 2 * ROWS_PER_SUBJECT
    assert df["text_value"][4] == "note 1"
    assert df["subject_id"].to_list() == [1] * 5 + [2] * 5


def test_scan_shard_rejects_missing_required_column(tmp_path: Path) -> None:
    path = write_table(tmp_path / "x.parquet", pa.table({"subject_id": pa.array([1], pa.int64())}))
    with pytest.raises(MedsError, match="column 'time'"):
        scan_shard(path)


def test_zoned_times_are_warned_and_read_as_naive_utc(tmp_path: Path) -> None:
    schema = DATA_SCHEMA.set(1, pa.field("time", pa.timestamp("ms", tz="Europe/Paris")))
    rows = [{"subject_id": 1, "time": datetime(2020, 6, 1, 12, tzinfo=UTC), "code": "A"}]
    path = write_table(tmp_path / "meds/data/0.parquet", rows_table(rows, schema))

    report = validate_dataset(tmp_path / "meds")
    assert report.ok, report.errors
    assert any(
        "column 'time': column has time zone Europe/Paris" in str(w) for w in report.warnings
    )
    assert scan_shard(path).collect()["time"].to_list() == [datetime(2020, 6, 1, 12)]


def test_read_metadata(meds_dir: Path) -> None:
    codes = read_codes_metadata(meds_dir)
    assert codes is not None
    assert codes.columns == ["code", "description", "parent_codes"]
    assert codes.schema["parent_codes"] == pl.List(pl.String)
    splits = read_subject_splits(meds_dir)
    assert splits is not None
    assert splits.to_dict(as_series=False) == {
        "subject_id": [1, 2, 3],
        "split": ["train", "train", "held_out"],
    }
    metadata = read_dataset_metadata(meds_dir)
    assert metadata is not None and metadata["meds_version"] == "0.4.1"


def test_read_metadata_absent_or_broken(meds_dir: Path) -> None:
    shutil.rmtree(meds_dir / "metadata")
    assert read_codes_metadata(meds_dir) is None
    assert read_subject_splits(meds_dir) is None
    assert read_dataset_metadata(meds_dir) is None
    (meds_dir / "metadata").mkdir()
    (meds_dir / "metadata/dataset.json").write_text("[1, 2]")
    with pytest.raises(MedsError, match="expected a JSON object"):
        read_dataset_metadata(meds_dir)
    errors = [str(e) for e in validate_dataset(meds_dir).errors]
    assert "metadata/dataset.json: JSON is not an object; expected a JSON object" in errors
    write_table(meds_dir / "metadata/codes.parquet", pa.table({"description": ["x"]}))
    with pytest.raises(MedsError, match="column 'code'"):
        read_codes_metadata(meds_dir)


def test_codes_metadata_without_optional_columns(meds_dir: Path) -> None:
    write_table(meds_dir / "metadata/codes.parquet", pa.table({"code": ["A"]}))
    codes = read_codes_metadata(meds_dir)
    assert codes is not None
    assert codes.columns == ["code", "description", "parent_codes"]
    assert codes["description"].to_list() == [None]


def test_default_builder_schema_matches_meds_package() -> None:
    """Guard the test fixture itself against drifting from the MEDS 0.4 schema."""
    meds = pytest.importorskip("meds")
    assert DATA_SCHEMA.equals(meds.DataSchema.schema())

