"""`ehrmotor pretrain --export-checkpoint`: a model bundle from a Trainer checkpoint.

The session's tiny run (conftest `tiny_bundle`: two steps, its one checkpoint-2 kept) is the
finished run; tests that change a work folder copy it first.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from features_fixtures import read_events
from safetensors.torch import load_file

from ehrmotor.bundle import load_bundle
from ehrmotor.cli import main
from ehrmotor.embed import compute_features
from ehrmotor.lock import work_lock
from ehrmotor.pretrain import export

STEP = 2  # the tiny run's only checkpoint


@pytest.fixture(scope="module")
def finished(tiny_bundle: tuple[Path, Path]) -> tuple[Path, Path]:
    """(MEDS directory, work folder) of the finished tiny run (shared: never write into it)."""
    return tiny_bundle[0], tiny_bundle[1].parent


@pytest.fixture
def work(finished: tuple[Path, Path], tmp_path: Path) -> Path:
    """A copy of the finished run's work folder (prepared files and checkpoints)."""
    copy = tmp_path / "work"
    for part in ("pretraining_files", "pretraining_output"):
        shutil.copytree(finished[1] / part, copy / part)
    return copy


def export_args(work: Path, step: str, *extra: str) -> list[str]:
    return ["pretrain", "--work", str(work), "--export-checkpoint", step, *extra]


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = [line for line in capsys.readouterr().err.strip().splitlines()
             if not re.match(r"(DEBUG|INFO|WARNING) ", line)]
    assert len(lines) == 1, lines
    return lines[0]


def digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_latest_checkpoint_of_a_finished_run_is_the_final_bundle_with_its_step(
        finished: tuple[Path, Path], tmp_path: Path) -> None:
    meds, work = finished
    before = digests(work / "pretraining_output")
    out = tmp_path / "exported"
    # Training holds the work folder's lock; exporting does not take it.
    with work_lock(work, "pretrain"):
        assert main(export_args(work, "latest", "--out", str(out))) == 0
    assert digests(work / "pretraining_output") == before
    final, exported = load_file(work / "model" / "model.safetensors"), load_file(
        out / "model.safetensors")
    assert final.keys() == exported.keys()
    assert all(np.array_equal(final[name], exported[name]) for name in final)
    events = read_events(meds).filter(pl.col("time").is_not_null())
    labels = (events.group_by("subject_id").agg(prediction_time=pl.col("time").max())
              .sort("subject_id").head(6))
    want = compute_features(meds, work / "model", labels)
    got = compute_features(meds, out, labels)
    np.testing.assert_array_equal(got["subject_ids"], want["subject_ids"])
    np.testing.assert_allclose(got["features"], want["features"], atol=1e-6, rtol=0)
    summary = json.loads((out / "training_summary.json").read_text())
    final_summary = json.loads((work / "model" / "training_summary.json").read_text())
    assert summary["checkpoint_step"] == summary["global_step"] == STEP
    for key in ("max_window", "unseen_splits", "parameters", "config", "val_loss"):
        assert summary[key] == final_summary[key], key
    assert json.loads((out / "fingerprint.json").read_text())["checkpoint_step"] == STEP
    card = (out / "README.md").read_text()
    assert f"\ncheckpoint_step: {STEP}\n" in card
    assert f"exported from checkpoint step {STEP} " in card
    assert load_bundle(out).fingerprint != load_bundle(work / "model").fingerprint


