"""`ehrmotor finetune`: adapt a pretrained bundle to one task with Hugging Face `Trainer`.

The label subjects are split, grouped by subject with a seeded permutation, into a train part and
a validation part (`FinetuneConfig.val_fraction`; no subject in both). The task model
(`ehrmotor.model.task_models`) starts from the pretrained bundle, trains on the train part's
windows (`ehrmotor.finetune.data`, token-budget batches as in pretraining) and keeps the
checkpoint of lowest validation loss (early stopping after `early_stopping_patience`
evaluations without improvement). OUT holds:

    OUT/model/              the fine-tuned bundle (`ehrmotor.finetune.bundle`)
    OUT/finetune_output/    checkpoints while training (removed at the end)

OUT is locked for the run; rerunning the same command resumes from the last complete checkpoint
when the settings, the pretrained bundle and the labels are unchanged (else it stops naming what
changed; `restart` discards the checkpoints). With OUT/model complete the command does nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import polars as pl
import torch
from transformers import EarlyStoppingCallback

from ehrmotor import artifacts
from ehrmotor.bundle import Bundle, load_bundle
from ehrmotor.checkpoints import prepare_output, resumable_checkpoint
from ehrmotor.errors import InputError, PretrainError
from ehrmotor.finetune.bundle import bundle_is_complete, write_task_bundle
from ehrmotor.finetune.data import TaskCollator, check_vocabulary, task_labels, task_windows
from ehrmotor.finetune.settings import FinetuneConfig, apply_freeze, training_arguments
from ehrmotor.lock import work_lock
from ehrmotor.model.config import MotorConfig
from ehrmotor.model.task_models import (
    BINARY,
    TASK_MODELS,
    TaskSpec,
    pretraining_codes,
    recorded_task,
)
from ehrmotor.trainer import MotorTrainer

log = logging.getLogger(__name__)
OUTPUT_DIR = "finetune_output"
MODEL_DIR = "model"
LABELS_RECORD = "labels.json"  # `ehrmotor label` records each outcome's codes there


class TaskTrainer(MotorTrainer):
    """`MotorTrainer` (token-budget batches of packed windows) with a task's targets."""

    def __init__(self, *args: Any, kind: str, **kwargs: Any) -> None:
        super().__init__(*args, task_map=torch.zeros(0, dtype=torch.long), **kwargs)
        self.collator = TaskCollator(kind)  # type: ignore[assignment]


def split_label_subjects(subject_ids: pl.Series, val_fraction: float,
                         seed: int) -> np.ndarray:
    """The validation subjects (sorted): round(val_fraction · n), at least one, of a seeded
    permutation of the sorted unique subjects; InputError with fewer than two subjects."""
    subjects = np.unique(subject_ids.to_numpy())
    if len(subjects) < 2:
        raise InputError(f"labels: {len(subjects)} subject; fine-tuning needs at least two (one "
                         "to train on, one to stop early on)")
    size = min(max(1, round(val_fraction * len(subjects))), len(subjects) - 1)
    return np.sort(np.random.default_rng([seed, 19]).permutation(subjects)[:size])


def base_rate(labels: pl.DataFrame, kind: str, where: str) -> float:
    """Training event rate (events per day at risk) or prevalence; InputError for an empty
    class (no events, no positives or no negatives)."""
    if kind == BINARY:
        positives = int(labels["outcome"].sum())
        if positives in (0, labels.height):
            missing = "positive" if positives == 0 else "negative"
            raise InputError(f"{where}: the training part has no {missing} labels (of "
                             f"{labels.height}); a classifier needs both classes")
        return positives / labels.height
    events = int(labels["event"].sum())
    if events == 0:
        raise InputError(f"{where}: the training part has no events (of {labels.height} "
                         "labels, all censored); a time-to-event model needs some")
    return events / float(labels["event_days"].sum())


def recorded_codes(labels_path: Path, name: str) -> tuple[str, ...]:
    """The outcome codes `ehrmotor label` recorded for task `name` (labels.json beside the
    label file, or in the label folder); empty when there is no such record."""
    for folder in (labels_path, labels_path.parent):
        record = folder / LABELS_RECORD
        if record.is_file():
            try:
                outcomes = json.loads(record.read_text()).get("outcomes", {})
            except (OSError, ValueError, AttributeError):
                return ()
            codes = outcomes.get(name) if isinstance(outcomes, dict) else None
            return tuple(str(code) for code in codes) if isinstance(codes, list) else ()
    return ()


def _digest(frame: pl.DataFrame) -> str:
    return hashlib.sha256(frame.write_ipc(None).getvalue()).hexdigest()[:16]


