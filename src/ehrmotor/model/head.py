"""The MOTOR head, its piecewise-exponential loss, and the pretraining model that joins them to
the encoder.

Time is in days. Bins are given by finite edges [e_0 = 0, e_1, ..., e_{B-1}] (config.bin_edges_days,
from `motor_task.json`); bin b covers (e_b, e_{b+1}] and the last bin (e_{B-1}, +inf). At a
prediction point, each task has a time t (`event_days`): days to the task's next occurrence
(`is_event` True) or, without one, days to the subject's censoring. With a constant hazard
λ_b = exp(log_hazard_b) inside bin b:

    time_at_risk_b = clamp(t - e_b, 0, e_{b+1} - e_b)     days spent in bin b before t
    event_in_bin_b = 1 if the event is observed and t falls in bin b, else 0

    -log L = Σ_b λ_b · time_at_risk_b - Σ_b log λ_b · event_in_bin_b

(the survival term plus, for an observed event, the log-density at t). An event at t = 0 counts in
the first bin.

Data flow of `MotorModel`: encoder hidden states (T, hidden) -> the P prediction points
(`point_indices`) -> `MotorHead` -> log-hazard per (point, bin, task) -> with labels
event_days, is_event (P, tasks): `bin_labels` -> `piecewise_exponential_nll`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils import ModelOutput

from ehrmotor.model.config import MotorConfig
from ehrmotor.model.encoder import MotorEncoder, MotorPreTrainedModel


class MotorHead(nn.Module):
    """Representation -> log-hazard per day for each (bin, task)."""

    def __init__(self, config: MotorConfig) -> None:
        super().__init__()
        self.num_bins = config.num_bins
        self.final_layer_size = config.final_layer_size
        self.bins = nn.Linear(config.hidden_size, config.num_bins * config.final_layer_size,
                              bias=False)
        self.norm = nn.RMSNorm(config.final_layer_size, eps=config.rms_norm_eps)
        self.tasks = nn.Linear(config.final_layer_size, config.num_tasks, bias=False)
        # Filled from config.initial_log_rates in MotorModel._init_weights.
        self.bias = nn.Parameter(torch.zeros(config.num_bins, config.num_tasks))

    def forward(self, representations: torch.Tensor) -> torch.Tensor:
        points = representations.shape[0]
        # (P, hidden) -> (P, bins · final) -> (P, bins, final)
        per_bin = self.bins(representations).view(points, self.num_bins, self.final_layer_size)
        normed = self.norm(per_bin.to(self.norm.weight.dtype))  # norm in the weights' precision
        # fp32 sum: the bias (about log 1e-4) would lose its digits in bf16
        return self.tasks(normed).float() + self.bias  # (P, bins, tasks)


def bin_labels(event_days: torch.Tensor, is_event: torch.Tensor,
               bin_edges_days: Sequence[float] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-bin targets from per-task times.

    event_days (P, tasks): days to the event, or to censoring where `is_event` (P, tasks) is
    False. Returns time_at_risk (P, bins, tasks) float32 in days and event_in_bin (P, bins, tasks)
    bool.
    """
    days = torch.as_tensor(event_days, dtype=torch.float32)
    observed = torch.as_tensor(is_event, dtype=torch.bool, device=days.device)
    edges = torch.as_tensor(bin_edges_days, dtype=torch.float32, device=days.device)
    if edges.dim() != 1 or edges.numel() == 0 or edges[0] != 0:
        raise ValueError(f"bin_edges_days must be a non-empty list starting at 0; got {edges}")
    if days.dim() != 2 or days.shape != observed.shape:
        raise ValueError(f"event_days {tuple(days.shape)} and is_event {tuple(observed.shape)} "
                         "must share the shape (P, tasks)")

    bin_width = torch.cat([edges[1:] - edges[:-1], edges.new_tensor([float("inf")])])  # (bins,)
    since_start = days[:, None, :] - edges[None, :, None]  # (P, bins, tasks)
    time_at_risk = torch.minimum(since_start.clamp(min=0), bin_width[None, :, None])

    # bin b with e_b < t <= e_{b+1}; t = 0 lands in bin 0
    event_bin = (torch.searchsorted(edges, days.contiguous(), right=False) - 1).clamp(min=0)
    bins = torch.arange(edges.numel(), device=days.device)
    event_in_bin = (bins[None, :, None] == event_bin[:, None, :]) & observed[:, None, :]
    return time_at_risk, event_in_bin


