"""MEDS label files: the labels of one prediction task, read, checked and written.

A label file is parquet in MEDS's label schema (`meds.LabelSchema` in meds 0.4,
`meds.label_schema` in meds 0.3): `subject_id` int64, `prediction_time` timestamp[us] (the label
may use data up to and including this time) and the label in one of `boolean_value`,
`integer_value`, `float_value` or `categorical_value`. ACES and the MEDS-DEV task pipelines write
all four value columns, three of them null, and may shard the labels like the data::

    COHORT.parquet                      one file (`data=single_file`)
    COHORT/<split>/<shard>.parquet      one per data shard (`data=sharded`), beside COHORT/.logs/

A folder holds one task per name (`label_tasks`): its shard files (`0.parquet`, ...) and split
folders belong to the folder's task, any other file is a task named by its stem, so the folder
`ehrmotor label` writes (`death.parquet`, `heart_failure.parquet`) holds two tasks, never merged.

MEDS has no time-to-event label yet; ours keeps the two key columns and adds `event_time`
timestamp[us] (null when censored) and `censor_time` timestamp[us] (end of follow-up; may be null
when the event is set). A row is valid when at least one of them is set, event_time is strictly
after prediction_time, censor_time is at or after it, and event_time <= censor_time when both are
set. `time_to_event_days` turns such a frame into days and an event flag. Every kind: one row
per (subject_id, prediction_time) and, for time-to-event labels, no MEDS value column filled.
`embed`, `evaluate` and the label writer all check through `check_label_set` (in-memory labels)
or the readers here (files).

Errors are `InputError`s of one line naming the file, the column and, where there is one, the row
(0-based within its file) and subject.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from ehrmotor.artifacts import atomic_path, check_output
from ehrmotor.errors import InputError, first_line, one_line
from ehrmotor.meds.label_paths import label_tasks, one_task
from ehrmotor.meds.read import Finding

LABEL_KINDS = ("boolean", "integer", "float", "categorical", "time_to_event")
VALUE_COLUMNS = {"boolean": "boolean_value", "integer": "integer_value", "float": "float_value",
                 "categorical": "categorical_value"}
KEY_COLUMNS = ("subject_id", "prediction_time")
TIME_TO_EVENT_COLUMNS = ("event_time", "censor_time")
MICROSECONDS_PER_DAY = 86_400_000_000

_FILE, _ROW = "_file", "_row"  # where each row came from, for error messages


def _is_time(dtype: pl.DataType) -> bool:
    return isinstance(dtype, pl.Datetime) or dtype == pl.Date


def _is_string(dtype: pl.DataType) -> bool:
    return dtype == pl.String or isinstance(dtype, pl.Categorical | pl.Enum)


# column -> (dtype it is read as, what it must hold, which stored dtypes convert without loss)
_TYPES: dict[str, tuple[pl.DataType, str, Callable[[pl.DataType], bool]]] = {
    "subject_id": (pl.Int64(), "integers", lambda dtype: dtype.is_integer()),
    "prediction_time": (pl.Datetime("us"), "a datetime (timestamp)", _is_time),
    "boolean_value": (pl.Boolean(), "booleans", lambda dtype: dtype == pl.Boolean),
    "integer_value": (pl.Int64(), "integers", lambda dtype: dtype.is_integer()),
    "float_value": (pl.Float64(), "numbers", lambda dtype: dtype.is_numeric()),
    "categorical_value": (pl.String(), "strings", _is_string),
    "event_time": (pl.Datetime("us"), "a datetime (timestamp)", _is_time),
    "censor_time": (pl.Datetime("us"), "a datetime (timestamp)", _is_time),
}


# The arrow types written: meds 0.4's LabelSchema (float32 labels, plain strings), ours for times.
_ARROW_TYPES = {"subject_id": pa.int64(), "prediction_time": pa.timestamp("us"),
                "boolean_value": pa.bool_(), "integer_value": pa.int64(),
                "float_value": pa.float32(), "categorical_value": pa.string(),
                "event_time": pa.timestamp("us"), "censor_time": pa.timestamp("us")}


def label_columns(kind: str) -> tuple[str, ...]:
    """The columns of a LabelSet frame of this kind, in order."""
    if kind == "time_to_event":
        return KEY_COLUMNS + TIME_TO_EVENT_COLUMNS
    return (*KEY_COLUMNS, VALUE_COLUMNS[kind])


@dataclass(frozen=True)
class LabelSet:
    """The labels of one task.

    frame: subject_id Int64, prediction_time Datetime("us"), then for kind "time_to_event"
    event_time and censor_time Datetime("us") (nullable), else the kind's value column
    (boolean_value Boolean, integer_value Int64, float_value Float64, categorical_value String);
    sorted by subject_id, prediction_time (stable). files: the parquet files it was read from.
    """

    name: str
    kind: str
    frame: pl.DataFrame
    files: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in LABEL_KINDS:
            raise InputError(f"labels {self.name}: kind {self.kind!r}; expected one of "
                             f"{', '.join(LABEL_KINDS)}")
        missing = [c for c in label_columns(self.kind) if c not in self.frame.columns]
        if missing:
            raise InputError(f"labels {self.name}: columns {', '.join(missing)} are missing; "
                             f"expected {', '.join(label_columns(self.kind))}")


def _cast(series: pl.Series, file: str | Path) -> pl.Series:
    """A known label column as its `_TYPES` dtype; zoned times become naive UTC."""
    target, expected, accepts = _TYPES[series.name]
    source = series.dtype
    if source != pl.Null and not accepts(source):
        raise InputError(f"{file}: column '{series.name}' has type {source}; expected {expected}")
    if isinstance(source, pl.Datetime) and source.time_zone is not None:
        series = series.dt.convert_time_zone("UTC").dt.replace_time_zone(None)
    try:
        return series.cast(target)
    except pl.exceptions.PolarsError as exc:
        raise InputError(f"{file}: column '{series.name}' has type {source}; cannot convert it "
                         f"to {target} ({first_line(exc)})") from exc


def _require_values(frame: pl.DataFrame, column: str, file: Path) -> None:
    nulls = frame[column].is_null()
    if nulls.any():
        row = int(nulls.arg_true()[0])
        subject = None if column == "subject_id" else frame["subject_id"][row]
        raise InputError(str(Finding(str(file), f"{nulls.sum()} null values; expected none",
                                     column=column, row=row, subject_id=subject)))


def _read_file(file: Path, index: int) -> pl.DataFrame:
    """The label columns of one file, typed and with `_FILE`/`_ROW`; other columns dropped."""
    try:
        lazy = pl.scan_parquet(file, hive_partitioning=False)
        known = [name for name in lazy.collect_schema().names() if name in _TYPES]
        frame = lazy.select(known).collect()
    except (pl.exceptions.PolarsError, pa.ArrowException, OSError) as exc:
        raise InputError(f"{file}: cannot read parquet ({one_line(exc)}); expected a MEDS "
                         "label file") from exc
    for column in KEY_COLUMNS:
        if column not in frame.columns:
            raise InputError(f"{file}: column '{column}' is missing; expected subject_id, "
                             "prediction_time and a label column")
    frame = pl.DataFrame([_cast(frame[name], file) for name in frame.columns])
    for column in KEY_COLUMNS:
        _require_values(frame, column, file)
    return frame.with_row_index(_ROW).with_columns(pl.lit(index, pl.UInt32).alias(_FILE))


def _read_files(files: list[Path]) -> pl.DataFrame:
    frames = [_read_file(file, index) for index, file in enumerate(files)]
    return pl.concat(frames, how="diagonal")


def _kind(frame: pl.DataFrame, path: Path, label_required: bool = True) -> str | None:
    """The label kind the columns of `frame` hold; InputError when it is not one. None when
    there is no label column at all and `label_required` is False (prediction times only)."""
    times = [column for column in TIME_TO_EVENT_COLUMNS if column in frame.columns]
    if not label_required and not times and not set(VALUE_COLUMNS.values()) & set(frame.columns):
        return None
    if len(times) == 2:
        return "time_to_event"
    kinds = {column: kind for kind, column in VALUE_COLUMNS.items()}
    present = [column for column in kinds if column in frame.columns]
    filled = [column for column in present if frame[column].null_count() < frame.height]
    if len(filled) > 1:
        raise InputError(f"{path}: columns {', '.join(filled)} all hold labels; expected one "
                         "label column per task")
    if filled:
        return kinds[filled[0]]
    if times:
        other = next(c for c in TIME_TO_EVENT_COLUMNS if c not in times)
        raise InputError(f"{path}: column '{other}' is missing; time-to-event labels need both "
                         "event_time and censor_time")
    if len(present) == 1:
        return kinds[present[0]]
    if present:
        raise InputError(f"{path}: columns {', '.join(present)} hold no label in any row; "
                         "expected one of them to hold the labels")
    raise InputError(f"{path}: no label column; expected one of {', '.join(kinds)} (MEDS) or "
                     "event_time and censor_time (time to event)")


# (column named, failing rows, message with {column} placeholders), checked in this order
_TIME_TO_EVENT_CHECKS = (
    ("event_time", pl.col("event_time").is_null() & pl.col("censor_time").is_null(),
     "neither event_time nor censor_time is set; expected an event time, a censor time or both"),
    ("event_time", pl.col("event_time") <= pl.col("prediction_time"),
     "event_time {event_time} is not after prediction_time {prediction_time}; expected an event "
     "strictly after the prediction time"),
    ("censor_time", pl.col("censor_time") < pl.col("prediction_time"),
     "censor_time {censor_time} is before prediction_time {prediction_time}; expected the end "
     "of follow-up at or after the prediction time"),
    ("event_time", pl.col("event_time") > pl.col("censor_time"),
     "event_time {event_time} is after censor_time {censor_time}; expected the event at or "
     "before the end of follow-up"),
)


def _violation(frame: pl.DataFrame, kind: str | None, files: Sequence[Path] = ()
               ) -> tuple[str, dict[str, Any], str] | None:
    """(column, first offending row, message) of the first broken rule, or None.

    Label values must be set; time-to-event rows must pass `_TIME_TO_EVENT_CHECKS` and hold no
    MEDS value; (subject_id, prediction_time) must not repeat. `frame` has `_ROW` (and `_FILE`).
    """
    if kind is None:
        checks = []
    elif kind != "time_to_event":
        column = VALUE_COLUMNS[kind]
        checks = [(column, pl.col(column).is_null(), "null label; expected a value in every row")]
    else:
        checks = [*_TIME_TO_EVENT_CHECKS, *[
            (column, pl.col(column).is_not_null(), f"{column} holds a label beside event_time "
             "and censor_time; expected one kind of label per task")
            for column in VALUE_COLUMNS.values() if column in frame.columns]]
    for column, failing, message in checks:
        bad = frame.filter(failing.fill_null(False))
        if bad.height:
            row = bad.row(0, named=True)
            more = f" ({bad.height} rows in all)" if bad.height > 1 else ""
            return column, row, message.format(**row) + more
    return _duplicate(frame, files)


def _duplicate(frame: pl.DataFrame, files: Sequence[Path]
               ) -> tuple[str, dict[str, Any], str] | None:
    """The first row repeating an earlier row's (subject_id, prediction_time), or None."""
    repeats = frame.filter(~pl.struct(*KEY_COLUMNS).is_first_distinct())
    if repeats.is_empty():
        return None
    row = repeats.row(0, named=True)
    first = frame.filter((pl.col("subject_id") == row["subject_id"])
                         & (pl.col("prediction_time") == row["prediction_time"])).row(0, named=True)
    where = f"row {first[_ROW]}"
    if _FILE in first and first[_FILE] != row[_FILE]:
        where += f" of {files[first[_FILE]]}"
    more = f" ({repeats.height} repeated rows in all)" if repeats.height > 1 else ""
    return "prediction_time", row, (
        f"prediction_time {row['prediction_time']} repeats {where} for this subject{more}; "
        "expected one label per subject and prediction time (drop or merge the repeats)")


