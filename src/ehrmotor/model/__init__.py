"""The MOTOR model, Hugging Face style: encoder apart from head.

- `config`: `MotorConfig` and the size `PRESETS`.
- `attention`: causal local attention within subjects of a packed batch (`BACKENDS`).
- `encoder`: `MotorEncoder`, packed positions -> hidden states (T, hidden); what embedding loads.
- `head`: `MotorModel` = encoder + MOTOR head + piecewise-exponential loss; what pretraining trains.

`MotorEncoder.from_pretrained(bundle)` loads the encoder alone from a `MotorModel` bundle.
"""

from ehrmotor.model.attention import (
    BACKENDS,
    blockwise_local_attention,
    flex_local_attention,
    local_attention,
    resolve_backend,
)
from ehrmotor.model.config import PRESETS, MotorConfig
from ehrmotor.model.encoder import MotorEncoder, MotorPreTrainedModel
from ehrmotor.model.head import (
    LABELS,
    MotorHead,
    MotorModel,
    MotorOutput,
    current_weight_name,
    motor_loss,
)

__all__ = [
    "BACKENDS",
    "PRESETS",
    "MotorConfig",
    "MotorEncoder",
    "MotorHead",
    "MotorModel",
    "MotorOutput",
    "MotorPreTrainedModel",
    "blockwise_local_attention",
    "current_weight_name",
    "flex_local_attention",
    "local_attention",
    "motor_loss",
    "LABELS",
    "resolve_backend",
]
