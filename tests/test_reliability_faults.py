"""Reliability under resource faults and races: a full disk, a read-only folder and a file size
limit (in a subprocess on a small tmpfs, skipped where this process may not mount one), never
deleting a folder, concurrent runs and locks, interruptions, links and allocation failures: one
line, exit 2, nothing deleted or half-written."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from reliability_cases import (
    PRETRAIN_TOML,
    existing_folder,
    pretrain_with,
)
from reliability_world import World, error_lines, make_world, run_cli, run_main, snapshot

from ehrmotor.artifacts import clean_stale_temporaries, fingerprint_files
from ehrmotor.errors import WorkFolderBusy
from ehrmotor.lock import LOCK_FILE, work_lock
from ehrmotor.processes import process_pool


@pytest.fixture(scope="session")
def world(tiny_bundle: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> World:
    return make_world(tiny_bundle, tmp_path_factory)


# --------------------------------------------------------------------------- resource faults


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB tmpfs mounted at tmp_path/disk (skipped where mounting is not allowed)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def assert_no_partial_artifacts(folder: Path) -> None:
    """Only complete artifacts: no temporaries, and every artifact has its manifest."""
    for path in folder.rglob("*"):
        assert ".tmp-" not in path.name and ".old-" not in path.name, path
    files = folder / "pretraining_files"
    if files.exists():
        for artifact in files.iterdir():
            if artifact.name.endswith(".manifest.json") or artifact.name == "config.json":
                continue
            assert (files / f"{artifact.name}.manifest.json").exists(), artifact


def assert_one_error_line(result: subprocess.CompletedProcess[str], command: str,
                          fragment: str) -> None:
    lines = error_lines(result.stderr)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert len(lines) == 1 and lines[0].startswith(f"ehrmotor {command}: error: "), lines
    assert fragment in lines[0], lines


@pytest.mark.slow
def test_prepare_on_a_full_disk_is_one_line_and_leaves_only_complete_artifacts(
        world: World, small_disk: Path) -> None:
    result = run_cli(["prepare", "--meds", str(world.meds), "--athena", str(world.meds / "athena"),
                      "--out", str(small_disk / "work"), "--workers", "1"])
    assert_one_error_line(result, "prepare", "No space left on device")
    assert_no_partial_artifacts(small_disk / "work")


@pytest.mark.slow
def test_embed_on_a_full_disk_is_one_line_and_writes_nothing(world: World,
                                                             small_disk: Path) -> None:
    (small_disk / "filler").write_bytes(b"\0" * (3 * 2**20 - 8192))
    result = run_cli(["embed", "--model", str(world.bundle), "--meds", str(world.meds),
                      "--labels", str(world.labels), "--out", str(small_disk / "e.parquet")])
    assert_one_error_line(result, "embed", "No space left on device")
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


@pytest.mark.slow
@pytest.mark.parametrize("command", ["prepare", "embed"])
def test_a_read_only_out_is_one_line(world: World, small_disk: Path, command: str) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    if command == "prepare":
        argv = ["prepare", "--meds", str(world.tiny_meds), "--out", str(small_disk / "work")]
    else:
        argv = ["embed", "--model", str(world.bundle), "--meds", str(world.meds), "--labels",
                str(world.labels), "--out", str(small_disk / "e.parquet")]
    assert_one_error_line(run_cli(argv), command, "Read-only file system")


@pytest.mark.slow
def test_a_file_size_limit_is_one_line_and_leaves_only_complete_artifacts(
        world: World, tmp_path: Path) -> None:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))
    result = run_cli(["prepare", "--meds", str(world.meds), "--athena", str(world.meds / "athena"),
                      "--out", str(tmp_path / "work"), "--workers", "1"], preexec=limit)
    assert_one_error_line(result, "prepare", "File too large")
    assert_no_partial_artifacts(tmp_path / "work")


# --------------------------------------------------------------------------- never delete


def test_no_command_deletes_a_pre_existing_folder(world: World, tmp_path: Path) -> None:
    """embed, prepare, evaluate and synth pointed at a folder of the user's keep it intact."""
    folder = existing_folder(tmp_path)
    before = snapshot(folder)
    runs = [
        ["embed", "--model", str(world.bundle), "--meds", str(world.meds), "--labels",
         str(world.labels), "--out", str(folder)],
        ["synth", "--subjects", "5", "--out", str(folder)],
        ["synth", "--subjects", "5", "--out", str(folder), "--force"],
    ]
    for argv in runs:
        assert run_main(argv) == 2, argv
        assert snapshot(folder) == before, argv
    # prepare writes beside the user's files, in its own pretraining_files/ (here it stops at
    # the MOTOR task: three subjects are too few), and keeps the user's files
    assert run_main(["prepare", "--meds", str(world.tiny_meds), "--out", str(folder)]) == 2
    assert (folder / "pretraining_files" / "ontology").is_dir()
    assert (folder / "inner" / "precious.txt").read_text() == "do not delete\n"


def test_atomic_writes_replace_files_but_never_folders(tmp_path: Path) -> None:
    from ehrmotor.artifacts import atomic_path
    from ehrmotor.errors import OutputError

    folder = existing_folder(tmp_path)
    with pytest.raises(OutputError, match="is a folder"), atomic_path(folder) as tmp:
        tmp.write_text("x")
    assert (folder / "inner" / "precious.txt").exists()
    with pytest.raises(OutputError, match="refusing to replace"), atomic_path(folder) as tmp:
        tmp.mkdir()
    assert (folder / "inner" / "precious.txt").exists()
    assert not list(tmp_path.glob(".*tmp-*"))


