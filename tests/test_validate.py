"""Tests for ehrmotor.meds.validate: whole-dataset validation and its report."""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from broken_meds import BROKEN, Broken
from meds_builders import (
    HELD_OUT,
    ROWS_PER_SUBJECT,
    TRAIN,
    replace_column,
    rewrite,
    rows_table,
    set_value,
    subject_rows,
    write_meds,
    write_table,
)

from ehrmotor.meds import (
    Finding,
    MedsError,
    data_files,
    require_valid,
    validate_dataset,
)

# --------------------------------------------------------------------------- valid input


def test_valid_dataset_is_accepted_with_counts(meds_dir: Path) -> None:
    report = validate_dataset(meds_dir)
    assert report.ok, report.errors
    assert report.errors == [] and report.warnings == []
    assert report.num_files == 2
    assert report.num_rows == 3 * ROWS_PER_SUBJECT
    assert report.num_subjects == 3
    assert report.meds_version == "0.4.1"
    assert "3 subject(s)" in report.summary()


def test_meds_03_style_dataset_is_accepted(tmp_path: Path) -> None:
    root = write_meds(tmp_path / "meds", meds_version="0.3.3", text_value=False)
    assert "text_value" not in pq.read_schema(root / TRAIN).names
    report = validate_dataset(root)
    assert report.ok, report.errors
    assert report.warnings == []
    assert report.meds_version == "0.3.3"


def test_extra_columns_and_hidden_files_are_accepted(meds_dir: Path) -> None:
    rewrite(meds_dir, TRAIN, lambda t: t.append_column("unit", pa.array(["mg"] * t.num_rows)))
    (meds_dir / "data/.DS_Store").write_bytes(b"\x00\x01")
    report = validate_dataset(meds_dir)
    assert report.ok, report.errors
    assert report.warnings == []


def test_float64_values_and_other_timestamp_units_are_accepted(meds_dir: Path) -> None:
    def widen(table: pa.Table) -> pa.Table:
        table = replace_column(table, "numeric_value", table["numeric_value"].cast(pa.float64()))
        return replace_column(table, "time", table["time"].cast(pa.timestamp("ns")))

    rewrite(meds_dir, TRAIN, widen)
    rewrite(
        meds_dir, HELD_OUT, lambda t: replace_column(t, "time", t["time"].cast(pa.timestamp("ms")))
    )
    report = validate_dataset(meds_dir)
    assert report.ok, report.errors
    assert report.warnings == []


def test_nested_and_flat_shards_are_found_sorted(meds_dir: Path) -> None:
    write_table(meds_dir / "data/4.parquet", rows_table(subject_rows(4)))
    (meds_dir / "data/README.txt").write_text("not data")
    files = data_files(meds_dir)
    assert [p.relative_to(meds_dir).as_posix() for p in files] == [
        "data/4.parquet",
        HELD_OUT,
        TRAIN,
    ]


def test_data_files_raises_without_shards(tmp_path: Path) -> None:
    with pytest.raises(MedsError, match="no 'data/' directory"):
        data_files(tmp_path)
    (tmp_path / "data").mkdir()
    with pytest.raises(MedsError, match="no parquet files"):
        data_files(tmp_path)


# --------------------------------------------------------------------------- broken input


@pytest.mark.parametrize("case", BROKEN.values(), ids=BROKEN.keys())
def test_broken_input_is_reported(meds_dir: Path, case: Broken) -> None:
    target = case.breaks(meds_dir)
    report = validate_dataset(target)
    expected_file = str(target) if case.file == "nope" else case.file
    findings = report.warnings if case.warning else report.errors
    matching = [
        f
        for f in findings
        if (f.file, f.column, f.row, f.subject_id)
        == (expected_file, case.column, case.row, case.subject_id)
    ]
    assert len(matching) == 1, f"no single matching finding among {[str(f) for f in findings]}"
    text = str(matching[0])
    assert "\n" not in text
    assert text.startswith(f"{expected_file}: ")
    for piece in case.says:
        assert piece in text
    if case.warning:
        assert report.ok, report.errors
    else:
        assert not report.ok


def test_row_problems_report_only_the_first_occurrence(meds_dir: Path) -> None:
    rewrite(meds_dir, TRAIN, lambda t: set_value(set_value(t, "code", 2, None), "code", 3, None))
    errors = validate_dataset(meds_dir).errors
    assert [(e.file, e.column, e.row) for e in errors] == [(TRAIN, "code", 2)]


def test_null_subject_id_does_not_break_order_checks(meds_dir: Path) -> None:
    # A null id between two rows of subject 2 must not look like subject 2 reappearing.
    rewrite(meds_dir, TRAIN, lambda t: set_value(t, "subject_id", 7, None))
    errors = validate_dataset(meds_dir).errors
    assert [(e.column, e.row, e.subject_id) for e in errors] == [("subject_id", 7, None)]


def test_shard_without_subject_id_and_code_reports_both(meds_dir: Path) -> None:
    rewrite(meds_dir, TRAIN, lambda t: t.select(["time"]))
    report = validate_dataset(meds_dir)
    assert [(e.file, e.column) for e in report.errors] == [
        (TRAIN, "subject_id"),
        (TRAIN, "code"),
    ]
    assert report.num_rows == 3 * ROWS_PER_SUBJECT
    assert report.num_subjects == 1  # only held_out's subject 3 can be counted


def test_finding_renders_one_line_with_optional_parts() -> None:
    full = Finding("data/0.parquet", "bad; expected good", column="time", row=3, subject_id=9)
    assert str(full) == "data/0.parquet: column 'time', row 3 (subject 9): bad; expected good"
    assert str(Finding("data", "gone")) == "data: gone"
    assert str(Finding("f", "x", subject_id=4)) == "f: subject 4: x"
    assert str(Finding("f", "line one\n  line two")) == "f: line one line two"


def test_require_valid_raises_with_one_line_per_error(meds_dir: Path) -> None:
    rewrite(meds_dir, TRAIN, lambda t: set_value(t, "subject_id", 1, None))
    (meds_dir / "data/notes.csv").write_text("x")
    with pytest.raises(MedsError) as raised:
        require_valid(meds_dir)
    lines = str(raised.value).splitlines()
    assert lines == [str(f) for f in raised.value.findings]
    assert "data/notes.csv: not a parquet file; expected only *.parquet files in data/" in lines
    assert f"{TRAIN}: column 'subject_id', row 1: null subject_id; expected a non-null int64" in (
        lines
    )


def test_require_valid_logs_warnings_and_returns_report(
    meds_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (meds_dir / "metadata/dataset.json").unlink()
    with caplog.at_level(logging.WARNING, logger="ehrmotor.meds"):
        report = require_valid(meds_dir)
    assert report.ok
    assert "metadata/dataset.json: file is missing" in caplog.text


def test_check_codes_false_skips_coverage(tmp_path: Path) -> None:
    root = write_meds(tmp_path / "meds", codes=["MEDS_BIRTH"])
    assert validate_dataset(root, check_codes=False).warnings == []