def finetune(model_path: Path, meds: Path, labels: Path, out: Path,
             config: FinetuneConfig | None = None, *, outcome_codes: tuple[str, ...] = (),
             restart: bool = False, num_proc: int = 1) -> Path:
    """Fine-tune and write OUT/model; return its path (module docstring). outcome_codes: the
    codes of a time-to-event outcome, whose pretraining task (if any) starts the head (default:
    those `ehrmotor label` recorded in labels.json beside the label file)."""
    config = config or FinetuneConfig()
    out = Path(out)
    artifacts.check_output(out, "folder")
    with work_lock(out, "finetune"):
        for stale in artifacts.clean_stale_temporaries(out):
            log.info("finetune: removed %s, left by an interrupted run", stale)
        if bundle_is_complete(out / MODEL_DIR):
            log.info("finetune: %s is complete; nothing to do", out / MODEL_DIR)
            return out / MODEL_DIR
        return _finetune(model_path, meds, labels, out, config, outcome_codes, restart, num_proc)


def _load_pretrained(model_path: Path) -> Bundle:
    config_file = Path(model_path) / "config.json"
    if config_file.is_file():
        recorded = recorded_task(MotorConfig.from_json_file(str(config_file)))
        if recorded is not None:
            raise InputError(f"{model_path}: already fine-tuned (for {recorded.name!r}); give "
                             "the pretrained bundle")
    return load_bundle(model_path)


def _finetune(model_path: Path, meds: Path, labels_path: Path, out: Path,
              config: FinetuneConfig, outcome_codes: tuple[str, ...], restart: bool,
              num_proc: int) -> Path:
    bundle = _load_pretrained(model_path)
    name, kind, labels = task_labels(labels_path)
    val_subjects = split_label_subjects(labels["subject_id"], config.val_fraction, config.seed)
    in_val = pl.col("subject_id").is_in(pl.Series(val_subjects).implode())
    train_labels = labels.filter(~in_val)
    codes = outcome_codes or recorded_codes(Path(labels_path), name)
    task = TaskSpec(name, kind, codes, base_rate(train_labels, kind, str(labels_path)))
    model = TASK_MODELS[kind].from_motor(bundle.model, task, pretraining_codes(bundle.path))
    trainable = apply_freeze(model, config.freeze)  # a bad setting fails before data is read
    context = bundle.max_window or 0
    tokens = config.tokens_per_batch or max(context, 8192)
    if tokens < context:
        raise InputError(f"finetune: tokens_per_batch {tokens} is smaller than the model's "
                         f"context of {context} positions")
    windows = task_windows(meds, bundle, labels, kind, num_proc)
    check_vocabulary(windows, str(meds))
    output = out / OUTPUT_DIR
    args = training_arguments(config, output, kind, model.config.hidden_size)
    settings = {"config": {**config.to_json(), "outcome_codes": list(outcome_codes)},
                "prepared": {"model": bundle.fingerprint, "labels": _digest(labels)}}
    try:
        checkpoint = None if restart else resumable_checkpoint(output, settings, "finetune")
    except PretrainError as error:  # its message names pretrain's folder and command
        raise InputError(str(error).replace("pretrain:", "finetune:", 1)) from error
    prepare_output(output, checkpoint, settings, restart, "finetune")
    log.info("finetune: %s task %r, %d labels (%d subjects for validation), freeze %s: "
             "%s of %s parameters train", kind, name, labels.height, len(val_subjects),
             config.freeze, f"{trainable:,}", f"{model.count_parameters():,}")
    parts = [windows.filter(in_val.not_()), windows.filter(in_val)]
    train, val = (datasets.Dataset.from_polars(part.drop("labels")).with_format("torch")
                  for part in parts)
    trainer = TaskTrainer(model=model, args=args, train_dataset=train, eval_dataset=val,
                          tokens_per_batch=tokens, kind=kind,
                          callbacks=[EarlyStoppingCallback(config.early_stopping_patience)])
    result = trainer.train(resume_from_checkpoint=checkpoint)
    summary = {"global_step": result.global_step, "train_loss": result.training_loss,
               "val_loss": trainer.evaluate()["eval_loss"], "labels": labels.height,
               "validation_subjects": len(val_subjects), "trainable_parameters": trainable,
               "max_window": bundle.max_window, "pretrained_fingerprint": bundle.fingerprint,
               "config": settings["config"]}
    target = write_task_bundle(trainer, bundle, out / MODEL_DIR, summary)
    artifacts.remove_atomically(output)
    return target
