"""Validating MEDS datasets: every problem as a one-line finding naming file, column and row.

Each data file is checked on its own (`shard_checks`: schema and rows); this module adds what
needs the whole dataset: subjects shared between files, the metadata files, codes missing from
codes.parquet, and the counts of the report.
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

from ehrmotor.errors import cut
from ehrmotor.meds.oddities import describe_cycles, parent_cycles
from ehrmotor.meds.read import (
    CODES_FILE,
    DATA_DIR,
    DATASET_FILE,
    KNOWN_SPLITS,
    SPLITS_FILE,
    SUPPORTED_VERSIONS,
    Finding,
    MedsError,
    data_dir_files,
    is_string_type,
    read_dataset_metadata,
    relative_path,
    subjects_in_several_splits,
    unknown_split_rows,
)
from ehrmotor.meds.shard_checks import Findings, check_shard

logger = logging.getLogger(__name__)


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


# --------------------------------------------------------------------------- cross-file checks


def _check_subjects_across_files(
    rels: list[str], subjects: list[pl.DataFrame], found: Findings
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


def _check_code_coverage(codes: list[pl.DataFrame], known: pl.DataFrame, found: Findings) -> None:
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
            f"{cut(missing['code'][0])!r}",
            "every data code to have a row in codes.parquet",
            column="code",
        )


def _check_parent_cycles(meds_dir: Path, found: Findings) -> None:
    """Warn when codes.parquet's parent_codes form a cycle (a code its own ancestor).

    A parent_codes column that is absent or not a list of strings is left alone here (prepare
    reports one it cannot read).
    """
    path = meds_dir / CODES_FILE
    if "parent_codes" not in pq.read_schema(path).names:
        return
    try:
        edges = (pl.read_parquet(path, columns=["code", "parent_codes"], hive_partitioning=False)
                 .select(pl.col("code").cast(pl.String),
                         parent=pl.col("parent_codes").cast(pl.List(pl.String)))
                 .explode("parent"))
    except (pl.exceptions.PolarsError, pa.ArrowException, OSError):
        return
    cycles = parent_cycles(edges)
    if cycles.height:
        found.warn(CODES_FILE, f"{describe_cycles(cycles)}; the ontology keeps the cycle, so "
                   "each code on it counts the others as ancestors",
                   "parent_codes without cycles", column="parent_codes")


def _check_dataset_json(meds_dir: Path, found: Findings) -> str | None:
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
            f"meds_version {cut(version)!r} is not a version this tool was built for",
            "0.3.x or 0.4.x",
        )
    return version


def _check_metadata_parquet(
    meds_dir: Path, rel: str, columns: dict[str, Any], found: Findings
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


def check_split_names(rel: str, splits: pl.DataFrame, found: Findings) -> None:
    """Error for subjects listed under two splits (a held-out subject could be pretrained on);
    warning for split names MEDS does not define (prepare pretrains on them)."""
    table = splits.select(pl.col("subject_id").cast(pl.Int64), pl.col("split").cast(pl.String))
    several = subjects_in_several_splits(table)
    if several.height:
        found.error(rel, f"{several.height} subject(s) are listed under more than one split "
                    f"(e.g. under {', '.join(several['splits'][0])})",
                    "each subject in exactly one split", column="subject_id",
                    subject_id=several["subject_id"][0])
    unknown = unknown_split_rows(table)
    if unknown.height:
        found.warn(rel, f"{unknown['subject_id'].n_unique()} subject(s) are in a split other "
                   f"than {', '.join(KNOWN_SPLITS)} (e.g. {unknown['split'][0]!r}); prepare "
                   "pretrains on them unless --exclude-splits names it",
                   f"split names among {', '.join(KNOWN_SPLITS)}", column="split",
                   subject_id=unknown["subject_id"][0])


# --------------------------------------------------------------------------- public entry points


def validate_dataset(meds_dir: Path, *, check_codes: bool = True) -> ValidationReport:
    """Check a MEDS directory and collect every problem found; never raises for bad data.

    `check_codes` enables the warning about data codes missing from codes.parquet. The
    returned report lists errors (the dataset cannot be used) and warnings (it can, but
    something is off), with file/row/subject counts over the readable data files.
    """
    meds_dir = Path(meds_dir)
    report = ValidationReport(meds_dir=meds_dir)
    found = Findings(report.errors, report.warnings)
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
    if codes is not None:
        _check_parent_cycles(meds_dir, found)
    splits = _check_metadata_parquet(
        meds_dir,
        SPLITS_FILE,
        {"subject_id": (pa.types.is_integer, "int64"), "split": (is_string_type, "string")},
        found,
    )
    if splits is not None:
        check_split_names(SPLITS_FILE, splits, found)
    return report


def _check_data(meds_dir: Path, report: ValidationReport, found: Findings) -> list[pl.DataFrame]:
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
        result = check_shard(meds_dir, path, found)
        if result is None:
            continue
        report.num_rows += result.num_rows
        if result.subjects is not None:
            rels.append(relative_path(meds_dir, path))
            subjects.append(result.subjects)
        if result.codes is not None:
            codes.append(result.codes)
    report.num_subjects = _check_subjects_across_files(rels, subjects, found)
    found.oddities.warn(found)  # one warning per oddity, summed over the files
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
