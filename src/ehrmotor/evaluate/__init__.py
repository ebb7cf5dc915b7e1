"""`ehrmotor evaluate`: MOTOR embeddings against count features on downstream tasks.

`tasks` picks the evaluation subjects and turns label sets into tasks, `landmarks` makes
time-to-event labels of outcomes at several prediction times per subject; `features` builds the
MOTOR and count (`counts`) feature sets; `protocol` draws the k-shot training sets and fits the
heads (`heads`, `piecewise`, `boosted`; penalties chosen by `penalties`), `scoring` scores them
(`metrics`) with subject-bootstrap intervals; `run` is the stage, `report` writes its files and
`commands` holds the `label` and `evaluate` commands.

The names below are imported on first use, so that the command line (which imports `commands`)
starts without torch, LightGBM and scikit-survival.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ehrmotor.evaluate.landmarks import LandmarkSettings, landmark_label_sets
    from ehrmotor.evaluate.run import EvaluationResult, Oracle, ProtocolSettings, evaluate
    from ehrmotor.evaluate.scoring import RESULT_SCHEMA

_HOMES = {"LandmarkSettings": "landmarks", "landmark_label_sets": "landmarks",
          "EvaluationResult": "run", "Oracle": "run", "ProtocolSettings": "run",
          "evaluate": "run", "RESULT_SCHEMA": "scoring"}

__all__ = ["RESULT_SCHEMA", "EvaluationResult", "LandmarkSettings", "Oracle", "ProtocolSettings",
           "evaluate", "landmark_label_sets"]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'ehrmotor.evaluate' has no attribute {name!r}")
    return getattr(importlib.import_module(f"ehrmotor.evaluate.{_HOMES[name]}"), name)
