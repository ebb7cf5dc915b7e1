"""Validating MEDS datasets: every problem as a one-line finding naming file, column and row.

Validation reads each shard's schema with pyarrow (footer only) and then checks the rows with
vectorised polars expressions over whole columns, so it scales to tens of millions of rows
without any Python-level loop over rows or subjects.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from ehrmotor.meds.read import (
    CODES_FILE,
    DATA_DIR,
    DATASET_FILE,
    SPLITS_FILE,
    SUPPORTED_VERSIONS,
    Finding,
    MedsError,
    data_dir_files,
    is_string_type,
    read_dataset_metadata,
    relative_path,
)

logger = logging.getLogger(__name__)

# Name of the row-index column added while checking rows; the dunder keeps it from
# colliding with user columns (we only ever select known columns next to it anyway).
_ROW = "__row"

# The MEDS birth code; `ehrmotor.prepare.positions` counts ages from it (not imported: meds
# stays light).
BIRTH_CODE = "MEDS_BIRTH"
# Control characters (C0 and DEL): a code holding one would become a garbled vocabulary entry.
_CONTROL_CHARS = r"[\x00-\x1f\x7f]"
# Longest code text quoted in a finding, so a runaway value keeps the message to one short line.
_MAX_QUOTED = 60

@dataclass
class ValidationReport:
    """Result of `validate_dataset`: findings plus a few dataset-wide counts.

    Counts cover the data files that could be read; `meds_version` comes from
    metadata/dataset.json when it is present and readable.
    """

    meds_dir: Path
    errors: list[Finding] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)
    num_files: int = 0
    num_rows: int = 0
    num_subjects: int = 0
    meds_version: str | None = None

    @property
    def ok(self) -> bool:
        """True when there are no errors (warnings are allowed)."""
        return not self.errors

    def summary(self) -> str:
        """One line with the counts and the number of errors and warnings."""
        version = self.meds_version or "unknown"
        return (
            f"{self.meds_dir}: MEDS {version}, {self.num_files} data file(s), "
            f"{self.num_rows} row(s), {self.num_subjects} subject(s); "
            f"{len(self.errors)} error(s), {len(self.warnings)} warning(s)"
        )



def _finding(
    file: str,
    what: str,
    expected: str,
    *,
    column: str | None = None,
    row: int | None = None,
    subject_id: int | None = None,
) -> Finding:
    """Build a Finding whose message follows the "<what>; expected <expected>" pattern."""
    return Finding(file, f"{what}; expected {expected}", column, row, subject_id)


@dataclass
class _Findings:
    """Accumulates errors and warnings while validating."""

    errors: list[Finding] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)

    def error(self, *args: Any, **kwargs: Any) -> None:
        """Record an error; arguments as for `_finding`."""
        self.errors.append(_finding(*args, **kwargs))

    def warn(self, *args: Any, **kwargs: Any) -> None:
        """Record a warning; arguments as for `_finding`."""
        self.warnings.append(_finding(*args, **kwargs))


# --------------------------------------------------------------------------- schema checks

@dataclass(frozen=True)
class _ShardSchema:
    """Which columns of a shard passed the schema checks, so row checks know what to read."""

    subject_id_present: bool
    subject_id_int: bool
    time_ok: bool
    code_present: bool
    code_string: bool


def _check_optional_column(
    rel: str, schema: pa.Schema, name: str, kind: str, accept: Any, found: _Findings
) -> None:
    """Check an optional column's type: error if present with a type `accept` rejects.

    A column of pyarrow's null type (all values null, no type recorded) is castable to
    anything, so it is only a warning.
    """
    if name not in schema.names:
        return
    dtype = schema.field(name).type
    if pa.types.is_null(dtype):
        found.warn(rel, "column has null type (no values)", kind, column=name)
    elif not accept(dtype):
        found.error(rel, f"column has type {dtype}", kind, column=name)


def _check_schema(rel: str, schema: pa.Schema, found: _Findings) -> _ShardSchema:
    """Check one data shard's arrow schema, recording findings; extra columns are allowed."""
    names = set(schema.names)
    for name in ("subject_id", "time", "code"):
        if name not in names:
            found.error(rel, "required column is missing", f"a '{name}' column", column=name)

    sid_int = False
    if "subject_id" in names:
        dtype = schema.field("subject_id").type
        if pa.types.is_integer(dtype):
            sid_int = True
            if not pa.types.is_int64(dtype):
                found.warn(rel, f"column has type {dtype}", "int64", column="subject_id")
        else:
            found.error(rel, f"column has type {dtype}", "int64", column="subject_id")

    time_ok = False
    if "time" in names:
        dtype = schema.field("time").type
        if pa.types.is_timestamp(dtype):
            time_ok = True
            if dtype.tz is not None:
                # MEDS times are naive; scan_shard converts zoned times to naive UTC.
                found.warn(rel, f"column has time zone {dtype.tz}", "timestamp[us]", column="time")
        else:
            found.error(
                rel, f"column has type {dtype}", "a timestamp (timestamp[us])", column="time"
            )

    code_string = False
    if "code" in names:
        dtype = schema.field("code").type
        code_string = is_string_type(dtype)
        if not code_string:
            found.error(rel, f"column has type {dtype}", "string", column="code")

    _check_optional_column(
        rel, schema, "numeric_value", "float32 (or float64)", pa.types.is_floating, found
    )
    _check_optional_column(rel, schema, "text_value", "string", is_string_type, found)
    return _ShardSchema(
        subject_id_present="subject_id" in names,
        subject_id_int=sid_int,
        time_ok=time_ok,
        code_present="code" in names,
        code_string=code_string,
    )


