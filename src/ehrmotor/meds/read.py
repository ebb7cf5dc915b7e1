"""Reading MEDS datasets: finding shards, reading them with one schema, reading metadata.

Every pipeline step reads data through `scan_shard`, which normalises MEDS 0.4 and 0.3-style
shards to DATA_COLUMNS with fixed dtypes. Layout (MEDS 0.4, with 0.3-style datasets accepted)::

    DIR/data/**/*.parquet              subject_id, time, code, [numeric_value], [text_value]
    DIR/metadata/codes.parquet         code, description, parent_codes   (optional)
    DIR/metadata/dataset.json          {"meds_version": "0.4.1", ...}    (optional, warned)
    DIR/metadata/subject_splits.parquet  subject_id, split               (optional)
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa

from ehrmotor.errors import InputError

logger = logging.getLogger(__name__)

DATA_COLUMNS = ("subject_id", "time", "code", "numeric_value", "text_value")

# The normalised dtypes that `scan_shard` produces, in DATA_COLUMNS order.
DATA_DTYPES: dict[str, pl.DataType] = {
    "subject_id": pl.Int64(),
    "time": pl.Datetime("us"),
    "code": pl.String(),
    "numeric_value": pl.Float32(),
    "text_value": pl.String(),
}

DATA_DIR = "data"
CODES_FILE = "metadata/codes.parquet"
DATASET_FILE = "metadata/dataset.json"
SPLITS_FILE = "metadata/subject_splits.parquet"
BIRTH_CODE = "MEDS_BIRTH"  # MEDS's codes of birth and death
DEATH_CODE = "MEDS_DEATH"
US_PER_DAY = 86_400_000_000  # MEDS times are microseconds
# A MEDS split file outside the dataset: `prepare --held-out-fraction` writes it to WORK, and
# `pretrain` copies it into the model bundle (evaluate's default split file there).
HELD_OUT_FILE = "subject_splits.parquet"
# The split names MEDS defines; pretraining leaves out held_out (and whatever prepare is told).
KNOWN_SPLITS = ("train", "tuning", "held_out")

# MEDS minor versions whose data layout this module understands.
SUPPORTED_VERSIONS = ("0.3", "0.4")



# --------------------------------------------------------------------------- findings


@dataclass(frozen=True)
class Finding:
    """One problem found in a MEDS dataset.

    `file` is the path relative to the MEDS directory (or the directory itself when it
    is missing); `message` reads "<what is wrong>; expected <what>". `str()` renders the
    finding as a single line, leaving out location parts that are None.
    """

    file: str
    message: str
    column: str | None = None
    row: int | None = None
    subject_id: int | None = None

    def __str__(self) -> str:
        """Render as "<file>: column '<c>', row <r> (subject <s>): <message>"."""
        location = []
        if self.column is not None:
            location.append(f"column '{self.column}'")
        if self.row is not None:
            location.append(f"row {self.row}")
        where = ", ".join(location)
        if self.subject_id is not None:
            where = (
                f"{where} (subject {self.subject_id})" if where else f"subject {self.subject_id}"
            )
        text = f"{self.file}: {where}: {self.message}" if where else f"{self.file}: {self.message}"
        # Messages can embed library exception text; keep the rendering to one line.
        return re.sub(r"\s*\n\s*", " ", text)



class MedsError(InputError):
    """A MEDS dataset cannot be used; the message has one line per error finding."""

    def __init__(self, message: str, findings: Sequence[Finding] = ()) -> None:
        super().__init__(message)
        self.findings = list(findings)

    @classmethod
    def from_findings(cls, findings: Sequence[Finding]) -> MedsError:
        """Build the error whose message is the findings rendered one per line."""
        return cls("\n".join(str(f) for f in findings), findings)


# --------------------------------------------------------------------------- file discovery


def relative_path(meds_dir: Path, path: Path) -> str:
    """Path of `path` relative to `meds_dir` in POSIX form, for stable messages."""
    try:
        return path.relative_to(meds_dir).as_posix()
    except ValueError:
        return str(path)


def _is_hidden(path: Path, root: Path) -> bool:
    """True when any component of `path` below `root` starts with a dot (.DS_Store, .git)."""
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def data_dir_files(meds_dir: Path) -> list[Path]:
    """All visible regular files under DIR/data, sorted; data/ must exist."""
    data_dir = meds_dir / DATA_DIR
    return sorted(p for p in data_dir.rglob("*") if p.is_file() and not _is_hidden(p, data_dir))


def data_files(meds_dir: Path) -> list[Path]:
    """Sorted list of the parquet data files under `meds_dir`/data (any nesting).

    Hidden files and folders are skipped. Raises MedsError if data/ is missing or holds
    no parquet file. Non-parquet files are ignored here; `validate_dataset` reports them.
    """
    meds_dir = Path(meds_dir)
    data_dir = meds_dir / DATA_DIR
    if not data_dir.is_dir():
        raise MedsError(f"{meds_dir}: no '{DATA_DIR}/' directory; expected MEDS data shards there")
    files = [p for p in data_dir_files(meds_dir) if p.suffix == ".parquet"]
    if not files:
        raise MedsError(
            f"{meds_dir}: '{DATA_DIR}/' holds no parquet files; expected data/**/*.parquet shards"
        )
    return files


# --------------------------------------------------------------------------- schema checks


def is_string_type(dtype: pa.DataType) -> bool:
    """True for string, large_string, string_view, or a dictionary of those."""
    if pa.types.is_dictionary(dtype):
        dtype = dtype.value_type
    return bool(
        pa.types.is_string(dtype)
        or pa.types.is_large_string(dtype)
        or pa.types.is_string_view(dtype)
    )


# --------------------------------------------------------------------------- metadata


def _read_parquet_table(path: Path) -> pl.DataFrame:
    """Read a whole (small) metadata parquet file; raises MedsError if unreadable."""
    try:
        return pl.read_parquet(path, hive_partitioning=False)
    except (pl.exceptions.PolarsError, pa.ArrowException, OSError) as exc:
        raise MedsError(
            f"{path}: cannot read parquet file ({exc}); expected a readable Parquet file"
        ) from exc


def _require_columns(path: Path, df: pl.DataFrame, names: Sequence[str]) -> None:
    """Raise MedsError naming the first of `names` that `df` lacks."""
    for name in names:
        if name not in df.columns:
            raise MedsError(
                f"{path}: column '{name}': required column is missing; expected a '{name}' column"
            )


def read_dataset_metadata(meds_dir: Path) -> dict[str, Any] | None:
    """Parsed metadata/dataset.json, or None when the file is absent.

    Raises MedsError when it exists but is not a JSON object.
    """
    path = Path(meds_dir) / DATASET_FILE
    if not path.is_file():
        return None
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MedsError(f"{path}: cannot parse JSON ({exc}); expected a JSON object") from exc
    if not isinstance(loaded, dict):
        raise MedsError(f"{path}: JSON is a {type(loaded).__name__}; expected a JSON object")
    return loaded


def read_codes_metadata(meds_dir: Path) -> pl.DataFrame | None:
    """metadata/codes.parquet as `code`, `description` (String), `parent_codes` (List[String]).

    Missing optional columns come back as nulls; None when the file is absent. Raises
    MedsError when the file is unreadable or lacks `code`.
    """
    path = Path(meds_dir) / CODES_FILE
    if not path.is_file():
        return None
    df = _read_parquet_table(path)
    _require_columns(path, df, ["code"])
    wanted = {"code": pl.String(), "description": pl.String(), "parent_codes": pl.List(pl.String)}
    try:
        return df.select(
            pl.col(name).cast(dtype) if name in df.columns else pl.lit(None, dtype).alias(name)
            for name, dtype in wanted.items()
        )
    except pl.exceptions.PolarsError as exc:
        raise MedsError(f"{path}: cannot convert columns ({exc}); expected {wanted}") from exc


def read_subject_splits(meds_dir: Path) -> pl.DataFrame | None:
    """metadata/subject_splits.parquet as `subject_id` (Int64), `split` (String).

    None when the file is absent; raises MedsError when unreadable or lacking a column.
    """
    path = Path(meds_dir) / SPLITS_FILE
    return read_splits_file(path) if path.is_file() else None


def read_splits_file(path: Path) -> pl.DataFrame:
    """A MEDS subject_splits.parquet at any path (e.g. the one `prepare --held-out-fraction`
    writes) as `subject_id` (Int64), `split` (String); MedsError naming the file when it is
    missing, unreadable or lacks a column."""
    path = Path(path)
    if not path.is_file():
        raise MedsError(f"{path}: not found; expected a MEDS subject_splits.parquet "
                        "(subject_id, split)")
    df = _read_parquet_table(path)
    _require_columns(path, df, ["subject_id", "split"])
    try:
        return df.select(pl.col("subject_id").cast(pl.Int64), pl.col("split").cast(pl.String))
    except pl.exceptions.PolarsError as exc:
        raise MedsError(
            f"{path}: cannot convert columns ({exc}); expected subject_id int64, split string"
        ) from exc


def subjects_in_several_splits(table: pl.DataFrame) -> pl.DataFrame:
    """The subjects of a splits table listed under more than one split name: `subject_id`,
    `splits` (their sorted names), sorted by subject_id."""
    return (table.group_by("subject_id").agg(pl.col("split").unique().sort().alias("splits"))
            .filter(pl.col("splits").list.len() > 1).sort("subject_id"))


def unknown_split_rows(table: pl.DataFrame) -> pl.DataFrame:
    """The rows of a splits table whose split is not one of KNOWN_SPLITS, sorted by subject."""
    return table.filter(~pl.col("split").is_in(list(KNOWN_SPLITS))
                        | pl.col("split").is_null()).sort("subject_id")


def _normalise_column(name: str, schema: pl.Schema) -> pl.Expr:
    """Expression producing column `name` with its DATA_DTYPES dtype (null if absent)."""
    dtype = DATA_DTYPES[name]
    if name not in schema:
        return pl.lit(None, dtype).alias(name)
    column = pl.col(name)
    source = schema[name]
    if name == "time" and isinstance(source, pl.Datetime) and source.time_zone is not None:
        # MEDS times are naive; express zoned times as naive UTC rather than local clock.
        column = column.dt.convert_time_zone("UTC").dt.replace_time_zone(None)
    return column.cast(dtype)


def scan_shard(path: Path) -> pl.LazyFrame:
    """Lazily read one data file as exactly DATA_COLUMNS with normalised dtypes.

    Out: subject_id Int64, time Datetime("us"), code String, numeric_value Float32,
    text_value String. Missing optional columns are added as nulls; extra columns are
    dropped. Raises MedsError when the file is unreadable or lacks a required column.
    """
    path = Path(path)
    lazy = pl.scan_parquet(path, hive_partitioning=False)
    try:
        schema = lazy.collect_schema()
    except (pl.exceptions.PolarsError, pa.ArrowException, OSError) as exc:
        raise MedsError(
            f"{path}: cannot read parquet file ({exc}); expected a readable Parquet file"
        ) from exc
    for name in ("subject_id", "time", "code"):
        if name not in schema:
            raise MedsError(
                f"{path}: column '{name}': required column is missing; expected a '{name}' column"
            )
    return lazy.select(_normalise_column(name, schema) for name in DATA_COLUMNS)

