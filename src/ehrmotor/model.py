"""The MOTOR transformer and its piecewise-exponential time-to-event head (Hugging Face style).

A batch is one packed sequence of T positions from several subjects (1-D token dimension):

    entries (N,), weights (N,)   vocabulary entries of all positions and their weights
    bag_offsets (T,)             start of each position's bag in `entries` (EmbeddingBag offsets)
    time_features (T, 3)         normalised age, log-age and log-time-since-previous
    age_days (T,)                days since birth; drives the rotary position encoding
    segment_ids (T,)             subject index in the pack (a subject's positions are contiguous)
    point_indices (P,)           positions of the prediction points
    labels, either form:
      time_at_risk, event_in_bin (P, bins, tasks)  from `motor_loss.dense_labels`
      event_days, is_event (P, tasks)              days to event or censoring; binned with
                                                   config.bin_edges_days (`motor_loss.bin_labels`)

Data flow: embedding bag + time features -> pre-norm blocks (rotary on age, causal local attention
within subjects, SwiGLU) -> RMSNorm -> representation at each point -> head -> log-hazard per
(point, bin, task) -> piecewise-exponential NLL (`motor_loss`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from ehrmotor.attention import BACKENDS, local_attention
from ehrmotor.motor_loss import bin_labels, motor_loss, piecewise_exponential_nll

__all__ = ["MotorConfig", "MotorModel", "MotorOutput", "motor_loss"]

PRESETS: dict[str, dict[str, int]] = {
    "base": {"num_layers": 12, "hidden_size": 768, "num_heads": 12, "intermediate_size": 3072},
    "small": {"num_layers": 6, "hidden_size": 768, "num_heads": 12, "intermediate_size": 3072},
    "tiny": {"num_layers": 2, "hidden_size": 64, "num_heads": 4, "intermediate_size": 128,
             "final_layer_size": 32},
}


def _finite_floats(name: str, values: Sequence[float] | None) -> list[float]:
    floats = [float(value) for value in (values if values is not None else [])]
    if not all(math.isfinite(value) for value in floats):
        raise ValueError(f"{name} must be finite (config.json is strict JSON); got {floats}")
    return floats


class MotorConfig(PretrainedConfig):
    """Architecture of a MOTOR model; saved as strict-JSON `config.json`.

    rope_theta: the rotary encoding turns each head's pair i by age_days · theta^(-2i/head_dim)
    radians. With theta = 10,000 the wavelengths run from 2π days (about a week) to about
    2π · 10,000 days (about 170 years), so day-level gaps and a whole lifetime (0..40,000 days)
    both stay distinguishable without wrapping around.
    bin_edges_days: finite bin edges in days, first 0, one per bin (the last bin is unbounded);
    may be empty when unknown. initial_log_rates: per task log-hazard per day that every bin's
    bias starts at; empty means zeros.
    """

    model_type = "ehrmotor"
    attribute_map = {"num_hidden_layers": "num_layers", "num_attention_heads": "num_heads"}

    def __init__(self, vocab_size: int = 16384, hidden_size: int = 768, num_layers: int = 12,
                 num_heads: int = 12, intermediate_size: int = 3072, attention_width: int = 496,
                 attention_backend: str = "auto", num_tasks: int | None = None,
                 num_bins: int | None = None, final_layer_size: int = 512, time_features: int = 3,
                 rms_norm_eps: float = 1e-6, rope_theta: float = 10000.0,
                 initializer_range: float = 0.02, bin_edges_days: Sequence[float] | None = None,
                 initial_log_rates: Sequence[float] | None = None, **kwargs: Any) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.intermediate_size = intermediate_size
        self.attention_width = attention_width
        self.attention_backend = attention_backend
        self.bin_edges_days = _finite_floats("bin_edges_days", bin_edges_days)
        self.initial_log_rates = _finite_floats("initial_log_rates", initial_log_rates)
        self.num_tasks = num_tasks or len(self.initial_log_rates) or 8192
        self.num_bins = num_bins or len(self.bin_edges_days) or 8
        self.final_layer_size = final_layer_size
        self.time_features = time_features
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.initializer_range = initializer_range
        self._validate()
        super().__init__(**kwargs)

    def _validate(self) -> None:
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ValueError(f"hidden_size {self.hidden_size} must split into {self.num_heads} "
                             "heads of even size (rotary encoding turns pairs)")
        if self.attention_backend not in BACKENDS:
            raise ValueError(f"attention_backend {self.attention_backend!r} not in {BACKENDS}")
        if self.attention_width < 1:
            raise ValueError(f"attention_width must be at least 1; got {self.attention_width}")
        edges = self.bin_edges_days
        if edges and (len(edges) != self.num_bins or edges[0] != 0
                      or any(b <= a for a, b in zip(edges, edges[1:], strict=False))):
            raise ValueError(f"bin_edges_days must be {self.num_bins} increasing edges starting "
                             f"at 0; got {edges}")
        if self.initial_log_rates and len(self.initial_log_rates) != self.num_tasks:
            raise ValueError(f"initial_log_rates has {len(self.initial_log_rates)} values for "
                             f"{self.num_tasks} tasks")
        for name in ("rms_norm_eps", "rope_theta", "initializer_range"):
            value = float(getattr(self, name))
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number; got {value}")

    @classmethod
    def preset(cls, name: str, **kwargs: Any) -> MotorConfig:
        """A named size ("base", "small", "tiny"); keyword arguments override or add fields."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **kwargs})