def piecewise_exponential_nll(log_hazards: torch.Tensor, time_at_risk: torch.Tensor,
                              event_in_bin: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood per (point, task), in fp32 whatever the input dtype.

    log_hazards, time_at_risk, event_in_bin: (P, bins, tasks); log-hazards per day, time in days.
    Returns Σ exp(log_hazards)·time_at_risk − Σ log_hazards·event_in_bin over everything,
    divided by P · tasks.
    """
    if log_hazards.shape != time_at_risk.shape or log_hazards.shape != event_in_bin.shape:
        raise ValueError(f"log_hazards {tuple(log_hazards.shape)}, time_at_risk "
                         f"{tuple(time_at_risk.shape)} and event_in_bin "
                         f"{tuple(event_in_bin.shape)} must share the shape (P, bins, tasks)")
    pairs = log_hazards.shape[0] * log_hazards.shape[2]
    with torch.autocast(log_hazards.device.type, enabled=False):
        log_hazards = log_hazards.float()  # exp in bf16 loses too much
        survival = (torch.exp(log_hazards) * time_at_risk.float()).sum()
        events = (log_hazards * event_in_bin.float()).sum()
        return (survival - events) / max(pairs, 1)


def motor_loss(log_hazards: torch.Tensor, event_days: torch.Tensor, is_event: torch.Tensor,
               bin_edges_days: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """`piecewise_exponential_nll` from per-task times (P, tasks); see `bin_labels`."""
    return piecewise_exponential_nll(log_hazards, *bin_labels(event_days, is_event,
                                                              bin_edges_days))


@dataclass
class MotorOutput(ModelOutput):
    """loss: mean NLL per (point, task) when labels are given; log_hazards (P, bins, tasks) fp32,
    per day; representations (P, hidden): the final-norm hidden state at each point."""

    loss: torch.Tensor | None = None
    log_hazards: torch.Tensor | None = None
    representations: torch.Tensor | None = None


class MotorModel(MotorPreTrainedModel):
    """Pretraining model: `MotorEncoder` (weights under `motor.`) + `MotorHead` (`head.`) + loss."""

    def __init__(self, config: MotorConfig) -> None:
        super().__init__(config)
        self.motor = MotorEncoder(config)
        self.head = MotorHead(config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, MotorHead):
            if getattr(module.bias, "_is_hf_initialized", False):
                return  # loaded from a checkpoint (transformers >= 5 marks loaded tensors)
            rates = torch.tensor(self.config.initial_log_rates or [0.0] * self.config.num_tasks)
            with torch.no_grad():
                module.bias.copy_(rates.to(module.bias.dtype).expand_as(module.bias))

    def encode(self, entries: torch.Tensor, weights: torch.Tensor, bag_offsets: torch.Tensor,
               time_features: torch.Tensor, age_days: torch.Tensor,
               segment_ids: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden state of every position: (T, hidden); see `MotorEncoder`."""
        return self.motor(entries, weights, bag_offsets, time_features, age_days, segment_ids)

    def forward(self, entries: torch.Tensor, weights: torch.Tensor, bag_offsets: torch.Tensor,
                time_features: torch.Tensor, age_days: torch.Tensor, segment_ids: torch.Tensor,
                point_indices: torch.Tensor, event_days: torch.Tensor | None = None,
                is_event: torch.Tensor | None = None,
                return_dict: bool | None = None) -> MotorOutput | tuple[torch.Tensor, ...]:
        """Log-hazards at the points (P,) of the packed batch; the loss when event_days and
        is_event (P, tasks) are given (days to event or censoring; see the module docstring)."""
        hidden = self.encode(entries, weights, bag_offsets, time_features, age_days, segment_ids)
        representations = hidden[point_indices.long()]  # (P, hidden)
        log_hazards = self.head(representations)  # (P, bins, tasks)
        loss = None
        if event_days is not None or is_event is not None:
            if event_days is None or is_event is None:
                raise ValueError("labels need both event_days and is_event (P, tasks)")
            if not self.config.bin_edges_days:
                raise ValueError("event_days/is_event need config.bin_edges_days; it is empty")
            loss = motor_loss(log_hazards, event_days, is_event, self.config.bin_edges_days)
        output = MotorOutput(loss=loss, log_hazards=log_hazards, representations=representations)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return output if return_dict else output.to_tuple()


def current_weight_name(name: str) -> str:
    """The name a checkpoint tensor has in today's MotorModel.

    Bundles written before the encoder/head split hold the encoder's tensors at the top level
    (`embedding.entries.weight`, `layers.0...`, `norm.weight`); they now live under the encoder's
    prefix (`motor.embedding.entries.weight`). `from_pretrained` already maps them so (transformers
    adds a missing base_model_prefix key by key); a check of a file's tensor names against the
    model's should map them the same way first. Other names come back unchanged.
    """
    top = name.split(".", 1)[0]
    if top in ("embedding", "layers", "norm"):
        return f"{MotorModel.base_model_prefix}.{name}"
    return name