# --------------------------------------------------------------------------- row checks


def _null_check_exprs(shape: _ShardSchema) -> list[pl.Expr]:
    """Aggregations giving the first row with a null subject_id / code (null if none).

    Evaluated over the whole shard with a `_ROW` index column; one value per output.
    """
    row = pl.col(_ROW)
    exprs: list[pl.Expr] = []
    if shape.subject_id_present:
        exprs.append(row.filter(pl.col("subject_id").is_null()).first().alias("null_sid_row"))
    if shape.code_present:
        exprs.append(row.filter(pl.col("code").is_null()).first().alias("null_code_row"))
    return exprs


def _code_check_exprs(shape: _ShardSchema) -> list[pl.Expr]:
    """Aggregations locating the first empty code and the first code with a control character.

    Evaluated over the whole shard with a `_ROW` index column; each problem gives its count,
    first row, that row's subject (when subject_id is an integer) and, for control
    characters, the offending code. Requires a string code column.
    """
    if not shape.code_string:
        return []
    row = pl.col(_ROW)
    code = pl.col("code").cast(pl.String)
    problems = {"empty_code": code == "", "control_code": code.str.contains(_CONTROL_CHARS)}
    exprs: list[pl.Expr] = []
    for name, bad in problems.items():
        exprs += [
            bad.sum().alias(f"{name}_count"),
            row.filter(bad).first().alias(f"{name}_row"),
        ]
        if shape.subject_id_int:
            exprs.append(pl.col("subject_id").filter(bad).first().alias(f"{name}_sid"))
    exprs.append(code.filter(problems["control_code"]).first().alias("control_code_value"))
    return exprs


def _birth_check_exprs() -> list[pl.Expr]:
    """Aggregations counting timed events earlier than their subject's MEDS_BIRTH event.

    Evaluated over the shard's rows with a non-null subject_id and the original `_ROW`
    index; requires an integer subject_id, a timestamp time and a string code. Subjects
    without MEDS_BIRTH count nothing. The example is the first such event in the file.
    """
    row = pl.col(_ROW)
    sid = pl.col("subject_id")
    time = pl.col("time")
    birth = time.filter(pl.col("code").cast(pl.String) == BIRTH_CODE).min().over(sid)
    early = (time < birth).fill_null(False)
    return [
        early.sum().alias("early_events"),
        sid.filter(early).n_unique().alias("early_subjects"),
        row.filter(early).first().alias("early_row"),
        sid.filter(early).first().alias("early_sid"),
    ]


