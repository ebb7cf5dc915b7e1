"""Interrupts and resource faults mid-run: SIGINT and SIGTERM sent to the whole process group (as
a terminal's Ctrl-C and most schedulers do) end `prepare` and `pretrain` with one line, exit
status 130 / 143, the workers gone, the lock released, no temporaries, no partial checkpoint and
no bundle; the same command then resumes. A checkpoint save that fails (full disk) is one line
and leaves no partial checkpoint.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from ehrmotor import checkpoints
from ehrmotor.cli import main
from ehrmotor.lock import LOCK_FILE
from ehrmotor.synthetic import generate

LOG_LINE = re.compile(r"(DEBUG|INFO|WARNING|ERROR) ")
PREPARE_FLAGS = ["--workers", "2", "--vocab-size", "2000", "--candidate-tasks", "300",
                 "--max-window", "1024"]
PRETRAIN_TOML = """\
[pretrain]
preset = "tiny"
tokens_per_batch = 2048
gradient_accumulation_steps = 1
max_steps = {steps}
eval_steps = {save}
save_steps = {save}
warmup_steps = 1
logging_steps = 1
"""
SIGNALS = {"SIGINT": (signal.SIGINT, 130), "SIGTERM": (signal.SIGTERM, 143)}


@pytest.fixture(scope="module")
def meds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3000 synthetic subjects in 4 shards per split: prepare's worker steps take seconds."""
    return generate(tmp_path_factory.mktemp("interrupts") / "meds", 3000, seed=0, num_shards=4,
                    progress=False)


PROGRESS = re.compile(r"\d+%\||^\s*(\x1b)?\[A\s*$")  # tqdm bars and their cursor moves


def error_lines(err: str) -> list[str]:
    """stderr without log records and progress bars."""
    return [line for line in err.strip().splitlines()
            if line.strip() and not LOG_LINE.match(line) and "\r" not in line
            and not PROGRESS.search(line)]


