"""`ehrmotor pretrain`: train the MOTOR transformer with Hugging Face `Trainer`, write the bundle.

Reads `WORK/pretraining_files/` (from `prepare`), trains with the defaults of DESIGN.md (see
`PretrainConfig`), keeps checkpoints and TensorBoard logs in `WORK/pretraining_output/`, and at the
end writes the self-contained bundle `WORK/model/` atomically:

    config.json            MotorConfig (strict JSON), loadable with `MotorModel.from_pretrained`
    model.safetensors      weights of the best checkpoint (lowest val loss)
    dictionary.msgpack     the tokenizer
    motor_task.json        task codes, time bins and initial rates
    ontology/              the ontology the tokenizer was built with
    training_summary.json  steps, val loss, base-rate val loss, parameter count
    subject_splits.parquet prepare's own held-out split, when it wrote one (evaluate's default)
    README.md              the model card (`ehrmotor.pretrain.model_card`)
    fingerprint.json       a digest of each part above and one fingerprint over them, written
                           last (`ehrmotor.bundle.record_fingerprint`); loading checks it

`pretraining_output/` is then removed unless `--keep-output`. With a finished bundle present,
pretraining is a no-op unless `--force` (which implies `--restart`). Runs unchanged under
`torchrun` / `accelerate launch`: each rank draws its own batches from `TokenBudgetBatchSampler`.

Settings are checked before anything is written (`ehrmotor.pretrain.setup`); a bad one stops with a
one-line `PretrainError` naming it. An interrupted run is resumed by rerunning the same command
(`ehrmotor.checkpoints`): `pretraining_output/` records the settings it was started with
(`pretrain_settings.json`: the resolved PretrainConfig and digests of the prepared inputs'
manifests), and the last complete checkpoint is resumed when they match. Checkpoints from other
settings stop the run naming what changed; `--restart` discards them. Every rank takes the same
decision, from files alone. Temporaries left in `WORK/` by a killed run (`.model.tmp-PID/`) are
removed at the start.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import EarlyStoppingCallback, Trainer

from ehrmotor import artifacts
from ehrmotor.bundle import FINGERPRINT_FILE, record_fingerprint
from ehrmotor.checkpoints import prepare_output, resumable_checkpoint
from ehrmotor.config import PretrainConfig, config_dict
from ehrmotor.errors import PretrainError
from ehrmotor.lock import work_lock
from ehrmotor.meds.read import HELD_OUT_FILE
from ehrmotor.model import MotorConfig, MotorModel, motor_loss
from ehrmotor.pretrain.memory import allocation_errors, check_model_fits
from ehrmotor.pretrain.model_card import write_model_card
from ehrmotor.pretrain.setup import (
    build_model_config,
    check_settings,
    check_window_budget,
    load_prepared_files,
    training_arguments,
    training_settings,
)
from ehrmotor.trainer import MotorTrainer

log = logging.getLogger(__name__)
BUNDLE_FILES = ("config.json", "model.safetensors", "dictionary.msgpack", "motor_task.json",
                FINGERPRINT_FILE)


def _write_bundle(trainer: Trainer, work: Path, summary: dict[str, Any]) -> Path:
    bundle = work / "model"
    files = work / "pretraining_files"
    with artifacts.atomic_path(bundle, replace_folder=True) as tmp:
        trainer.save_model(str(tmp))
        shutil.copy(files / "tokenizer" / "dictionary.msgpack", tmp / "dictionary.msgpack")
        shutil.copy(files / "motor_task.json", tmp / "motor_task.json")
        shutil.copytree(files / "ontology", tmp / "ontology")
        if (work / HELD_OUT_FILE).is_file():  # prepare --held-out-fraction's split
            shutil.copy(work / HELD_OUT_FILE, tmp / HELD_OUT_FILE)
        (tmp / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        for stray in ("training_args.bin",):  # pickled by Trainer.save_model; never shipped
            (tmp / stray).unlink(missing_ok=True)
        fingerprint = record_fingerprint(tmp)  # it ties together the parts written above
        write_model_card(tmp, files, summary=summary, fingerprint=fingerprint)  # not a part
    return bundle


def bundle_is_complete(bundle: Path) -> bool:
    return all((bundle / name).is_file() for name in BUNDLE_FILES)


def pretrain(work: Path, config: PretrainConfig | None = None, *, restart: bool = False,
             force: bool = False, keep_output: bool = False) -> Path:
    """Train and write `WORK/model/`; return its path (see the module docstring).

    Resumes from the last complete checkpoint in `WORK/pretraining_output/` when it was trained
    with the same settings. `restart` discards that folder and trains from step 0; so does
    `force`, which also retrains when the bundle is complete. Holds the work folder's lock
    throughout.
    """
    work = Path(work)
    artifacts.check_output(work, "folder")
    if not work.exists():
        raise PretrainError(f"{work}: no such work folder; run `ehrmotor prepare --out {work}` "
                            "first")
    with work_lock(work, "pretrain"):
        return _pretrain(work, config or PretrainConfig(), restart=restart or force,
                         force=force, keep_output=keep_output)


def _pretrain(work: Path, config: PretrainConfig, *, restart: bool, force: bool,
              keep_output: bool) -> Path:
    bundle = work / "model"
    if _global_rank() == 0:
        for stale in artifacts.clean_stale_temporaries(work):
            log.info("pretrain: removed %s, left by an interrupted run", stale)
    if bundle_is_complete(bundle) and not force:
        log.info("pretrain: %s is complete; nothing to do (use --force to retrain)", bundle)
        return bundle
    # Everything is checked before anything is written.
    prepared = load_prepared_files(work)
    if len(prepared.train) == 0:
        raise PretrainError(f"{work / 'pretraining_files/train_batches'}: no training windows")
    check_settings(config)
    model_config = build_model_config(config, prepared)
    check_window_budget(config, prepared)
    output = work / "pretraining_output"
    has_val = len(prepared.val) > 0
    if not has_val:
        log.warning("pretrain: no validation data (val_batches is empty): training without "
                    "evaluation or early stopping; the bundle holds the last step's weights")
    args = training_arguments(config, output, has_val, model_config.hidden_size)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    parameters = check_model_fits(model_config, device, args.world_size if config.fsdp else 1)
    settings = training_settings(config, work / "pretraining_files")
    checkpoint = None if restart else resumable_checkpoint(output, settings)
    if args.process_index == 0:
        prepare_output(output, checkpoint, settings, restart)

    with allocation_errors(model_config, parameters, device):
        model = MotorModel(model_config)
    log.info("pretrain: MOTOR %s model, %s parameters, %d tasks, %d bins, vocabulary %d; %s%s",
             config.preset, f"{model.count_parameters():,}", model_config.num_tasks,
             model_config.num_bins, model_config.vocab_size,
             "bf16 autocast" if args.bf16 else "fp32",
             ", activation checkpointing" if config.gradient_checkpointing else "")
    trainer = MotorTrainer(
        model=model, args=args, train_dataset=prepared.train,
        eval_dataset=prepared.val if has_val else None, tokens_per_batch=config.tokens_per_batch,
        task_map=torch.from_numpy(prepared.task.task_map()), bags=prepared.bags,
        callbacks=[EarlyStoppingCallback(config.early_stopping_patience)] if has_val else [],
    )
    with allocation_errors(model_config, parameters, device):
        result = trainer.train(resume_from_checkpoint=checkpoint)
    if trainer.is_fsdp_enabled:
        log.info("pretrain: FSDP over %d ranks (model %s)", args.world_size,
                 type(trainer.model_wrapped).__name__)
    summary: dict[str, Any] = {"global_step": result.global_step,
                               # compute_features cuts windows as prepare did
                               "max_window": prepared.max_window,
                               # evaluate keeps to the subjects pretraining never saw
                               "unseen_splits": prepared.unseen_splits,
                               "train_loss": result.training_loss,
                               "parameters": model.count_parameters(),
                               "config": config_dict(config)}
    if has_val:
        summary["val_loss"] = trainer.evaluate()["eval_loss"]
        summary["base_rate_val_loss"] = base_rate_loss(trainer, model_config)
    if trainer.is_world_process_zero():
        _write_bundle(trainer, work, {k: v for k, v in summary.items()
                                      if not (isinstance(v, float) and not math.isfinite(v))})
        if not keep_output:
            artifacts.remove_atomically(output)
    trainer.accelerator.wait_for_everyone()
    return bundle


def _global_rank() -> int:
    """This process's rank under torchrun / accelerate launch (0 when run alone)."""
    return int(os.environ.get("RANK", "0"))


def base_rate_loss(trainer: MotorTrainer, model_config: MotorConfig) -> float:
    """Val loss of the prefitted model: every log-hazard at its task's initial rate."""
    rates = torch.tensor(model_config.initial_log_rates, dtype=torch.float32)
    edges = model_config.bin_edges_days
    total, batches = 0.0, 0
    for batch in trainer.get_eval_dataloader():
        points = batch["censor_days"].shape[0]
        log_hazards = rates.to(batch["censor_days"].device).expand(points, len(edges), -1)
        total += float(motor_loss(log_hazards, batch["censor_days"], batch["label_point"],
                                  batch["label_task"], batch["label_days"], edges))
        batches += 1
    return total / max(batches, 1)