def _raise(violation: tuple[str, dict[str, Any], str], where: Callable[[dict[str, Any]], str]
           ) -> None:
    column, row, message = violation
    raise InputError(str(Finding(where(row), message, column=column, row=row[_ROW],
                                 subject_id=row["subject_id"])))


def check_label_set(labels: LabelSet) -> None:
    """InputError (one line: the set's name, column, row of its frame, subject) when `labels`
    breaks a rule of the module docstring: the checks every label file passes, for labels
    built in memory."""
    violation = _violation(labels.frame.with_row_index(_ROW), labels.kind)
    if violation is not None:  # rows count in the frame (sorted), not in a file
        _raise(violation, lambda row: f"labels {labels.name}")


def _read_task(files: list[Path], path: Path, label_required: bool
               ) -> tuple[str | None, pl.DataFrame]:
    """(kind, checked frame sorted by the keys, stable) of one task's `files`."""
    frame = _read_files(files)
    kind = _kind(frame, path, label_required)
    violation = _violation(frame, kind, files)
    if violation is not None:
        _raise(violation, lambda row: str(files[row[_FILE]]))
    columns = label_columns(kind) if kind is not None else KEY_COLUMNS
    return kind, frame.sort(*KEY_COLUMNS, maintain_order=True).select(columns)