def group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def interrupted(argv: list[str], number: int, ready: Callable[[int], bool],
                log: Path) -> tuple[int, str]:
    """Run `ehrmotor ARGV` in a session of its own, send `number` to its process group once
    `ready(pid)`, and return (exit status, stderr) once every process of the group is gone."""
    with log.open("w") as err:
        process = subprocess.Popen([sys.executable, "-m", "ehrmotor", *argv], stderr=err,
                                   stdout=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not ready(process.pid):
        assert process.poll() is None, f"ended before the signal: {log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.02)
    os.killpg(process.pid, number)
    status = process.wait(timeout=60)
    deadline = time.monotonic() + 20  # the workers and multiprocessing's resource tracker
    while group_alive(process.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not group_alive(process.pid), "processes of the command outlived it"
    return status, log.read_text()


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]


@pytest.mark.parametrize("name", list(SIGNALS))
def test_prepare_interrupted_in_its_workers_is_one_line_and_resumes(
        name: str, meds: Path, tmp_path: Path) -> None:
    number, expected = SIGNALS[name]
    work, log = tmp_path / "work", tmp_path / "stderr.txt"
    argv = ["prepare", "--meds", str(meds), "--out", str(work), *PREPARE_FLAGS]

    def in_workers(pid: int) -> bool:  # the tokenizer step, after split, counts in the workers
        return log.exists() and "split: built" in log.read_text()
    status, err = interrupted(argv, number, in_workers, log)
    assert status == expected, err[-3000:]
    assert "Traceback" not in err and "BrokenProcessPool" not in err
    assert error_lines(err) == [
        "ehrmotor prepare: interrupted; rerunning the same command resumes"], err[-3000:]
    assert not (work / LOCK_FILE).exists()
    assert temporaries(work) == []
    assert not (work / "pretraining_files" / "train_batches").exists()
    rerun = subprocess.run([sys.executable, "-m", "ehrmotor", *argv], capture_output=True,
                           text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "split: loaded" in rerun.stderr  # resumed: the finished steps were kept


def pretrain_work(tiny_bundle: tuple[Path, Path], root: Path, steps: int, save: int) -> Path:
    work = root / "work"
    shutil.copytree(tiny_bundle[1].parent / "pretraining_files", work / "pretraining_files")
    (root / "pretrain.toml").write_text(PRETRAIN_TOML.format(steps=steps, save=save))
    return work


def assert_only_whole_checkpoints(output: Path) -> None:
    for folder in output.glob("checkpoint-*"):
        assert (folder / "trainer_state.json").is_file(), f"partial checkpoint {folder}"


@pytest.mark.parametrize("name", list(SIGNALS))
def test_pretrain_interrupted_mid_training_is_one_line_and_leaves_no_partial_checkpoint(
        name: str, tiny_bundle: tuple[Path, Path], tmp_path: Path) -> None:
    number, expected = SIGNALS[name]
    work, log = pretrain_work(tiny_bundle, tmp_path, 200, 1), tmp_path / "stderr.txt"
    argv = ["pretrain", "--work", str(work), "--config", str(tmp_path / "pretrain.toml")]

    def training(pid: int) -> bool:  # a checkpoint at every step: signals land in saves too
        return (work / "pretraining_output" / "checkpoint-1" / "trainer_state.json").exists()
    status, err = interrupted(argv, number, training, log)
    assert status == expected, err[-3000:]
    assert "Traceback" not in err
    assert error_lines(err) == [
        "ehrmotor pretrain: interrupted; rerunning the same command resumes"], err[-3000:]
    assert not (work / LOCK_FILE).exists()
    assert temporaries(work) == []
    assert not (work / "model").exists()
    assert_only_whole_checkpoints(work / "pretraining_output")
    assert checkpoints.last_complete_checkpoint(work / "pretraining_output") is not None


@pytest.mark.parametrize("failure", ["torch", "oserror"])
def test_a_checkpoint_save_on_a_full_disk_is_one_line_and_leaves_no_partial_checkpoint(
        failure: str, tiny_bundle: tuple[Path, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    work = pretrain_work(tiny_bundle, tmp_path, 2, 2)

    def full_disk(obj: object, path: object, *args: object, **kwargs: object) -> None:
        Path(str(path)).write_bytes(b"PK\x03\x04 cut short")  # what a failed write leaves
        if failure == "torch":
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos "
                               "1472 vs 1360")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    monkeypatch.setattr(torch, "save", full_disk)
    monkeypatch.setattr(checkpoints, "free_bytes", lambda folder: 0)  # the disk is full
    capsys.readouterr()
    status = main(["pretrain", "--work", str(work), "--config", str(tmp_path / "pretrain.toml")])
    err = capsys.readouterr().err
    assert status == 2, err[-3000:]
    lines = error_lines(err)
    assert len(lines) == 1 and "Traceback" not in err, lines
    checkpoint = work / "pretraining_output" / "checkpoint-2"
    assert lines[0].startswith("ehrmotor pretrain: error: "), lines
    assert f"{checkpoint}: No space left on device" in lines[0], lines
    assert "No space left on device" in lines[0] and "partial checkpoint was removed" in lines[0]
    assert not checkpoint.exists()
    assert not (work / "model").exists() and temporaries(work) == []
    assert not (work / LOCK_FILE).exists()


def children(pid: int) -> int:
    """Live child processes of `pid`."""
    count = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        count += int(fields[1]) == pid and fields[0] != "Z"
    return count


def test_synth_interrupted_while_its_workers_start_is_one_line(tmp_path: Path) -> None:
    """The workers are still importing (no initializer has run yet): they must not print the
    KeyboardInterrupt tracebacks of their imports."""
    log, out = tmp_path / "stderr.txt", tmp_path / "synthetic"
    argv = ["synth", "--subjects", "20000", "--shards", "8", "--workers", "2", "--out", str(out)]

    def workers_started(pid: int) -> bool:
        return children(pid) >= 2
    status, err = interrupted(argv, signal.SIGINT, workers_started, log)
    assert status == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert error_lines(err) == [
        "ehrmotor synth: interrupted; rerunning the same command starts it again"], err[-3000:]
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["stderr.txt"]


def test_a_signal_while_a_worker_launches_is_handled_after_the_launch(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Python runs a signal handler in the main thread even while that thread blocks the signal
    (another thread took it): raised halfway through launching a worker, it left the child
    reading a setup it never got (`EOFError: Ran out of input` printed by the child)."""
    from concurrent.futures import Future, ProcessPoolExecutor

    from ehrmotor import processes

    steps: list[str] = []

    def launching(self: ProcessPoolExecutor, fn: object, /, *args: object) -> Future[None]:
        steps.append("launch started")
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):  # the handler gets its chances to run mid-launch here
            time.sleep(0.0001)
        steps.append("launch finished")
        return Future()

    monkeypatch.setattr(ProcessPoolExecutor, "submit", launching)
    previous = processes.install_interrupt_handlers()
    try:
        pool = processes.WorkerPool(1)
        with pytest.raises(KeyboardInterrupt):
            pool.submit(print)
        assert steps == ["launch started", "launch finished"]
        pool.shutdown(wait=False)
    finally:
        processes.restore_handlers(previous)
