"""Where `prepare` runs its per-shard work: a local process pool (the default) or a Ray cluster.

Both are `concurrent.futures.Executor`s. `StepContext.map` submits `work(job)` for every shard
job and reads the results back in job order, and the step reduces them in the driver, so the
artifacts are byte-identical whichever executor ran the shards.

    local   `ehrmotor.processes.process_pool`: spawned worker processes on this machine
    ray     `RayExecutor`: each shard is a Ray task (one CPU) on a running Ray cluster, which
            every node reaches the MEDS, Athena and work folders of at the same paths (a shared
            POSIX filesystem); object-store URLs (s3://, gs://) are refused. Without an address
            and without a running cluster (RAY_ADDRESS, the last `ray start` here) it starts a
            local Ray instance for the run, as `ray.init()` does, and stops it at the end

Ray is imported only when the ray executor is chosen (`pip install ehrmotor[ray]`).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, Future
from concurrent.futures import wait as wait_futures
from functools import partial
from pathlib import Path
from typing import Any

from ehrmotor.errors import EhrmotorError, InputError, first_line
from ehrmotor.processes import process_pool

log = logging.getLogger(__name__)
EXECUTORS = ("local", "ray")
SHARDS_PER_CPU = 4  # fewer leaves cores idle while the last, largest shards finish
CONNECT_SECONDS = 10.0
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/+")  # Path("s3://b/k") reads "s3:/b/k"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours its task names


class ExecutorError(EhrmotorError):
    """The ray executor cannot run: Ray missing, no cluster, a task lost with its node (one
    line; the CLI exits with status 2)."""


def refuse_urls(paths: Iterable[Path | str | None]) -> None:
    """Raise InputError for an object-store URL among `paths`: prepare reads and writes local or
    shared POSIX paths only."""
    for path in paths:
        match = _URL.match(str(path)) if path is not None else None
        if match:
            url = _URL.sub(f"{match.group(1)}://", str(path), count=1)
            raise InputError(f"{url}: object-store URLs are not supported; put the data on a "
                             "filesystem every node mounts at the same path")


def shard_executor(executor: str, workers: int, ray_address: str | None = None) -> Executor:
    """The executor `prepare` maps its shards with: `workers` local processes, or Ray tasks on
    the cluster at `ray_address` (None: the running cluster, else a local Ray instance with
    `workers` CPUs)."""
    if executor == "local":
        return process_pool(workers)
    if executor == "ray":
        return RayExecutor(ray_address, local_cpus=workers)
    raise InputError(f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as error:
        raise ExecutorError("--executor ray needs Ray: pip install ehrmotor[ray]") from error
    return ray


def _bootstrap_address(address: str | None) -> str | None:
    """host:port of the cluster `address` names (None: RAY_ADDRESS, else the last `ray start`
    on this machine); None when there is none or it cannot be told ("ray://" addresses)."""
    try:  # a private helper of Ray's: without it we only lose the early checks
        from ray._private.services import canonicalize_bootstrap_address

        return canonicalize_bootstrap_address(address)  # type: ignore[arg-type]
    except Exception:
        return None


def _unanswered(gcs: str) -> OSError | ValueError | None:
    """Why nothing listens at host:port `gcs`, or None when something does."""
    host, _, port = gcs.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_SECONDS).close()
    except (OSError, ValueError) as error:
        return error
    return None


def running_cluster() -> str | None:
    """The cluster a run without --ray-address joins: RAY_ADDRESS when set, else the last
    `ray start` on this machine while it still answers; None when there is none."""
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    gcs = _bootstrap_address(None)
    return gcs if gcs is not None and _unanswered(gcs) is None else None


def _start_local(ray: Any, cpus: int | None) -> None:
    """`ray.init()` of a local instance with `cpus` CPUs (None: every core), for this run."""
    log.info("ray: no --ray-address and no Ray cluster running here: starting a local Ray "
             "instance%s for this run (stopped when it ends)",
             f" with {cpus} CPUs" if cpus else "")
    try:
        ray.init(address="local", num_cpus=cpus, include_dashboard=False,
                 logging_level=logging.WARNING)
    except (ConnectionError, ValueError, RuntimeError, OSError) as error:
        raise ExecutorError(f"ray: cannot start a local Ray instance: {first_line(error)}"
                            ) from error


def _connect(ray: Any, address: str) -> None:
    """`ray.init(address)`, failing in seconds rather than after Ray's many minutes of retries
    when nothing listens there."""
    gcs = _bootstrap_address(address)  # None: "ray://", or no cluster found: ray.init says
    if gcs is not None:
        error = _unanswered(gcs)
        if error is not None:
            raise ExecutorError(f"ray: no Ray cluster answers at {gcs} ({error}); check "
                                "--ray-address (or RAY_ADDRESS), or start one with "
                                "`ray start --head`") from error
    try:
        ray.init(address=address, logging_level=logging.WARNING)
    except (ConnectionError, ValueError, RuntimeError) as error:
        raise ExecutorError(f"ray: cannot connect to a Ray cluster at {address}: "
                            f"{first_line(error)} (start one with `ray start --head`)"
                            ) from error


def _call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """What each Ray task runs: the shard function, as the local pool would call it."""
    return fn(*args, **kwargs)


class _RemoteTraceback(Exception):
    """The worker's traceback, chained to the error it raised (as a process pool does)."""

    def __str__(self) -> str:
        return str(self.args[0])