class MotorEmbedding(nn.Module):
    """Weighted sum of each position's vocabulary entries plus a projection of its time features."""

    def __init__(self, config: MotorConfig) -> None:
        super().__init__()
        self.entries = nn.EmbeddingBag(config.vocab_size, config.hidden_size, mode="sum")
        self.time = nn.Linear(config.time_features, config.hidden_size, bias=False)

    def forward(self, entries: torch.Tensor, weights: torch.Tensor, bag_offsets: torch.Tensor,
                time_features: torch.Tensor) -> torch.Tensor:
        bags = self.entries(entries.long(), bag_offsets.long(),
                            per_sample_weights=weights.to(self.entries.weight.dtype))  # (T, hidden)
        return bags + self.time(time_features.to(self.time.weight.dtype))


def rotary_tables(age_days: torch.Tensor, head_dim: int,
                  theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of age_days · theta^(-2i/head_dim), each (T, 1, head_dim / 2), in fp32."""
    exponents = torch.arange(0, head_dim, 2, device=age_days.device, dtype=torch.float32)
    inverse_frequency = theta ** (-exponents / head_dim)  # radians per day
    angles = age_days.float()[:, None] * inverse_frequency[None, :]  # (T, head_dim / 2)
    return angles.cos()[:, None, :], angles.sin()[:, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (first half, second half) pairs of x (T, H, D) by the angles; keeps x's dtype."""
    first, second = x.float().chunk(2, dim=-1)  # (T, H, D / 2) each
    rotated = torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)
    return rotated.to(x.dtype)


class MotorAttention(nn.Module):
    def __init__(self, config: MotorConfig) -> None:
        super().__init__()
        self.config = config
        self.num_heads = config.num_heads
        self.head_dim = config.hidden_size // config.num_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.out = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                segment_ids: torch.Tensor) -> torch.Tensor:
        length = x.shape[0]
        qkv = self.qkv(x).view(length, 3, self.num_heads, self.head_dim)  # (T, 3, H, D)
        q, k, v = qkv.unbind(dim=1)  # (T, H, D) each
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = local_attention(q, k, v, segment_ids, self.config.attention_width,
                            self.config.attention_backend)  # (T, H, D)
        return self.out(y.reshape(length, -1))  # (T, hidden)


class MotorFeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: MotorConfig) -> None:
        super().__init__()
        self.gate_up = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)  # (T, intermediate) each
        return self.down(F.silu(gate) * up)


class MotorBlock(nn.Module):
    def __init__(self, config: MotorConfig) -> None:
        super().__init__()
        self.attention_norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attention = MotorAttention(config)
        self.feed_forward_norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.feed_forward = MotorFeedForward(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                segment_ids: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, segment_ids)
        return x + self.feed_forward(self.feed_forward_norm(x))


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
        per_bin = self.bins(representations).view(points, self.num_bins, self.final_layer_size)
        normed = self.norm(per_bin.to(self.norm.weight.dtype))  # norm in the weights' precision
        # fp32 sum: the bias (about log 1e-4) would lose its digits in bf16
        return self.tasks(normed).float() + self.bias  # (P, bins, tasks)