def read_label_sets(path: str | Path, *, task_name: str | None = None) -> list[LabelSet]:
    """The labels of every task in a MEDS label file or folder (`label_tasks`), by name.

    The kind is "time_to_event" when event_time and censor_time are columns, else the one MEDS
    value column that holds labels. `task_name` renames the one task (InputError when the
    folder holds several). Raises InputError (one line: file, column, row, subject) for a
    missing or mistyped column, null keys or labels, several label columns, time-to-event rows
    that break the rules above and repeated (subject_id, prediction_time) rows.
    """
    path = Path(path)
    tasks = label_tasks(path)
    if task_name is not None:
        tasks = [(task_name, one_task(path, tasks)[1])]
    return [_label_set(name, files, path) for name, files in tasks]


def read_label_set(path: str | Path, *, task_name: str | None = None) -> LabelSet:
    """The labels of the one task in a MEDS label file or folder; see `read_label_sets`.
    InputError when the folder holds several tasks."""
    path = Path(path)
    name, files = one_task(path, label_tasks(path))
    return _label_set(task_name or name, files, path)


def _label_set(name: str, files: list[Path], path: Path) -> LabelSet:
    kind, frame = _read_task(files, path, label_required=True)
    if kind is None:  # unreachable: _kind raises when a label is required
        raise InputError(f"{path}: no label column")
    return LabelSet(name, kind, frame, tuple(files))


