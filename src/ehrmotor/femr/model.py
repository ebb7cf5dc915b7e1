"""femr 0.2.4's hybrid encoder in plain PyTorch: even layers Hawk, odd layers local attention.

Inputs are one packed sequence of T positions (`segment_ids` tells sequences apart; nothing
crosses them):

    entries (E,) int64, weights (E,) float32, bag_offsets (T + 1,)   each position's code bag
    ages_days (T,) float32      age at the position, in days (the rotary angle)
    time_data (T, 5) float32    femr's time features, float16-rounded (see `tokens`)

Each layer is a residual branch: norm -> (time features written over the last columns when
`use_normed_ages`) -> input_proj, split into a feed-forward part and either Hawk's recurrent
block (even layers) or q, k, v for rotary local attention (odd layers) -> output_proj of the
concatenation. femr's rotary frequencies are 1 / 10000 ** linspace(0, 2, head_dim // 2) (not the
usual 1 / 10000 ** (2i / head_dim)) and rotate adjacent pairs (x0, x1) -> (-x1, x0).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ehrmotor.model.attention import local_attention
from ehrmotor.model.hawk import RecurrentBlock

MODEL_TYPE = "ehrmotor-femr-hybrid"
# The files of a converted bundle (`ehrmotor convert-femr` writes them, `features` reads them).
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
DICTIONARY_FILE = "dictionary.msgpack"
ONTOLOGY_DIR = "ontology"
PARENTS_FILE = "parents.parquet"
TIME_FEATURES = 5
ACTIVATIONS = ("gelu", "swiglu")


@dataclass(frozen=True)
class FemrHybridConfig:
    """What a converted femr model needs; written as config.json in the bundle."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_layers: int
    attention_width: int
    use_normed_ages: bool
    hidden_act: str
    use_bias: bool = True
    femr_version: str = "0.2.4"
    layout: str = "hybrid"  # "hybrid" (femr 0.2.4) or "released" (femr 0.2.0 / 0.2.1)
    task_type: str = ""  # femr's task head saved with the model: "motor", "clmbr" or none
    motor_task: dict[str, Any] = field(default_factory=dict)  # femr's task_kwargs, as saved
    model_type: str = MODEL_TYPE

    def __post_init__(self) -> None:
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r}: expected one of {ACTIVATIONS}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads "
                             f"{self.num_heads}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True, allow_nan=False) + "\n"

    @classmethod
    def from_json_file(cls, path: Path) -> FemrHybridConfig:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})


class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def rotary_tables(ages_days: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """femr's (cos, sin), each (T, 1, head_dim), every frequency repeated for its pair."""
    inv_freq = 1.0 / (10000 ** torch.linspace(0, 2, steps=head_dim // 2, device=ages_days.device))
    angles = ages_days.float()[:, None] * inv_freq[None, :]  # (T, head_dim // 2)
    cos = torch.repeat_interleave(torch.cos(angles), 2, dim=-1)[:, None, :]
    sin = torch.repeat_interleave(torch.sin(angles), 2, dim=-1)[:, None, :]
    return cos, sin


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (T, H, D): each adjacent pair (x0, x1) turned by its angle: x*cos + (-x1, x0)*sin."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    turned = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).reshape(x.shape)
    return x * cos.to(x.dtype) + turned * sin.to(x.dtype)


class FemrLayer(nn.Module):
    def __init__(self, config: FemrHybridConfig, recurrent: bool) -> None:
        super().__init__()
        self.config = config
        self.is_recurrent = recurrent
        hidden, inner = config.hidden_size, config.intermediate_size
        ff_width = inner * (2 if config.hidden_act == "swiglu" else 1)
        mixer_width = 0 if recurrent else 3 * hidden
        self.norm = RMSNorm(hidden)
        self.input_proj = nn.Linear(hidden, mixer_width + ff_width, bias=config.use_bias)
        self.output_proj = nn.Linear(hidden + inner, hidden, bias=config.use_bias)
        self.recurrent = RecurrentBlock(hidden, config.num_heads) if recurrent else None

    def forward(self, x: torch.Tensor, time_data: torch.Tensor, rotary: tuple[torch.Tensor, ...],
                segment_ids: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        if self.config.use_normed_ages:  # femr overwrites the last columns with time features
            extra = time_data if self.is_recurrent else torch.cat((time_data, time_data**2), -1)
            x = torch.cat((x[:, :-extra.shape[1]], extra.to(x.dtype)), dim=-1)
        projected = self.input_proj(x)
        if self.recurrent is not None:
            mixed, ff = self.recurrent(x, segment_ids), projected
        else:
            hidden, heads = self.config.hidden_size, self.config.num_heads
            ff = projected[:, :-3 * hidden]
            qkv = projected[:, -3 * hidden:].reshape(x.shape[0], 3, heads, hidden // heads)
            q, k = rotate(qkv[:, 0], *rotary), rotate(qkv[:, 1], *rotary)  # (T, H, D)
            mixed = local_attention(q, k, qkv[:, 2], segment_ids, self.config.attention_width,
                                    backend="blockwise").reshape(x.shape)
        if self.config.hidden_act == "swiglu":
            gate, value = ff.chunk(2, dim=-1)
            ff = F.silu(gate) * value
        else:
            ff = F.gelu(ff)
        return self.output_proj(torch.cat((mixed, ff), dim=-1))


class FemrHybridEncoder(nn.Module):
    """The converted encoder; `forward` returns (T, hidden) representations (out_norm applied)."""

    def __init__(self, config: FemrHybridConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.EmbeddingBag(config.vocab_size, config.hidden_size, mode="sum",
                                     include_last_offset=True)
        self.in_norm = RMSNorm(config.hidden_size)
        self.layers = nn.ModuleList(FemrLayer(config, recurrent=i % 2 == 0)
                                    for i in range(config.num_layers))
        self.out_norm = RMSNorm(config.hidden_size)

    def forward(self, entries: torch.Tensor, weights: torch.Tensor, bag_offsets: torch.Tensor,
                ages_days: torch.Tensor, time_data: torch.Tensor, segment_ids: torch.Tensor
                ) -> torch.Tensor:
        x = self.in_norm(self.embed(entries, bag_offsets, per_sample_weights=weights))  # (T, hid)
        rotary = rotary_tables(ages_days, self.config.hidden_size // self.config.num_heads)
        for layer in self.layers:
            x = x + layer(x, time_data, rotary, segment_ids)
        return self.out_norm(x)
