"""The MOTOR model, Hugging Face style: encoder apart from head.

- `config`: `MotorConfig` and the size `PRESETS`.
- `attention`: causal local attention within subjects of a packed batch (`BACKENDS`).
- `encoder`: `MotorEncoder`, packed positions -> hidden states (T, hidden); what embedding loads.
- `head`: `MotorModel` = encoder + MOTOR head + piecewise-exponential loss; what pretraining trains.

`MotorEncoder.from_pretrained(bundle)` loads the encoder alone from a `MotorModel` bundle.
Importing this package registers the classes with transformers' Auto classes (model_type
"ehrmotor"): `AutoConfig` -> `MotorConfig`, `AutoModel` -> `MotorEncoder` (the hidden states),
`AutoModelForPreTraining` -> `MotorModel` (encoder, head and loss).
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


def register_auto_classes() -> None:
    """Register the config and models with transformers' Auto classes (idempotent)."""
    from transformers import AutoConfig, AutoModel, AutoModelForPreTraining

    AutoConfig.register(MotorConfig.model_type, MotorConfig, exist_ok=True)
    AutoModel.register(MotorConfig, MotorEncoder, exist_ok=True)
    AutoModelForPreTraining.register(MotorConfig, MotorModel, exist_ok=True)


register_auto_classes()

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
    "register_auto_classes",
    "LABELS",
    "resolve_backend",
]
