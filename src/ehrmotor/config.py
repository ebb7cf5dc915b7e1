"""Configuration: every default of DESIGN.md in one place, overridable from a TOML file and flags.

A config file is TOML with one table per stage:

    [prepare]
    vocab_size = 16384
    candidate_tasks = 8192

Unknown keys and values of the wrong type are errors that name the file, table and key.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

from ehrmotor.errors import ConfigError

__all__ = ["BACKENDS", "PRESETS", "ConfigError", "PrepareConfig", "PretrainConfig", "load_config"]

# The one source of model sizes and attention backends (the model package reads them from here,
# so that reading a config file does not import torch).
_BASE = {"num_layers": 12, "hidden_size": 768, "num_heads": 12, "intermediate_size": 3072,
         "final_layer_size": 512}
PRESETS: dict[str, dict[str, int]] = {
    "base": _BASE,
    "small": {**_BASE, "num_layers": 6},
    "tiny": {"num_layers": 2, "hidden_size": 64, "num_heads": 4, "intermediate_size": 128,
             "final_layer_size": 32},
}
BACKENDS = ("auto", "blockwise", "flex")

C = TypeVar("C")



@dataclass(frozen=True)
class PrepareConfig:
    """Settings of `ehrmotor prepare` (DESIGN.md, "Pipeline" and "MOTOR semantics")."""

    remove_vocabularies: tuple[str, ...] = ("SPL", "HemOnc")
    exclude_splits: tuple[str, ...] = ("held_out",)
    # Without metadata/subject_splits.parquet one of these two must be set: hold out this share
    # of subjects (hashed with held_out_seed; written to WORK/subject_splits.parquet), or
    # pretrain on every subject knowingly (nothing is left for evaluation).
    held_out_fraction: float | None = None
    held_out_seed: int = 53
    no_held_out: bool = False
    split_seed: int = 97
    val_fraction: float = 0.10
    vocab_size: int = 16_384
    min_fraction: float = 1e-5  # entries seen in a smaller share of train subjects are dropped
    numeric_bins: int = 10  # quantile bins per numeric code
    numeric_sample_size: int = 10_000  # values per code kept to fit the bin edges
    min_text_fraction: float = 1e-4  # text values need this share of subjects for an entry
    candidate_tasks: int = 8_192  # the most informative codes; those with enough events stay
    num_bins: int = 8
    final_layer_size: int | None = None  # MOTOR head width; None: the model preset's
    min_task_events: int = 10  # tasks with fewer train events are dropped
    min_task_fraction: float = 1e-4  # ... and those with events after a smaller share of points
    max_window: int = 16_384  # positions per training window
    seed: int = 97  # prediction-point sampling and the tokenizer's numeric-value sample

    def __post_init__(self) -> None:
        minimum = {"vocab_size": 1, "numeric_bins": 1, "numeric_sample_size": 1,
                   "candidate_tasks": 1, "num_bins": 1, "final_layer_size": 1,
                   "min_task_events": 1, "max_window": 2}
        for name, low in minimum.items():
            if getattr(self, name) is not None and getattr(self, name) < low:
                raise ConfigError(f"prepare: {name} must be at least {low}, "
                                  f"got {getattr(self, name)}")
        for name in ("val_fraction", "min_fraction", "min_text_fraction", "min_task_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"prepare: {name} must be in [0, 1), got {getattr(self, name)}")
        if self.held_out_fraction is not None and not 0.0 < self.held_out_fraction < 1.0:
            raise ConfigError(f"prepare: held_out_fraction must be in (0, 1), "
                              f"got {self.held_out_fraction}")
        if self.held_out_fraction is not None and self.no_held_out:
            raise ConfigError("prepare: held_out_fraction and no_held_out exclude each other; "
                              "set one")

    # The settings each prepare step depends on: its manifest records exactly these, so that a
    # change reaches the step that uses it and no other.
    def ontology_settings(self, athena: bool) -> OntologySettings:
        return OntologySettings(self.remove_vocabularies, athena)

    def split_settings(self) -> SplitSettings:
        excluded = () if self.no_held_out else self.exclude_splits
        return SplitSettings(self.split_seed, self.val_fraction, excluded)

    def held_out_settings(self) -> HeldOutSettings:
        return HeldOutSettings(self.held_out_fraction, self.held_out_seed)

    def tokenizer_settings(self) -> TokenizerSettings:
        return TokenizerSettings(self.vocab_size, self.min_fraction, self.numeric_bins,
                                 self.numeric_sample_size, self.min_text_fraction, self.seed)

    def task_settings(self) -> TaskSettings:
        return TaskSettings(self.candidate_tasks, self.num_bins, self.final_layer_size,
                            self.min_task_events, self.min_task_fraction)

    def window_settings(self) -> WindowSettings:
        return WindowSettings(self.max_window, self.seed, self.candidate_tasks)


@dataclass(frozen=True)
class OntologySettings:
    """What `ontology/` is built with (`prepare.steps.ontology_step`)."""

    remove_vocabularies: tuple[str, ...]
    athena: bool  # built with an Athena vocabulary (else from codes.parquet alone)


@dataclass(frozen=True)
class HeldOutSettings:
    """What WORK/subject_splits.parquet is built with (`prepare.steps.held_out_step`)."""

    fraction: float | None  # None: prepare writes no split of its own (the step is skipped)
    seed: int


@dataclass(frozen=True)
class SplitSettings:
    """What `split.csv` is built with (`prepare.steps.split_step`)."""

    seed: int
    val_fraction: float
    exclude_splits: tuple[str, ...]  # MEDS splits never used for pretraining


@dataclass(frozen=True)
class TokenizerSettings:
    """What `tokenizer/` is fitted with (`prepare.steps.tokenizer_step`)."""

    vocab_size: int
    min_fraction: float
    numeric_bins: int
    numeric_sample_size: int
    min_text_fraction: float
    seed: int  # the numeric-value sample


@dataclass(frozen=True)
class TaskSettings:
    """What `motor_task.json` is fitted with (`prepare.steps.motor_task_step`, from the train
    dataset's task statistics)."""

    candidate_tasks: int  # as the train dataset counted them
    num_bins: int
    final_layer_size: int | None
    min_task_events: int
    min_task_fraction: float


@dataclass(frozen=True)
class WindowSettings:
    """What the datasets are built with (`prepare.steps.dataset_step`)."""

    max_window: int
    seed: int  # prediction-point sampling
    candidate_tasks: int  # the tasks whose occurrences the windows keep


def _check_type(value: Any, annotation: Any) -> Any:
    """Return `value` converted to the annotated type, or raise TypeError."""
    origin = typing.get_origin(annotation)
    if origin is tuple:
        (item_type, _ellipsis) = typing.get_args(annotation)
        if not isinstance(value, list | tuple):
            raise TypeError("a list")
        return tuple(_check_type(v, item_type) for v in value)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        return _check_type(value, next(o for o in options if o is not type(None)))
    if annotation is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if annotation is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if annotation in (str, bool) and isinstance(value, annotation):
        return value
    raise TypeError(f"a {getattr(annotation, '__name__', annotation)}")


def build_config(cls: type[C], values: dict[str, Any], source: str) -> C:
    """An instance of the dataclass `cls` from `values`, checking names and types.

    `source` names where the values came from (file and table) for error messages.
    """
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    checked = {}
    for key, value in values.items():
        if key not in known:
            names = ", ".join(sorted(known))
            raise ConfigError(f"{source}: unknown key {key!r}"
                              f"{_unknown_name_hint(key, sorted(known))}; known keys: {names}")
        try:
            checked[key] = _check_type(value, hints[key])
        except TypeError as expected:
            raise ConfigError(
                f"{source}: key {key!r} has value {value!r}; expected {expected}"
            ) from None
    return cls(**checked)


TABLES = ("prepare", "pretrain")  # one per command that reads a config file


def _unknown_name_hint(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def read_config_file(path: Path | None, table: str) -> dict[str, Any]:
    """The `[table]` of a TOML config file (empty when `path` is None).

    Every top-level entry must be one of the known TABLES: a misspelled table or a key outside
    any table is an error, never silently ignored.
    """
    if path is None:
        return {}
    try:
        document = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder; expected a TOML config file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file; expected TOML") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML ({error})") from None
    known = ", ".join(f"[{name}]" for name in TABLES)
    for name, value in document.items():
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: key {name!r} is outside any table; put it under one of "
                              f"{known}")
        if name not in TABLES:
            raise ConfigError(f"{path}: unknown table [{name}]"
                              f"{_unknown_name_hint(name, TABLES)}; known tables: {known}")
    return dict(document.get(table, {}))


