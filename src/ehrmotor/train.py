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

`pretraining_output/` is then removed unless `--keep-output`. With a finished bundle present,
pretraining is a no-op unless `--force` (which implies `--restart`). Runs unchanged under
`torchrun` / `accelerate launch`: each rank draws its own batches from `TokenBudgetBatchSampler`.

Settings are checked before anything is written; a bad one stops with a one-line `PretrainError`
naming it. An interrupted run is resumed by rerunning the same command: `pretraining_output/`
records the settings it was started with (`pretrain_settings.json`: the resolved PretrainConfig
and digests of the prepared inputs' manifests), and the last complete checkpoint is resumed when
they match. Checkpoints from other settings stop the run naming what changed; `--restart`
discards them. Every rank takes the same decision, from files alone. Temporaries left in `WORK/`
by a killed run (`.model.tmp-PID/`) are removed at the start.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import EarlyStoppingCallback, Trainer, TrainingArguments

from ehrmotor import artifacts
from ehrmotor.batching import TokenBudgetBatchSampler, WindowCollator, window_lengths
from ehrmotor.config import PretrainConfig, config_dict
from ehrmotor.errors import InputError
from ehrmotor.lock import work_lock
from ehrmotor.model import PRESETS, MotorConfig, MotorModel, motor_loss
from ehrmotor.prepare.datasets import load_prepared
from ehrmotor.prepare.motor_task import MotorTask
from ehrmotor.prepare.tokenizer import Tokenizer

log = logging.getLogger(__name__)
BUNDLE_FILES = ("config.json", "model.safetensors", "dictionary.msgpack", "motor_task.json")
SETTINGS_FILE = "pretrain_settings.json"  # in pretraining_output/: what its checkpoints came from
# Settings a resumed run may change: they change neither the weights nor the batches.
RESUMABLE_CHANGES = ("dataloader_num_workers", "logging_steps", "save_total_limit")


class PretrainError(InputError):
    """Missing or unusable input for pretraining (one line; the CLI exits with status 2)."""


class MotorTrainer(Trainer):
    """`Trainer` fed by token-budget batches of packed windows instead of fixed-size batches."""

    def __init__(self, *args: Any, tokens_per_batch: int, num_tasks: int, **kwargs: Any):
        self.tokens_per_batch = tokens_per_batch
        self.collator = WindowCollator(num_tasks)
        super().__init__(*args, **kwargs)

    def _loader(self, dataset: Any, shuffle: bool) -> DataLoader:
        from accelerate.data_loader import prepare_data_loader

        sampler = TokenBudgetBatchSampler(
            window_lengths(dataset), self.tokens_per_batch, shuffle=shuffle, seed=self.args.seed,
            rank=self.args.process_index, world_size=self.args.world_size,
        )
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=self.collator,
                            num_workers=self.args.dataloader_num_workers)
        # The sampler already gives each rank its own batches, so the loader is wrapped as one
        # process's (no re-sharding); batches go to this rank's device, set_epoch to the sampler.
        return prepare_data_loader(loader, self.accelerator.device, num_processes=1,
                                   process_index=0, put_on_device=True,
                                   non_blocking=self.accelerator.non_blocking)

    def get_train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, shuffle=True)

    def get_eval_dataloader(self, eval_dataset: Any = None) -> DataLoader:
        return self._loader(eval_dataset if eval_dataset is not None else self.eval_dataset,
                            shuffle=False)


@dataclass
class Prepared:
    tokenizer: Tokenizer
    task: MotorTask
    train: Any
    val: Any


