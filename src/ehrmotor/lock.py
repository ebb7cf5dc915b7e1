"""One writer per work folder: an exclusive lock held for the length of a command.

The lock is `FOLDER/.ehrmotor.lock`, locked with `flock` (released by the kernel when its holder
dies, so a killed run never blocks the next) and holding the holder's pid, host, command and start
time (JSON) for the message a second run stops with. A lock file left by a dead holder is taken
over, and the takeover is logged. A folder given as a symbolic link is locked as the folder it
points to.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from ehrmotor.artifacts import followed, remove_empty_folders
from ehrmotor.errors import WorkFolderBusy

log = logging.getLogger(__name__)
LOCK_FILE = ".ehrmotor.lock"


def _holder(path: Path) -> dict[str, object]:
    try:
        value = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def describe_holder(holder: dict[str, object]) -> str:
    if not holder:
        return "another ehrmotor process"
    started = holder.get("started")
    since = (time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(float(started)))
             if isinstance(started, int | float) else "")
    return (f"`ehrmotor {holder.get('command', '?')}` (pid {holder.get('pid', '?')} on "
            f"{holder.get('host', '?')}{since})")


def _is_main_rank() -> bool:
    """Under torchrun every rank runs the command; only global rank 0 takes the lock."""
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def work_lock(folder: Path, command: str) -> Iterator[None]:
    """Hold the exclusive lock of `folder` (created if absent) while the block runs.

    Raises WorkFolderBusy naming the holder when another live process has it. A folder this
    call created is removed again when the block leaves it empty (a run that failed at once).
    """
    if not _is_main_rank():
        yield
        return
    folder = followed(Path(folder))  # a link to a folder: lock the folder itself
    created = [parent for parent in (*reversed(folder.parents), folder) if not parent.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            remove_empty_folders(created)
            raise WorkFolderBusy(
                f"{folder}: in use by {describe_holder(_holder(path))}; one command at a time "
                "may write a work folder; wait for it to finish") from None
        # The file may have been unlinked by its previous holder between our open and flock.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    previous = _holder(path)
    if previous:
        log.warning("%s: taking over the lock of %s, which ended without releasing it", folder,
                    describe_holder(previous))
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
              "started": time.time()}
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(holder).encode())
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.close(fd)
        remove_empty_folders(created)
