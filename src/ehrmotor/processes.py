"""Worker process pools whose workers exit when the process that started them dies, and leave
interrupts to it.

A `ProcessPoolExecutor` worker outlives a parent killed with SIGKILL (as the OOM killer does) and
goes on computing for nobody; these workers watch their parent and exit when it is gone.

Ctrl-C reaches every process of the terminal's process group. The workers start with SIGINT
blocked and then ignore it (their tracebacks would bury the one line the command ends with);
the parent handles it and stops them with `stop_workers` (SIGTERM, which they do not handle:
they end at once, printing nothing). `install_interrupt_handlers` sets up the command line's
handling: SIGTERM raises `Terminated`, so that the same cleanup runs as for Ctrl-C.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError, ProcessPoolExecutor
from typing import Any

PARENT_CHECK_SECONDS = 0.5
_POOLS: weakref.WeakSet[ProcessPoolExecutor] = weakref.WeakSet()
# While a worker is being launched, a signal is only recorded here (its handler runs after):
# raised halfway through the launch, it would leave the child reading a setup it never gets.
_LAUNCH: dict[str, Any] = {"active": False, "pending": None, "handler": None}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that `finally` blocks and context
    managers clean up (lock, temporaries, workers) before the command exits with status 143."""


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(PARENT_CHECK_SECONDS)
    os._exit(1)  # the parent died: nobody will read our results


def _start_worker(parent_pid: int, initializer: Callable[..., Any] | None,
                  initargs: tuple[Any, ...]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True,
                     name="ehrmotor-parent-watch").start()
    if initializer is not None:
        initializer(*initargs)


class _CancellableFuture(Future):
    """A pool future that a broken pool may still fail after it was cancelled.

    Python 3.11's pool, on a worker's death, sets BrokenProcessPool on every call it still
    holds, cancelled ones included; the InvalidStateError that raises kills its manager thread,
    so the calls still running never finish, and the cancelled ones are never reported to
    `concurrent.futures.wait` (which waits for "cancelled and notified"): whoever waits hangs.
    Here the cancelled call is reported instead."""

    def set_exception(self, exception: BaseException | None) -> None:
        try:
            super().set_exception(exception)
        except InvalidStateError:
            if not self.cancelled():
                raise
            self.set_running_or_notify_cancel()  # wakes `wait` on this cancelled call


class WorkerPool(ProcessPoolExecutor):
    """The pool of `process_pool` (its futures are `_CancellableFuture`s)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        # submit starts the workers: they inherit SIGINT blocked, so Ctrl-C never reaches them,
        # not even while they import their modules (before any initializer runs). A SIGINT
        # meanwhile stays pending here and is handled on return.
        # Blocking covers the children only: Python runs a handler in the main thread whenever
        # any other thread took the signal, so the handler itself defers to the launch's end.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        _LAUNCH["active"] = True
        try:
            future = super().submit(fn, *args, **kwargs)
        finally:
            _LAUNCH["active"] = False
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            pending, _LAUNCH["pending"] = _LAUNCH["pending"], None
            if pending is not None and _LAUNCH["handler"] is not None:
                _LAUNCH["handler"](pending, None)
        future.__class__ = _CancellableFuture  # adds a method only: same layout
        return future


def process_pool(workers: int, initializer: Callable[..., Any] | None = None,
                 initargs: tuple[Any, ...] = ()) -> ProcessPoolExecutor:
    """A spawn-context pool of `workers` processes that exit when this process dies and that
    `stop_workers` ends."""
    pool = WorkerPool(workers, mp_context=multiprocessing.get_context("spawn"),
                      initializer=_start_worker, initargs=(os.getpid(), initializer, initargs))
    _POOLS.add(pool)
    return pool


def stop_workers() -> None:
    """Terminate the workers of every pool of this process (on an interrupt: their results
    will not be read). The pools then fail their pending calls, so nothing waits on them."""
    for pool in list(_POOLS):
        processes = getattr(pool, "_processes", None) or {}
        for process in list(processes.values()):
            if process.is_alive():
                process.terminate()


def _interrupt_handler(main_pid: int) -> Callable[[int, object], None]:
    """The SIGINT/SIGTERM handler of a command: the first signal stops the worker processes
    and raises KeyboardInterrupt (SIGINT) or Terminated (SIGTERM), so that the lock, the
    temporaries and partial checkpoints are cleaned up; later ones are ignored while that
    runs."""

    def handle(number: int, frame: object) -> None:
        if os.getpid() != main_pid:  # a forked child (a DataLoader worker): the parent decides
            if number == signal.SIGTERM:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGTERM)
            return
        if _LAUNCH["active"]:  # `WorkerPool.submit` handles it once the launch is complete
            _LAUNCH["pending"] = _LAUNCH["pending"] or number
            return
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stop_workers()
        raise Terminated() if number == signal.SIGTERM else KeyboardInterrupt()
    return handle


def install_interrupt_handlers() -> dict[int, Any]:
    """Handle SIGINT and SIGTERM as `_interrupt_handler` says; return the previous handlers
    for `restore_handlers` (none off the main thread, where Python cannot set handlers)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    handler = _interrupt_handler(os.getpid())
    _LAUNCH["handler"] = handler
    previous: dict[int, Any] = {}
    for number in (signal.SIGINT, signal.SIGTERM):
        previous[number] = signal.signal(number, handler)
    return previous


def restore_handlers(previous: dict[int, Any]) -> None:
    _LAUNCH["handler"] = None
    for number, handler in previous.items():
        if handler is not None:  # None: set outside Python, cannot be restored
            signal.signal(number, handler)
