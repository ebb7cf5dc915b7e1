"""Adapting a pretrained bundle to one task: `finetune` (training), `predict` (predictions),
`load_task_bundle` (a fine-tuned bundle). The task models live in `ehrmotor.model.task_models`.
"""

from ehrmotor.finetune.bundle import load_task_bundle
from ehrmotor.finetune.predict import predict
from ehrmotor.finetune.run import finetune
from ehrmotor.finetune.settings import FinetuneConfig

__all__ = ["FinetuneConfig", "finetune", "load_task_bundle", "predict"]
