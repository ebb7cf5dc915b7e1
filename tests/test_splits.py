"""Who is held out of pretraining: the MEDS split file, or prepare's own (--held-out-fraction), or
nobody, knowingly (--no-held-out); and where `label` and `evaluate` then find the held-out
subjects (--splits-file, the bundle's copy). Subject split tables that could leak (a subject in
two splits) stop `validate` and `prepare`; unknown split names are warned about."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import polars as pl
import pyarrow as pa
import pytest
from meds_builders import write_meds, write_table

from ehrmotor.cli import main
from ehrmotor.config import ConfigError, PrepareConfig, load_config
from ehrmotor.errors import InputError
from ehrmotor.evaluate.run import unseen_splits
from ehrmotor.evaluate.tasks import DEFAULT_SPLITS
from ehrmotor.prepare.split import HASH_BUCKETS, hash_buckets
from ehrmotor.pretrain.setup import load_prepared_files
from ehrmotor.synthetic import generate

SMALL = ["--workers", "1", "--vocab-size", "300", "--candidate-tasks", "50", "--max-window", "512"]
SPLITS = "metadata/subject_splits.parquet"


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 synthetic subjects without metadata/subject_splits.parquet (as many real exports)."""
    meds = generate(tmp_path_factory.mktemp("export") / "meds", 40, seed=0, progress=False)
    (meds / SPLITS).unlink()
    shutil.rmtree(meds / "athena")
    return meds