def load_config(cls: type[C], path: Path | None, table: str,
                   overrides: dict[str, Any] | None = None) -> C:
    """Defaults < config file `[table]` < `overrides` (flags given on the command line)."""
    values = read_config_file(path, table)
    config = build_config(cls, values, f"{path}: [{table}]")
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    if flags:
        config = dataclasses.replace(config, **flags)  # type: ignore[type-var]
    return config


def config_dict(config: Any) -> dict[str, Any]:
    """Plain JSON-ready dict of a config dataclass (tuples as lists)."""
    values = dataclasses.asdict(config)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


@dataclass(frozen=True)
class PretrainConfig:
    """Settings of `ehrmotor pretrain` (DESIGN.md, Stage 2). Model sizes come from `preset`;
    the `hidden_size`…`attention_width` fields override it when set."""

    preset: str = "base"
    hidden_size: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    intermediate_size: int | None = None
    final_layer_size: int | None = None  # default: the prepared MOTOR task's
    attention_width: int = 496
    attention_backend: str = "auto"  # one of BACKENDS
    tokens_per_batch: int = 16_384
    learning_rate: float = 1e-4
    warmup_steps: int = 500
    gradient_accumulation_steps: int = 32
    weight_decay: float = 0.1
    adam_beta2: float = 0.95
    num_train_epochs: float = 30.0
    max_steps: int = -1  # > 0 stops after this many optimizer steps
    eval_steps: int = 500
    save_steps: int = 500
    logging_steps: int = 10
    early_stopping_patience: int = 5
    save_total_limit: int = 2
    seed: int = 42
    dataloader_num_workers: int = 0
    # auto: bf16 autocast on CUDA and on CPUs with AMX-BF16 (not AVX512-BF16 alone: slower),
    # where it was measured faster at every size; fp32 elsewhere (`ehrmotor.precision`). Also
    # bf16, fp32. Weights, optimizer state and loss stay fp32.
    precision: str = "auto"
    # Recompute each layer's activations in the backward pass: less memory, up to a third more
    # compute; the same loss and gradients.
    gradient_checkpointing: bool = False
    # torch.compile the model (Trainer's torch_compile): fused kernels, faster steps after a
    # compilation of about a minute on CPU (two: the second for varying batch shapes).
    compile: bool = False
    # Shard parameters, gradients and optimizer state over the ranks with FSDP (Trainer's `fsdp`,
    # FSDP2, each transformer block a unit): for a model that does not fit one device.
    fsdp: bool = False

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError(f"pretrain: preset must be one of {', '.join(PRESETS)}, "
                              f"got {self.preset!r}")
        if self.attention_backend not in BACKENDS:
            raise ConfigError(f"pretrain: attention_backend must be one of {', '.join(BACKENDS)}, "
                              f"got {self.attention_backend!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"pretrain: precision must be auto, bf16 or fp32, "
                              f"got {self.precision!r}")
        for name in ("tokens_per_batch", "gradient_accumulation_steps", "eval_steps",
                     "save_steps", "logging_steps", "save_total_limit", "attention_width"):
            if getattr(self, name) < 1:
                raise ConfigError(f"pretrain: {name} must be at least 1, got {getattr(self, name)}")
