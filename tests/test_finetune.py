"""`ehrmotor finetune` / `predict`: frozen encoders stay bit-identical, a fine-tuned bundle
reloads and predicts the numbers it computes in training, its representations equal
`compute_features` of the same weights, one-line errors. One tiny bundle per session
(conftest `tiny_bundle`); each fine-tuning here runs two steps."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from finetune_fixtures import write_labels

from ehrmotor.bundle import load_bundle, record_fingerprint
from ehrmotor.cli import main
from ehrmotor.embed import compute_features
from ehrmotor.errors import InputError
from ehrmotor.finetune import FinetuneConfig, finetune, load_task_bundle, predict
from ehrmotor.finetune.data import TaskCollator, check_vocabulary, task_labels, task_windows
from ehrmotor.finetune.predict import survival
from ehrmotor.finetune.run import recorded_codes
from ehrmotor.model import MotorModel
from ehrmotor.sequences.batching import frame_rows

STEPS = FinetuneConfig(max_steps=2, eval_steps=1, tokens_per_batch=2048, learning_rate=1e-2)


@pytest.fixture(scope="module")
def labels(tiny_bundle: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    meds = tiny_bundle[0]
    path = write_labels(meds, tmp_path_factory.mktemp("labels") / "er_visit.parquet", "Visit/ER")
    # 60 subjects keep each step short
    frame = pl.read_parquet(path).head(60)
    frame.write_parquet(path)
    return path


def _run(tiny_bundle: tuple[Path, Path], labels: Path, out: Path, freeze: str) -> Path:
    meds, bundle = tiny_bundle
    config = FinetuneConfig(**{**STEPS.to_json(), "freeze": freeze})
    return finetune(bundle, meds, labels, out, config, outcome_codes=("Visit/ER",))


@pytest.fixture(scope="module")
def frozen(tiny_bundle: tuple[Path, Path], labels: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _run(tiny_bundle, labels, tmp_path_factory.mktemp("frozen"), "encoder")


@pytest.fixture(scope="module")
def full(tiny_bundle: tuple[Path, Path], labels: Path,
         tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _run(tiny_bundle, labels, tmp_path_factory.mktemp("full"), "none")


def _states(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in model.state_dict().items()}


def test_freeze_encoder_leaves_every_encoder_weight_bit_identical(
        tiny_bundle: tuple[Path, Path], frozen: Path, full: Path) -> None:
    pretrained = _states(load_bundle(tiny_bundle[1]).model.motor)
    head_only = load_task_bundle(frozen).model
    assert _states(head_only.motor).keys() == pretrained.keys()
    assert all(torch.equal(value, pretrained[name])
               for name, value in _states(head_only.motor).items())
    start = load_bundle(tiny_bundle[1]).model.head.bins.weight
    assert not torch.equal(head_only.head.bins.weight, start)  # the head did train
    everything = _states(load_task_bundle(full).model.motor)
    assert any(not torch.equal(value, pretrained[name]) for name, value in everything.items())


def _training_path(bundle_path: Path, meds: Path, labels: Path) -> tuple[torch.Tensor, ...]:
    """(representations, scores) of the fine-tuned model over the training batches."""
    bundle = load_task_bundle(bundle_path)
    _, kind, frame = task_labels(labels)
    windows = task_windows(meds, bundle, frame, kind)
    batch = TaskCollator(kind)(frame_rows(windows))
    order = torch.from_numpy(windows["labels"].explode().to_numpy().astype(np.int64))
    with torch.no_grad():
        output = bundle.model(**batch)
    representations = torch.empty_like(output.representations)
    representations[order] = output.representations
    scores = torch.empty_like(output.scores)
    scores[order] = output.scores
    return representations, scores


def test_a_fine_tuned_bundle_reloads_and_predicts_the_same_numbers(
        tiny_bundle: tuple[Path, Path], full: Path, labels: Path, tmp_path: Path) -> None:
    meds = tiny_bundle[0]
    _, scores = _training_path(full, meds, labels)
    written = pl.read_parquet(predict(full, meds, labels, tmp_path / "p.parquet",
                                      horizons_days=[30.0, 365.0]))
    config = load_task_bundle(full).config
    expected = survival(scores, config.bin_edges_days, [30.0, 365.0])
    np.testing.assert_allclose(written["survival_30d"].to_numpy(), expected[:, 0], rtol=1e-5)
    np.testing.assert_allclose(written["survival_365d"].to_numpy(), expected[:, 1], rtol=1e-5)
    np.testing.assert_allclose(written["predicted_boolean_probability"].to_numpy(),
                               1 - expected[:, 0], rtol=1e-5, atol=1e-7)
    truth = pl.read_parquet(labels)
    assert written["subject_id"].to_list() == truth["subject_id"].to_list()


def test_the_representation_at_a_label_equals_compute_features_of_the_same_weights(
        tiny_bundle: tuple[Path, Path], full: Path, labels: Path, tmp_path: Path) -> None:
    meds, pretrained = tiny_bundle
    representations, _ = _training_path(full, meds, labels)
    task_model = load_task_bundle(full).model
    encoder_only = MotorModel(load_bundle(pretrained).config)
    encoder_only.motor.load_state_dict(task_model.motor.state_dict())
    copy = tmp_path / "bundle"
    shutil.copytree(pretrained, copy)
    encoder_only.save_pretrained(copy)
    (copy / "fingerprint.json").unlink()
    record_fingerprint(copy)
    features = compute_features(meds, copy, labels)["features"]
    np.testing.assert_allclose(representations.numpy(), features, rtol=1e-4, atol=1e-5)


def test_unknown_subjects_labels_before_birth_and_an_empty_class_are_one_line_errors(
        tiny_bundle: tuple[Path, Path], labels: Path, tmp_path: Path) -> None:
    meds, bundle = tiny_bundle
    frame = pl.read_parquet(labels)
    unknown = tmp_path / "unknown.parquet"
    frame.with_columns(subject_id=pl.col("subject_id") + 10**9).write_parquet(unknown)
    with pytest.raises(InputError, match="subjects are not in the data"):
        finetune(bundle, meds, unknown, tmp_path / "a", STEPS)
    early = tmp_path / "early.parquet"
    frame.with_columns(prediction_time=pl.datetime(1900, 1, 1),
                       event_time=pl.datetime(1900, 1, 15),
                       censor_time=pl.datetime(1900, 2, 1)).write_parquet(early)
    with pytest.raises(InputError, match="before the subject's birth date"):
        finetune(bundle, meds, early, tmp_path / "b", STEPS)
    negative = tmp_path / "negative.parquet"
    frame.select("subject_id", "prediction_time", boolean_value=pl.lit(False)).write_parquet(
        negative)
    assert main(["finetune", "--model", str(bundle), "--meds", str(meds), "--labels",
                 str(negative), "--out", str(tmp_path / "c"), "--max-steps", "1"]) == 2
    with pytest.raises(InputError, match="no positive labels"):
        finetune(bundle, meds, negative, tmp_path / "c", STEPS)


def test_data_coded_with_another_vocabulary_is_refused() -> None:
    windows = pl.DataFrame({"bag_sizes": [[2, 0, 0], [1, 0, 0]]})
    with pytest.raises(InputError, match="vocabulary"):
        check_vocabulary(windows, "meds")
    check_vocabulary(pl.DataFrame({"bag_sizes": [[2, 1, 0]]}), "meds")


def test_a_killed_finetune_resumes_from_its_checkpoint(
        tiny_bundle: tuple[Path, Path], labels: Path, tmp_path: Path) -> None:
    meds, bundle = tiny_bundle
    out = tmp_path / "ft"
    command = [sys.executable, "-m", "ehrmotor", "finetune", "--model", str(bundle), "--meds",
               str(meds), "--labels", str(labels), "--out", str(out), "--max-steps", "4",
               "--eval-steps", "1", "--tokens-per-batch", "2048"]
    checkpoints = out / "finetune_output"
    with open(tmp_path / "killed.log", "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while not list(checkpoints.glob("checkpoint-*/trainer_state.json")):
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"no checkpoint before the run ended: {tmp_path / 'killed.log'}")
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert not (out / "model").exists()
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "finetune: resuming from checkpoint-" in result.stderr, result.stderr[-3000:]
    summary = json.loads((out / "model" / "training_summary.json").read_text())
    assert summary["global_step"] == 4
    assert not checkpoints.exists()


def test_a_binary_fine_tuned_bundle_predicts_what_it_computes(
        tiny_bundle: tuple[Path, Path], labels: Path, tmp_path: Path) -> None:
    meds, pretrained = tiny_bundle
    binary = write_labels(meds, tmp_path / "labels" / "er.parquet", "Visit/ER", kind="boolean")
    pl.read_parquet(binary).head(60).write_parquet(binary)
    config = FinetuneConfig(**{**STEPS.to_json(), "freeze": "encoder", "max_steps": 1})
    bundle = finetune(pretrained, meds, binary, tmp_path / "ft", config)
    _, logits = _training_path(bundle, meds, binary)
    out = tmp_path / "p.parquet"
    assert main(["predict", "--model", str(bundle), "--meds", str(meds), "--labels",
                 str(binary), "--out", str(out)]) == 0
    written = pl.read_parquet(out)
    assert written.columns == ["subject_id", "prediction_time", "boolean_value",
                               "predicted_boolean_probability", "predicted_boolean_value"]
    probability = torch.sigmoid(logits.double()).numpy()
    np.testing.assert_allclose(written["predicted_boolean_probability"].to_numpy(), probability,
                               rtol=1e-5)
    assert written["boolean_value"].to_list() == pl.read_parquet(binary)["boolean_value"].to_list()


def test_outcome_codes_default_to_those_ehrmotor_label_recorded(tmp_path: Path) -> None:
    (tmp_path / "labels.json").write_text(json.dumps(
        {"outcomes": {"death": ["MEDS_DEATH"], "copd": ["ICD10CM/J44"]}}))
    assert recorded_codes(tmp_path / "copd.parquet", "copd") == ("ICD10CM/J44",)
    assert recorded_codes(tmp_path, "death") == ("MEDS_DEATH",)
    assert recorded_codes(tmp_path / "x.parquet", "other") == ()
    assert recorded_codes(tmp_path / "sub" / "x.parquet", "death") == ()
