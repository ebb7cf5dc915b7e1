"""Resuming training: which checkpoint in an output folder a rerun continues from.

`ehrmotor pretrain` (`WORK/pretraining_output/`) and `ehrmotor finetune` (`OUT/finetune_output/`)
record in their output folder the settings its checkpoints were trained with (SETTINGS_FILE,
`pretrain_settings.json`: `config`, the resolved settings, and `prepared`, a digest of each input;
pretraining's are `ehrmotor.pretrain.setup.training_settings`). A rerun resumes the last complete
checkpoint when its settings match (RESUMABLE_CHANGES aside) and stops with a PretrainError naming
what changed when they do not. The decision reads files only, so every rank of a distributed run
takes the same one.

A checkpoint is whole or absent: `whole_checkpoint` removes the `checkpoint-N/` that a failed or
interrupted save leaves (a full disk, Ctrl-C) and turns a full disk into one OutputError line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ehrmotor import artifacts
from ehrmotor.errors import (
    EhrmotorError,
    OutputError,
    PretrainError,
    environment_message,
    first_line,
)

log = logging.getLogger(__name__)
SETTINGS_FILE = "pretrain_settings.json"  # in pretraining_output/: what its checkpoints came from
# Settings a resumed run may change: they change neither the weights nor the batches.
TRAINER_STATE = "trainer_state.json"  # Trainer writes it last into a checkpoint
# torch.save reports a failed write (full disk, size limit) as a RuntimeError without an errno.
TORCH_WRITE_FAILURES = ("inline_container", "PytorchStreamWriter", "unexpected pos")
LOW_SPACE_BYTES = 64 * 2**20  # below this, a failed write is put down to a full disk
RESUMABLE_CHANGES = ("dataloader_num_workers", "logging_steps", "save_total_limit",
                     "gradient_checkpointing", "compile")


def settings_changes(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between two settings records, ignoring RESUMABLE_CHANGES."""
    old, new = recorded.get("config", {}), current["config"]
    changes = [f"{key} {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(set(old) | set(new))
               if key not in RESUMABLE_CHANGES and old.get(key) != new.get(key)]
    old, new = recorded.get("prepared", {}), current["prepared"]
    inputs = [name for name in sorted(set(old) | set(new)) if old.get(name) != new.get(name)]
    if inputs:
        changes.append(f"prepared {', '.join(inputs)} changed")
    return changes


def _read_settings(output: Path) -> dict[str, Any] | None:
    try:
        recorded = json.loads((output / SETTINGS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return recorded if isinstance(recorded, dict) else None


def resumable_checkpoint(output: Path, settings: dict[str, Any], stage: str = "pretrain"
                         ) -> str | None:
    """The last complete checkpoint in `output` when it was trained with `settings`, else None
    when there is none; PretrainError when there is one from other (or unrecorded) settings
    (messages name `stage`, the command).

    Depends on files only, so every rank of a distributed run decides alike.
    """
    checkpoint = last_complete_checkpoint(output)
    if checkpoint is None:
        return None
    restart = "rerun with --restart to discard the checkpoints and train from step 0"
    recorded = _read_settings(output)
    if recorded is None:
        raise PretrainError(f"{stage}: {output} has checkpoints but no readable record of their "
                            f"settings ({SETTINGS_FILE}); {restart}")
    changes = settings_changes(recorded, settings)
    if changes:
        raise PretrainError(f"{stage}: the checkpoints in {output} were trained with other "
                            f"settings: {'; '.join(changes)}; rerun with the earlier settings to "
                            f"resume, or {restart}")
    return checkpoint


def prepare_output(output: Path, checkpoint: str | None, settings: dict[str, Any],
                   restart: bool, stage: str = "pretrain") -> None:
    """On the main process: empty `output` unless resuming, record `settings` in it."""
    if checkpoint is None:
        if output.exists():
            why = "restart" if restart else "no complete checkpoint"
            log.info("%s: %s; discarding %s and training from step 0", stage, why, output)
            shutil.rmtree(output)
    else:
        log.info("%s: resuming from %s (same settings) in %s", stage, Path(checkpoint).name,
                 output)
        for stale in artifacts.clean_stale_temporaries(output):
            log.info("%s: removed %s, left by an interrupted run", stage, stale)
    output.mkdir(parents=True, exist_ok=True)
    if _read_settings(output) != settings:
        artifacts.write_json(output / SETTINGS_FILE, settings)


def last_complete_checkpoint(output: Path) -> str | None:
    """The newest `checkpoint-N` that Trainer finished writing, or None.

    Trainer writes `trainer_state.json` last; a process killed while saving leaves a folder
    without it (and possibly a truncated `model.safetensors`), which resuming must skip.
    """
    try:
        steps = [int(path.parent.name.split("-")[1])
                 for path in output.glob("checkpoint-*/trainer_state.json")
                 if path.parent.name.split("-")[1].isdigit()]
    except FileNotFoundError:  # the main process is discarding `output`: nothing to resume
        return None
    return str(output / f"checkpoint-{max(steps)}") if steps else None


def free_bytes(folder: Path) -> int | None:
    """Bytes an unprivileged process may still write on `folder`'s filesystem (None: unknown)."""
    try:
        stats = os.statvfs(folder)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


def _save_failure(error: BaseException, folder: Path) -> str | None:
    """One line for a checkpoint that could not be written for want of space (or another
    environment reason), else None."""
    message = environment_message(error, folder)
    if message is not None:
        return message
    text = str(error)
    if isinstance(error, RuntimeError) and any(mark in text for mark in TORCH_WRITE_FAILURES):
        space = free_bytes(folder.parent)
        reason = (os.strerror(28) if space is not None and space < LOW_SPACE_BYTES
                  else f"write failed: {first_line(error)}")
        return f"{folder}: {reason}"
    return None


@contextlib.contextmanager
def whole_checkpoint(folder: Path, owner: bool = True) -> Iterator[None]:
    """Run a checkpoint save into `folder`; when it fails or is interrupted before Trainer wrote
    its state (TRAINER_STATE, written last), remove the partial folder (`owner`: the process
    that saves it, global rank 0). A full disk becomes an OutputError naming the folder and the
    reason."""
    folder = Path(folder)
    try:
        yield
    except BaseException as error:
        if owner and folder.is_dir() and not (folder / TRAINER_STATE).is_file():
            shutil.rmtree(folder, ignore_errors=True)
        message = None if isinstance(error, EhrmotorError) else _save_failure(error, folder)
        if message is None:
            raise
        raise OutputError(f"{message} (while saving a checkpoint; the partial checkpoint was "
                          "removed, the earlier ones are kept)") from error