def _order_check_exprs(shape: _ShardSchema) -> list[pl.Expr]:
    """Aggregations locating the first row (and its subject) that breaks row order.

    Evaluated over the shard's rows with a non-null subject_id (null ids are reported
    separately and must not look like a subject change), keeping the original `_ROW`
    index. Outputs are null when the order is fine. Requires an integer subject_id.
    """
    row = pl.col(_ROW)
    sid = pl.col("subject_id")
    prev_sid = sid.shift(1)
    # A subject's block starts where the id changes; if that is not the subject's first
    # row in the file, its rows are split into several blocks.
    reappears = sid.ne_missing(prev_sid) & (row != row.min().over(sid))
    exprs = [
        row.filter(reappears).first().alias("split_row"),
        sid.filter(reappears).first().alias("split_sid"),
    ]
    if shape.time_ok:
        time = pl.col("time")
        prev_time = time.shift(1)
        # Static rows (null time) sort first, so a null after a non-null is out of order
        # just like a time that goes backwards.
        backwards = sid.eq_missing(prev_sid) & (
            (time.is_null() & prev_time.is_not_null()) | (time < prev_time).fill_null(False)
        )
        exprs += [
            row.filter(backwards).first().alias("unsorted_row"),
            sid.filter(backwards).first().alias("unsorted_sid"),
        ]
    return exprs


def _report_row_checks(rel: str, result: dict[str, Any], found: _Findings) -> None:
    """Turn the merged single-row results of the row, order and birth checks into findings."""
    if result.get("null_sid_row") is not None:
        found.error(
            rel,
            "null subject_id",
            "a non-null int64",
            column="subject_id",
            row=result["null_sid_row"],
        )
    if result.get("null_code_row") is not None:
        found.error(
            rel, "null code", "a non-null string", column="code", row=result["null_code_row"]
        )
    value = result.get("control_code_value") or ""
    clipped = value if len(value) <= _MAX_QUOTED else value[:_MAX_QUOTED] + "..."
    code_problems = {
        "empty_code": "empty code",
        "control_code": f"code {clipped!r} holds a control character",
    }
    for name, what in code_problems.items():
        if result.get(f"{name}_row") is None:
            continue
        found.error(
            rel,
            f"{what} ({result[f'{name}_count']} row(s) of this file)",
            "a non-empty code without control characters (newline, tab, < 0x20 or 0x7f)",
            column="code",
            row=result[f"{name}_row"],
            subject_id=result.get(f"{name}_sid"),
        )
    if result.get("split_row") is not None:
        found.error(
            rel,
            "subject's rows are not contiguous (the subject appeared earlier in the file)",
            "all rows of a subject to be adjacent",
            column="subject_id",
            row=result["split_row"],
            subject_id=result["split_sid"],
        )
    if result.get("unsorted_row") is not None:
        found.error(
            rel,
            "time is earlier than the previous row of the same subject",
            "static rows (null time) first, then non-decreasing times within a subject",
            column="time",
            row=result["unsorted_row"],
            subject_id=result["unsorted_sid"],
        )
    if result.get("early_events"):
        found.warn(
            rel,
            f"{result['early_subjects']} subject(s) have {result['early_events']} timed "
            f"event(s) before their {BIRTH_CODE} event (prepare folds them into the birth "
            "position)",
            f"{BIRTH_CODE} no later than a subject's first timed event",
            column="time",
            row=result["early_row"],
            subject_id=result["early_sid"],
        )


@dataclass
class _ShardResult:
    """What cross-file checks need from one shard: its row count, subjects and codes."""

    num_rows: int
    subjects: pl.DataFrame | None
    codes: pl.DataFrame | None


def _check_shard(meds_dir: Path, path: Path, found: _Findings) -> _ShardResult | None:
    """Validate one parquet data file; returns None when it cannot be read at all."""
    rel = relative_path(meds_dir, path)
    try:
        with pq.ParquetFile(path) as parquet_file:
            schema = parquet_file.schema_arrow
            num_rows = parquet_file.metadata.num_rows
    except (pa.ArrowException, OSError) as exc:
        found.error(rel, f"cannot read parquet file ({exc})", "a readable Parquet file")
        return None

    shape = _check_schema(rel, schema, found)
    needed = [c for c in ("subject_id", "time", "code") if c in schema.names]

    base = pl.scan_parquet(path, hive_partitioning=False).select(needed)
    indexed = base.with_row_index(_ROW)
    # All queries for this shard run in one collect_all so polars can share the scan.
    queries: dict[str, pl.LazyFrame] = {}
    if row_exprs := _null_check_exprs(shape) + _code_check_exprs(shape):
        queries["rows"] = indexed.select(row_exprs)
    if shape.subject_id_int:
        non_null = indexed.filter(pl.col("subject_id").is_not_null())
        queries["order"] = non_null.select(_order_check_exprs(shape))
        if shape.time_ok and shape.code_string:
            queries["birth"] = non_null.select(_birth_check_exprs())
        queries["subjects"] = base.select(pl.col("subject_id").cast(pl.Int64).drop_nulls().unique())
    if shape.code_string:
        queries["codes"] = base.select(pl.col("code").cast(pl.String).drop_nulls().unique())
    if not queries:
        return _ShardResult(num_rows, None, None)
    try:
        frames = dict(zip(queries, pl.collect_all(list(queries.values())), strict=True))
    except (pl.exceptions.PolarsError, pa.ArrowException, OSError) as exc:
        found.error(rel, f"cannot read data ({exc})", "a readable Parquet file")
        return _ShardResult(num_rows, None, None)

    checks: dict[str, Any] = {}
    for name in ("rows", "order", "birth"):
        if name in frames:
            checks |= frames[name].row(0, named=True)
    _report_row_checks(rel, checks, found)
    return _ShardResult(num_rows, frames.get("subjects"), frames.get("codes"))


