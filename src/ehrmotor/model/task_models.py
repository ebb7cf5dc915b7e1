"""Task models: a pretrained MOTOR encoder adapted to one downstream task, Hugging Face style.

- `MotorForTimeToEvent`: encoder + `TimeToEventHead`, a piecewise-exponential head over the
  pretrained time bins for ONE outcome. It starts from the pretrained MOTOR head: the shared
  per-bin projection and norm, and the outcome's task row and bias when one of the outcome's
  codes is a pretraining task; otherwise the mean task row and, in every bin, the log of the
  training event rate (events per day at risk). Loss: `time_to_event_loss`, the pretraining
  likelihood (`motor_loss`) restricted to one task, censoring exact.
- `MotorForBinary`: encoder + a logistic layer on the representation at the prediction time,
  its bias starting at the training prevalence's log-odds. Loss: binary cross-entropy.

Both take the packed batch of `ehrmotor.sequences.batching.collate_windows` (the one featurization
path: embedding windows ending at each label's position) and read the representations at
`point_indices`. The config (`MotorConfig`, strict JSON) records the task in `finetune_task`
(`TaskSpec.to_json`: name, kind, codes, pretrained_task) beside the architecture.
`from_pretrained(path, task=...)` builds a task model from a pretraining bundle;
`from_pretrained(path)` reloads a fine-tuned one (its config has `finetune_task`); `save_pretrained`
writes config.json and model.safetensors. `task_model_class(config)` picks the class a fine-tuned
config needs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from ehrmotor.model.config import MotorConfig
from ehrmotor.model.encoder import MotorEncoder, MotorPreTrainedModel
from ehrmotor.model.head import MotorHead, MotorModel, motor_loss

TIME_TO_EVENT = "time_to_event"
BINARY = "binary"
TASK_KINDS = (TIME_TO_EVENT, BINARY)
MOTOR_TASK_FILE = "motor_task.json"


@dataclass(frozen=True)
class TaskSpec:
    """The downstream task: its name, kind (TASK_KINDS), the outcome's codes (time-to-event:
    a pretraining task of one of them initialises the head) and the training base rate
    (time-to-event: events per day at risk; binary: the fraction of positive labels)."""

    name: str
    kind: str
    codes: tuple[str, ...] = ()
    base_rate: float | None = None
    pretrained_task: int | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise ValueError(f"task {self.name!r}: kind {self.kind!r}; expected one of "
                             f"{', '.join(TASK_KINDS)}")
        rate = self.base_rate
        if rate is not None and not (math.isfinite(rate) and rate > 0
                                     and (self.kind != BINARY or rate < 1)):
            raise ValueError(f"task {self.name!r}: base_rate {rate} must be positive and finite "
                             "(binary: a fraction strictly between 0 and 1)")

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "codes": list(self.codes),
                "base_rate": self.base_rate, "pretrained_task": self.pretrained_task}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> TaskSpec:
        return cls(str(value["name"]), str(value["kind"]), tuple(value.get("codes") or ()),
                   value.get("base_rate"), value.get("pretrained_task"))


def recorded_task(config: MotorConfig) -> TaskSpec | None:
    """The task a fine-tuned config records, or None for a pretraining config."""
    value = getattr(config, "finetune_task", None)
    return TaskSpec.from_json(value) if isinstance(value, dict) else None


@dataclass
class TaskOutput(ModelOutput):
    """loss: mean per label when the targets are given; scores: (P, bins) log-hazards per day
    (time-to-event) or (P,) logits (binary), fp32; representations (P, hidden)."""

    loss: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    representations: torch.Tensor | None = None


def time_to_event_loss(log_hazards: torch.Tensor, event_days: torch.Tensor, event: torch.Tensor,
                       bin_edges_days: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood per label of one task: `motor_loss` with each label's
    follow-up ending at its time (event_days (P,): days to the event, or to censoring when
    `event` (P,) is False), so a censored label is at risk up to its censoring exactly."""
    days = event_days.float()
    observed = event.bool().nonzero()[:, 0]
    return motor_loss(log_hazards[:, :, None], days, observed, torch.zeros_like(observed),
                      days[observed], bin_edges_days)


