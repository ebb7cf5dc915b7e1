"""`ehrmotor pretrain` checkpoints and resuming (`ehrmotor.checkpoints`): one CLI run killed with
SIGKILL and rerun with the same command (which resumes), checkpoints of other settings, --force,
and one two-node `torchrun` run on CPU (two agents, c10d rendezvous)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from pretrain_fixtures import (  # noqa: F401 (fixtures)
    bundle_mtimes,
    new_work,
    one_error_line,
    summary_of,
    val_batches,
)

from ehrmotor import checkpoints
from ehrmotor.cli import main
from ehrmotor.model import MotorModel

# Every test here runs `ehrmotor pretrain` in subprocesses (a killed run, torchrun).
pytestmark = pytest.mark.slow

SAVE_STEPS = 10
RESUME_STEPS = 20


def ehrmotor_pretrain(work: Path, config_file: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "ehrmotor", "pretrain", "--work", str(work), "--config",
            str(config_file), *flags]


def complete_checkpoints(output: Path) -> list[int]:
    """Steps of the checkpoints Trainer finished writing (trainer_state.json comes last)."""
    return sorted(int(p.parent.name.split("-")[1])
                  for p in output.glob("checkpoint-*/trainer_state.json"))


@pytest.fixture(scope="module")
def resumed(prepared_files: Path, config_file: Path,
            tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, str]:
    """A CLI run killed after its first checkpoint, then rerun with the same command: (work,
    step resumed at, log of the rerun)."""
    folder = tmp_path_factory.mktemp("resume")
    work = new_work(prepared_files, folder)
    command = ehrmotor_pretrain(work, config_file, "--max-steps", str(RESUME_STEPS),
                                "--keep-output")
    output = work / "pretraining_output"
    with open(folder / "killed.log", "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while not complete_checkpoints(output):
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"no checkpoint before the run ended: {(folder / 'killed.log')}")
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert not (work / "model").exists()
    last = complete_checkpoints(output)[-1]
    assert last < RESUME_STEPS
    # A kill while a checkpoint is written leaves it half-written: resume must skip it.
    partial = output / f"checkpoint-{last + SAVE_STEPS}"
    if not partial.exists():
        partial.mkdir()
        (partial / "model.safetensors").write_bytes(b"cut short")
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "info"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return work, last, result.stderr


def test_rerun_after_sigkill_resumes_from_the_checkpoint_to_max_steps(
        resumed: tuple[Path, int, str]) -> None:
    work, last, log = resumed
    assert f"resuming from checkpoint-{last} " in log, log[-4000:]
    match = re.search(r"Resuming training from checkpoint with epoch \d+ and global step (\d+)",
                      log)
    assert match, log[-4000:]
    assert int(match.group(1)) == last
    assert "from step 0" not in log
    assert summary_of(work)["global_step"] == RESUME_STEPS
    model = MotorModel.from_pretrained(work / "model").eval()
    with torch.no_grad():
        assert torch.isfinite(model(**next(val_batches(work))).loss)


def test_keep_output_keeps_checkpoints_and_tensorboard_logs(
        resumed: tuple[Path, int, str]) -> None:
    output = resumed[0] / "pretraining_output"
    assert RESUME_STEPS in complete_checkpoints(output)
    assert list((output / "runs").rglob("events.out.tfevents.*"))
    settings = json.loads((output / checkpoints.SETTINGS_FILE).read_text())
    assert settings["config"]["max_steps"] == RESUME_STEPS
    assert {"train_batches", "val_batches", "tokenizer"} <= settings["prepared"].keys()


def test_checkpoints_of_other_settings_stop_naming_the_change_until_restart(
        resumed: tuple[Path, int, str], config_file: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    work = tmp_path / "work"
    shutil.copytree(resumed[0], work)
    shutil.rmtree(work / "model")  # as if killed before the bundle was written
    output = work / "pretraining_output"
    before = {p.relative_to(output).as_posix(): p.stat().st_mtime_ns
              for p in output.rglob("*") if p.is_file()}
    command = ["pretrain", "--work", str(work), "--config", str(config_file), "--max-steps",
               str(RESUME_STEPS), "--keep-output"]

    assert main([*command, "--tokens-per-batch", "4096"]) == 2
    line = one_error_line(capsys)
    assert "other settings: tokens_per_batch 2048 -> 4096;" in line, line
    assert "--restart to discard the checkpoints" in line, line

    manifest = work / "pretraining_files" / "train_batches.manifest.json"
    recorded = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**recorded, "inputs": {"changed": True}}))
    assert main(command) == 2
    assert "other settings: prepared train_batches changed;" in one_error_line(capsys)
    manifest.write_text(json.dumps(recorded))

    (output / checkpoints.SETTINGS_FILE).unlink()
    assert main(command) == 2
    assert "no readable record of their settings" in one_error_line(capsys)
    assert not (work / "model").exists()
    after = {p.relative_to(output).as_posix(): p.stat().st_mtime_ns
             for p in output.rglob("*") if p.is_file()}
    assert after == {k: v for k, v in before.items() if k != checkpoints.SETTINGS_FILE}

    caplog.set_level("INFO", logger="ehrmotor")
    assert main([*command, "--restart", "--max-steps", "2"]) == 0
    assert "restart; discarding" in caplog.text
    assert "resuming from" not in caplog.text
    assert summary_of(work)["global_step"] == 2
    assert max(complete_checkpoints(output), default=0) <= 2


def test_force_retrains_a_complete_bundle(resumed: tuple[Path, int, str], config_file: Path,
                                          tmp_path: Path) -> None:
    work = tmp_path / "work"
    shutil.copytree(resumed[0], work)
    before = bundle_mtimes(work)
    assert main(["pretrain", "--work", str(work), "--config", str(config_file),
                 "--max-steps", "2", "--force"]) == 0
    after = bundle_mtimes(work)
    assert after.keys() == before.keys()
    for name in ("config.json", "model.safetensors", "training_summary.json"):
        assert after[f"model/{name}"] != before[f"model/{name}"], name
    assert summary_of(work)["global_step"] == 2
    assert not (work / "pretraining_output").exists()  # no --keep-output this time
    MotorModel.from_pretrained(work / "model")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_torchrun_on_two_nodes_trains_and_writes_a_loadable_bundle(
        prepared_files: Path, config_file: Path, tmp_path: Path) -> None:
    """Two torchrun agents (--nnodes=2, one process each) meet through a c10d rendezvous on
    localhost, as two hosts would, and train over gloo on a shared work folder."""
    work = new_work(prepared_files, tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "info"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
               "--nproc_per_node=1", "--rdzv_backend=c10d",
               f"--rdzv_endpoint=127.0.0.1:{free_port()}", "--rdzv_id=ehrmotor-two-nodes",
               "-m", "ehrmotor", "pretrain", "--work", str(work), "--config", str(config_file),
               "--max-steps", "4"]
    agents = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env) for _ in range(2)]
    try:
        outputs = [agent.communicate(timeout=600) for agent in agents]
    finally:
        for agent in agents:
            agent.kill()
    for agent, (_, err) in zip(agents, outputs, strict=True):
        assert agent.returncode == 0, err[-4000:]
    logs = "".join(err for _, err in outputs)
    # One window batch per process and step, two ranks: a total batch of 2.
    assert re.search(r"Total train batch size \(w\. parallel, distributed & accumulation\) = 2\b",
                     logs), logs[-4000:]
    assert summary_of(work)["global_step"] == 4
    model = MotorModel.from_pretrained(work / "model").eval()
    with torch.no_grad():
        assert torch.isfinite(model(**next(val_batches(work))).loss)
    assert not (work / "pretraining_output").exists()