@dataclass
class MotorOutput(ModelOutput):
    """loss: mean NLL per (point, task) when labels are given; log_hazards (P, bins, tasks) fp32,
    per day; representations (P, hidden): the final-norm hidden state at each point."""

    loss: torch.Tensor | None = None
    log_hazards: torch.Tensor | None = None
    representations: torch.Tensor | None = None


class MotorModel(PreTrainedModel):
    config_class = MotorConfig
    base_model_prefix = "motor"
    main_input_name = "segment_ids"  # one per position: what Trainer counts as tokens
    _no_split_modules = ["MotorBlock"]

    def __init__(self, config: MotorConfig) -> None:
        super().__init__(config)
        self.embedding = MotorEmbedding(config)
        self.layers = nn.ModuleList(MotorBlock(config) for _ in range(config.num_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.head = MotorHead(config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.EmbeddingBag):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, nn.RMSNorm) and module.weight is not None:
            nn.init.ones_(module.weight)
        elif isinstance(module, MotorHead):
            if getattr(module.bias, "_is_hf_initialized", False):
                return  # loaded from a checkpoint (transformers >= 5 marks loaded tensors)
            rates = torch.tensor(self.config.initial_log_rates or [0.0] * self.config.num_tasks)
            with torch.no_grad():
                module.bias.copy_(rates.to(module.bias.dtype).expand_as(module.bias))

    def count_parameters(self) -> int:
        """Number of parameters (all trainable)."""
        return sum(parameter.numel() for parameter in self.parameters())

    def encode(self, entries: torch.Tensor, weights: torch.Tensor, bag_offsets: torch.Tensor,
               time_features: torch.Tensor, age_days: torch.Tensor,
               segment_ids: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden state of every position: (T, hidden)."""
        if not (bag_offsets.shape[0] == time_features.shape[0] == age_days.shape[0]
                == segment_ids.shape[0]):
            raise ValueError(f"bag_offsets {tuple(bag_offsets.shape)}, time_features "
                             f"{tuple(time_features.shape)}, age_days {tuple(age_days.shape)} and "
                             f"segment_ids {tuple(segment_ids.shape)} must share the length T")
        x = self.embedding(entries, weights, bag_offsets, time_features)  # (T, hidden)
        cos, sin = rotary_tables(age_days, self.config.hidden_size // self.config.num_heads,
                                 self.config.rope_theta)
        for layer in self.layers:
            x = layer(x, cos, sin, segment_ids)
        return self.norm(x)

    def forward(self, entries: torch.Tensor, weights: torch.Tensor, bag_offsets: torch.Tensor,
                time_features: torch.Tensor, age_days: torch.Tensor, segment_ids: torch.Tensor,
                point_indices: torch.Tensor, time_at_risk: torch.Tensor | None = None,
                event_in_bin: torch.Tensor | None = None, event_days: torch.Tensor | None = None,
                is_event: torch.Tensor | None = None,
                return_dict: bool | None = None) -> MotorOutput | tuple[torch.Tensor, ...]:
        hidden = self.encode(entries, weights, bag_offsets, time_features, age_days, segment_ids)
        representations = hidden[point_indices.long()]  # (P, hidden)
        log_hazards = self.head(representations)  # (P, bins, tasks)
        labels = self._binned_labels(time_at_risk, event_in_bin, event_days, is_event)
        loss = piecewise_exponential_nll(log_hazards, *labels) if labels is not None else None
        output = MotorOutput(loss=loss, log_hazards=log_hazards, representations=representations)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return output if return_dict else output.to_tuple()

    def _binned_labels(self, time_at_risk: torch.Tensor | None, event_in_bin: torch.Tensor | None,
                       event_days: torch.Tensor | None, is_event: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(time_at_risk, event_in_bin) from whichever label form was passed, or None."""
        dense_given = time_at_risk is not None or event_in_bin is not None
        per_task_given = event_days is not None or is_event is not None
        if dense_given and per_task_given:
            raise ValueError("pass labels as time_at_risk + event_in_bin or as event_days + "
                             "is_event, not both")
        if time_at_risk is not None and event_in_bin is not None:
            return time_at_risk, event_in_bin
        if event_days is not None and is_event is not None:
            if not self.config.bin_edges_days:
                raise ValueError("event_days/is_event need config.bin_edges_days; it is empty")
            return bin_labels(event_days, is_event, self.config.bin_edges_days)
        if dense_given or per_task_given:
            raise ValueError("labels need both tensors of their form: time_at_risk + "
                             "event_in_bin, or event_days + is_event")
        return None
