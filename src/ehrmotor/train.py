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
pretraining is a no-op unless `--force`. Runs unchanged under `torchrun` / `accelerate launch`:
each rank draws its own batches from `TokenBudgetBatchSampler`.
"""

from __future__ import annotations

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
from ehrmotor.model import MotorConfig, MotorModel, motor_loss
from ehrmotor.motor_task import MotorTask
from ehrmotor.tokenizer import Tokenizer
from ehrmotor.write_datasets import load_prepared

log = logging.getLogger(__name__)
BUNDLE_FILES = ("config.json", "model.safetensors", "dictionary.msgpack", "motor_task.json")


class PretrainError(ValueError):
    """Missing or unusable input for pretraining (one line; the CLI exits with status 2)."""


class MotorTrainer(Trainer):
    """`Trainer` fed by token-budget batches of packed windows instead of fixed-size batches."""

    def __init__(self, *args: Any, tokens_per_batch: int, num_tasks: int, **kwargs: Any):
        self.tokens_per_batch = tokens_per_batch
        self.collator = WindowCollator(num_tasks)
        super().__init__(*args, **kwargs)

    def _loader(self, dataset: Any, shuffle: bool) -> DataLoader:
        sampler = TokenBudgetBatchSampler(
            window_lengths(dataset), self.tokens_per_batch, shuffle=shuffle, seed=self.args.seed,
            rank=self.args.process_index, world_size=self.args.world_size,
        )
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=self.collator,
                            num_workers=self.args.dataloader_num_workers)
        prepared = self.accelerator.prepare(loader)
        # The sampler already gives each rank its own batches: keep accelerate from re-sharding.
        wrapper = getattr(prepared, "batch_sampler", None)
        if wrapper is not None and getattr(wrapper, "batch_sampler", None) is sampler:
            wrapper.num_processes = 1
            wrapper.process_index = 0
        return prepared

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


def build_model_config(config: PretrainConfig, prepared: Prepared) -> MotorConfig:
    overrides = {k: getattr(config, k) for k in ("hidden_size", "num_layers", "num_heads",
                                                 "intermediate_size", "final_layer_size")
                 if getattr(config, k) is not None}
    overrides.setdefault("final_layer_size", prepared.task.final_layer_size)
    return MotorConfig.preset(
        config.preset, vocab_size=len(prepared.tokenizer), num_tasks=prepared.task.tasks.height,
        num_bins=prepared.task.num_bins, bin_edges_days=prepared.task.bin_edges_days,
        initial_log_rates=[float(x) for x in prepared.task.initial_log_rates()],
        attention_width=config.attention_width, attention_backend=config.attention_backend,
        **overrides,
    )


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
    with artifacts.atomic_path(bundle) as tmp:
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


def pretrain(work: Path, config: PretrainConfig | None = None, *, resume: bool = False,
             force: bool = False, keep_output: bool = False) -> Path:
    """Train and write `WORK/model/`; return its path (see the module docstring)."""
    work = Path(work)
    config = config or PretrainConfig()
    bundle = work / "model"
    if bundle_is_complete(bundle) and not force:
        log.info("pretrain: %s is complete; nothing to do (use --force to retrain)", bundle)
        return bundle
    prepared = load_prepared_files(work)
    if len(prepared.train) == 0:
        raise PretrainError(f"{work / 'pretraining_files/train_batches'}: no training windows")
    model_config = build_model_config(config, prepared)
    model = MotorModel(model_config)
    log.info("pretrain: MOTOR %s model, %s parameters, %d tasks, %d bins, vocabulary %d",
             config.preset, f"{model.count_parameters():,}", model_config.num_tasks,
             model_config.num_bins, model_config.vocab_size)
    output = work / "pretraining_output"
    if force and output.exists() and not resume:
        shutil.rmtree(output)
    has_val = len(prepared.val) > 0
    trainer = MotorTrainer(
        model=model, args=training_arguments(config, output, has_val), train_dataset=prepared.train,
        eval_dataset=prepared.val if has_val else None, tokens_per_batch=config.tokens_per_batch,
        num_tasks=model_config.num_tasks,
        callbacks=[EarlyStoppingCallback(config.early_stopping_patience)] if has_val else [],
    )
    checkpoint = last_complete_checkpoint(output) if resume else None
    if resume and checkpoint is None:
        log.warning("pretrain: --resume given but no checkpoint in %s; starting fresh", output)
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


def last_complete_checkpoint(output: Path) -> str | None:
    """The newest `checkpoint-N` that Trainer finished writing, or None.

    Trainer writes `trainer_state.json` last; a process killed while saving leaves a folder
    without it (and possibly a truncated `model.safetensors`), which resuming must skip.
    """
    steps = [int(path.parent.name.split("-")[1])
             for path in output.glob("checkpoint-*/trainer_state.json")
             if path.parent.name.split("-")[1].isdigit()]
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
