"""MotorConfig: the whole architecture of a MOTOR model, saved as strict-JSON `config.json`.

The presets are the one source of model-size defaults: MotorConfig's own defaults are "base".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from transformers import PretrainedConfig

from ehrmotor.config import BACKENDS, PRESETS

_BASE = PRESETS["base"]  # MotorConfig() is the base size


def _finite_floats(name: str, values: Sequence[float] | None) -> list[float]:
    floats = [float(value) for value in (values if values is not None else [])]
    if not all(math.isfinite(value) for value in floats):
        raise ValueError(f"{name} must be finite (config.json is strict JSON); got {floats}")
    return floats


class MotorConfig(PretrainedConfig):
    """Architecture of a MOTOR model; saved as strict-JSON `config.json`.

    Encoder: vocab_size entries in the embedding bag, time_features per position, num_layers
    blocks of num_heads heads over hidden_size, SwiGLU of intermediate_size, causal local attention
    of attention_width positions (attention_backend: one of `BACKENDS`).
    rope_theta: the rotary encoding turns each head's pair i by age_days · theta^(-2i/head_dim)
    radians. With theta = 10,000 the wavelengths run from 2π days (about a week) to about
    2π · 10,000 days (about 170 years), so day-level gaps and a whole lifetime (0..40,000 days)
    both stay distinguishable without wrapping around.
    max_window: the training context, positions per window (position 0 included); embeddings
    use it by default (`ehrmotor.representations`). None when unknown (bundles written before it was
    recorded; `ehrmotor.bundle` then reads training_summary.json).

    Head: num_tasks tasks, num_bins time bins, final_layer_size features per bin.
    bin_edges_days: finite bin edges in days, first 0, one per bin (the last bin is unbounded);
    may be empty when unknown. initial_log_rates: per task log-hazard per day that every bin's
    bias starts at; empty means zeros.
    """

    model_type = "ehrmotor"
    attribute_map = {"num_hidden_layers": "num_layers", "num_attention_heads": "num_heads"}

    def __init__(self, vocab_size: int = 16384, hidden_size: int = _BASE["hidden_size"],
                 num_layers: int = _BASE["num_layers"], num_heads: int = _BASE["num_heads"],
                 intermediate_size: int = _BASE["intermediate_size"], attention_width: int = 496,
                 attention_backend: str = "auto", num_tasks: int | None = None,
                 num_bins: int | None = None, final_layer_size: int = _BASE["final_layer_size"],
                 time_features: int = 3, rms_norm_eps: float = 1e-6, rope_theta: float = 10000.0,
                 initializer_range: float = 0.02, bin_edges_days: Sequence[float] | None = None,
                 initial_log_rates: Sequence[float] | None = None, max_window: int | None = None,
                 **kwargs: Any) -> None:
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
        self.max_window = max_window
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
        window = self.max_window
        if window is not None and (not isinstance(window, int) or isinstance(window, bool)
                                   or window < 2):
            raise ValueError(f"max_window must be an integer of at least 2 (position 0 and one "
                             f"more) or null; got {window!r}")
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
        """A named size ("base", "small", "tiny"); keyword arguments override or add fields.

        A keyword given as None counts as not given: `preset("tiny", final_layer_size=None)`
        keeps the preset's 32, so a caller can pass a setting the user may have left unset.
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
        given = {key: value for key, value in kwargs.items() if value is not None}
        return cls(**{**PRESETS[name], **given})
