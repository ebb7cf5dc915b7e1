"""The MOTOR encoder: a packed batch of positions -> final-norm hidden state per position.

A batch is one packed sequence of T positions from several subjects (1-D token dimension):

    entries (N,), weights (N,)   vocabulary entries of all positions and their weights
    bag_offsets (T,)             start of each position's bag in `entries` (EmbeddingBag offsets)
    time_features (T, 3)         normalised age, log-age and log-time-since-previous
    age_days (T,)                days since birth; drives the rotary position encoding
    segment_ids (T,)             subject index in the pack (a subject's positions are contiguous)

Data flow: embedding bag + time features -> pre-norm blocks (rotary on age, causal local attention
within subjects, SwiGLU) -> RMSNorm -> hidden states (T, hidden). `MotorEncoder` is what
embedding needs; `ehrmotor.model.head.MotorModel` adds the MOTOR head and loss for pretraining.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer

from ehrmotor.model.attention import local_attention
from ehrmotor.model.config import MotorConfig


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
        # q and k turned in one call: (T, 2, H, D) -> (T, 2H, D), a view
        turned = apply_rotary(qkv[:, :2].reshape(length, 2 * self.num_heads, self.head_dim),
                              cos, sin)
        q, k = turned.view(length, 2, self.num_heads, self.head_dim).unbind(dim=1)
        v = qkv[:, 2]  # (T, H, D) each
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


class MotorBlock(GradientCheckpointingLayer):
    """Pre-norm attention and feed-forward; recomputed in the backward pass when activation
    checkpointing is on (`activation_checkpointing_enable()`), so x must come positionally."""

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


class MotorPreTrainedModel(PreTrainedModel):
    """What the encoder and the pretraining model share: config class, weight names, init.

    The pretraining model keeps the encoder under `base_model_prefix` (`motor.`), so
    `MotorEncoder.from_pretrained` loads the encoder alone from a pretraining bundle: transformers
    strips the prefix, and `MotorEncoder` leaves the head's tensors (`head.`) out quietly.
    """

    config_class = MotorConfig
    base_model_prefix = "motor"
    main_input_name = "segment_ids"  # one per position: what Trainer counts as tokens
    supports_gradient_checkpointing = True  # per MotorBlock
    _no_split_modules = ["MotorBlock"]

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.EmbeddingBag):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, nn.RMSNorm) and module.weight is not None:
            nn.init.ones_(module.weight)

    def count_parameters(self) -> int:
        """Number of parameters (all trainable)."""
        return sum(parameter.numel() for parameter in self.parameters())


class MotorEncoder(MotorPreTrainedModel):
    """Embedding bag, rotary-encoded pre-norm blocks and the final RMSNorm."""

    # A pretraining bundle also holds the MOTOR head; loading the encoder alone skips it, and
    # transformers' report would otherwise list it as UNEXPECTED, which reads like an error.
    _keys_to_ignore_on_load_unexpected = [r"^head\."]

    def __init__(self, config: MotorConfig) -> None:
        super().__init__(config)
        self.embedding = MotorEmbedding(config)
        self.layers = nn.ModuleList(MotorBlock(config) for _ in range(config.num_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_init()

    def forward(self, entries: torch.Tensor, weights: torch.Tensor, bag_offsets: torch.Tensor,
                time_features: torch.Tensor, age_days: torch.Tensor,
                segment_ids: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden state of every position: (T, hidden); inputs as in the module
        docstring."""
        if not (bag_offsets.shape[0] == time_features.shape[0] == age_days.shape[0]
                == segment_ids.shape[0]):
            raise ValueError(f"bag_offsets {tuple(bag_offsets.shape)}, time_features "
                             f"{tuple(time_features.shape)}, age_days {tuple(age_days.shape)} and "
                             f"segment_ids {tuple(segment_ids.shape)} must share the length T")
        x = self.embedding(entries, weights, bag_offsets, time_features)  # (T, hidden)
        cos, sin = rotary_tables(age_days, self.config.hidden_size // self.config.num_heads,
                                 self.config.rope_theta)  # (T, 1, head_dim / 2) each
        for layer in self.layers:
            x = layer(x, cos, sin, segment_ids)
        return self.norm(x)
