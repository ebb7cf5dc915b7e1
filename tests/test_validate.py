"""Tests for ehrmotor.meds: MEDS validation, reading and normalisation."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from meds_builders import (
    DATA_SCHEMA,
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
    DATA_COLUMNS,
    Finding,
    MedsError,
    data_files,
    read_codes_metadata,
    read_dataset_metadata,
    read_subject_splits,
    require_valid,
    scan_shard,
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


# --------------------------------------------------------------------------- codes and birth


@pytest.mark.parametrize(
    ("code", "says"),
    [
        ("", "empty code"),
        ("ICD10CM//E11\n.9", r"code 'ICD10CM//E11\n.9' holds a control character"),
        ("LOINC//2345-7\t", r"code 'LOINC//2345-7\t' holds a control character"),
        ("NOTE//x\x7f", r"code 'NOTE//x\x7f' holds a control character"),
        ("\x00", r"code '\x00' holds a control character"),
    ],
    ids=["empty", "newline", "tab", "del", "nul"],
)
def test_empty_and_control_character_codes_are_errors(
    meds_dir: Path, code: str, says: str
) -> None:
    # Rows 7 and 8 of train/0.parquet are subject 2's lab and note.
    rewrite(meds_dir, TRAIN, lambda t: set_value(set_value(t, "code", 7, code), "code", 8, code))
    report = validate_dataset(meds_dir, check_codes=False)
    assert [(e.file, e.column, e.row, e.subject_id) for e in report.errors] == [
        (TRAIN, "code", 7, 2)
    ]
    text = str(report.errors[0])
    assert text == (
        f"{TRAIN}: column 'code', row 7 (subject 2): {says} (2 row(s) of this file); expected "
        "a non-empty code without control characters (newline, tab, < 0x20 or 0x7f)"
    )
    with pytest.raises(MedsError, match="row 7"):
        require_valid(meds_dir)


def test_prepare_refuses_a_control_character_code(meds_dir: Path, tmp_path: Path) -> None:
    from ehrmotor.prepare import PrepareError, prepare

    rewrite(meds_dir, HELD_OUT, lambda t: set_value(t, "code", 2, "ICD10CM//E11\r"))
    with pytest.raises(PrepareError) as raised:
        prepare(meds_dir, tmp_path / "work", workers=1, progress=False)
    assert str(raised.value) == (
        f"{HELD_OUT}: column 'code', row 2 (subject 3): code 'ICD10CM//E11\\r' holds a control "
        "character (1 row(s) of this file); expected a non-empty code without control "
        "characters (newline, tab, < 0x20 or 0x7f)"
    )


def _born_late(subject_id: int, birth: datetime) -> list[dict[str, object]]:
    """Subject rows with MEDS_BIRTH moved to `birth`, re-sorted by time (static row first)."""
    rows = subject_rows(subject_id)
    rows[1]["time"] = birth
    return [rows[0], *sorted(rows[1:], key=lambda r: r["time"])]


def test_events_before_meds_birth_are_a_warning_with_count_and_example(meds_dir: Path) -> None:
    # Subject 1 is born at the time of its diagnosis (not earlier: no count); subject 2 after
    # its diagnosis and lab, before its note.
    rows = _born_late(1, datetime(2010, 3, 1, 9)) + _born_late(2, datetime(2011, 1, 1))
    assert [r["code"] for r in rows[5:]] == [
        "GENDER//F", "ICD10CM//E11.9", "LOINC//2345-7", "MEDS_BIRTH", "NOTE//discharge"
    ]
    write_table(meds_dir / TRAIN, rows_table(rows))
    report = validate_dataset(meds_dir)
    assert report.ok, report.errors
    assert [str(w) for w in report.warnings] == [
        f"{TRAIN}: column 'time', row 6 (subject 2): 1 subject(s) have 2 timed event(s) before "
        "their MEDS_BIRTH event (prepare folds them into the birth position); expected "
        "MEDS_BIRTH no later than a subject's first timed event"
    ]


def test_prepare_counts_the_events_it_folds_into_the_birth_position(meds_dir: Path) -> None:
    from ehrmotor.prepare import PrepareSummary
    from ehrmotor.prepare.positions import count_before_birth

    rows = _born_late(1, datetime(2010, 3, 1, 9)) + _born_late(2, datetime(2011, 1, 1))
    # Subject 4 has no MEDS_BIRTH: its first event is its birth, nothing is early.
    rows += [r for r in subject_rows(4) if r["code"] != "MEDS_BIRTH"]
    write_table(meds_dir / TRAIN, rows_table(rows))
    events = scan_shard(meds_dir / TRAIN).collect()
    assert count_before_birth(events) == (1, 2)
    assert count_before_birth(scan_shard(meds_dir / HELD_OUT).collect()) == (0, 0)
    summary = PrepareSummary(subjects_born_late=1, events_before_birth=2)
    assert "events before MEDS_BIRTH 2 of 1 subject(s), folded into the birth position" in (
        summary.lines()
    )