def binary_loss(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy of logits (P,) against 0/1 labels (P,), in fp32."""
    return F.binary_cross_entropy_with_logits(logits.float(), label.float())


class TimeToEventHead(nn.Module):
    """Representation -> log-hazard per day in each pretrained time bin, for one task."""

    def __init__(self, config: MotorConfig) -> None:
        super().__init__()
        self.num_bins, self.final_layer_size = config.num_bins, config.final_layer_size
        # Named as in MotorHead: the pretrained per-bin projection and norm load as they are.
        self.bins = nn.Linear(config.hidden_size, config.num_bins * config.final_layer_size,
                              bias=False)
        self.norm = nn.RMSNorm(config.final_layer_size, eps=config.rms_norm_eps)
        self.task = nn.Linear(config.final_layer_size, 1, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.num_bins))

    def forward(self, representations: torch.Tensor) -> torch.Tensor:
        points = representations.shape[0]
        # (P, hidden) -> (P, bins, final)
        per_bin = self.bins(representations).view(points, self.num_bins, self.final_layer_size)
        normed = self.norm(per_bin.to(self.norm.weight.dtype))
        return self.task(normed).float()[..., 0] + self.bias  # (P, bins)


class BinaryHead(nn.Linear):
    """Representation -> one logit (P,), fp32."""

    def __init__(self, config: MotorConfig) -> None:
        super().__init__(config.hidden_size, 1)

    def forward(self, representations: torch.Tensor) -> torch.Tensor:
        return super().forward(representations).float()[..., 0]  # (P,)


class _TaskModel(MotorPreTrainedModel):
    """Encoder (`motor.`) + a task head (`head.`); subclasses set `kind` and the head."""

    kind = ""
    head: nn.Module

    def __init__(self, config: MotorConfig) -> None:
        super().__init__(config)
        self.motor = MotorEncoder(config)

    def encode(self, entries: torch.Tensor, weights: torch.Tensor, bag_offsets: torch.Tensor,
               time_features: torch.Tensor, age_days: torch.Tensor,
               segment_ids: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden state of every position (T, hidden), as `MotorModel.encode`."""
        return self.motor(entries, weights, bag_offsets, time_features, age_days, segment_ids)

    @property
    def task(self) -> TaskSpec:
        recorded = recorded_task(cast(MotorConfig, self.config))
        if recorded is None:
            raise ValueError("this task model's config records no finetune_task")
        return recorded

    def _loss(self, scores: torch.Tensor, targets: dict[str, torch.Tensor | None]
              ) -> torch.Tensor | None:
        raise NotImplementedError

    def _forward(self, inputs: dict[str, torch.Tensor], point_indices: torch.Tensor,
                 targets: dict[str, torch.Tensor | None],
                 return_dict: bool | None) -> TaskOutput | tuple[torch.Tensor, ...]:
        hidden = self.encode(**inputs)  # (T, hidden)
        representations = hidden[point_indices.long()]  # (P, hidden)
        scores = self.head(representations)
        output = TaskOutput(loss=self._loss(scores, targets), scores=scores,
                            representations=representations)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return output if return_dict else output.to_tuple()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any,
                        task: TaskSpec | None = None, **kwargs: Any) -> Any:
        """A fine-tuned bundle reloads as saved (`task`, if given, must match its record); a
        pretraining bundle needs `task` and starts from its MOTOR head (module docstring)."""
        path = Path(pretrained_model_name_or_path)
        config = MotorConfig.from_pretrained(path)
        recorded = recorded_task(config)
        if recorded is not None:
            if recorded.kind != cls.kind or (task is not None and task.name != recorded.name):
                raise ValueError(f"{path}: fine-tuned for {recorded.kind} task "
                                 f"{recorded.name!r}; cannot load it as {cls.__name__}"
                                 + (f" for {task.name!r}" if task is not None else ""))
            return super().from_pretrained(path, *args, **kwargs)
        if task is None:
            raise ValueError(f"{path}: a pretraining bundle; pass task=TaskSpec(...) to start a "
                             "task model from it")
        pretrained = MotorModel.from_pretrained(path, *args, **kwargs)
        return cls.from_motor(pretrained, task, pretraining_codes(path))

    @classmethod
    def from_motor(cls, pretrained: MotorModel, task: TaskSpec,
                   task_codes: Sequence[str] = ()) -> Any:
        """A task model with `pretrained`'s encoder (copied) and a head started from its head;
        task_codes: the code of each pretraining task, in model task order."""
        if task.kind != cls.kind:
            raise ValueError(f"task {task.name!r} is {task.kind}; {cls.__name__} needs {cls.kind}")
        config = MotorConfig.from_dict(pretrained.config.to_dict())
        model = cls(config)
        model.motor.load_state_dict(pretrained.motor.state_dict())
        recorded = model._start_head(pretrained, task, list(task_codes))
        model.config.finetune_task = recorded.to_json()
        return model

    def _start_head(self, pretrained: MotorModel, task: TaskSpec,
                    task_codes: list[str]) -> TaskSpec:
        raise NotImplementedError


def pretraining_codes(bundle: Path) -> list[str]:
    """The code of each pretraining task of a bundle (its motor_task.json), model task order;
    empty when the file is absent."""
    path = Path(bundle) / MOTOR_TASK_FILE
    if not path.is_file():
        return []
    return [str(task["code"]) for task in json.loads(path.read_text())["tasks"]]


