"""Tests for the embedded synthetic EHR (`ehrmotor.synthetic.generate`, `ehrmotor synth`): MEDS
conformance, data properties, determinism and the command line.

The datasets come from `synthetic_fixtures` (generated once per session); the Athena vocabulary
is tested in test_synthetic_athena.py, the planted effects and true hazards in
test_synthetic_hazards.py. Everything is asserted from the written files alone.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import meds
import polars as pl
import pyarrow.parquet as pq
import pytest
from synthetic_fixtures import MAIN_SUBJECTS, SMALL_SUBJECTS

from ehrmotor.cli import main as cli_main
from ehrmotor.meds import data_files, validate_dataset
from ehrmotor.synthetic import generate

SPLITS = {meds.train_split, meds.tuning_split, meds.held_out_split}
ICD9_END = datetime(2015, 10, 1)
DATA_COLUMNS = ["subject_id", "time", "code", "numeric_value", "text_value"]


def _digests(meds_dir: Path) -> dict[str, str]:
    """sha256 of every file under data/, metadata/ and athena/, by relative path."""
    return {
        path.relative_to(meds_dir).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for folder in ("data", "metadata", "athena")
        for path in sorted((meds_dir / folder).rglob("*"))
        if path.is_file()
    }


# --------------------------------------------------------------------------- MEDS conformance


@pytest.mark.slow
def test_data_files_validate_against_meds_data_schema(main_dir: Path) -> None:
    paths = data_files(main_dir)
    assert len(paths) == 9  # 3 shards x 3 splits
    for path in paths:
        assert path.parent.name in SPLITS
        assert re.fullmatch(r"\d+\.parquet", path.name), path
        table = pq.read_table(path)
        meds.DataSchema.validate(table)  # types, and no null subject_id or code
        assert table.column_names == DATA_COLUMNS


@pytest.mark.slow
def test_codes_metadata_validates_against_meds_code_metadata_schema(main_dir: Path) -> None:
    table = pq.read_table(main_dir / meds.code_metadata_filepath)
    meds.CodeMetadataSchema.validate(table)


@pytest.mark.slow
def test_subject_splits_validate_against_meds_subject_split_schema(main_dir: Path) -> None:
    table = pq.read_table(main_dir / meds.subject_splits_filepath)
    meds.SubjectSplitSchema.validate(table)


@pytest.mark.slow
def test_dataset_json_validates_against_meds_dataset_metadata_schema(main_dir: Path) -> None:
    metadata = json.loads((main_dir / meds.dataset_metadata_filepath).read_text())
    meds.DatasetMetadataSchema.validate(metadata)
    assert metadata["meds_version"].startswith("0.4")
    assert metadata["dataset_name"]


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_each_subject_lives_in_exactly_one_file(main_events: pl.DataFrame) -> None:
    assert main_events.schema["subject_id"] == pl.Int64
    files = main_events.group_by("subject_id").agg(pl.col("file").n_unique())
    assert files.height == MAIN_SUBJECTS
    assert files["file"].max() == 1


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_death_is_the_last_event_of_a_subject(main_events: pl.DataFrame) -> None:
    deaths = main_events.filter(pl.col("code") == meds.death_code).select("subject_id",
                                                                          death="time")
    after = main_events.join(deaths, on="subject_id").filter(pl.col("time") > pl.col("death"))
    assert after.height == 0, (
        f"{after['subject_id'].n_unique()} subject(s) have events after MEDS_DEATH:\n"
        f"{after.select('subject_id', 'time', 'code', 'death')}"
    )


@pytest.mark.slow
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


@pytest.mark.slow
def test_events_per_subject_are_heavy_tailed(main_events: pl.DataFrame) -> None:
    counts = main_events.group_by("subject_id").len()["len"]
    quantiles = {q: counts.quantile(q) for q in (0.0, 0.5, 0.9, 1.0)}
    assert quantiles[0.0] < 30, quantiles
    assert 50 <= quantiles[0.5] <= 200, quantiles
    assert quantiles[1.0] > 1_000, quantiles
    assert quantiles[0.9] > 3 * quantiles[0.5], quantiles
    assert counts.mean() > quantiles[0.5]


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_lab_values_are_positive(main_events: pl.DataFrame) -> None:
    bad = main_events.filter(pl.col("numeric_value") <= 0)
    assert bad.height == 0, bad.group_by("code").agg(pl.len(), pl.col("numeric_value").min())


# --------------------------------------------------------------------------- determinism


@pytest.mark.slow
def test_same_seed_gives_identical_bytes_whatever_the_workers(
    small_w1: Path, small_w2: Path
) -> None:
    one, two = _digests(small_w1), _digests(small_w2)
    assert {p.split("/")[0] for p in one} == {"data", "metadata", "athena"}
    assert one == two


@pytest.mark.slow
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


@pytest.mark.slow
def test_synth_command_writes_a_valid_dataset(cli_seed1: Path) -> None:
    report = validate_dataset(cli_seed1)
    assert report.ok, [str(e) for e in report.errors]
    assert report.num_subjects == SMALL_SUBJECTS
    params = json.loads((cli_seed1 / "metadata" / "synthetic.json").read_text())
    assert params["seed"] == 1 and params["num_shards"] == 2
    assert (cli_seed1 / "athena" / "CONCEPT.csv").is_file()


@pytest.mark.slow
def test_validate_command_accepts_the_generated_data(
    main_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = cli_main(["validate", str(main_dir)])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert "0 error(s), 1 warning(s)" in captured.out  # duplicate rows (see above)
    assert f"{MAIN_SUBJECTS} subject(s)" in captured.out
