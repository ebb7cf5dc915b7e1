"""End-to-end tests of `ehrmotor prepare` on the embedded synthetic dataset (~300 subjects).

The session's synthetic dataset (conftest `synthetic_meds`) and one reference run (through the
CLI) are shared; the other tests run prepare again into their own work folders and compare with
the reference.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from prepare_builders import one_line_error
from synthetic_data import SUBJECTS

from ehrmotor.cli import main
from ehrmotor.config import PrepareConfig, config_dict
from ehrmotor.meds import data_files, scan_shard
from ehrmotor.motor_task.tasks import FORMAT_VERSION as TASK_FORMAT_VERSION
from ehrmotor.motor_task.tasks import MotorTask
from ehrmotor.prepare.split import read_split
from ehrmotor.prepare.steps import TOKENIZER_STEP_VERSION
from ehrmotor.sequences.batching import collate_windows
from ehrmotor.sequences.positions import encode_events
from ehrmotor.sequences.shards import DATASET_FORMAT_VERSION, load_prepared
from ehrmotor.vocabulary.bags import BagTable
from ehrmotor.vocabulary.ontology import Ontology
from ehrmotor.vocabulary.tokenizer import Tokenizer

ARTIFACTS = ["config.json", "ontology", "split.csv", "tokenizer/dictionary.msgpack",
             "tokenizer/bags.npz",
             "motor_task.json", "train_batches", "val_batches"]
STEPS = ["ontology", "split.csv", "tokenizer", "train_batches", "motor_task.json",
         "val_batches"]
COLUMNS = ["subject_id", "window", "first_events", "previous_time", "event_items", "items",
           "times", "points", "censor_days", "task_ids", "task_times"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def meds(synthetic_meds: Path) -> Path:
    """The synthetic MEDS dataset (SUBJECTS subjects), with its Athena vocabulary in meds/athena;
    shared with other modules, so never changed here."""
    return synthetic_meds


def prepare_args(meds: Path, work: Path, *extra: str) -> list[str]:
    return ["prepare", "--meds", str(meds), "--athena", str(meds / "athena"), "--out", str(work),
            "--vocab-size", "2000", "--candidate-tasks", "300", "--workers", "2", *extra]


@pytest.fixture(scope="session")
def reference(meds: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pretraining_files/ of an uninterrupted CLI run."""
    work = tmp_path_factory.mktemp("reference")
    assert main(prepare_args(meds, work)) == 0
    return work / "pretraining_files"


def file_digests(folder: Path, skip: Callable[[Path], bool] = lambda _: False) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not skip(p)}


def file_mtimes(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns
            for p in sorted(folder.rglob("*")) if p.is_file()}


# =========================================================================== 7. artifacts


def test_prepare_writes_every_artifact_with_its_manifest(reference: Path) -> None:
    for name in ARTIFACTS:
        assert (reference / name).exists(), name
    for step in STEPS:
        manifest = json.loads((reference / f"{step}.manifest.json").read_text())
        version = {"train_batches": DATASET_FORMAT_VERSION, "val_batches": DATASET_FORMAT_VERSION,
                   "motor_task.json": TASK_FORMAT_VERSION,
                   "tokenizer": TOKENIZER_STEP_VERSION}.get(step, 1)
        assert manifest["format_version"] == version
        assert "config" in manifest and "inputs" in manifest
    assert (reference / "ontology" / "ancestors.parquet").is_file()
    config = json.loads((reference / "config.json").read_text())
    assert (config["vocab_size"], config["candidate_tasks"]) == (2000, 300)
    # The MOTOR task's train labels, kept for the train dataset, are gone with the run.
    assert not [p.name for p in reference.iterdir() if p.name.startswith(".")]


def test_datasets_load_in_torch_format_with_the_documented_columns(reference: Path) -> None:
    vocabulary = len(Tokenizer.load(reference / "tokenizer"))
    assert vocabulary == 2000
    for split in ("train", "val"):
        dataset = load_prepared(reference / f"{split}_batches")
        assert dataset.format["type"] == "torch"
        assert dataset.column_names == COLUMNS
        assert dataset.features["items"].feature.dtype == "uint16"  # 2000 entries
        assert dataset.features["times"].feature.dtype == "int64"
        assert dataset.features["task_times"].feature.dtype == "int64"
        assert dataset.features["task_ids"].feature.dtype == "uint16"  # 300 candidates
        assert dataset.num_rows > 0
        row = dataset[0]
        assert isinstance(row["items"], torch.Tensor) and row["times"].dtype == torch.int64
        assert row["event_items"].sum().item() == len(row["items"])
        # position 0's events, then one event per later position
        assert len(row["event_items"]) - int(row["first_events"]) == len(row["times"]) - 1
        assert int(row["previous_time"]) <= int(row["times"][1])
        assert row["items"].min().item() >= 0 and row["items"].max().item() < vocabulary


