"""Worker process pools whose workers exit when the process that started them dies.

A `ProcessPoolExecutor` worker outlives a parent killed with SIGKILL (as the OOM killer does) and
goes on computing for nobody; these workers watch their parent and exit when it is gone.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

PARENT_CHECK_SECONDS = 0.5


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(PARENT_CHECK_SECONDS)
    os._exit(1)  # the parent died: nobody will read our results


def _start_worker(parent_pid: int, initializer: Callable[..., Any] | None,
                  initargs: tuple[Any, ...]) -> None:
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True,
                     name="ehrmotor-parent-watch").start()
    if initializer is not None:
        initializer(*initargs)


def process_pool(workers: int, initializer: Callable[..., Any] | None = None,
                 initargs: tuple[Any, ...] = ()) -> ProcessPoolExecutor:
    """A spawn-context pool of `workers` processes that exit when this process dies."""
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_start_worker,
                               initargs=(os.getpid(), initializer, initargs))
