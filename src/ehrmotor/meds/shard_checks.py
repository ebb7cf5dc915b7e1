"""Checks of one MEDS data file: its schema and its rows, each problem a one-line finding.

The schema is read with pyarrow (footer only); the rows are checked with vectorised polars
expressions over whole columns, in one `collect_all` per file, so a shard of tens of millions of
rows is checked without any Python-level loop over rows or subjects. `validate` runs `check_shard`
on every file and adds the checks across files and of the metadata.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from ehrmotor.errors import cut
from ehrmotor.meds.oddities import Oddities, births_query, oddities_query
from ehrmotor.meds.read import Finding, is_string_type, relative_path

# Name of the row-index column added while checking rows; the dunder keeps it from
# colliding with user columns (we only ever select known columns next to it anyway).
_ROW = "__row"

# Control characters (C0 and DEL): a code holding one would become a garbled vocabulary entry.
_CONTROL_CHARS = r"[\x00-\x1f\x7f]"


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
class Findings:
    """Accumulates errors and warnings while validating, and the data oddities over files
    (reported as warnings by `oddities.warn(found)` once every file is checked)."""

    errors: list[Finding] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)
    oddities: Oddities = field(default_factory=Oddities)

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
    float16: bool  # numeric_value is float16 (MEDS: float32)


def _check_optional_column(
    rel: str, schema: pa.Schema, name: str, kind: str, accept: Any, found: Findings
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


def _check_schema(rel: str, schema: pa.Schema, found: Findings) -> _ShardSchema:
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
    float16 = "numeric_value" in names and pa.types.is_float16(schema.field("numeric_value").type)
    return _ShardSchema(
        subject_id_present="subject_id" in names,
        subject_id_int=sid_int,
        time_ok=time_ok,
        code_present="code" in names,
        code_string=code_string,
        float16=float16,
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


_CODE_EXPECTED = "a non-empty code without control characters (newline, tab, < 0x20 or 0x7f)"


def _row_problems(result: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(result key prefix, problem, expectation, column) of each single-row check, in report
    order; a check found something when `result` has its `<prefix>_row`."""
    clipped = cut(result.get("control_code_value") or "")

    def counted(what: str, prefix: str) -> str:
        return f"{what} ({result.get(f'{prefix}_count')} row(s) of this file)"

    return [
        ("null_sid", "null subject_id", "a non-null int64", "subject_id"),
        ("null_code", "null code", "a non-null string", "code"),
        ("empty_code", counted("empty code", "empty_code"), _CODE_EXPECTED, "code"),
        ("control_code", counted(f"code {clipped!r} holds a control character", "control_code"),
         _CODE_EXPECTED, "code"),
        ("split", "subject's rows are not contiguous (the subject appeared earlier in the file)",
         "all rows of a subject to be adjacent", "subject_id"),
        ("unsorted", "time is earlier than the previous row of the same subject",
         "static rows (null time) first, then non-decreasing times within a subject", "time"),
    ]


def _report_row_checks(rel: str, result: dict[str, Any], found: Findings) -> None:
    """Turn the merged single-row results of the row and order checks into findings."""
    for prefix, problem, expected, column in _row_problems(result):
        if result.get(f"{prefix}_row") is not None:
            found.error(rel, problem, expected, column=column, row=result[f"{prefix}_row"],
                        subject_id=result.get(f"{prefix}_sid"))


@dataclass
class ShardResult:
    """What cross-file checks need from one shard: its row count, subjects and codes."""

    num_rows: int
    subjects: pl.DataFrame | None
    codes: pl.DataFrame | None


def check_shard(meds_dir: Path, path: Path, found: Findings) -> ShardResult | None:
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
    needed = [c for c in ("subject_id", "time", "code", "numeric_value", "text_value")
              if c in schema.names]

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
            queries["oddities"] = oddities_query(non_null, needed, shape.float16)
            queries["births"] = births_query(non_null)
        queries["subjects"] = base.select(pl.col("subject_id").cast(pl.Int64).drop_nulls().unique())
    if shape.code_string:
        queries["codes"] = base.select(pl.col("code").cast(pl.String).drop_nulls().unique())
    if not queries:
        return ShardResult(num_rows, None, None)
    try:
        frames = dict(zip(queries, pl.collect_all(list(queries.values())), strict=True))
    except (pl.exceptions.PolarsError, pa.ArrowException, OSError) as exc:
        found.error(rel, f"cannot read data ({exc})", "a readable Parquet file")
        return ShardResult(num_rows, None, None)

    checks: dict[str, Any] = {}
    for name in ("rows", "order"):
        if name in frames:
            checks |= frames[name].row(0, named=True)
    _report_row_checks(rel, checks, found)
    if "oddities" in frames:
        found.oddities.add_file(rel, frames["oddities"].row(0, named=True)
                                | frames["births"].row(0, named=True))
    return ShardResult(num_rows, frames.get("subjects"), frames.get("codes"))
