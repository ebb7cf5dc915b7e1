"""What pretraining starts from, checked before anything is written.

The prepared inputs (`load_prepared_files`), the training settings (`check_settings`,
`check_window_budget`), and from them the model's `MotorConfig` (`build_model_config`) and the
Trainer's `TrainingArguments` (`training_arguments`). A setting that cannot work stops with a
one-line PretrainError naming it. `training_settings` is what a checkpoint depends on (the resolved
config and a digest of each prepared input): `ehrmotor.checkpoints` resumes only checkpoints of the
same settings, and `ehrmotor.pretrain.export` exports only those of the current prepared files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments

from ehrmotor.config import PretrainConfig, config_dict
from ehrmotor.errors import PretrainError, first_line
from ehrmotor.model import LABELS, PRESETS, MotorConfig
from ehrmotor.motor_task.tasks import MotorTask
from ehrmotor.precision import auto_uses_bf16
from ehrmotor.sequences.batching import window_lengths
from ehrmotor.sequences.shards import INDEX, load_prepared
from ehrmotor.vocabulary.bags import BagTable
from ehrmotor.vocabulary.tokenizer import Tokenizer


@dataclass
class Prepared:
    tokenizer: Tokenizer
    task: MotorTask
    train: Any
    val: Any
    max_window: int | None  # the training context prepare cut the windows with
    unseen_splits: list[str] | None  # MEDS splits prepare left out of pretraining
    bags: BagTable  # expands the datasets' items at collate


def load_prepared_files(work: Path) -> Prepared:
    files = work / "pretraining_files"
    needed = [files / p for p in ("tokenizer/dictionary.msgpack", "motor_task.json",
                                  f"train_batches/{INDEX}", f"val_batches/{INDEX}")]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise PretrainError(f"{files}: missing {', '.join(missing)}; run `ehrmotor prepare` "
                            "first")
    resolved = files / "config.json"
    recorded = json.loads(resolved.read_text()) if resolved.is_file() else {}
    return Prepared(Tokenizer.load(files / "tokenizer"), MotorTask.load(files / "motor_task.json"),
                    load_prepared(files / "train_batches"), load_prepared(files / "val_batches"),
                    recorded.get("max_window"), recorded.get("exclude_splits"),
                    BagTable.load(files / "tokenizer"))



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
    try:
        return MotorConfig.preset(
            config.preset, vocab_size=len(prepared.tokenizer),
            num_tasks=prepared.task.tasks.height, num_bins=prepared.task.num_bins,
            bin_edges_days=prepared.task.bin_edges_days,
            initial_log_rates=[float(x) for x in prepared.task.initial_log_rates()],
            attention_width=config.attention_width, attention_backend=config.attention_backend,
            max_window=prepared.max_window, **overrides,
        )
    except ValueError as error:  # a setting (or prepared task) the model rejects
        raise PretrainError(f"pretrain: {first_line(error)}") from error


def _use_bf16(config: PretrainConfig, hidden_size: int) -> bool:
    """Whether training runs under bf16 autocast: `precision`, where "auto" follows
    `precision.auto_uses_bf16` on the device Trainer will use (CUDA when present, else CPU)."""
    if config.precision == "auto":
        return auto_uses_bf16("cuda" if torch.cuda.is_available() else "cpu", hidden_size,
                              training=True)
    return config.precision == "bf16"


# transformers 5 renamed gradient_checkpointing (a deprecated alias until v6)
_CHECKPOINTING_ARGUMENT = next(name for name in ("activation_checkpointing",
                                                 "gradient_checkpointing")
                               if name in {f.name for f in fields(TrainingArguments)})


def fsdp_devices_available() -> bool:
    """Whether this machine has the GPUs accelerate's FSDP needs."""
    return torch.cuda.is_available()


def training_arguments(config: PretrainConfig, output: Path, has_val: bool,
                       hidden_size: int) -> TrainingArguments:
    """The Trainer's arguments for `config` and a model `hidden_size` wide, writing to `output`;
    PretrainError for a setting `TrainingArguments` rejects."""
    try:
        return TrainingArguments(**_training_kwargs(config, output, has_val, hidden_size))
    except ValueError as error:
        raise PretrainError(f"pretrain: {first_line(error)}") from error


def _training_kwargs(config: PretrainConfig, output: Path, has_val: bool,
                     hidden_size: int) -> dict[str, Any]:
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
        logging_steps=config.logging_steps, bf16=_use_bf16(config, hidden_size), seed=config.seed,
        remove_unused_columns=False, dataloader_num_workers=config.dataloader_num_workers,
        # Labels are named for Trainer so evaluation reports the loss; logits are never gathered.
        label_names=list(LABELS), prediction_loss_only=True,
        ddp_find_unused_parameters=False,
        optim="adamw_torch_fused",  # one kernel: 3.5x the plain loop's speed on CPU
    )
    kwargs[_CHECKPOINTING_ARGUMENT] = config.gradient_checkpointing
    kwargs["torch_compile"] = config.compile
    if config.fsdp:
        if not fsdp_devices_available():
            # accelerate enables its FSDP plugin for multi-GPU (and XPU, NPU, ...) ranks only and
            # would silently train CPU processes with plain data parallelism.
            raise PretrainError("pretrain: fsdp needs GPUs: accelerate shards models over GPU "
                                "ranks only (CPU processes train data-parallel without it)")
        kwargs["fsdp"] = True
        kwargs["fsdp_config"] = {"transformer_layer_cls_to_wrap": ["MotorBlock"],
                                 "state_dict_type": "FULL_STATE_DICT"}
    if not torch.cuda.is_available():
        # Without use_cpu, accelerate does not set up multi-process CPU training under torchrun.
        kwargs["use_cpu"] = True
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            kwargs["ddp_backend"] = "gloo"
    return kwargs


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
    for name in ("train_batches", "val_batches"):  # the manifests decide their content
        parts.setdefault(name, []).append((files / name / INDEX).read_text())
    return {name: hashlib.sha256("\0".join(values).encode()).hexdigest()[:16]
            for name, values in sorted(parts.items())}


def training_settings(config: PretrainConfig, files: Path) -> dict[str, Any]:
    """What a checkpoint depends on: the resolved config and the prepared inputs."""
    return {"config": config_dict(config), "prepared": prepared_digests(files)}