def load_prepared_files(work: Path) -> Prepared:
    files = work / "pretraining_files"
    needed = [files / p for p in ("tokenizer/dictionary.msgpack", "motor_task.json",
                                  "train_batches/state.json", "val_batches/state.json")]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise PretrainError(f"{files}: missing {', '.join(missing)}; run `ehrmotor prepare` "
                            "first")
    return Prepared(Tokenizer.load(files / "tokenizer"), MotorTask.load(files / "motor_task.json"),
                    load_prepared(files / "train_batches"), load_prepared(files / "val_batches"))


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def check_settings(config: PretrainConfig) -> None:
    """Raise PretrainError naming the first training setting that cannot work."""
    def bad(name: str, must: str) -> PretrainError:
        return PretrainError(f"pretrain: {name} must be {must}, got {getattr(config, name)}")

    for name in ("learning_rate", "weight_decay", "adam_beta2", "num_train_epochs"):
        if not math.isfinite(getattr(config, name)):
            raise bad(name, "a finite number")
    if config.learning_rate <= 0:
        raise bad("learning_rate", "positive")
    if config.weight_decay < 0:
        raise bad("weight_decay", "at least 0")
    if not 0 <= config.adam_beta2 < 1:
        raise bad("adam_beta2", "in [0, 1)")
    if config.max_steps <= 0 and config.num_train_epochs <= 0:
        raise bad("num_train_epochs", "positive (or set max_steps)")
    for name in ("warmup_steps", "seed", "dataloader_num_workers"):
        if getattr(config, name) < 0:
            raise bad(name, "at least 0")
    if config.early_stopping_patience < 1:
        raise bad("early_stopping_patience", "at least 1")


def check_window_budget(config: PretrainConfig, prepared: Prepared) -> None:
    """Every prepared window must fit in one batch (else batching fails mid-training)."""
    longest = max((int(window_lengths(data).max()) for data in (prepared.train, prepared.val)
                   if len(data)), default=0)
    if longest > config.tokens_per_batch:
        raise PretrainError(
            f"pretrain: tokens_per_batch {config.tokens_per_batch} is smaller than the longest "
            f"prepared window ({longest} positions); set tokens_per_batch to at least {longest} "
            "(--tokens-per-batch or [pretrain] in the config file), or prepare again with "
            f"max_window at most {config.tokens_per_batch}")


