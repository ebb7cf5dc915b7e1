"""Pretraining end to end on a few hundred synthetic subjects: learning, bundle, resume, DDP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ehrmotor.batching import collate_windows
from ehrmotor.cli import main
from ehrmotor.config import PrepareConfig, PretrainConfig
from ehrmotor.model import MotorModel
from ehrmotor.prepare import prepare
from ehrmotor.synthetic import generate
from ehrmotor.train import pretrain
from ehrmotor.write_datasets import load_prepared

CONFIG = """
[pretrain]
preset = "tiny"
tokens_per_batch = 2048
gradient_accumulation_steps = 1
learning_rate = 2e-3
warmup_steps = 10
eval_steps = 50
save_steps = 50
logging_steps = 10
"""


def _prepared(root: Path, subjects: int) -> Path:
    meds = root / "meds"
    generate(meds, subjects, seed=3, progress=False)
    work = root / "work"
    prepare(meds, work, athena_dir=meds / "athena", workers=2, progress=False,
            config=PrepareConfig(vocab_size=2000, num_tasks=300, max_window=1024))
    return work


@pytest.fixture(scope="session")
def prepared_work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _prepared(tmp_path_factory.mktemp("train"), 400)


@pytest.fixture(scope="session")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "pretrain.toml"
    path.write_text(CONFIG)
    return path


def _copy_prepared(prepared_work: Path, tmp_path: Path) -> Path:
    work = tmp_path / "work"
    (work / "pretraining_files").parent.mkdir(parents=True)
    (work / "pretraining_files").symlink_to(prepared_work / "pretraining_files")
    return work


@pytest.fixture(scope="session")
def trained(prepared_work: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = _copy_prepared(prepared_work, tmp_path_factory.mktemp("trained"))
    pretrain(work, PretrainConfig(preset="tiny", tokens_per_batch=2048,
                                  gradient_accumulation_steps=1, learning_rate=2e-3,
                                  warmup_steps=10, max_steps=200, eval_steps=50, save_steps=50))
    return work


def test_tiny_model_learns_beyond_the_base_rates(trained: Path) -> None:
    summary = json.loads((trained / "model" / "training_summary.json").read_text())
    assert summary["global_step"] == 200
    # The prefitted model predicts each task's constant rate; the trained one must do better.
    assert summary["val_loss"] < summary["base_rate_val_loss"] * 0.99, summary


def test_bundle_is_self_contained_strict_json_and_free_of_pickles(trained: Path) -> None:
    bundle = trained / "model"
    for name in ("config.json", "model.safetensors", "dictionary.msgpack", "motor_task.json",
                 "ontology/ancestors.parquet", "training_summary.json"):
        assert (bundle / name).is_file(), name

    def refuse(constant: str) -> None:
        raise ValueError(constant)

    json.loads((bundle / "config.json").read_text(), parse_constant=refuse)
    assert not [p for p in bundle.rglob("*") if p.suffix in (".bin", ".pt", ".pkl", ".pth")]
    assert not (trained / "pretraining_output").exists()


def test_bundle_round_trip_gives_identical_outputs(trained: Path) -> None:
    model = MotorModel.from_pretrained(trained / "model").eval()
    again = MotorModel.from_pretrained(trained / "model").eval()
    val = load_prepared(trained / "pretraining_files" / "val_batches")
    batch = collate_windows([val[i] for i in range(min(3, len(val)))], model.config.num_tasks)
    with torch.no_grad():
        first, second = model(**batch), again(**batch)
    assert torch.equal(first.log_hazards, second.log_hazards)
    assert torch.isfinite(first.loss)
    # The weights are the trained ones, not a fresh initialisation.
    fresh = MotorModel(model.config)
    assert not torch.equal(fresh.head.tasks.weight, model.head.tasks.weight)


def test_pretrain_with_a_complete_bundle_is_a_no_op_unless_forced(
        trained: Path, config_file: Path) -> None:
    weights = trained / "model" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert main(["pretrain", "--work", str(trained), "--config", str(config_file)]) == 0
    assert weights.stat().st_mtime_ns == before


def test_force_retrains_and_keep_output_keeps_checkpoints(
        prepared_work: Path, tmp_path: Path, config_file: Path) -> None:
    work = _copy_prepared(prepared_work, tmp_path)
    args = ["pretrain", "--work", str(work), "--config", str(config_file), "--max-steps", "4",
            "--keep-output"]
    assert main(args) == 0
    assert (work / "pretraining_output" / "runs").is_dir()  # TensorBoard logs
    before = (work / "model" / "model.safetensors").stat().st_mtime_ns
    assert main([*args, "--force"]) == 0
    assert (work / "model" / "model.safetensors").stat().st_mtime_ns > before


def test_resume_after_a_kill_finishes_and_loads(
        prepared_work: Path, tmp_path: Path, config_file: Path) -> None:
    work = _copy_prepared(prepared_work, tmp_path)
    config = tmp_path / "resume.toml"
    # Frequent checkpoints; no early stop, so the resumed run must reach max_steps.
    config.write_text(config_file.read_text().replace("save_steps = 50", "save_steps = 5")
                      .replace("eval_steps = 50", "eval_steps = 5")
                      + "early_stopping_patience = 1000\n")
    args = [sys.executable, "-m", "ehrmotor", "pretrain", "--work", str(work), "--config",
            str(config), "--max-steps", "60"]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    output = work / "pretraining_output"
    deadline = time.monotonic() + 240
    while not list(output.glob("checkpoint-*")) and time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail("training ended before its first checkpoint")
        time.sleep(0.2)
    time.sleep(1.0)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert list(output.glob("checkpoint-*")), "no checkpoint before the kill"
    assert not (work / "model").exists()
    assert subprocess.run([*args, "--resume"], capture_output=True).returncode == 0
    summary = json.loads((work / "model" / "training_summary.json").read_text())
    assert summary["global_step"] == 60
    MotorModel.from_pretrained(work / "model")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_torchrun_with_two_processes_trains_and_writes_a_loadable_bundle(
        prepared_work: Path, tmp_path: Path, config_file: Path) -> None:
    work = _copy_prepared(prepared_work, tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "ehrmotor",
         "pretrain", "--work", str(work), "--config", str(config_file), "--max-steps", "4"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((work / "model" / "training_summary.json").read_text())
    assert summary["global_step"] == 4
    MotorModel.from_pretrained(work / "model")


def test_pretrain_without_prepared_files_is_a_one_line_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pretrain", "--work", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "ehrmotor prepare" in error[0]


def test_unknown_pretrain_setting_is_a_one_line_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[pretrain]\nlearnig_rate = 1e-3\n")
    assert main(["pretrain", "--work", str(tmp_path), "--config", str(config)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "learnig_rate" in error[0]
