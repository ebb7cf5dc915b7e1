"""`ehrmotor prepare --executor ray`: the per-shard work as tasks on a Ray cluster.

Run for real on Ray's own multi-node simulation (`ray.cluster_utils.Cluster`: a head and a second
node, one CPU each, on this machine), compared byte for byte with the local process pool, and on
the local Ray instance a run without a cluster starts. The tests that need no cluster
(refusals, Ray missing) run without Ray installed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from synthetic_data import SEED

from ehrmotor.cli import main
from ehrmotor.errors import InputError
from ehrmotor.prepare import executors
from ehrmotor.prepare.executors import ExecutorError, RayExecutor, shard_executor
from ehrmotor.prepare.shard_jobs import ShardJob
from ehrmotor.prepare.steps import StepContext
from ehrmotor.synthetic import generate

SUBJECTS = 300
SHARDS = 6  # per split: 18 data files, so 9 per CPU of the two-node cluster


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Any]:
    """A Ray cluster of two nodes with one CPU each, shut down (with its processes) at the end
    of the module, whatever the tests did."""
    ray = pytest.importorskip("ray", reason="the ray executor needs pip install ehrmotor[ray]")
    from ray.cluster_utils import Cluster

    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_USAGE_STATS_ENABLED", "0")  # no prompt, no network
        env.delenv("RAY_ADDRESS", raising=False)
        # The workers cannot import this test module: ship its functions by value.
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        cluster = Cluster(initialize_head=True,
                          head_node_args={"num_cpus": 1, "include_dashboard": False})
        session = Path(cluster.head_node.get_session_dir_path())  # its logs, under /tmp/ray
        try:
            cluster.add_node(num_cpus=1)
            cluster.wait_for_nodes()
            yield cluster
        finally:
            if ray.is_initialized():
                ray.shutdown()
            cluster.shutdown()
            shutil.rmtree(session, ignore_errors=True)
            ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def sharded_meds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SUBJECTS synthetic subjects in SHARDS shards per split (Athena vocabulary in meds/athena)."""
    return generate(tmp_path_factory.mktemp("ray") / "meds", SUBJECTS, seed=SEED,
                    num_shards=SHARDS, workers=2, progress=False)


def prepare_args(meds: Path, work: Path, *extra: str) -> list[str]:
    return ["prepare", "--meds", str(meds), "--athena", str(meds / "athena"), "--out", str(work),
            "--vocab-size", "2000", "--candidate-tasks", "300", "--max-window", "1024", *extra]


def file_bytes_digests(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under `folder` (manifests, stats, lock and hidden files included)."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines()
             if not re.match(r"(DEBUG|INFO|WARNING) ", line)]
    assert len(lines) == 1, err
    return lines[0]