def test_held_out_subjects_are_never_used_for_pretraining(meds: Path, reference: Path) -> None:
    splits = pl.read_parquet(meds / "metadata" / "subject_splits.parquet")
    held_out = set(splits.filter(pl.col("split") == "held_out")["subject_id"].to_list())
    assert held_out
    split = pl.read_csv(reference / "split.csv")
    assert split.columns == ["subject_id", "split_name"]
    assert set(split["split_name"]) == {"train", "val"}
    assert not held_out & set(split["subject_id"].to_list())
    assert split.height == SUBJECTS - len(held_out)
    names = dict(split.iter_rows())
    for name in ("train", "val"):
        table = load_prepared(reference / f"{name}_batches").with_format(None)
        subjects = set(table["subject_id"])
        assert not held_out & subjects
        assert {names[s] for s in subjects} == {name}


def test_labels_are_consistent_with_tasks_points_and_censoring(reference: Path) -> None:
    task = json.loads((reference / "motor_task.json").read_text())
    num_tasks = len(task["tasks"])
    assert 0 < num_tasks <= task["candidate_tasks"] <= 300
    assert task["bin_edges_days"][0] == 0.0 and len(task["bin_edges_days"]) == task["num_bins"]
    dataset = load_prepared(reference / "train_batches")
    pairs = 0
    for row in dataset.with_format(None):
        points, censor = row["points"], np.array(row["censor_days"])
        assert len(points) == len(censor) > 0
        assert min(points) > 0 and max(points) < len(row["times"])  # never position 0
        assert row["times"] == sorted(row["times"]) and row["previous_time"] >= row["times"][0]
        # The occurrences that label the points: sorted by task and time, each after a point.
        occurrences = list(zip(row["task_ids"], row["task_times"], strict=True))
        assert occurrences == sorted(occurrences)
        assert all(t > row["times"][points[0]] for _, t in occurrences)
    for start in range(0, len(dataset), 64):
        rows = [dataset[i] for i in range(start, min(start + 64, len(dataset)))]
        batch = collate_windows(rows, True, torch.from_numpy(MotorTask.load(
            reference / "motor_task.json").task_map()), BagTable.load(reference / "tokenizer"))
        tasks, days, at = batch["label_task"], batch["label_days"], batch["label_point"]
        if len(tasks):
            assert tasks.min() >= 0 and tasks.max() < num_tasks
            assert at.min() >= 0 and at.max() < len(batch["censor_days"])
            assert (days > 0).all()
            assert (days <= batch["censor_days"][at] * (1 + 1e-6)).all()
            assert len(set(zip(at.tolist(), tasks.tolist(), strict=True))) == len(tasks)
        pairs += len(tasks)
    assert pairs > 1000


def test_every_vocabulary_entry_occurs_in_an_encoded_train_bag(meds: Path,
                                                               reference: Path) -> None:
    tokenizer = Tokenizer.load(reference / "tokenizer")
    ontology = Ontology.load(reference / "ontology")
    train = read_split(reference / "split.csv").filter(pl.col("split_name") == "train")
    used: set[int] = set()
    for path in data_files(meds):
        events = scan_shard(path).join(train.lazy().select("subject_id"), on="subject_id",
                                       how="semi").collect()
        used |= set(encode_events(events, tokenizer, ontology)["entry"].unique().to_list())
    unused = tokenizer.entries.filter(~pl.col("index").is_in(sorted(used)))
    assert unused.height == 0, unused.select("kind", "code", "bin", "text").rows()
    # Codes that only carry values (labs) are among them, through their valued events' bags.
    valued = pl.concat([scan_shard(path).filter(pl.col("numeric_value").is_not_null())
                        .select("code").unique().collect() for path in data_files(meds)])
    assert tokenizer.entries.filter(pl.col("kind") == "code")["code"].is_in(
        valued["code"].implode()).any()


def test_manifests_record_the_tokenizer_seed_and_min_task_fraction(reference: Path) -> None:
    tokenizer = json.loads((reference / "tokenizer.manifest.json").read_text())["config"]
    task = json.loads((reference / "motor_task.json.manifest.json").read_text())["config"]
    assert tokenizer["seed"] == 97
    assert task["min_task_fraction"] == 1e-4


def step_settings(config: PrepareConfig) -> dict[str, object]:
    """The settings of each step (by artifact) for a run with an Athena folder."""
    return {"ontology": config.ontology_settings(athena=True), "split.csv": config.split_settings(),
            "tokenizer": config.tokenizer_settings(), "motor_task.json": config.task_settings(),
            "train_batches": config.window_settings(), "val_batches": config.window_settings()}


