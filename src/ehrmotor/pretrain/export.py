"""`ehrmotor pretrain --work WORK --export-checkpoint N|latest`: a bundle from a checkpoint.

A long pretraining run can be evaluated while it trains: this writes, atomically (temporary
sibling, then rename), the bundle `pretrain` would write if it stopped at Trainer checkpoint
`WORK/pretraining_output/checkpoint-N/` (default `--out`: WORK/model-step-N):

    config.json, model.safetensors   the checkpoint's, byte for byte
    dictionary.msgpack, motor_task.json, ontology/, subject_splits.parquet
                                     from WORK as `pretrain` copies them
    training_summary.json            checkpoint_step (N), global_step, the training loss last
                                     logged up to N, the val loss evaluated at N (when it was),
                                     parameters, max_window, unseen_splits, the run's config
    fingerprint.json, README.md      both record checkpoint_step

It takes no lock (training may hold it) and never writes inside `pretraining_output/`. Only a
complete checkpoint is exported (Trainer writes trainer_state.json last). Its files are opened
before anything is copied, so a checkpoint the Trainer deletes meanwhile (it keeps the newest
`save_total_limit`) is still copied whole; one deleted before it was opened is a one-line error
(`latest` then takes the newest again). The prepared files must be the ones the checkpoints
were trained from (the digests in pretraining_output/pretrain_settings.json). The result is
loaded with `load_bundle` before it is renamed into place.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ehrmotor import artifacts
from ehrmotor.errors import BundleError, InputError, OutputError, PretrainError

log = logging.getLogger(__name__)
OUTPUT_DIR = "pretraining_output"
FILES_DIR = "pretraining_files"
LATEST = "latest"
ATTEMPTS = 3  # `latest` chosen again when the Trainer deleted it before it was opened
# pretrain options that only training uses: refused with --export-checkpoint
TRAINING_OPTIONS = ("config", "preset", "max_steps", "tokens_per_batch", "resume", "restart",
                    "force", "keep_output")
COPIED_FILES = (("tokenizer/dictionary.msgpack", "dictionary.msgpack"),
                ("motor_task.json", "motor_task.json"))


def checkpoint_step(value: str) -> int | str:
    """argparse type of --export-checkpoint: a step (integer >= 0) or "latest"."""
    if value == LATEST:
        return value
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"must be a checkpoint step (an integer >= 0) or "
                                         f"{LATEST!r}, got {value!r}")
    return int(value)


def add_export_options(parser: argparse.ArgumentParser) -> None:
    """The options of `pretrain` that export a checkpoint instead of training."""
    parser.add_argument("--export-checkpoint", type=checkpoint_step, default=None,
                        metavar="N|latest",
                        help="do not train: write a model bundle from checkpoint step N (or "
                             "the newest) of WORK/pretraining_output, also while a run trains")
    parser.add_argument("--out", type=Path, default=None,
                        help="with --export-checkpoint: the bundle folder to create (default "
                             "WORK/model-step-N; an existing path is refused)")


def run_export(args: argparse.Namespace) -> int:
    """`pretrain --export-checkpoint`: the CLI handler (after argparse)."""
    if args.export_checkpoint is None:
        raise InputError("--out needs --export-checkpoint (pretrain writes WORK/model)")
    training = [f"--{name.replace('_', '-')}" for name in TRAINING_OPTIONS
                if getattr(args, name, None) not in (None, False)]
    if training:
        raise InputError(f"--export-checkpoint does not train; drop {', '.join(training)}")
    bundle = export_checkpoint(args.work, args.export_checkpoint, args.out)
    log.info("pretrain: checkpoint %s exported as the model bundle %s", args.export_checkpoint,
             bundle)
    return 0


@dataclass
class _Opened:
    """A checkpoint's files, opened (so a deletion no longer matters) or read."""

    step: int
    folder: Path
    config: bytes
    state: dict[str, Any]
    weights: IO[bytes]


def complete_steps(output: Path) -> list[int]:
    """Steps of the checkpoints in `output` that Trainer finished writing, ascending."""
    if not output.is_dir():
        return []
    steps = []
    for state in output.glob("checkpoint-*/trainer_state.json"):
        suffix = state.parent.name.removeprefix("checkpoint-")
        if suffix.isdigit():
            steps.append(int(suffix))
    return sorted(steps)


def _listed(steps: list[int]) -> str:
    return ", ".join(map(str, steps)) if steps else "none"