def test_default_out_is_work_model_step_n_and_is_never_replaced(
        work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(export_args(work, str(STEP))) == 0
    bundle = work / f"model-step-{STEP}"
    written = digests(bundle)
    assert load_bundle(bundle).max_window is not None
    assert main(export_args(work, "latest")) == 2
    assert error_line(capsys) == (f"ehrmotor pretrain: error: --out {bundle}: exists; an export "
                                  "never replaces anything (choose another path or remove it)")
    assert digests(bundle) == written
    assert sorted(p.name for p in work.iterdir()) == [
        f"model-step-{STEP}", "pretraining_files", "pretraining_output"]


def test_a_step_without_a_checkpoint_lists_the_steps_there(
        work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copytree(work / "pretraining_output" / f"checkpoint-{STEP}",
                    work / "pretraining_output" / "checkpoint-7")
    (work / "pretraining_output" / "checkpoint-7" / "trainer_state.json").unlink()  # cut short
    assert main(export_args(work, "5")) == 2
    assert error_line(capsys) == ("ehrmotor pretrain: error: "
                                  f"{work / 'pretraining_output'}: no complete checkpoint-5; "
                                  f"complete checkpoints: {STEP}")
    assert main(export_args(work, "7")) == 2
    assert "no complete checkpoint-7 (being written or cut short)" in error_line(capsys)
    assert main(export_args(work, "latest")) == 0  # the newest complete one
    assert (work / f"model-step-{STEP}").is_dir()


def test_no_checkpoints_yet_not_a_work_folder_and_out_that_exists_are_one_line_errors(
        work: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "taken").mkdir()
    assert main(export_args(work, "latest", "--out", str(tmp_path / "taken"))) == 2
    assert f"--out {tmp_path / 'taken'}: exists" in error_line(capsys)
    assert main(export_args(tmp_path / "absent", "latest")) == 2
    assert error_line(capsys).endswith(f"{tmp_path / 'absent'}: not a work folder (no such "
                                       "folder); give the --work of `ehrmotor prepare` and "
                                       "`ehrmotor pretrain`")
    assert main(export_args(tmp_path, "latest")) == 2
    assert f"{tmp_path}: not a work folder (no pretraining_files/)" in error_line(capsys)
    shutil.rmtree(work / "pretraining_output")
    assert main(export_args(work, "latest")) == 2
    assert error_line(capsys) == (f"ehrmotor pretrain: error: {work / 'pretraining_output'}: no "
                                  "checkpoints yet; pretrain saves one every save_steps steps")
    assert sorted(p.name for p in work.iterdir()) == ["pretraining_files"]


def test_prepared_files_changed_since_training_are_refused(
        work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = work / "pretraining_output" / "pretrain_settings.json"
    recorded = json.loads(settings.read_text())
    recorded["prepared"]["tokenizer"] = "0" * 16
    settings.write_text(json.dumps(recorded))
    assert main(export_args(work, "latest")) == 2
    assert "pretraining_files: tokenizer changed since the checkpoints" in error_line(capsys)


def test_a_checkpoint_deleted_after_it_was_opened_is_exported_whole(
        work: Path, finished: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    opened = export._open

    def open_then_rotate(output: Path, step: int, stack: object) -> object:
        result = opened(output, step, stack)  # type: ignore[arg-type]
        shutil.rmtree(output / f"checkpoint-{step}")  # the Trainer's save_total_limit
        return result

    monkeypatch.setattr(export, "_open", open_then_rotate)
    assert main(export_args(work, str(STEP))) == 0
    assert not (work / "pretraining_output" / f"checkpoint-{STEP}").exists()
    bundle = work / f"model-step-{STEP}"
    assert ((bundle / "model.safetensors").read_bytes()
            == (finished[1] / "model" / "model.safetensors").read_bytes())


def test_a_checkpoint_deleted_before_it_was_opened_is_a_one_line_error(
        work: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    opened = export._open

    def rotate_then_open(output: Path, step: int, stack: object) -> object:
        shutil.rmtree(output / f"checkpoint-{step}")
        return opened(output, step, stack)  # type: ignore[arg-type]

    monkeypatch.setattr(export, "_open", rotate_then_open)
    assert main(export_args(work, str(STEP))) == 2
    checkpoint = work / "pretraining_output" / f"checkpoint-{STEP}"
    assert error_line(capsys) == (f"ehrmotor pretrain: error: {checkpoint}: removed by the "
                                  "training run while it was being opened (it keeps the newest "
                                  "save_total_limit checkpoints); complete checkpoints now: none")
    assert sorted(p.name for p in work.iterdir()) == ["pretraining_files", "pretraining_output"]


def test_an_export_that_fails_midway_leaves_nothing(
        work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("planted failure after the weights were copied")

    monkeypatch.setattr("ehrmotor.pretrain.model_card.write_model_card", fail)
    before = digests(work)
    with pytest.raises(RuntimeError, match="planted failure"):
        export.export_checkpoint(work, "latest")
    assert digests(work) == before  # no bundle, no temporary, checkpoints untouched
    assert sorted(p.name for p in work.iterdir()) == ["pretraining_files", "pretraining_output"]


def test_training_options_and_out_alone_are_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(export_args(tmp_path, "latest", "--max-steps", "5", "--restart")) == 2
    assert error_line(capsys) == ("ehrmotor pretrain: error: --export-checkpoint does not "
                                  "train; drop --max-steps, --restart")
    assert main(["pretrain", "--work", str(tmp_path), "--out", str(tmp_path / "b")]) == 2
    assert error_line(capsys) == ("ehrmotor pretrain: error: --out needs --export-checkpoint "
                                  "(pretrain writes WORK/model)")
    assert list(tmp_path.iterdir()) == []