def test_each_manifest_records_its_steps_settings(reference: Path) -> None:
    expected = step_settings(PrepareConfig(vocab_size=2000, candidate_tasks=300))
    for artifact, settings in expected.items():
        manifest = json.loads((reference / f"{artifact}.manifest.json").read_text())
        assert manifest["config"] == config_dict(settings), artifact


def test_every_prepare_setting_reaches_a_step() -> None:
    config = PrepareConfig()
    for name in (field.name for field in fields(PrepareConfig)):
        value = getattr(config, name)  # a tuple, None (final_layer_size), an int or a float
        other = (*value, "X") if isinstance(value, tuple) else (
            0.5 if name == "held_out_fraction" else 8) if value is None else (
            not value if isinstance(value, bool) else
            value + 3 if isinstance(value, int) else value / 2)
        changed = replace(config, **{name: other})
        assert ((step_settings(changed), changed.held_out_settings())
                != (step_settings(config), config.held_out_settings())), name


# =========================================================================== 8. idempotence


def test_rerun_rebuilds_nothing_and_a_changed_setting_is_refused(
        meds: Path, reference: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = file_mtimes(reference)
    assert main(prepare_args(meds, reference.parent)) == 0
    after = file_mtimes(reference)
    # Nothing is rewritten, config.json included (its settings did not change).
    assert after == before
    capsys.readouterr()
    assert main(prepare_args(meds, reference.parent, "--vocab-size", "3000")) == 2
    assert "vocab_size" in one_line_error(capsys.readouterr().err)
    assert file_mtimes(reference) == after


def test_a_new_package_version_alone_rebuilds_nothing(
        meds: Path, reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    shutil.copytree(reference.parent, work)
    before = file_mtimes(work / "pretraining_files")
    monkeypatch.setattr("ehrmotor.artifacts.__version__", "99.0.0")
    assert main(prepare_args(meds, work)) == 0
    assert file_mtimes(work / "pretraining_files") == before


def test_force_rebuilds_every_step(meds: Path, reference: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    shutil.copytree(reference.parent, work)
    before = file_mtimes(work / "pretraining_files")
    time.sleep(0.01)
    assert main(prepare_args(meds, work, "--force")) == 0
    after = file_mtimes(work / "pretraining_files")
    assert set(after) == set(before)
    # Every step's artifact is rebuilt; config.json is unchanged, so it is not rewritten.
    rebuilt = [name for name in before if name != "config.json"]
    assert all(after[name] > before[name] for name in rebuilt), "some file was not rewritten"
    assert file_digests(work / "pretraining_files") == file_digests(reference)


# =========================================================================== 9. determinism


def test_same_input_gives_byte_identical_artifacts(meds: Path, reference: Path,
                                                   tmp_path: Path) -> None:
    work = tmp_path / "other"
    # Another folder and another number of worker processes.
    args = prepare_args(meds, work)
    args[args.index("--workers") + 1] = "1"
    assert main(args) == 0
    # Manifests record relative input paths only, so they are compared too.
    for manifest in (work / "pretraining_files").glob("*.manifest.json"):
        assert str(tmp_path) not in manifest.read_text()
        assert str(meds) not in manifest.read_text()
    got, want = file_digests(work / "pretraining_files"), file_digests(reference)
    assert len(want) > 20
    assert got == want


# =========================================================================== 10. kill, resume


def run_until(args: list[str], ready: Callable[[], bool]) -> None:
    """Run `python -m ehrmotor ARGS` and SIGKILL it (and its workers) once `ready()` holds."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    process = subprocess.Popen([sys.executable, "-m", "ehrmotor", *args], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not ready():
            if process.poll() is not None:
                pytest.fail(f"prepare ended (status {process.returncode}) before the kill point")
            if time.monotonic() > deadline:
                pytest.fail("kill point not reached in 120 s")
            time.sleep(0.002)
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL


def test_killed_runs_resume_to_identical_artifacts(
        meds: Path, reference: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "work" / "pretraining_files"
    args = prepare_args(meds, out.parent)
    # Killed during the steps after the ontology (split / tokenizer workers running) ...
    run_until(args, lambda: (out / "ontology.manifest.json").exists())
    assert not (out / "val_batches.manifest.json").exists()
    # ... then while a dataset is half written into its temporary folder.
    run_until(args, lambda: any(out.glob(".train_batches.tmp-*")))
    assert any(out.glob(".train_batches.tmp-*"))
    assert not (out / "val_batches").exists()
    caplog.set_level("INFO", logger="ehrmotor")
    assert main(args) == 0
    assert "tokenizer: loaded" in caplog.text  # the finished steps are not redone
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    assert file_digests(out) == file_digests(reference)
