"""Fine-tuned bundles: written by `ehrmotor finetune`, read by `predict` and `load_task_bundle`.

A fine-tuned bundle is a pretraining bundle's layout (`ehrmotor.bundle`) with a task model
inside: config.json (MotorConfig plus `finetune_task`: the task's name, kind, outcome codes,
base rate and the pretraining task that started the head), model.safetensors (`motor.` encoder
and `head.` task head), and, copied from the pretrained bundle, dictionary.msgpack,
motor_task.json and ontology/; training_summary.json (steps, losses, settings, the pretrained
bundle's fingerprint) and fingerprint.json (digests of the parts, written last).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, cast

from safetensors import SafetensorError
from transformers.utils import logging as hf_logging

from ehrmotor import artifacts
from ehrmotor.bundle import (
    CONFIG_FILE,
    DICTIONARY_FILE,
    FINGERPRINT_FILE,
    MOTOR_TASK_FILE,
    ONTOLOGY_DIR,
    SUMMARY_FILE,
    WEIGHTS_FILE,
    Bundle,
    _load_config,
    _load_ontology,
    _load_tokenizer,
    _loading_problems,
    check_fingerprint,
    record_fingerprint,
)
from ehrmotor.errors import BundleError, one_line
from ehrmotor.model import MotorModel
from ehrmotor.model.task_models import recorded_task, task_model_class

BY_FINETUNE = "written by `ehrmotor finetune`"


def bundle_is_complete(bundle: Path) -> bool:
    return (bundle / FINGERPRINT_FILE).is_file()


def write_task_bundle(trainer: Any, pretrained: Bundle, target: Path,
                      summary: dict[str, Any]) -> Path:
    """Write the trainer's model with the pretrained bundle's vocabulary to `target`,
    atomically (module docstring)."""
    with artifacts.atomic_path(target, replace_folder=True) as tmp:
        trainer.save_model(str(tmp))
        (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle; never shipped
        for name in (DICTIONARY_FILE, MOTOR_TASK_FILE):
            shutil.copy(pretrained.path / name, tmp / name)
        shutil.copytree(pretrained.path / ONTOLOGY_DIR, tmp / ONTOLOGY_DIR)
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
        record_fingerprint(tmp)
    return target


def load_task_bundle(path: str | Path) -> Bundle:
    """The fine-tuned bundle at `path`, checked; `Bundle.model` is the task model
    (`MotorForTimeToEvent` or `MotorForBinary`, eval mode, on CPU). BundleError for a
    pretraining bundle or a damaged part."""
    bundle = Path(path)
    if not bundle.is_dir():
        raise BundleError(f"{bundle}: not a folder; expected a fine-tuned bundle {BY_FINETUNE}")
    config = _load_config(bundle / CONFIG_FILE)
    if recorded_task(config) is None:
        raise BundleError(f"{bundle / CONFIG_FILE}: records no finetune_task; a pretraining "
                          f"bundle, expected a fine-tuned one {BY_FINETUNE}")
    tokenizer = _load_tokenizer(bundle)
    if len(tokenizer) != config.vocab_size:
        raise BundleError(f"{bundle / CONFIG_FILE}: vocab_size {config.vocab_size} but "
                          f"{bundle / DICTIONARY_FILE} has {len(tokenizer)} entries")
    ontology = _load_ontology(bundle, None)
    fingerprint = check_fingerprint(bundle)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        loaded: Any = task_model_class(config).from_pretrained(
            bundle, config=config, use_safetensors=True, output_loading_info=True)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise BundleError(f"{bundle / WEIGHTS_FILE}: cannot be loaded ({one_line(exc)})") from exc
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    model, info = loaded
    problems = _loading_problems(info)
    if problems:
        raise BundleError(f"{bundle / WEIGHTS_FILE}: does not match {CONFIG_FILE}: {problems}")
    # Embedding code reads `model.encode` and `model.config` only, which task models share.
    return Bundle(bundle, config, cast(MotorModel, model.eval()), tokenizer, ontology,
                  config.max_window, None, fingerprint)