class MotorForTimeToEvent(_TaskModel):
    """Encoder + `TimeToEventHead`; loss `time_to_event_loss` (module docstring)."""

    kind = TIME_TO_EVENT

    def __init__(self, config: MotorConfig) -> None:
        super().__init__(config)
        self.head = TimeToEventHead(config)
        self.post_init()

    def _start_head(self, pretrained: MotorModel, task: TaskSpec,
                    task_codes: list[str]) -> TaskSpec:
        source = cast(MotorHead, pretrained.head)
        head = cast(TimeToEventHead, self.head)
        found = next((task_codes.index(code) for code in task.codes if code in task_codes), None)
        with torch.no_grad():
            head.bins.weight.copy_(source.bins.weight)
            head.norm.weight.copy_(source.norm.weight)
            if found is not None:
                head.task.weight.copy_(source.tasks.weight[found][None])
                head.bias.copy_(source.bias[:, found])
            else:
                head.task.weight.copy_(source.tasks.weight.mean(0, keepdim=True))
                rate = task.base_rate if task.base_rate is not None else 1.0 / 365.25
                head.bias.fill_(math.log(rate))
        return TaskSpec(task.name, task.kind, task.codes, task.base_rate, found)

    def forward(self, entries: torch.Tensor, weights: torch.Tensor, bag_offsets: torch.Tensor,
                time_features: torch.Tensor, age_days: torch.Tensor, segment_ids: torch.Tensor,
                point_indices: torch.Tensor, event_days: torch.Tensor | None = None,
                event: torch.Tensor | None = None,
                return_dict: bool | None = None) -> TaskOutput | tuple[torch.Tensor, ...]:
        """Log-hazards (P, bins) at the points; the loss when event_days and event are given."""
        inputs = dict(entries=entries, weights=weights, bag_offsets=bag_offsets,
                      time_features=time_features, age_days=age_days, segment_ids=segment_ids)
        return self._forward(inputs, point_indices, {"event_days": event_days, "event": event},
                             return_dict)

    def _loss(self, scores: torch.Tensor, targets: dict[str, torch.Tensor | None]
              ) -> torch.Tensor | None:
        event_days, event = targets["event_days"], targets["event"]
        if event_days is None or event is None:
            return None
        return time_to_event_loss(scores, event_days, event, self.config.bin_edges_days)


class MotorForBinary(_TaskModel):
    """Encoder + a logistic layer (`head`: hidden -> 1 logit); loss: binary cross-entropy."""

    kind = BINARY

    def __init__(self, config: MotorConfig) -> None:
        super().__init__(config)
        self.head = BinaryHead(config)
        self.post_init()

    def _start_head(self, pretrained: MotorModel, task: TaskSpec,
                    task_codes: list[str]) -> TaskSpec:
        head = cast(BinaryHead, self.head)
        with torch.no_grad():
            head.weight.zero_()  # starts at the base rate; the gradient moves it
            rate = task.base_rate if task.base_rate is not None else 0.5
            head.bias.fill_(math.log(rate / (1 - rate)))
        return TaskSpec(task.name, task.kind, task.codes, task.base_rate, None)

    def forward(self, entries: torch.Tensor, weights: torch.Tensor, bag_offsets: torch.Tensor,
                time_features: torch.Tensor, age_days: torch.Tensor, segment_ids: torch.Tensor,
                point_indices: torch.Tensor, outcome: torch.Tensor | None = None,
                return_dict: bool | None = None) -> TaskOutput | tuple[torch.Tensor, ...]:
        """Logits (P,) at the points; the loss when `outcome` (P,), the 0/1 labels, is given."""
        inputs = dict(entries=entries, weights=weights, bag_offsets=bag_offsets,
                      time_features=time_features, age_days=age_days, segment_ids=segment_ids)
        return self._forward(inputs, point_indices, {"outcome": outcome}, return_dict)

    def _loss(self, scores: torch.Tensor, targets: dict[str, torch.Tensor | None]
              ) -> torch.Tensor | None:
        outcome = targets["outcome"]
        return None if outcome is None else binary_loss(scores, outcome)


TASK_MODELS: dict[str, type[_TaskModel]] = {TIME_TO_EVENT: MotorForTimeToEvent,
                                            BINARY: MotorForBinary}
TARGETS = {TIME_TO_EVENT: ("event_days", "event"), BINARY: ("outcome",)}


def task_model_class(config: MotorConfig) -> type[_TaskModel]:
    """The class that loads a fine-tuned config (ValueError for a pretraining one)."""
    task = recorded_task(config)
    if task is None:
        raise ValueError("config.json records no finetune_task: a pretraining bundle, not a "
                         "fine-tuned one")
    return TASK_MODELS[task.kind]