def _check_work(work: Path) -> Path:
    """WORK/pretraining_output after checking WORK is a work folder with checkpoints."""
    if not work.is_dir():
        raise PretrainError(f"{work}: not a work folder (no such folder); give the --work of "
                            "`ehrmotor prepare` and `ehrmotor pretrain`")
    if not (work / FILES_DIR).is_dir():
        raise PretrainError(f"{work}: not a work folder (no {FILES_DIR}/); run `ehrmotor "
                            f"prepare --out {work}` and `ehrmotor pretrain --work {work}` first")
    output = work / OUTPUT_DIR
    if not complete_steps(output):
        finished = (f"; the run finished: its bundle is {work / 'model'} (pretrain removes the "
                    "checkpoints after it unless --keep-output)"
                    if (work / "model" / "fingerprint.json").is_file() else
                    "; pretrain saves one every save_steps steps")
        raise PretrainError(f"{output}: no checkpoints yet{finished}")
    return output


def _step_to_open(output: Path, wanted: int | str) -> int:
    steps = complete_steps(output)
    if not steps:
        raise PretrainError(f"{output}: no complete checkpoints left (the training run removed "
                            "them)")
    if wanted == LATEST:
        return steps[-1]
    if wanted not in steps:
        partial = " (being written or cut short)" if (output / f"checkpoint-{wanted}").is_dir() \
            else ""
        raise PretrainError(f"{output}: no complete checkpoint-{wanted}{partial}; complete "
                            f"checkpoints: {_listed(steps)}")
    return int(wanted)


def _open(output: Path, step: int, stack: contextlib.ExitStack) -> _Opened:
    """Open checkpoint `step`'s files; FileNotFoundError when it is (partly) gone."""
    folder = output / f"checkpoint-{step}"
    try:  # the weights first: once open, a deletion no longer matters
        weights = stack.enter_context((folder / "model.safetensors").open("rb"))
    except FileNotFoundError:
        if (folder / "trainer_state.json").is_file():  # still there: it never had them
            raise PretrainError(f"{folder}: no model.safetensors (a sharded or pickled "
                                "checkpoint cannot be exported)") from None
        raise
    state_bytes = (folder / "trainer_state.json").read_bytes()
    config = (folder / "config.json").read_bytes()
    try:
        state = json.loads(state_bytes)
    except ValueError as error:
        raise PretrainError(f"{folder / 'trainer_state.json'}: not JSON ({error})") from error
    if not isinstance(state, dict):
        raise PretrainError(f"{folder / 'trainer_state.json'}: not a JSON object")
    return _Opened(step, folder, config, state, weights)


def _open_checkpoint(output: Path, wanted: int | str, stack: contextlib.ExitStack) -> _Opened:
    """The wanted checkpoint, opened; a one-line error when the Trainer deleted it first."""
    for _ in range(ATTEMPTS):
        step = _step_to_open(output, wanted)
        try:
            return _open(output, step, stack)
        except FileNotFoundError:
            if wanted != LATEST:
                raise PretrainError(
                    f"{output / f'checkpoint-{step}'}: removed by the training run while it "
                    "was being opened (it keeps the newest save_total_limit checkpoints); "
                    f"complete checkpoints now: {_listed(complete_steps(output))}") from None
    raise PretrainError(f"{output}: the newest checkpoint was removed {ATTEMPTS} times before "
                        "it could be opened; try again")


def _check_prepared(work: Path, output: Path) -> dict[str, Any]:
    """The run's recorded settings, after checking the prepared files are still theirs."""
    from ehrmotor.checkpoints import SETTINGS_FILE
    from ehrmotor.pretrain.setup import prepared_digests

    path = output / SETTINGS_FILE
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise PretrainError(f"{path}: no readable record of the settings the checkpoints were "
                            f"trained with ({type(error).__name__})") from error
    if not isinstance(recorded, dict) or not isinstance(recorded.get("prepared"), dict):
        raise PretrainError(f"{path}: not a record of pretrain settings")
    try:
        current = prepared_digests(work / FILES_DIR)
    except OSError as error:
        raise PretrainError(f"{work / FILES_DIR}: incomplete ({error.strerror}: "
                            f"{error.filename}); rerun `ehrmotor prepare`") from error
    changed = sorted(name for name in set(current) | set(recorded["prepared"])
                     if current.get(name) != recorded["prepared"].get(name))
    if changed:
        raise PretrainError(f"{work / FILES_DIR}: {', '.join(changed)} changed since the "
                            f"checkpoints in {output} were trained; a bundle needs the "
                            "vocabulary and task they were trained with")
    return recorded


