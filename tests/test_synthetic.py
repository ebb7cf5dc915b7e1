"""Tests for the embedded synthetic EHR (`ehrmotor.synthetic`, `ehrmotor synth`).

Datasets are generated once per session:
- `main_dir`: 3,000 subjects in 3 shards, used by most tests;
- `power_dir`: 8,000 subjects in 4 shards, for the planted effects that need statistical power;
- `small_w1` / `small_w2`: 300 subjects in 2 shards with 1 and 2 workers (determinism, meds_reader);
- `cli_seed1`: the same 300 subjects with seed 1, written through the `ehrmotor synth` command.

Everything about the planted structure is asserted from the written files alone.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import meds
import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from ehrmotor.cli import main as cli_main
from ehrmotor.meds import data_files, validate_dataset
from ehrmotor.synthetic import OUTCOMES, generate, true_hazards

MAIN_SUBJECTS = 3_000
POWER_SUBJECTS = 8_000
SMALL_SUBJECTS = 300
SPLITS = {meds.train_split, meds.tuning_split, meds.held_out_split}
MONTH_DAYS = 30.4375
ICD9_END = datetime(2015, 10, 1)
FIRST_CONCEPT_ID = 2_000_000_001
DATA_COLUMNS = ["subject_id", "time", "code", "numeric_value", "text_value"]
ATHENA_HEADERS = {
    "CONCEPT.csv": [
        "concept_id", "concept_name", "domain_id", "vocabulary_id", "concept_class_id",
        "standard_concept", "concept_code", "valid_start_date", "valid_end_date", "invalid_reason",
    ],
    "CONCEPT_RELATIONSHIP.csv": [
        "concept_id_1", "concept_id_2", "relationship_id", "valid_start_date", "valid_end_date",
        "invalid_reason",
    ],
    "CONCEPT_ANCESTOR.csv": [
        "ancestor_concept_id", "descendant_concept_id", "min_levels_of_separation",
        "max_levels_of_separation",
    ],
}
# Signature block of latent 0 (which drives diabetes) and a placebo block of latent 1 (which
# does not): codes of ICD-10-CM categories E70-E88 and L80-L99.
SIGNATURE_E70_E88 = r"^ICD10CM/E(7\d|8[0-8])"
PLACEBO_L80_L99 = r"^ICD10CM/L[89]\d"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def main_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "main"
    return generate(out, MAIN_SUBJECTS, seed=0, num_shards=3, progress=False)


@pytest.fixture(scope="session")
def power_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "power"
    return generate(out, POWER_SUBJECTS, seed=0, num_shards=4, progress=False)


@pytest.fixture(scope="session")
def small_w1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "small_w1"
    return generate(out, SMALL_SUBJECTS, seed=0, num_shards=2, workers=1, progress=False)


@pytest.fixture(scope="session")
def small_w2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "small_w2"
    return generate(out, SMALL_SUBJECTS, seed=0, num_shards=2, workers=2, progress=False)


@pytest.fixture(scope="session")
def cli_seed1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 300-subject dataset with seed 1, written by `python -m ehrmotor synth`."""
    out = tmp_path_factory.mktemp("synth") / "cli_seed1"
    command = [sys.executable, "-m", "ehrmotor", "synth", "--subjects", str(SMALL_SUBJECTS),
               "--seed", "1", "--out", str(out), "--shards", "2", "--workers", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"ehrmotor synth failed:\n{result.stderr}"
    return out


def _read_events(meds_dir: Path) -> pl.DataFrame:
    """All data rows, with the file they come from, its split folder and the row in the file."""
    frames = []
    for path in data_files(meds_dir):
        frames.append(
            pl.read_parquet(path).with_row_index("row").with_columns(
                file=pl.lit(path.relative_to(meds_dir).as_posix()),
                folder=pl.lit(path.parent.name),
            )
        )
    return pl.concat(frames)


@pytest.fixture(scope="session")
def main_events(main_dir: Path) -> pl.DataFrame:
    return _read_events(main_dir)


@pytest.fixture(scope="session")
def power_events(power_dir: Path) -> pl.DataFrame:
    """Timed rows of the power dataset (static rows dropped)."""
    return _read_events(power_dir).filter(pl.col("time").is_not_null())


@pytest.fixture(scope="session")
def athena(main_dir: Path) -> dict[str, pl.DataFrame]:
    """The three Athena files read as all-string columns with quoting disabled."""
    return {
        name: pl.read_csv(main_dir / "athena" / name, separator="\t", quote_char=None,
                          infer_schema=False)
        for name in ATHENA_HEADERS
    }


@pytest.fixture(scope="session")
def concepts(athena: dict[str, pl.DataFrame]) -> pl.DataFrame:
    """CONCEPT.csv with integer ids and the MEDS code string."""
    return athena["CONCEPT.csv"].with_columns(
        pl.col("concept_id").cast(pl.Int64),
        code=pl.col("vocabulary_id") + "/" + pl.col("concept_code"),
    )


def _ids(frame: pl.DataFrame, *columns: str) -> pl.DataFrame:
    return frame.select(pl.col(c).cast(pl.Int64) for c in columns)


# --------------------------------------------------------------------------- helpers


def _first_time(events: pl.DataFrame, pattern: str, name: str) -> pl.DataFrame:
    """Each subject's first time of a code matching the regex `pattern`, as column `name`."""
    return (
        events.filter(pl.col("code").str.contains(pattern))
        .group_by("subject_id")
        .agg(pl.col("time").min().alias(name))
    )


def _observation(events: pl.DataFrame) -> pl.DataFrame:
    """Each subject's first and last timed event other than the birth."""
    return (
        events.filter(pl.col("time").is_not_null() & (pl.col("code") != meds.birth_code))
        .group_by("subject_id")
        .agg(start=pl.col("time").min(), end=pl.col("time").max(),
             visits=pl.col("code").str.starts_with("Visit/").sum())
    )


def _months(start: pl.Expr, end: pl.Expr) -> pl.Expr:
    return (end - start).dt.total_seconds() / (86_400 * MONTH_DAYS)


def _poisson_sf(k: int, mu: float) -> float:
    """P(X >= k) for X ~ Poisson(mu)."""
    return 1.0 - sum(math.exp(-mu) * mu**i / math.factorial(i) for i in range(k))


def _digests(meds_dir: Path) -> dict[str, str]:
    """sha256 of every file under data/, metadata/ and athena/, by relative path."""
    return {
        path.relative_to(meds_dir).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for folder in ("data", "metadata", "athena")
        for path in sorted((meds_dir / folder).rglob("*"))
        if path.is_file()
    }


# --------------------------------------------------------------------------- MEDS conformance


def test_data_files_validate_against_meds_data_schema(main_dir: Path) -> None:
    paths = data_files(main_dir)
    assert len(paths) == 9  # 3 shards x 3 splits
    for path in paths:
        assert path.parent.name in SPLITS
        assert re.fullmatch(r"\d+\.parquet", path.name), path
        table = pq.read_table(path)
        meds.DataSchema.validate(table)  # types, and no null subject_id or code
        assert table.column_names == DATA_COLUMNS


def test_codes_metadata_validates_against_meds_code_metadata_schema(main_dir: Path) -> None:
    table = pq.read_table(main_dir / meds.code_metadata_filepath)
    meds.CodeMetadataSchema.validate(table)


def test_subject_splits_validate_against_meds_subject_split_schema(main_dir: Path) -> None:
    table = pq.read_table(main_dir / meds.subject_splits_filepath)
    meds.SubjectSplitSchema.validate(table)


def test_dataset_json_validates_against_meds_dataset_metadata_schema(main_dir: Path) -> None:
    metadata = json.loads((main_dir / meds.dataset_metadata_filepath).read_text())
    meds.DatasetMetadataSchema.validate(metadata)
    assert metadata["meds_version"].startswith("0.4")
    assert metadata["dataset_name"]


def test_splits_are_standard_and_match_the_data_folders(
    main_dir: Path, main_events: pl.DataFrame
) -> None:
    splits = pl.read_parquet(main_dir / meds.subject_splits_filepath)
    assert set(splits["split"].unique()) == SPLITS
    assert splits.height == MAIN_SUBJECTS
    assert splits["subject_id"].is_unique().all()
    folders = main_events.select("subject_id", "folder").unique()
    joined = folders.join(splits, on="subject_id", how="full", coalesce=True)
    mismatched = joined.filter(pl.col("folder").ne_missing(pl.col("split")))
    assert mismatched.height == 0, mismatched.head()
    share = (splits["split"] == meds.train_split).mean()
    assert 0.75 <= share <= 0.85


def test_meds_reader_converts_the_dataset(small_w1: Path, tmp_path: Path) -> None:
    import meds_reader

    convert = Path(sys.executable).with_name("meds_reader_convert")
    executable = str(convert) if convert.exists() else shutil.which("meds_reader_convert")
    assert executable, "meds_reader_convert is not installed"
    database = tmp_path / "db"
    result = subprocess.run(
        [executable, str(small_w1), str(database), "--num_threads", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    subjects = meds_reader.SubjectDatabase(str(database))
    assert len(subjects) == SMALL_SUBJECTS
    rows = pl.scan_parquet(data_files(small_w1)).select(pl.len()).collect().item()
    assert sum(len(subjects[sid].events) for sid in subjects) == rows


def test_own_validator_accepts_the_dataset(main_dir: Path, main_events: pl.DataFrame) -> None:
    report = validate_dataset(main_dir)
    assert report.ok, [str(e) for e in report.errors]
    # The codes.parquet coverage check passes; the one warning is for the diagnoses a visit
    # draws twice (same code and time): exact duplicate rows, as real exports have them.
    assert len(report.warnings) == 1 and "duplicate row(s)" in report.warnings[0].message
    assert report.num_subjects == MAIN_SUBJECTS
    assert report.num_rows == main_events.height
    assert report.meds_version is not None and report.meds_version.startswith("0.4")


# --------------------------------------------------------------------------- data properties


def test_each_subject_lives_in_exactly_one_file(main_events: pl.DataFrame) -> None:
    assert main_events.schema["subject_id"] == pl.Int64
    files = main_events.group_by("subject_id").agg(pl.col("file").n_unique())
    assert files.height == MAIN_SUBJECTS
    assert files["file"].max() == 1


def test_rows_are_sorted_by_subject_then_time_with_static_rows_first(
    main_events: pl.DataFrame,
) -> None:
    rows = main_events.sort("file", "row").with_columns(
        prev_subject=pl.col("subject_id").shift().over("file"),
        prev_time=pl.col("time").shift().over("file"),
    )
    subject_back = rows.filter(pl.col("subject_id") < pl.col("prev_subject"))
    assert subject_back.height == 0, subject_back.head()
    same = pl.col("subject_id") == pl.col("prev_subject")
    static_late = rows.filter(same & pl.col("prev_time").is_not_null() & pl.col("time").is_null())
    assert static_late.height == 0, static_late.head()
    time_back = rows.filter(same & (pl.col("time") < pl.col("prev_time")))
    assert time_back.height == 0, time_back.head()
    # The static rows are each subject's sex and race.
    static = (
        main_events.filter(pl.col("time").is_null())
        .group_by("subject_id")
        .agg(gender=pl.col("code").str.starts_with("Gender/").sum(),
             race=pl.col("code").str.starts_with("Race/").sum(), n=pl.len())
    )
    assert static.height == MAIN_SUBJECTS
    assert (static["gender"] == 1).all() and (static["race"] == 1).all()
    assert (static["n"] == 2).all()


def test_birth_once_per_subject_before_everything_and_some_deaths(
    main_events: pl.DataFrame,
) -> None:
    per_subject = main_events.group_by("subject_id").agg(
        births=(pl.col("code") == meds.birth_code).sum(),
        deaths=(pl.col("code") == meds.death_code).sum(),
        birth=pl.col("time").filter(pl.col("code") == meds.birth_code).first(),
        first=pl.col("time").filter(pl.col("code") != meds.birth_code).min(),
    )
    assert (per_subject["births"] == 1).all()
    early = per_subject.filter(pl.col("first") < pl.col("birth"))
    assert early.height == 0, early.head()
    assert per_subject["deaths"].max() == 1
    died = (per_subject["deaths"] == 1).mean()
    assert 0.01 < died < 0.5, died


def test_death_is_the_last_event_of_a_subject(main_events: pl.DataFrame) -> None:
    deaths = main_events.filter(pl.col("code") == meds.death_code).select("subject_id",
                                                                          death="time")
    after = main_events.join(deaths, on="subject_id").filter(pl.col("time") > pl.col("death"))
    assert after.height == 0, (
        f"{after['subject_id'].n_unique()} subject(s) have events after MEDS_DEATH:\n"
        f"{after.select('subject_id', 'time', 'code', 'death')}"
    )


def test_numeric_and_text_values_are_present_on_the_right_codes(
    main_events: pl.DataFrame,
) -> None:
    numeric = main_events.filter(pl.col("numeric_value").is_not_null())
    text = main_events.filter(pl.col("text_value").is_not_null())
    assert numeric.height > 10_000
    assert text.height > 100
    assert numeric["code"].str.starts_with("LOINC/").all()
    assert numeric["numeric_value"].is_finite().all()
    assert set(text["code"].unique()) == {"LOINC/72166-2"}
    assert set(text["text_value"].unique()) == {
        "Never smoker", "Former smoker", "Current every day smoker",
    }


def test_events_per_subject_are_heavy_tailed(main_events: pl.DataFrame) -> None:
    counts = main_events.group_by("subject_id").len()["len"]
    quantiles = {q: counts.quantile(q) for q in (0.0, 0.5, 0.9, 1.0)}
    assert quantiles[0.0] < 30, quantiles
    assert 50 <= quantiles[0.5] <= 200, quantiles
    assert quantiles[1.0] > 1_000, quantiles
    assert quantiles[0.9] > 3 * quantiles[0.5], quantiles
    assert counts.mean() > quantiles[0.5]


def test_codes_come_from_the_expected_vocabularies(main_events: pl.DataFrame) -> None:
    codes = main_events["code"]
    assert codes.n_unique() > 5_000
    vocabularies = set(codes.str.split("/").list.first().unique())
    expected = {"ICD10CM", "ICD9CM", "ICD10PCS", "LOINC", "RxNorm", "CPT4", "Visit", "Gender",
                "Race", "HemOnc", meds.birth_code, meds.death_code}
    assert expected <= vocabularies, expected - vocabularies
    icd9 = main_events.filter(pl.col("code").str.starts_with("ICD9CM/"))
    assert icd9.height > 1_000
    assert (icd9["time"] < ICD9_END).all(), icd9["time"].max()


def test_lab_values_are_realistic(main_events: pl.DataFrame) -> None:
    # LOINC code: (low, high) bounds of the median value in its usual unit.
    medians = {
        "2160-0": (0.6, 1.5),  # creatinine mg/dL
        "4548-4": (4.5, 7.0),  # HbA1c %
        "2345-7": (70, 140),  # glucose mg/dL
        "2951-2": (135, 145),  # sodium mmol/L
        "2823-3": (3.5, 5.0),  # potassium mmol/L
        "718-7": (11, 16),  # hemoglobin g/dL
    }
    labs = main_events.filter(pl.col("code").str.starts_with("LOINC/")).group_by("code").agg(
        median=pl.col("numeric_value").median(), n=pl.col("numeric_value").count()
    )
    found = dict(zip(labs["code"], labs["median"], strict=True))
    for loinc, (low, high) in medians.items():
        assert low <= found[f"LOINC/{loinc}"] <= high, (loinc, found[f"LOINC/{loinc}"])


def test_lab_values_are_positive(main_events: pl.DataFrame) -> None:
    bad = main_events.filter(pl.col("numeric_value") <= 0)
    assert bad.height == 0, bad.group_by("code").agg(pl.len(), pl.col("numeric_value").min())


# --------------------------------------------------------------------------- Athena vocabulary


def test_athena_files_parse_with_quoting_disabled(
    main_dir: Path, athena: dict[str, pl.DataFrame]
) -> None:
    for name, header in ATHENA_HEADERS.items():
        path = main_dir / "athena" / name
        lines = path.read_bytes().count(b"\n")
        assert athena[name].columns == header
        assert athena[name].height == lines - 1, name
    # The quirks live in CONCEPT.csv: Python's csv module reads it too, one record per line.
    path = main_dir / "athena" / "CONCEPT.csv"
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    header = ATHENA_HEADERS["CONCEPT.csv"]
    assert rows[0] == header
    assert len(rows) == path.read_bytes().count(b"\n")
    assert {len(row) for row in rows} == {len(header)}
    assert not any(row[-1] for row in rows[1:])  # invalid_reason is empty, "\r" not kept


def test_athena_has_the_quirks_of_the_real_download(
    main_dir: Path, concepts: pl.DataFrame, athena: dict[str, pl.DataFrame]
) -> None:
    # Bare (unbalanced) double quotes in some concept names.
    quoted = concepts.filter(pl.col("concept_name").str.contains('"', literal=True))
    assert quoted.height > 0
    assert (quoted["concept_name"].str.count_matches('"', literal=True) % 2 == 1).any()
    # CRLF line ends, on CPT4 rows; readers must not keep the carriage return.
    crlf = [line for line in (main_dir / "athena" / "CONCEPT.csv").read_bytes().split(b"\n")
            if line.endswith(b"\r")]
    assert crlf
    assert {line.split(b"\t")[3] for line in crlf} == {b"CPT4"}
    assert not concepts["invalid_reason"].drop_nulls().str.contains("\r").any()
    # YYYYMMDD dates.
    for name in ("CONCEPT.csv", "CONCEPT_RELATIONSHIP.csv"):
        for column in ("valid_start_date", "valid_end_date"):
            dates = athena[name][column]
            assert dates.str.contains(r"^\d{8}$").all(), (name, column)
            assert dates.str.to_date("%Y%m%d", strict=False).null_count() == 0, (name, column)
    # Invented concept ids.
    assert concepts["concept_id"].min() >= FIRST_CONCEPT_ID
    assert concepts["concept_id"].is_unique().all()
    assert concepts["code"].is_unique().all()


def test_athena_is_closed_under_reference(
    concepts: pl.DataFrame, athena: dict[str, pl.DataFrame]
) -> None:
    known = concepts.select(id="concept_id")
    relationship = athena["CONCEPT_RELATIONSHIP.csv"]
    ancestor = athena["CONCEPT_ANCESTOR.csv"]
    assert relationship.height > 0 and ancestor.height > 0
    for frame, columns in ((relationship, ("concept_id_1", "concept_id_2")),
                           (ancestor, ("ancestor_concept_id", "descendant_concept_id"))):
        for column in columns:
            ids = _ids(frame, column).rename({column: "id"}).unique()
            missing = ids.join(known, on="id", how="anti")
            assert missing.height == 0, (column, missing.head())


def test_icd9cm_concepts_reach_the_hierarchy_only_through_maps_to(
    concepts: pl.DataFrame, athena: dict[str, pl.DataFrame]
) -> None:
    icd9 = concepts.filter(pl.col("vocabulary_id") == "ICD9CM")
    assert icd9.height > 1_000
    assert icd9["standard_concept"].null_count() == icd9.height  # non-standard
    relationship = athena["CONCEPT_RELATIONSHIP.csv"].with_columns(
        pl.col("concept_id_1", "concept_id_2").cast(pl.Int64)
    )
    maps = relationship.filter(pl.col("relationship_id") == "Maps to").join(
        icd9.select(concept_id_1="concept_id"), on="concept_id_1"
    )
    assert maps["concept_id_1"].n_unique() == icd9.height  # every ICD9CM concept maps
    targets = maps.join(concepts.select(concept_id_2="concept_id", vocab="vocabulary_id",
                                        standard="standard_concept"), on="concept_id_2")
    assert set(targets["vocab"].unique()) == {"ICD10CM"}
    assert set(targets["standard"].unique()) == {"S"}
    own_is_a = relationship.filter(pl.col("relationship_id") == "Is a").join(
        icd9.select(concept_id_1="concept_id"), on="concept_id_1")
    assert own_is_a.height == 0
    ancestor = _ids(athena["CONCEPT_ANCESTOR.csv"], "ancestor_concept_id",
                    "descendant_concept_id")
    icd9_ids = icd9["concept_id"].implode()
    in_ancestor = ancestor.filter(pl.col("ancestor_concept_id").is_in(icd9_ids)
                                  | pl.col("descendant_concept_id").is_in(icd9_ids))
    assert in_ancestor.height == 0


def test_athena_has_vocabularies_the_pipeline_prunes(concepts: pl.DataFrame) -> None:
    counts = dict(concepts["vocabulary_id"].value_counts().iter_rows())
    assert counts.get("SPL", 0) > 0
    assert counts.get("HemOnc", 0) > 0


def test_every_data_code_is_an_athena_concept(
    main_events: pl.DataFrame, concepts: pl.DataFrame
) -> None:
    used = main_events.select("code").unique().filter(
        ~pl.col("code").is_in([meds.birth_code, meds.death_code])
    )
    missing = used.join(concepts.select("code"), on="code", how="anti")
    assert missing.height == 0, missing.head()


def test_codes_metadata_parents_match_the_athena_hierarchy(
    main_dir: Path, concepts: pl.DataFrame, athena: dict[str, pl.DataFrame]
) -> None:
    codes = pl.read_parquet(main_dir / meds.code_metadata_filepath)
    assert codes["code"].is_unique().all()
    expected_codes = set(concepts["code"]) | {meds.birth_code, meds.death_code}
    assert set(codes["code"]) == expected_codes
    standard = concepts.filter(pl.col("standard_concept").is_not_null()).select(child="concept_id")
    source = concepts.filter(pl.col("standard_concept").is_null()).select(child="concept_id")
    maps_to = (
        athena["CONCEPT_RELATIONSHIP.csv"]
        .filter(pl.col("relationship_id") == "Maps to")
        .select(child=pl.col("concept_id_1").cast(pl.Int64),
                parent=pl.col("concept_id_2").cast(pl.Int64))
        .filter(pl.col("child") != pl.col("parent"))
        .join(source, on="child")
    )
    is_a = (
        athena["CONCEPT_ANCESTOR.csv"]
        .filter(pl.col("min_levels_of_separation") == "1")
        .select(child=pl.col("descendant_concept_id").cast(pl.Int64),
                parent=pl.col("ancestor_concept_id").cast(pl.Int64))
        .join(standard, on="child")
    )
    names = concepts.select("concept_id", "code")
    athena_pairs = (
        pl.concat([maps_to, is_a])
        .join(names.rename({"concept_id": "child", "code": "child_code"}), on="child")
        .join(names.rename({"concept_id": "parent", "code": "parent_code"}), on="parent")
        .select("child_code", "parent_code")
        .unique()
    )
    metadata_pairs = (
        codes.select(child_code="code", parent_code="parent_codes")
        .explode("parent_code")
        .drop_nulls()
        .unique()
    )
    assert athena_pairs.height > 100_000
    only_athena = athena_pairs.join(metadata_pairs, on=["child_code", "parent_code"], how="anti")
    only_metadata = metadata_pairs.join(athena_pairs, on=["child_code", "parent_code"],
                                        how="anti")
    assert only_athena.height == 0, only_athena.head()
    assert only_metadata.height == 0, only_metadata.head()


# --------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_bytes_whatever_the_workers(
    small_w1: Path, small_w2: Path
) -> None:
    one, two = _digests(small_w1), _digests(small_w2)
    assert {p.split("/")[0] for p in one} == {"data", "metadata", "athena"}
    assert one == two


def test_a_different_seed_gives_different_data(small_w1: Path, cli_seed1: Path) -> None:
    seed0 = pl.read_parquet(data_files(small_w1)).sort("subject_id", "time", "code")
    seed1 = pl.read_parquet(data_files(cli_seed1)).sort("subject_id", "time", "code")
    assert seed0["subject_id"].n_unique() == seed1["subject_id"].n_unique() == SMALL_SUBJECTS
    assert not seed0.equals(seed1)
    births = (
        seed0.filter(pl.col("code") == meds.birth_code).select("subject_id", "time")
        .join(seed1.filter(pl.col("code") == meds.birth_code).select("subject_id", "time"),
              on="subject_id")
    )
    assert (births["time"] != births["time_right"]).mean() > 0.9


# --------------------------------------------------------------------------- planted effects


def test_heart_failure_incidence_jumps_after_a_first_myocardial_infarction(
    power_events: pl.DataFrame,
) -> None:
    window = pl.duration(days=183)
    subjects = (
        _observation(power_events)
        .join(_first_time(power_events, r"^ICD10CM/I21", "mi"), on="subject_id", how="left")
        .join(_first_time(power_events, r"^ICD10CM/I50", "hf"), on="subject_id", how="left")
    )
    # Six months after a first MI, among subjects without heart failure before it.
    after_mi = subjects.filter(
        pl.col("mi").is_not_null() & (pl.col("hf").is_null() | (pl.col("hf") > pl.col("mi")))
    ).with_columns(stop=pl.min_horizontal(pl.col("mi") + window, "end"))
    after_mi = after_mi.with_columns(
        event=pl.col("hf").is_not_null() & (pl.col("hf") <= pl.col("stop")),
        months=_months(pl.col("mi"), pl.min_horizontal("stop", "hf")),
    )
    # Background: everyone from the start of their record to MI, heart failure or the end.
    background = subjects.with_columns(stop=pl.min_horizontal("end", "hf", "mi")).with_columns(
        event=pl.col("hf").is_not_null() & (pl.col("hf") == pl.col("stop")),
        months=_months(pl.col("start"), pl.col("stop")),
    )
    events = int(after_mi["event"].sum())
    base_rate = background["event"].sum() / background["months"].sum()
    expected = base_rate * after_mi["months"].sum()
    ratio = events / expected
    detail = f"{events} HF after {after_mi.height} MIs, expected {expected:.2f}, ratio {ratio:.1f}"
    assert events >= 3, detail
    assert ratio > 3, detail
    assert _poisson_sf(events, expected) < 1e-3, detail


def test_ckd_is_more_common_after_a_diabetes_diagnosis(power_events: pl.DataFrame) -> None:
    subjects = (
        _observation(power_events)
        .join(_first_time(power_events, r"^ICD10CM/E11", "dm"), on="subject_id", how="left")
        .join(_first_time(power_events, r"^ICD10CM/N18", "ckd"), on="subject_id", how="left")
        .with_columns(
            dm_first=pl.col("dm").is_not_null()
            & (pl.col("ckd").is_null() | (pl.col("dm") < pl.col("ckd")))
        )
    )
    rates = subjects.group_by("dm_first").agg(
        n=pl.len(), ckd=pl.col("ckd").is_not_null().sum(), rate=pl.col("ckd").is_not_null().mean()
    )
    by_group = {row["dm_first"]: row for row in rates.iter_rows(named=True)}
    assert by_group[True]["ckd"] >= 10, rates
    assert by_group[True]["rate"] > 2 * by_group[False]["rate"], rates


@pytest.mark.parametrize(
    ("loinc", "diagnosis", "min_rise"),
    [("2160-0", r"^ICD10CM/N18", 0.25), ("4548-4", r"^ICD10CM/E11", 0.4)],
    ids=["creatinine-before-ckd", "hba1c-before-diabetes"],
)
def test_lab_drifts_up_in_the_months_before_the_diagnosis(
    power_events: pl.DataFrame, loinc: str, diagnosis: str, min_rise: float
) -> None:
    labs = power_events.filter(pl.col("code") == f"LOINC/{loinc}").join(
        _first_time(power_events, diagnosis, "diagnosis"), on="subject_id"
    ).with_columns(days=(pl.col("diagnosis") - pl.col("time")).dt.total_days())
    near = labs.filter(pl.col("days").is_between(1, 183)).group_by("subject_id").agg(
        near=pl.col("numeric_value").mean())
    far = labs.filter(pl.col("days") >= 730).group_by("subject_id").agg(
        far=pl.col("numeric_value").mean())
    paired = near.join(far, on="subject_id")
    rise = paired["near"].mean() - paired["far"].mean()
    detail = f"{paired.height} subjects, rise {rise:.2f}"
    assert paired.height >= 10, detail
    assert rise > min_rise, detail
    assert (paired["near"] > paired["far"]).mean() >= 0.8, detail


def test_signature_block_leaves_flag_diabetes_risk_through_their_parent(
    power_events: pl.DataFrame,
) -> None:
    subjects = _observation(power_events).filter(pl.col("visits") >= 10).join(
        _first_time(power_events, r"^ICD10CM/E11", "dm"), on="subject_id", how="left")

    def diabetes_ratio(block: str) -> float:
        counts = power_events.filter(pl.col("code").str.contains(block)).group_by(
            "subject_id").agg(block=pl.len())
        share = subjects.join(counts, on="subject_id", how="left").with_columns(
            share=pl.col("block").fill_null(0) / pl.col("visits"),
            dm=pl.col("dm").is_not_null(),
        )
        high = share.filter(pl.col("share") >= 0.2)
        none = share.filter(pl.col("share") == 0)
        assert high.height >= 100 and none.height >= 100, (block, high.height, none.height)
        return high["dm"].mean() / none["dm"].mean()

    signature, placebo = diabetes_ratio(SIGNATURE_E70_E88), diabetes_ratio(PLACEBO_L80_L99)
    assert signature > 3, (signature, placebo)
    assert signature > 2 * placebo, (signature, placebo)
    # The signal is spread over many rare leaves: visible through the parent, not one code.
    leaves = power_events.filter(pl.col("code").str.contains(SIGNATURE_E70_E88))["code"]
    assert leaves.n_unique() >= 100
    assert leaves.value_counts()["count"].max() < 0.05 * leaves.len()


# --------------------------------------------------------------------------- true hazards


def test_true_hazards_are_finite_inside_records_and_nan_outside(
    main_dir: Path, main_events: pl.DataFrame
) -> None:
    timed = main_events.filter(pl.col("time").is_not_null() & (pl.col("code") != meds.birth_code))
    inside = timed.sort("subject_id", "time").group_by("subject_id").agg(
        pl.col("time").first().alias("first"),
        pl.col("time").get(pl.len() // 2).alias("middle"),
        pl.col("time").last().alias("last"),
    ).unpivot(index="subject_id", value_name="time").select("subject_id", "time")
    births = main_events.filter(pl.col("code") == meds.birth_code)
    deaths = main_events.filter(pl.col("code") == meds.death_code)
    outside = pl.concat([
        births.select("subject_id", time=pl.col("time") - pl.duration(days=1)),
        births.select("subject_id", time=pl.lit(datetime(2026, 3, 1), dtype=pl.Datetime("us"))),
        deaths.select("subject_id", time=pl.col("time") + pl.duration(days=62)),
    ])
    assert deaths.height > 0
    probes = pl.concat([inside, outside])
    hazards = true_hazards(main_dir, probes["subject_id"].to_numpy(),
                           probes["time"].to_numpy(), "death")
    inner, outer = hazards[: inside.height], hazards[inside.height:]
    bad = inside.filter(pl.Series(~(np.isfinite(inner) & (inner > 0))))
    assert bad.height == 0, f"{bad.height} probes inside records without a hazard:\n{bad}"
    assert np.isnan(outer).all(), outside.filter(pl.Series(~np.isnan(outer)))
    with pytest.raises(ValueError, match="unknown outcome"):
        true_hazards(main_dir, np.array([10_001]), np.array([np.datetime64("2020-01-01")]),
                     "not_an_outcome")
    assert "heart_failure" in OUTCOMES and "death" in OUTCOMES


def test_true_heart_failure_hazard_rises_right_after_a_myocardial_infarction(
    main_dir: Path, main_events: pl.DataFrame
) -> None:
    mi = _first_time(main_events, r"^ICD10CM/I21", "mi")
    probes = pl.concat([
        mi.select("subject_id", time=pl.col("mi") + pl.duration(days=45)),
        mi.select("subject_id", time=pl.col("mi") - pl.duration(days=730)),
    ])
    hazards = true_hazards(main_dir, probes["subject_id"].to_numpy(), probes["time"].to_numpy(),
                           "heart_failure")
    after, before = hazards[: mi.height], hazards[mi.height:]
    both = np.isfinite(after) & np.isfinite(before)
    assert both.sum() >= 20, both.sum()
    assert (after[both] > before[both]).all()
    assert np.median(after[both] / before[both]) > 3


# --------------------------------------------------------------------------- command line


def test_synth_refuses_a_non_empty_folder_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine\n")
    status = cli_main(["synth", "--subjects", "10", "--out", str(out)])
    error = capsys.readouterr().err.strip()
    assert status == 2
    assert "\n" not in error and error.startswith("ehrmotor synth: error:"), error
    assert "--force" in error
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_synth_rejects_a_non_positive_subject_count(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["synth", "--subjects", "0", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "--subjects" in capsys.readouterr().err
    with pytest.raises(ValueError):
        generate(tmp_path / "direct", 0)


def test_synth_help_mentions_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["synth", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--subjects", "--seed", "--out", "--shards", "--workers", "--force"):
        assert option in text, option


def test_synth_command_writes_a_valid_dataset(cli_seed1: Path) -> None:
    report = validate_dataset(cli_seed1)
    assert report.ok, [str(e) for e in report.errors]
    assert report.num_subjects == SMALL_SUBJECTS
    params = json.loads((cli_seed1 / "metadata" / "synthetic.json").read_text())
    assert params["seed"] == 1 and params["num_shards"] == 2
    assert (cli_seed1 / "athena" / "CONCEPT.csv").is_file()


def test_validate_command_accepts_the_generated_data(
    main_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = cli_main(["validate", str(main_dir)])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert "0 error(s), 1 warning(s)" in captured.out  # duplicate rows (see above)
    assert f"{MAIN_SUBJECTS} subject(s)" in captured.out
