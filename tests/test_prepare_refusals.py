"""`ehrmotor prepare` refuses bad input in one line and leaves no artifacts: invalid MEDS, an
Athena folder without CONCEPT_ANCESTOR.csv, a bad config file, data without prediction points."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import polars as pl
import pytest
from meds_builders import rows_table, write_meds, write_table
from prepare_builders import one_line_error

from ehrmotor.cli import main


@pytest.fixture
def meds(synthetic_meds: Path) -> Path:
    """The session's synthetic MEDS dataset (never changed here)."""
    return synthetic_meds


@pytest.fixture
def tiny_meds(tmp_path: Path) -> Path:
    """A valid three-subject MEDS dataset (tests/meds_builders.py)."""
    return write_meds(tmp_path / "tiny")


def check_refused(args: list[str], out: Path, capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    assert main(args) == 2
    line = one_line_error(capsys.readouterr().err)
    assert not (out / "pretraining_files").exists() or not any(
        (out / "pretraining_files").iterdir())
    return line


def test_invalid_meds_is_refused_without_artifacts(
        tiny_meds: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shard = tiny_meds / "data" / "train" / "0.parquet"
    write_table(shard, pl.read_parquet(shard).drop("code").to_arrow())
    out = tmp_path / "work"
    line = check_refused(["prepare", "--meds", str(tiny_meds), "--out", str(out)], out, capsys)
    assert "code" in line and "0.parquet" in line


def test_athena_folder_without_concept_ancestor_is_refused(
        meds: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    athena = tmp_path / "athena"
    athena.mkdir()
    for name in ("CONCEPT.csv", "CONCEPT_RELATIONSHIP.csv"):
        (athena / name).symlink_to(meds / "athena" / name)
    out = tmp_path / "work"
    line = check_refused(["prepare", "--meds", str(meds), "--athena", str(athena), "--out",
                          str(out)], out, capsys)
    assert "CONCEPT_ANCESTOR.csv" in line


@pytest.mark.parametrize(("toml", "names"), [
    ("[prepare]\nvocab_sise = 100\n", ["vocab_sise", "unknown"]),
    ("[prepare]\nvocab_size = \"big\"\n", ["vocab_size", "big"]),
    ("[prepare]\nval_fraction = true\n", ["val_fraction"]),
])
def test_bad_config_file_is_refused_naming_the_key(
        tiny_meds: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], toml: str,
        names: list[str]) -> None:
    config = tmp_path / "prepare.toml"
    config.write_text(toml)
    out = tmp_path / "work"
    line = check_refused(["prepare", "--meds", str(tiny_meds), "--out", str(out), "--config",
                          str(config)], out, capsys)
    assert str(config) in line
    for name in names:
        assert name in line


def test_no_prediction_points_is_a_one_line_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_meds(tmp_path / "tiny")
    # Every train subject has a single timed event after birth: no prediction point anywhere.
    rows = [row for sid in (1, 2) for row in (
        {"subject_id": sid, "time": None, "code": "GENDER//F"},
        {"subject_id": sid, "time": datetime(1950, 1, 1), "code": "MEDS_BIRTH"},
        {"subject_id": sid, "time": datetime(2010, 1, 1), "code": "ICD10CM//E11.9"})]
    write_table(root / "data" / "train" / "0.parquet", rows_table(rows))
    capsys.readouterr()
    assert main(["prepare", "--meds", str(root), "--out", str(tmp_path / "work")]) == 2
    assert "prediction points" in one_line_error(capsys.readouterr().err)