# --------------------------------------------------------------------------- concurrency


@pytest.mark.slow
def test_two_prepares_into_one_folder_the_second_stops_naming_the_first(
        world: World, tmp_path: Path) -> None:
    work = tmp_path / "work"
    argv = ["prepare", "--meds", str(world.meds), "--athena", str(world.meds / "athena"),
            "--out", str(work), "--workers", "1"]
    first = subprocess.Popen([sys.executable, "-m", "ehrmotor", *argv], stderr=subprocess.PIPE,
                             text=True)
    deadline = time.monotonic() + 60
    lock = work / LOCK_FILE
    while not (lock.exists() and lock.stat().st_size) and time.monotonic() < deadline:
        time.sleep(0.05)  # held and its holder written
    first.send_signal(signal.SIGSTOP)  # the first holds the lock however slow the second starts
    try:
        second = run_cli(argv)
    finally:
        first.send_signal(signal.SIGCONT)
    assert_one_error_line(second, "prepare", f"in use by `ehrmotor prepare` (pid {first.pid} ")
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert not (work / LOCK_FILE).exists()
    assert run_cli(argv).returncode == 0  # the lock was released


def test_a_lock_left_by_a_killed_holder_is_taken_over(tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from ehrmotor.lock import work_lock\n"
         "with work_lock(sys.argv[1], 'pretrain'):\n print('held', flush=True)\n time.sleep(60)",
         str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    with pytest.raises(WorkFolderBusy, match=f"pid {holder.pid} "), work_lock(tmp_path, "prepare"):
        pass
    holder.kill()
    holder.wait()
    assert (tmp_path / LOCK_FILE).exists()  # SIGKILL: nobody removed it
    with caplog.at_level("WARNING"), work_lock(tmp_path, "prepare"):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert f"pid {holder.pid} " in caplog.text
    assert not (tmp_path / LOCK_FILE).exists()


def test_only_temporaries_of_dead_processes_are_cleaned(tmp_path: Path) -> None:
    dead = _dead_pid()
    live = subprocess.Popen(["sleep", "30"])
    try:
        for pid in (dead, live.pid, os.getpid()):
            (tmp_path / f".model.tmp-{pid}").mkdir()
        (tmp_path / ".model.old-1x").mkdir()  # not ours: name does not parse
        (tmp_path / "model.tmp-1").mkdir()  # not hidden: not ours
        removed = clean_stale_temporaries(tmp_path)
    finally:
        live.kill()
        live.wait()
    assert [p.name for p in removed] == [f".model.tmp-{dead}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f".model.tmp-{live.pid}", f".model.tmp-{os.getpid()}", ".model.old-1x", "model.tmp-1"])


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


# --------------------------------------------------------------------------- interruptions


def _sleep_in_worker(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def _pool_parent() -> None:  # run in a subprocess: start a pool, report worker pids, block
    with process_pool(2) as pool:
        pids = {pool.submit(os.getpid).result() for _ in range(8)}
        print(" ".join(map(str, sorted(pids))), flush=True)
        pool.submit(_sleep_in_worker, 120).result()


@pytest.mark.slow
def test_workers_exit_when_their_parent_is_killed() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", "import test_reliability_faults as t; t._pool_parent()"],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)})
    assert parent.stdout is not None
    workers = [int(pid) for pid in parent.stdout.readline().split()]
    assert workers
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(_running(pid) for pid in workers):
        time.sleep(0.2)
    assert not any(_running(pid) for pid in workers), "workers outlived their parent"


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_fingerprint_sees_a_same_size_edit_early_in_a_file(tmp_path: Path) -> None:
    shard = tmp_path / "0.parquet"
    shard.write_bytes(bytes(range(256)) * 8192)  # 2 MiB: the edit is 2 MiB before the end
    before = fingerprint_files([shard], tmp_path)
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert fingerprint_files([shard], tmp_path) != before


# --------------------------------------------------------------------------- links, memory


def test_prepare_and_label_write_through_a_link_to_a_folder(world: World, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]
                                                           ) -> None:
    target = tmp_path / "real"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    # prepare goes on (and stops at the MOTOR task: three subjects are too few)
    assert run_main(["prepare", "--meds", str(world.tiny_meds), "--out", str(link)]) == 2
    assert "is a file" not in capsys.readouterr().err
    assert (target / "pretraining_files" / "ontology").is_dir()
    assert not (target / LOCK_FILE).exists()
    labels = tmp_path / "labels-link"
    (tmp_path / "labels-real").mkdir()
    labels.symlink_to(tmp_path / "labels-real", target_is_directory=True)
    assert run_main(["label", "--meds", str(world.meds), "--out", str(labels), "--outcomes",
                     "hypertension"]) == 0
    assert labels.is_symlink() and (tmp_path / "labels-real" / "labels.json").is_file()
    assert not list(tmp_path.glob(".*tmp-*"))


def test_an_allocation_failure_building_the_model_is_one_line(
        world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from ehrmotor.pretrain import run as pretrain_run

    def no_memory(config: object) -> None:
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not "
                           "enough memory: you tried to allocate 1099511627776 bytes.")
    monkeypatch.setattr(pretrain_run, "MotorModel", no_memory)
    argv = pretrain_with(PRETRAIN_TOML)(world, tmp_path)
    capsys.readouterr()
    assert run_main(argv) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("ehrmotor pretrain: error: pretrain: "), lines
    assert "parameters" in lines[0] and "smaller preset" in lines[0], lines