def _losses(state: dict[str, Any], step: int) -> dict[str, float]:
    """The training loss last logged at or before `step`, and the val loss evaluated at it."""
    history = [entry for entry in state.get("log_history") or []
               if isinstance(entry, dict) and isinstance(entry.get("step"), int)
               and entry["step"] <= step]
    losses: dict[str, float] = {}
    for key, name in (("loss", "train_loss"), ("eval_loss", "val_loss")):
        values = [entry for entry in history if isinstance(entry.get(key), int | float)]
        if values and (key == "loss" or values[-1]["step"] == step):
            losses[name] = float(values[-1][key])
    return losses


def _summary(work: Path, opened: _Opened, settings: dict[str, Any],
             config_dict: dict[str, Any]) -> dict[str, Any]:
    """training_summary.json of the exported bundle."""
    import math

    import torch

    from ehrmotor.model import MotorConfig, MotorModel

    prepared = _json_object(work / FILES_DIR / "config.json")
    with torch.device("meta"):  # the count only: no memory, no initialisation
        parameters = MotorModel(MotorConfig.from_dict(config_dict)).count_parameters()
    summary: dict[str, Any] = {
        "checkpoint_step": opened.step,
        "exported_from": f"{OUTPUT_DIR}/{opened.folder.name}",
        "global_step": opened.state.get("global_step", opened.step),
        "max_window": prepared.get("max_window", config_dict.get("max_window")),
        "unseen_splits": prepared.get("exclude_splits"),
        "parameters": parameters,
        "config": settings.get("config"),
        **_losses(opened.state, opened.step),
    }
    return {key: value for key, value in summary.items()
            if not (isinstance(value, float) and not math.isfinite(value))}


def _json_object(path: Path) -> dict[str, Any]:
    """The JSON object at `path`, {} when absent or unreadable."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _write_parts(tmp: Path, work: Path, opened: _Opened, summary: dict[str, Any]) -> None:
    """Every part of the bundle into the folder `tmp`."""
    from ehrmotor.bundle import record_fingerprint
    from ehrmotor.meds.read import HELD_OUT_FILE
    from ehrmotor.pretrain.model_card import write_model_card

    tmp.mkdir()
    (tmp / "config.json").write_bytes(opened.config)
    with (tmp / "model.safetensors").open("wb") as weights:
        shutil.copyfileobj(opened.weights, weights, 2**22)
    files = work / FILES_DIR
    for source, name in COPIED_FILES:
        shutil.copy(files / source, tmp / name)
    shutil.copytree(files / "ontology", tmp / "ontology")
    if (work / HELD_OUT_FILE).is_file():  # prepare --held-out-fraction's split
        shutil.copy(work / HELD_OUT_FILE, tmp / HELD_OUT_FILE)
    (tmp / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    fingerprint = record_fingerprint(tmp, checkpoint_step=opened.step)
    write_model_card(tmp, files, summary=summary, fingerprint=fingerprint)


def _check_out(out: Path, output: Path) -> None:
    if out.exists() or out.is_symlink():
        raise OutputError(f"--out {out}: exists; an export never replaces anything (choose "
                          "another path or remove it)")
    for owned in (output, output.parent / FILES_DIR):
        if artifacts.inside(out, owned):
            raise OutputError(f"--out {out}: is inside {owned}, which pretraining reads or "
                              "writes (choose a path outside it)")
    artifacts.check_output(out, "folder")


def export_checkpoint(work: str | Path, step: int | str = LATEST,
                      out: str | Path | None = None) -> Path:
    """Write the bundle of checkpoint `step` (an int or "latest") of `work`; return its path.

    out: default WORK/model-step-N. PretrainError (bad work folder, no such step, prepared
    files changed) or OutputError (out exists) as one line; see the module docstring.
    """
    from ehrmotor.bundle import load_bundle

    work = Path(work)
    output = _check_work(work)
    settings = _check_prepared(work, output)
    if out is not None:
        _check_out(Path(out), output)
    with contextlib.ExitStack() as stack:
        opened = _open_checkpoint(output, step, stack)
        target = Path(out) if out is not None else work / f"model-step-{opened.step}"
        _check_out(target, output)
        try:
            config_dict = json.loads(opened.config)
        except ValueError as error:
            raise PretrainError(f"{opened.folder / 'config.json'}: not JSON ({error})") from error
        summary = _summary(work, opened, settings, config_dict)
        with artifacts.atomic_path(target) as tmp:
            _write_parts(tmp, work, opened, summary)
            try:
                load_bundle(tmp)
            except BundleError as error:
                raise PretrainError(f"{opened.folder}: cannot be exported: {error}") from error
    return target
