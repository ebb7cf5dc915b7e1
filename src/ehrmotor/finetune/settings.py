"""Settings of `ehrmotor finetune` (`FinetuneConfig`), checked before anything is written, and
what they turn into: which parameters train (`apply_freeze`) and the Trainer's arguments
(`training_arguments`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments

from ehrmotor.errors import ConfigError, first_line
from ehrmotor.model.task_models import TARGETS
from ehrmotor.precision import auto_uses_bf16

FREEZE_MODES = ("encoder", "none")  # or an integer N: the embedding and the first N blocks
HEAD_ONLY_LEARNING_RATE = 1e-3  # default with a frozen encoder: a probe trains faster
FULL_LEARNING_RATE = 1e-4  # default when encoder weights train


@dataclass(frozen=True)
class FinetuneConfig:
    """freeze: "encoder" (the head alone trains), "none" (everything) or "N" (the embedding and
    the first N blocks stay as pretrained). learning_rate None: HEAD_ONLY_LEARNING_RATE with a
    frozen encoder, else FULL_LEARNING_RATE. tokens_per_batch None: the larger of the model's
    context and 8,192. val_fraction: the share of label subjects held out for early stopping."""

    freeze: str = "none"
    learning_rate: float | None = None
    max_steps: int = -1
    num_train_epochs: float = 10.0
    tokens_per_batch: int | None = None
    precision: str = "auto"
    seed: int = 42
    val_fraction: float = 0.1
    eval_steps: int = 50
    early_stopping_patience: int = 3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    logging_steps: int = 10
    save_total_limit: int = 2

    def __post_init__(self) -> None:
        if self.freeze not in FREEZE_MODES and not (self.freeze.isdigit()):
            raise ConfigError(f"finetune: freeze must be encoder, none or a number of blocks, "
                              f"got {self.freeze!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"finetune: precision must be auto, bf16 or fp32, got "
                              f"{self.precision!r}")
        rate = self.learning_rate
        if rate is not None and not (math.isfinite(rate) and rate > 0):
            raise ConfigError(f"finetune: learning_rate must be positive, got {rate}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"finetune: val_fraction must be between 0 and 1, got "
                              f"{self.val_fraction}")
        for name in ("eval_steps", "early_stopping_patience", "logging_steps",
                     "save_total_limit"):
            if getattr(self, name) < 1:
                raise ConfigError(f"finetune: {name} must be at least 1, got "
                                  f"{getattr(self, name)}")
        if not (self.num_train_epochs > 0 and math.isfinite(self.num_train_epochs)):
            raise ConfigError(f"finetune: num_train_epochs must be positive, got "
                              f"{self.num_train_epochs}")

    @property
    def resolved_learning_rate(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return HEAD_ONLY_LEARNING_RATE if self.freeze == "encoder" else FULL_LEARNING_RATE

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def apply_freeze(model: Any, freeze: str) -> int:
    """Turn off the gradients of the frozen parameters; return the number that train.
    ConfigError for more blocks than the model has."""
    encoder = model.motor
    if freeze == "encoder":
        frozen = list(encoder.parameters())
    elif freeze == "none":
        frozen = []
    else:
        blocks = int(freeze)
        if blocks > len(encoder.layers):
            raise ConfigError(f"finetune: freeze {blocks} blocks, but the model has "
                              f"{len(encoder.layers)}")
        frozen = [*encoder.embedding.parameters(),
                  *(p for layer in encoder.layers[:blocks] for p in layer.parameters())]
    for parameter in frozen:
        parameter.requires_grad_(False)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def uses_bf16(precision: str, hidden_size: int) -> bool:
    if precision == "auto":
        return auto_uses_bf16("cuda" if torch.cuda.is_available() else "cpu", hidden_size,
                              training=True)
    return precision == "bf16"


def training_arguments(config: FinetuneConfig, output: Path, kind: str,
                       hidden_size: int) -> TrainingArguments:
    """The Trainer's arguments; ConfigError for a setting TrainingArguments rejects."""
    kwargs: dict[str, Any] = dict(
        output_dir=str(output), report_to=[], per_device_train_batch_size=1,
        per_device_eval_batch_size=1, learning_rate=config.resolved_learning_rate,
        warmup_steps=config.warmup_steps, weight_decay=config.weight_decay,
        num_train_epochs=config.num_train_epochs, max_steps=config.max_steps,
        eval_strategy="steps", eval_steps=config.eval_steps, save_strategy="steps",
        save_steps=config.eval_steps, save_total_limit=config.save_total_limit,
        load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False,
        logging_steps=config.logging_steps, bf16=uses_bf16(config.precision, hidden_size),
        seed=config.seed, data_seed=config.seed, remove_unused_columns=False,
        label_names=list(TARGETS[kind]), prediction_loss_only=True, disable_tqdm=None,
    )
    if not torch.cuda.is_available():
        kwargs["use_cpu"] = True
    try:
        return TrainingArguments(**kwargs)
    except ValueError as error:
        raise ConfigError(f"finetune: {first_line(error)}") from error