class _RayFuture(Future):
    """The result of one Ray task. `cancel` cancels the task; the future still resolves only
    once the task has stopped (so nothing writes after the step has cleaned up)."""

    def __init__(self, ray: Any, ref: Any, what: str):
        super().__init__()
        self._ray, self.ref, self.what = ray, ref, what

    def cancel(self) -> bool:
        if not self.done():
            self._ray.cancel(self.ref)  # a queued task never starts; a running one is interrupted
        return False


class RayExecutor(Executor):
    """Runs each submitted call as a Ray task (one CPU) on the cluster at `address`.

    Connects on creation unless this process is connected already, and disconnects on shutdown
    only if it connected. With no `address` and no running cluster (`running_cluster`) it starts
    a local Ray instance of `local_cpus` CPUs (None: every core) instead, and shutdown stops it;
    a cluster it did not start is never stopped. Errors a task raises are raised as they were
    in the worker (with its traceback as their cause); a task Ray lost (node died, worker
    killed for memory) raises ExecutorError.
    """

    def __init__(self, address: str | None = None, num_cpus: float = 1,
                 local_cpus: int | None = None):
        self._ray = ray = _import_ray()
        self._connected_here = not ray.is_initialized()
        self.started_local = False  # whether this executor started (and will stop) a Ray
        if self._connected_here:
            if address is None and running_cluster() is None:
                _start_local(ray, local_cpus)
                self.started_local = True
            else:
                _connect(ray, address or "auto")
        self._task = ray.remote(num_cpus=num_cpus)(_call)
        self._shipped: tuple[Callable[..., Any], Any] | None = None  # (fn, its object ref)
        self._pending: set[_RayFuture] = set()
        self._lock = threading.Lock()
        resources = ray.cluster_resources()
        log.info("ray: %d node(s), %g CPUs", len(ray.nodes()), resources.get("CPU", 0))

    @property
    def cpus(self) -> float:
        """The CPUs of the cluster."""
        return float(self._ray.cluster_resources().get("CPU", 0))

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        """`fn(*args, **kwargs)` as a Ray task. `fn` (a shard function with its bound settings)
        is put in the object store once while the same object is submitted again."""
        if self._shipped is None or self._shipped[0] is not fn:
            self._shipped = (fn, self._ray.put(fn))
        ref = self._task.remote(self._shipped[1], *args, **kwargs)
        future = _RayFuture(self._ray, ref, _describe(fn, args))
        with self._lock:
            self._pending.add(future)
        ref.future().add_done_callback(partial(self._settle, future))
        return future

    def _settle(self, future: _RayFuture, done: Future[Any]) -> None:
        try:
            result = done.result()
        except BaseException as error:
            future.set_exception(self._local_error(error, future.what))
        else:
            future.set_result(result)
        with self._lock:
            self._pending.discard(future)

    def _local_error(self, error: BaseException, what: str) -> BaseException:
        """The error of a task as the local pool would raise it."""
        exceptions = self._ray.exceptions
        cause = getattr(error, "cause", None)
        if isinstance(error, exceptions.RayTaskError) and isinstance(cause, Exception) and \
                not isinstance(cause, exceptions.RayError):
            cause.__cause__ = _RemoteTraceback(getattr(error, "traceback_str", str(error)))
            return cause
        if isinstance(error, exceptions.TaskCancelledError):
            return error  # we cancelled it: the error that made us do so is raised instead
        if isinstance(error, exceptions.RayError):
            # A RayTaskError's own first line is only "ray::_call() (pid=..., ip=...)".
            reason = first_line(cause if isinstance(cause, BaseException) else error)
            failure = ExecutorError(f"ray: {what} failed: {_ANSI.sub('', reason)}")
            failure.__cause__ = error
            return failure
        return error

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            pending = list(self._pending)
        if cancel_futures:
            for future in pending:
                future.cancel()
        if wait:
            wait_futures(pending)
        if self._connected_here and self._ray.is_initialized():
            # Disconnects this driver: a cluster keeps running, a local instance we started
            # (ray.init without an address) is stopped with it.
            self._ray.shutdown()
            self._connected_here = False


def _describe(fn: Callable[..., Any], args: tuple[Any, ...]) -> str:
    """"shard_dataset of /data/train/0.parquet": the function and the shard it was given."""
    while isinstance(fn, partial):
        fn = fn.func
    name = getattr(fn, "__name__", repr(fn))
    path = getattr(args[0], "path", None) if args else None
    return f"{name} of {path}" if path is not None else name