def test_ray_executor_writes_the_local_executors_artifacts_byte_for_byte(
        ray_cluster: Any, sharded_meds: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    assert main(prepare_args(sharded_meds, tmp_path / "local", "--workers", "2")) == 0
    # A relative --out: the driver must hand the Ray workers absolute paths.
    monkeypatch.chdir(tmp_path)
    assert main(prepare_args(sharded_meds, Path("ray"), "--executor", "ray",
                             "--ray-address", ray_cluster.address)) == 0
    assert not ray.is_initialized()  # prepare disconnected the driver it connected
    want = file_bytes_digests(tmp_path / "local")
    got = file_bytes_digests(tmp_path / "ray")
    assert len(want) > 20
    assert any(name.startswith("pretraining_files/train_batches/") for name in want)
    assert got == want
    # The cluster prepare ran on is still up.
    ray.init(address=ray_cluster.address, logging_level=logging.WARNING)
    try:
        assert sum(node["Alive"] for node in ray.nodes()) == 2
    finally:
        ray.shutdown()


def node_of_task(seconds: float) -> str:
    """The Ray node this runs on, after holding its CPU `seconds`."""
    import ray

    time.sleep(seconds)
    return str(ray.get_runtime_context().get_node_id())


def test_ray_tasks_run_on_both_nodes_in_submission_order(ray_cluster: Any) -> None:
    with RayExecutor(ray_cluster.address) as pool:
        # One CPU per node: second-long tasks spread over both nodes, even when a node's first
        # worker is slow to start on a loaded machine.
        futures = [pool.submit(partial(node_of_task, 1.0)) for _ in range(8)]
        assert len({future.result(timeout=120) for future in futures}) == 2
        results = [pool.submit(abs, -index) for index in range(10)]
        assert [future.result(timeout=60) for future in results] == list(range(10))


def test_a_connection_made_before_is_used_and_kept(ray_cluster: Any) -> None:
    import ray

    ray.init(address=ray_cluster.address, logging_level=logging.WARNING)
    try:
        with RayExecutor("203.0.113.1:6379") as pool:  # connected already: the address is unused
            assert pool.submit(abs, -3).result(timeout=60) == 3
        assert ray.is_initialized()
    finally:
        ray.shutdown()


def fail_first_shard(job: ShardJob, *, out: Path) -> int:
    """Shard 0 fails at once; the others take a while, even when interrupted, then write."""
    if job.index == 0:
        time.sleep(0.5)
        raise InputError("shard 0: bad")
    try:
        time.sleep(2)
    except KeyboardInterrupt:  # Ray's cancel of a running task
        time.sleep(1)
    (out / f"{job.index}.done").write_text("written")
    return job.index


def test_a_failed_shard_stops_the_map_after_every_started_task_has_ended(
        ray_cluster: Any, tmp_path: Path) -> None:
    jobs = [ShardJob(tmp_path / f"{index}.parquet", index, 6) for index in range(6)]
    with RayExecutor(ray_cluster.address) as pool:
        ctx = StepContext(tmp_path, None, tmp_path, {}, jobs, pool, progress=False)
        with pytest.raises(InputError, match="^shard 0: bad$"):
            ctx.map(partial(fail_first_shard, out=tmp_path), "test")
        written = sorted(tmp_path.glob("*.done"))
        time.sleep(3)  # long enough for any task still running to write
        assert sorted(tmp_path.glob("*.done")) == written
        assert len(written) < len(jobs) - 1  # the queued shards never ran


def raise_input_error(job: ShardJob) -> None:
    raise InputError(f"{job.path}: bad shard\nsecond line")


def test_a_shard_error_is_raised_as_the_local_pool_raises_it(ray_cluster: Any) -> None:
    with RayExecutor(ray_cluster.address) as pool:
        future = pool.submit(raise_input_error, ShardJob(Path("/data/3.parquet"), 3, 8))
        with pytest.raises(InputError) as raised:
            future.result(timeout=60)
    assert type(raised.value) is InputError
    assert str(raised.value) == "/data/3.parquet: bad shard\nsecond line"
    assert "raise_input_error" in str(raised.value.__cause__)  # the worker's traceback


def test_a_task_lost_with_its_worker_is_a_one_line_error(ray_cluster: Any) -> None:
    with RayExecutor(ray_cluster.address) as pool:
        # os._exit kills the worker; Ray retries the task, then gives up.
        future = pool.submit(os._exit, 1)
        with pytest.raises(ExecutorError, match=r"^ray: _exit failed: "):
            future.result(timeout=120)


def test_ray_missing_is_a_one_line_error_naming_the_extra(
        sharded_meds: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    assert main(prepare_args(sharded_meds, tmp_path / "work", "--executor", "ray")) == 2
    line = error_line(capsys.readouterr().err)
    assert line == ("ehrmotor prepare: error: --executor ray needs Ray: "
                    "pip install ehrmotor[ray]")
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("url", ["s3://bucket/meds", "gs://bucket/meds"])
def test_object_store_urls_are_refused_in_one_line(
        url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["prepare", "--meds", url, "--out", str(tmp_path / "work"), "--executor", "ray"]
    assert main(args) == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"ehrmotor prepare: error: {url}: object-store URLs are not "
                           "supported")
    assert not (tmp_path / "work").exists()


def test_ray_address_without_the_ray_executor_is_refused(
        sharded_meds: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(prepare_args(sharded_meds, tmp_path / "work", "--ray-address", "auto")) == 2
    assert error_line(capsys.readouterr().err) == (
        "ehrmotor prepare: error: --ray-address needs --executor ray")


def gcs_stops_answering(gcs: str, seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while executors._unanswered(gcs) is None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def test_without_an_address_or_a_cluster_a_local_ray_runs_the_shards_and_is_stopped(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    ray = pytest.importorskip("ray", reason="the ray executor needs pip install ehrmotor[ray]")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # As on a laptop: the test cluster of this module (if up) is not found.
    monkeypatch.setattr(executors, "running_cluster", lambda: None)
    assert not ray.is_initialized()
    with caplog.at_level(logging.INFO, logger=executors.__name__), \
            shard_executor("ray", 2) as pool:
        assert isinstance(pool, RayExecutor) and pool.started_local
        assert pool.cpus == 2  # --workers
        assert [pool.submit(abs, -i).result(timeout=120) for i in range(3)] == [0, 1, 2]
        gcs = ray.get_runtime_context().gcs_address
        session = Path(ray._private.worker._global_node.get_session_dir_path())  # its logs
    shutil.rmtree(session, ignore_errors=True)
    started = [r.getMessage() for r in caplog.records if "starting a local Ray" in r.getMessage()]
    assert started == ["ray: no --ray-address and no Ray cluster running here: starting a local "
                       "Ray instance with 2 CPUs for this run (stopped when it ends)"]
    assert not ray.is_initialized()
    assert gcs_stops_answering(gcs)  # the instance itself is gone, not only the connection


def test_without_an_address_a_running_cluster_is_joined_and_left_running(
        ray_cluster: Any, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    import ray

    monkeypatch.setenv("RAY_ADDRESS", ray_cluster.address)  # as `ray start` exports it
    assert executors.running_cluster() == ray_cluster.address
    with caplog.at_level(logging.INFO, logger=executors.__name__), \
            shard_executor("ray", 2) as pool:
        assert isinstance(pool, RayExecutor) and not pool.started_local
        assert pool.submit(abs, -4).result(timeout=60) == 4
        assert pool.cpus == 2  # the cluster's two nodes, not --workers
    assert "starting a local Ray" not in caplog.text
    assert not ray.is_initialized()
    assert executors._unanswered(ray_cluster.address) is None  # still up