def read_prediction_times(path: str | Path) -> pl.DataFrame:
    """`subject_id` Int64, `prediction_time` Datetime("us") of the one task in a label file or
    folder, sorted (stable). Read and checked as `read_label_set` does, but a file of
    prediction times alone (no label column) is enough: what `embed` needs."""
    path = Path(path)
    _, frame = _read_task(one_task(path, label_tasks(path))[1], path, label_required=False)
    return frame.select(KEY_COLUMNS)


def write_label_set(labels: LabelSet, path: str | Path) -> Path:
    """Write `labels` as one parquet file at `path`, atomically; return the path.

    Columns as in `LabelSet.frame`, except float_value, written as float32 as meds 0.4's
    LabelSchema has it. The rows are checked as `read_label_set` checks them, so what is
    written reads back. Refuses (OutputError) to replace a folder.
    """
    out = Path(path)
    check_output(out, "file")
    kind = labels.kind
    frame = pl.DataFrame([_cast(labels.frame[c], f"labels {labels.name}")
                          for c in label_columns(kind)])
    check_label_set(LabelSet(labels.name, kind, frame))
    schema = pa.schema([(column, _ARROW_TYPES[column]) for column in frame.columns])
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        pq.write_table(frame.to_arrow().cast(schema), tmp)
    return out


def time_to_event_days(frame: pl.DataFrame) -> pl.DataFrame:
    """`frame` (time-to-event labels) with `time_days` Float64 and `event` Boolean added.

    time_days: days from prediction_time to event_time when the event is set, else to
    censor_time (fractional; 1 hour = 1/24). event: whether event_time is set.
    """
    missing = [c for c in ("prediction_time", *TIME_TO_EVENT_COLUMNS) if c not in frame.columns]
    if missing:
        raise InputError(f"time_to_event_days: columns {', '.join(missing)} are missing; "
                         "expected time-to-event labels (prediction_time, event_time, "
                         "censor_time)")
    end = pl.coalesce("event_time", "censor_time")
    elapsed = (end - pl.col("prediction_time")).dt.total_microseconds()
    return frame.with_columns(time_days=elapsed.cast(pl.Float64) / MICROSECONDS_PER_DAY,
                              event=pl.col("event_time").is_not_null())