@pytest.fixture(scope="module")
def held_out_work(export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("held_out") / "work"
    assert main(["prepare", "--meds", str(export), "--out", str(work), *SMALL,
                 "--held-out-fraction", "0.2"]) == 0
    return work


def prepare_args(meds: Path, work: Path, *extra: str) -> list[str]:
    return ["prepare", "--meds", str(meds), "--out", str(work), *SMALL, *extra]


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_prepare_without_a_split_file_stops_and_says_how_to_go_on(
        export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "work"
    assert main(prepare_args(export, work)) == 2
    line = error_line(capsys)
    assert line.startswith(f"ehrmotor prepare: error: {export / SPLITS}: not found")
    assert "--held-out-fraction F" in line and "--no-held-out" in line
    assert not work.exists()


def test_held_out_fraction_writes_a_hashed_meds_split_that_pretraining_never_sees(
        export: Path, held_out_work: Path, tmp_path: Path) -> None:
    written = held_out_work / "subject_splits.parquet"
    table = pl.read_parquet(written)
    assert table.schema == pl.Schema({"subject_id": pl.Int64, "split": pl.String})
    ids = table["subject_id"].to_numpy()
    assert list(ids) == sorted(ids) and len(ids) == 40
    # femr's hash, prepare's own seed (recorded): held_out at most fraction x 65,536
    config = json.loads((held_out_work / "pretraining_files/config.json").read_text())
    assert config["held_out_fraction"] == 0.2
    expected = hash_buckets(ids, config["held_out_seed"]) <= 0.2 * HASH_BUCKETS
    assert (table["split"] == "held_out").to_list() == expected.tolist()
    held_out = set(table.filter(pl.col("split") == "held_out")["subject_id"].to_list())
    assert 0 < len(held_out) < 40
    pretrained = set(pl.read_csv(held_out_work / "pretraining_files/split.csv")["subject_id"])
    assert pretrained == set(ids) - held_out
    for name in ("train", "val"):
        prepared = load_prepared_files(held_out_work)
        windows = set(getattr(prepared, name).with_format(None)["subject_id"])
        assert windows and not windows & held_out
    assert prepared.unseen_splits == ["held_out"]
    again = tmp_path / "again"
    assert main(prepare_args(export, again, "--held-out-fraction", "0.2")) == 0
    assert (again / "subject_splits.parquet").read_bytes() == written.read_bytes()


def test_another_held_out_fraction_stops_the_rerun(
        export: Path, held_out_work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(prepare_args(export, held_out_work, "--held-out-fraction", "0.3")) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{held_out_work / 'subject_splits.parquet'} was built with different" in line
    assert "config.fraction (0.2 -> 0.3)" in line


def test_no_held_out_pretrains_on_everyone_and_evaluate_refuses(
        export: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    assert main(prepare_args(export, work, "--no-held-out")) == 0
    assert pl.read_csv(work / "pretraining_files/split.csv").height == 40
    assert not (work / "subject_splits.parquet").exists()
    config = json.loads((work / "pretraining_files/config.json").read_text())
    assert config["no_held_out"] is True and config["exclude_splits"] == []
    unseen = load_prepared_files(work).unseen_splits
    assert unseen == []
    with pytest.raises(InputError, match="pretrained on the held_out, tuning subjects"):
        unseen_splits(DEFAULT_SPLITS, unseen, work / "model")


def test_held_out_fraction_beside_a_meds_split_file_is_an_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    meds = write_meds(tmp_path / "meds")
    assert main(prepare_args(meds, tmp_path / "work", "--held-out-fraction", "0.2")) == 2
    assert error_line(capsys) == (
        f"ehrmotor prepare: error: {meds / SPLITS}: exists, and its splits decide who is held "
        "out; drop --held-out-fraction (held_out_fraction)")


def test_bare_exclude_splits_is_an_error(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    meds = write_meds(tmp_path / "meds")
    assert main(prepare_args(meds, tmp_path / "work", "--exclude-splits")) == 2
    assert error_line(capsys) == (
        "ehrmotor prepare: error: --exclude-splits needs split names (e.g. held_out); to "
        "pretrain on every subject give --no-held-out")
    assert not (tmp_path / "work").exists()


def write_splits(meds: Path, ids: list[int], names: list[str]) -> None:
    write_table(meds / SPLITS, pa.table({"subject_id": pa.array(ids, pa.int64()),
                                         "split": pa.array(names, pa.string())}))


def test_a_subject_in_two_splits_stops_validate_and_prepare(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    meds = write_meds(tmp_path / "meds")
    write_splits(meds, [1, 2, 3, 3], ["train", "train", "held_out", "train"])
    message = (f"{SPLITS}: column 'subject_id' (subject 3): 1 subject(s) are listed under more "
               "than one split (e.g. under held_out, train); expected each subject in exactly "
               "one split")
    assert main(["validate", str(meds)]) == 2
    assert f"error: {message}" in capsys.readouterr().err.splitlines()
    assert main(prepare_args(meds, tmp_path / "work")) == 2
    assert error_line(capsys) == f"ehrmotor prepare: error: {message}"


def test_an_unknown_split_name_is_a_warning(
        export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    meds = write_meds(tmp_path / "meds")
    write_splits(meds, [1, 2, 3], ["train", "test", "held_out"])
    message = (f"{SPLITS}: column 'split' (subject 2): 1 subject(s) are in a split other than "
               "train, tuning, held_out (e.g. 'test'); prepare pretrains on them unless "
               "--exclude-splits names it; expected split names among train, tuning, held_out")
    assert main(["validate", str(meds)]) == 0
    assert f"warning: {message}" in capsys.readouterr().err.splitlines()
    copy = tmp_path / "export"
    shutil.copytree(export, copy)
    ids = sorted({int(i) for i in pl.read_parquet(copy / "data", columns=["subject_id"])
                  ["subject_id"]})
    write_splits(copy, ids, ["test"] * 3 + ["train"] * (len(ids) - 3))
    with caplog.at_level(logging.WARNING):
        assert main(prepare_args(copy, tmp_path / "work")) == 0
    assert any("3 subject(s) are in a split other than" in r.getMessage()
               for r in caplog.records)


def test_label_reads_the_held_out_subjects_of_splits_file(
        export: Path, held_out_work: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["label", "--meds", str(export), "--out", str(tmp_path / "none")]) == 2
    assert error_line(capsys).startswith(
        f"ehrmotor label: error: {export / SPLITS}: not found; evaluation needs its held_out "
        "and tuning subjects; give --splits-file")
    splits_file = held_out_work / "subject_splits.parquet"
    out = tmp_path / "labels"
    assert main(["label", "--meds", str(export), "--out", str(out), "--outcomes", "hypertension",
                 "--splits-file", str(splits_file)]) == 0
    held_out = pl.read_parquet(splits_file).filter(pl.col("split") == "held_out")["subject_id"]
    labelled = pl.read_parquet(out / "hypertension.parquet")["subject_id"].unique()
    assert not labelled.is_empty() and labelled.is_in(held_out.implode()).all()


def test_splits_file_listing_a_subject_twice_is_refused(
        export: Path, held_out_work: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    table = pl.read_parquet(held_out_work / "subject_splits.parquet")
    first = table.filter(pl.col("split") == "held_out")["subject_id"][0]
    twice = tmp_path / "twice.parquet"
    pl.concat([table, pl.DataFrame({"subject_id": [first], "split": ["train"]})]
              ).write_parquet(twice)
    assert main(["label", "--meds", str(export), "--out", str(tmp_path / "labels"),
                 "--splits-file", str(twice)]) == 2
    assert error_line(capsys) == (
        f"ehrmotor label: error: {twice}: subject {first} is listed under held_out, train (1 "
        "subject(s) under more than one split); expected each subject in exactly one split")


class Chosen(Exception):
    """Raised by the stand-in for evaluation_subjects: which splits file evaluate chose."""


def choose_splits_file(monkeypatch: pytest.MonkeyPatch, bundle: Path, meds: Path,
                       tmp_path: Path, *extra: str) -> Any:
    """The splits file `ehrmotor evaluate` hands to evaluation_subjects (the model unloaded)."""
    def stand_in(meds_dir: Path, splits: Any, splits_file: Path | None = None) -> None:
        raise Chosen(splits_file)

    monkeypatch.setattr("ehrmotor.bundle.load_bundle", lambda path: SimpleNamespace(
        path=Path(path), unseen_splits=("held_out",)))
    monkeypatch.setattr("ehrmotor.evaluate.run.evaluation_subjects", stand_in)
    with pytest.raises(Chosen) as chosen:
        main(["evaluate", "--model", str(bundle), "--meds", str(meds), "--out",
              str(tmp_path / "out"), *extra])
    return chosen.value.args[0]


def test_evaluate_defaults_to_the_bundles_split_file(
        export: Path, held_out_work: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from ehrmotor.pretrain.run import _write_bundle

    class Trainer:
        def save_model(self, path: str) -> None:  # stand-ins for the weights' files
            Path(path).mkdir()
            (Path(path) / "config.json").write_text("{}")
            (Path(path) / "model.safetensors").write_bytes(b"")

    bundle = _write_bundle(Trainer(), held_out_work, {})  # type: ignore[arg-type]
    copied = bundle / "subject_splits.parquet"
    assert copied.read_bytes() == (held_out_work / "subject_splits.parquet").read_bytes()
    assert choose_splits_file(monkeypatch, bundle, export, tmp_path) == copied
    other = tmp_path / "other.parquet"
    assert choose_splits_file(monkeypatch, bundle, export, tmp_path,
                              "--splits-file", str(other)) == other
    shutil.rmtree(bundle)
    bundle.mkdir()
    assert choose_splits_file(monkeypatch, bundle, export, tmp_path) is None  # MEDS's


def test_held_out_settings_in_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "ehrmotor.toml"
    config.write_text("[prepare]\nheld_out_fraction = 0.25\nheld_out_seed = 5\n")
    loaded = load_config(PrepareConfig, config, "prepare")
    assert (loaded.held_out_fraction, loaded.held_out_seed) == (0.25, 5)
    with pytest.raises(ConfigError, match="held_out_fraction and no_held_out exclude each other"):
        load_config(PrepareConfig, config, "prepare", {"no_held_out": True})
    with pytest.raises(ConfigError, match=r"held_out_fraction must be in \(0, 1\), got 1.5"):
        PrepareConfig(held_out_fraction=1.5)