# --------------------------------------------------------------------------- cross-file checks


def _check_subjects_across_files(
    rels: list[str], subjects: list[pl.DataFrame], found: _Findings
) -> int:
    """Report subjects found in more than one file; return the number of distinct subjects.

    `subjects[i]` holds the unique subject ids of file `rels[i]`. One finding per file
    that shares subjects with a later file, naming the first shared subject.
    """
    if not subjects:
        return 0
    tagged = pl.concat(
        [df.with_columns(pl.lit(i, pl.UInt32).alias("file")) for i, df in enumerate(subjects)]
    )
    per_subject = tagged.group_by("subject_id").agg(pl.col("file").sort())
    shared = (
        per_subject.filter(pl.col("file").list.len() > 1)
        .select(
            "subject_id",
            pl.col("file").list.get(0).alias("first"),
            pl.col("file").list.get(1).alias("second"),
        )
        .sort("first", "subject_id")
        .group_by("first", maintain_order=True)
        .agg(pl.col("subject_id").first(), pl.col("second").first(), pl.len().alias("count"))
    )
    # This loop is over files that share subjects, never over subjects or rows.
    for first, sid, second, count in shared.iter_rows():
        found.error(
            rels[first],
            f"subject also appears in {rels[second]} ({count} subject(s) of this file are "
            "also in later files)",
            "each subject's rows in exactly one data file",
            column="subject_id",
            subject_id=sid,
        )
    return per_subject.height


def _check_code_coverage(codes: list[pl.DataFrame], known: pl.DataFrame, found: _Findings) -> None:
    """Warn when codes used in the data are missing from metadata/codes.parquet.

    `codes` holds each data file's unique codes; `known` is codes.parquet's `code` column.
    """
    if not codes:
        return
    used = pl.concat(codes).unique()
    missing = used.join(known.select("code").unique(), on="code", how="anti").sort("code")
    if missing.height:
        found.warn(
            CODES_FILE,
            f"{missing.height} code(s) used in the data are not listed, e.g. "
            f"'{missing['code'][0]}'",
            "every data code to have a row in codes.parquet",
            column="code",
        )


def _check_dataset_json(meds_dir: Path, found: _Findings) -> str | None:
    """Check metadata/dataset.json; return its meds_version when present."""
    if not (meds_dir / DATASET_FILE).is_file():
        found.warn(DATASET_FILE, "file is missing", "a JSON object with 'meds_version'")
        return None
    try:
        metadata = read_dataset_metadata(meds_dir)
    except MedsError as exc:
        # The cause is the parse/IO error; without one, the JSON parsed to a non-object.
        cause = exc.__cause__
        problem = f"cannot parse JSON ({cause})" if cause else "JSON is not an object"
        found.error(DATASET_FILE, problem, "a JSON object")
        return None
    version = (metadata or {}).get("meds_version")
    if version is None:
        found.warn(DATASET_FILE, "no 'meds_version' key", 'e.g. "meds_version": "0.4.1"')
        return None
    version = str(version)
    if not any(re.fullmatch(rf"{re.escape(v)}(\..*)?", version) for v in SUPPORTED_VERSIONS):
        found.warn(
            DATASET_FILE,
            f"meds_version {version!r} is not a version this tool was built for",
            "0.3.x or 0.4.x",
        )
    return version