def _check_heads(hidden: int, heads: int) -> None:
    if hidden % heads == 0 and (hidden // heads) % 2 == 0:
        return
    valid = [h for h in range(1, hidden + 1) if hidden % h == 0 and (hidden // h) % 2 == 0]
    hint = (f"; e.g. num_heads {min(valid, key=lambda h: (abs(h - heads), h))}" if valid
            else "; hidden_size must be even")
    raise PretrainError(f"pretrain: num_heads {heads} does not divide hidden_size {hidden} into "
                        f"heads of even size (rotary encoding turns pairs){hint}")


def build_model_config(config: PretrainConfig, prepared: Prepared) -> MotorConfig:
    """The MotorConfig of `config` on the prepared task; PretrainError naming a bad setting."""
    overrides = {k: getattr(config, k) for k in ("hidden_size", "num_layers", "num_heads",
                                                 "intermediate_size", "final_layer_size")
                 if getattr(config, k) is not None}
    for name, value in overrides.items():
        if value < 1:
            raise PretrainError(f"pretrain: {name} must be at least 1, got {value}")
    sizes = {**PRESETS[config.preset], **overrides}
    _check_heads(sizes["hidden_size"], sizes["num_heads"])
    if prepared.task.final_layer_size is not None:  # set in prepare; else the preset's
        overrides.setdefault("final_layer_size", prepared.task.final_layer_size)
    # The training context, as `prepare` cut the windows (WORK/pretraining_files/config.json).
    files = [Path(f["filename"]).parents[1] for f in prepared.train.cache_files]
    recorded = json.loads((files[0] / "config.json").read_text()) if files else {}
    try:
        return MotorConfig.preset(
            config.preset, vocab_size=len(prepared.tokenizer),
            num_tasks=prepared.task.tasks.height, num_bins=prepared.task.num_bins,
            bin_edges_days=prepared.task.bin_edges_days,
            initial_log_rates=[float(x) for x in prepared.task.initial_log_rates()],
            attention_width=config.attention_width, attention_backend=config.attention_backend,
            max_window=recorded.get("max_window"), **overrides,
        )
    except ValueError as error:  # a setting (or prepared task) the model rejects
        raise PretrainError(f"pretrain: {_first_line(error)}") from error


def _use_bf16(config: PretrainConfig) -> bool:
    if config.precision == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return config.precision == "bf16"


def training_arguments(config: PretrainConfig, output: Path, has_val: bool) -> TrainingArguments:
    kwargs: dict[str, Any] = dict(
        output_dir=str(output), report_to=["tensorboard"],  # logs in output/runs/
        per_device_train_batch_size=1, per_device_eval_batch_size=1,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate, warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay, adam_beta2=config.adam_beta2,
        num_train_epochs=config.num_train_epochs, max_steps=config.max_steps,
        eval_strategy="steps" if has_val else "no", eval_steps=config.eval_steps,
        save_strategy="steps", save_steps=config.save_steps,
        save_total_limit=config.save_total_limit, load_best_model_at_end=has_val,
        metric_for_best_model="eval_loss", greater_is_better=False,
        logging_steps=config.logging_steps, bf16=_use_bf16(config), seed=config.seed,
        remove_unused_columns=False, dataloader_num_workers=config.dataloader_num_workers,
        # Labels are named for Trainer so evaluation reports the loss; logits are never gathered.
        label_names=["event_days", "is_event"], prediction_loss_only=True,
        ddp_find_unused_parameters=False,
    )
    if not torch.cuda.is_available():
        # Without use_cpu, accelerate does not set up multi-process CPU training under torchrun.
        kwargs["use_cpu"] = True
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            kwargs["ddp_backend"] = "gloo"
    return TrainingArguments(**kwargs)


def _write_bundle(trainer: Trainer, work: Path, summary: dict[str, Any]) -> Path:
    bundle = work / "model"
    files = work / "pretraining_files"
    with artifacts.atomic_path(bundle, replace_folder=True) as tmp:
        trainer.save_model(str(tmp))
        shutil.copy(files / "tokenizer" / "dictionary.msgpack", tmp / "dictionary.msgpack")
        shutil.copy(files / "motor_task.json", tmp / "motor_task.json")
        shutil.copytree(files / "ontology", tmp / "ontology")
        (tmp / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        for stray in ("training_args.bin",):  # pickled by Trainer.save_model; never shipped
            (tmp / stray).unlink(missing_ok=True)
    return bundle


def bundle_is_complete(bundle: Path) -> bool:
    return all((bundle / name).is_file() for name in BUNDLE_FILES)


def pretrain(work: Path, config: PretrainConfig | None = None, *, restart: bool = False,
             resume: bool = True, force: bool = False, keep_output: bool = False) -> Path:
    """Train and write `WORK/model/`; return its path (see the module docstring).

    Resumes from the last complete checkpoint in `WORK/pretraining_output/` when it was trained
    with the same settings. `restart` discards that folder and trains from step 0; so does
    `force`, which also retrains when the bundle is complete. `resume` is the default and kept
    for old callers; `resume=False` is `restart=True`. Holds the work folder's lock throughout.
    """
    work = Path(work)
    artifacts.check_output(work, "folder")
    if not work.exists():
        raise PretrainError(f"{work}: no such work folder; run `ehrmotor prepare --out {work}` "
                            "first")
    with work_lock(work, "pretrain"):
        return _pretrain(work, config or PretrainConfig(), restart=restart or force or not resume,
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
    try:
        args = training_arguments(config, output, has_val)
    except ValueError as error:
        raise PretrainError(f"pretrain: {_first_line(error)}") from error
    settings = training_settings(config, work / "pretraining_files")
    checkpoint = None if restart else resumable_checkpoint(output, settings)
    if args.process_index == 0:
        _prepare_output(output, checkpoint, settings, restart)

    model = MotorModel(model_config)
    log.info("pretrain: MOTOR %s model, %s parameters, %d tasks, %d bins, vocabulary %d",
             config.preset, f"{model.count_parameters():,}", model_config.num_tasks,
             model_config.num_bins, model_config.vocab_size)
    trainer = MotorTrainer(
        model=model, args=args, train_dataset=prepared.train,
        eval_dataset=prepared.val if has_val else None, tokens_per_batch=config.tokens_per_batch,
        num_tasks=model_config.num_tasks,
        callbacks=[EarlyStoppingCallback(config.early_stopping_patience)] if has_val else [],
    )
    result = trainer.train(resume_from_checkpoint=checkpoint)
    prepared_config = json.loads((work / "pretraining_files" / "config.json").read_text())
    summary: dict[str, Any] = {"global_step": result.global_step,
                               # compute_features cuts windows as prepare did
                               "max_window": prepared_config.get("max_window"),
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
            shutil.rmtree(output, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    return bundle


def _global_rank() -> int:
    """This process's rank under torchrun / accelerate launch (0 when run alone)."""
    return int(os.environ.get("RANK", "0"))


def prepared_digests(files: Path) -> dict[str, str]:
    """A digest per prepared artifact: its manifest (less the package version) and, for the
    datasets, the fingerprint of their Arrow files."""
    parts: dict[str, list[str]] = {}
    for manifest in sorted(files.glob("*.manifest.json")):
        text = manifest.read_text()
        try:
            recorded = json.loads(text)
        except json.JSONDecodeError:
            recorded = text
        if isinstance(recorded, dict):
            recorded.pop("ehrmotor_version", None)
        parts.setdefault(manifest.name.removesuffix(".manifest.json"), []).append(
            json.dumps(recorded, sort_keys=True))
    for name in ("train_batches", "val_batches"):
        state = json.loads((files / name / "state.json").read_text())
        parts.setdefault(name, []).append(str(state.get("_fingerprint")))
    return {name: hashlib.sha256("\0".join(values).encode()).hexdigest()[:16]
            for name, values in sorted(parts.items())}


def training_settings(config: PretrainConfig, files: Path) -> dict[str, Any]:
    """What a checkpoint depends on: the resolved config and the prepared inputs."""
    return {"config": config_dict(config), "prepared": prepared_digests(files)}


def settings_changes(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between two `training_settings`, ignoring RESUMABLE_CHANGES."""
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


def resumable_checkpoint(output: Path, settings: dict[str, Any]) -> str | None:
    """The last complete checkpoint in `output` when it was trained with `settings`, else None
    when there is none; PretrainError when there is one from other (or unrecorded) settings.

    Depends on files only, so every rank of a distributed run decides alike.
    """
    checkpoint = last_complete_checkpoint(output)
    if checkpoint is None:
        return None
    restart = "rerun with --restart to discard the checkpoints and train from step 0"
    recorded = _read_settings(output)
    if recorded is None:
        raise PretrainError(f"pretrain: {output} has checkpoints but no readable record of their "
                            f"settings ({SETTINGS_FILE}); {restart}")
    changes = settings_changes(recorded, settings)
    if changes:
        raise PretrainError(f"pretrain: the checkpoints in {output} were trained with other "
                            f"settings: {'; '.join(changes)}; rerun with the earlier settings to "
                            f"resume, or {restart}")
    return checkpoint


def _prepare_output(output: Path, checkpoint: str | None, settings: dict[str, Any],
                    restart: bool) -> None:
    """On the main process: empty `output` unless resuming, record `settings` in it."""
    if checkpoint is None:
        if output.exists():
            why = "restart" if restart else "no complete checkpoint"
            log.info("pretrain: %s; discarding %s and training from step 0", why, output)
            shutil.rmtree(output)
    else:
        log.info("pretrain: resuming from %s (same settings) in %s", Path(checkpoint).name,
                 output)
        for stale in artifacts.clean_stale_temporaries(output):
            log.info("pretrain: removed %s, left by an interrupted run", stale)
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


def base_rate_loss(trainer: MotorTrainer, model_config: MotorConfig) -> float:
    """Val loss of the prefitted model: every log-hazard at its task's initial rate."""
    rates = torch.tensor(model_config.initial_log_rates, dtype=torch.float32)
    edges = model_config.bin_edges_days
    total, batches = 0.0, 0
    for batch in trainer.get_eval_dataloader():
        points = batch["event_days"].shape[0]
        log_hazards = rates.to(batch["event_days"].device).expand(points, len(edges), -1)
        total += float(motor_loss(log_hazards, batch["event_days"], batch["is_event"], edges))
        batches += 1
    return total / max(batches, 1)