def _check_metadata_parquet(
    meds_dir: Path, rel: str, columns: dict[str, Any], found: _Findings
) -> pl.DataFrame | None:
    """Read a metadata parquet file and check its required columns and their types.

    `columns` maps each required column to (type test, expected type text). Returns the
    table when it is usable, None when absent or broken (after recording errors).
    """
    path = meds_dir / rel
    if not path.is_file():
        return None
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as exc:
        found.error(rel, f"cannot read parquet file ({exc})", "a readable Parquet file")
        return None
    usable = True
    for name, (accept, expected) in columns.items():
        if name not in schema.names:
            found.error(rel, "required column is missing", f"a '{name}' column", column=name)
            usable = False
        elif not accept(schema.field(name).type):
            found.error(rel, f"column has type {schema.field(name).type}", expected, column=name)
            usable = False
    if not usable:
        return None
    try:
        return pl.read_parquet(path, columns=list(columns), hive_partitioning=False)
    except (pl.exceptions.PolarsError, pa.ArrowException, OSError) as exc:
        found.error(rel, f"cannot read data ({exc})", "a readable Parquet file")
        return None


# --------------------------------------------------------------------------- public entry points


def validate_dataset(meds_dir: Path, *, check_codes: bool = True) -> ValidationReport:
    """Check a MEDS directory and collect every problem found; never raises for bad data.

    `check_codes` enables the warning about data codes missing from codes.parquet. The
    returned report lists errors (the dataset cannot be used) and warnings (it can, but
    something is off), with file/row/subject counts over the readable data files.
    """
    meds_dir = Path(meds_dir)
    report = ValidationReport(meds_dir=meds_dir)
    found = _Findings(report.errors, report.warnings)
    if not meds_dir.is_dir():
        what = "is not a directory" if meds_dir.exists() else "directory does not exist"
        found.error(str(meds_dir), what, "a MEDS dataset directory with data/ and metadata/")
        return report

    used_codes = _check_data(meds_dir, report, found)
    report.meds_version = _check_dataset_json(meds_dir, found)
    codes = _check_metadata_parquet(
        meds_dir, CODES_FILE, {"code": (is_string_type, "string")}, found
    )
    if check_codes and codes is not None:
        _check_code_coverage(used_codes, codes, found)
    _check_metadata_parquet(
        meds_dir,
        SPLITS_FILE,
        {"subject_id": (pa.types.is_integer, "int64"), "split": (is_string_type, "string")},
        found,
    )
    return report


def _check_data(meds_dir: Path, report: ValidationReport, found: _Findings) -> list[pl.DataFrame]:
    """Check everything under data/, filling the report's counts.

    Returns each readable file's unique codes, for the codes.parquet coverage check.
    """
    data_dir = meds_dir / DATA_DIR
    if not data_dir.is_dir():
        found.error(DATA_DIR, "directory is missing", "data/**/*.parquet shards")
        return []
    files = data_dir_files(meds_dir)
    parquet = [p for p in files if p.suffix == ".parquet"]
    for other in (p for p in files if p.suffix != ".parquet"):
        found.error(
            relative_path(meds_dir, other), "not a parquet file", "only *.parquet files in data/"
        )
    if not parquet:
        found.error(DATA_DIR, "directory holds no parquet files", "data/**/*.parquet shards")
        return []

    rels: list[str] = []
    subjects: list[pl.DataFrame] = []
    codes: list[pl.DataFrame] = []
    report.num_files = len(parquet)
    for path in parquet:
        result = _check_shard(meds_dir, path, found)
        if result is None:
            continue
        report.num_rows += result.num_rows
        if result.subjects is not None:
            rels.append(relative_path(meds_dir, path))
            subjects.append(result.subjects)
        if result.codes is not None:
            codes.append(result.codes)
    report.num_subjects = _check_subjects_across_files(rels, subjects, found)
    return codes


def require_valid(meds_dir: Path) -> ValidationReport:
    """Validate `meds_dir`, log its warnings, and raise MedsError if there are errors.

    Returns the report when the dataset is usable.
    """
    report = validate_dataset(meds_dir)
    for warning in report.warnings:
        logger.warning("%s", warning)
    if not report.ok:
        raise MedsError.from_findings(report.errors)
    logger.info("%s", report.summary())
    return report


