"""`ehrmotor predict`: a fine-tuned bundle's predictions at label times, as parquet.

Representations come from `ehrmotor.representations.bundle_features` (the one featurization path, so
they equal `compute_features` of the same encoder weights); the task head turns them into
predictions. One row per label, sorted by subject_id and prediction_time, in the meds-evaluation
`PredictionSchema` (the MEDS label schema plus two prediction columns):

    subject_id int64, prediction_time timestamp[us],
    boolean_value bool            the label when LABELS holds one (else null); time-to-event:
                                  "event within the first horizon", null when censored before it
    predicted_boolean_probability float32   binary: P(label); time-to-event: 1 - S(first horizon)
    predicted_boolean_value bool  the probability >= 0.5

Time-to-event models add, for each horizon H (days after prediction_time, `horizons_days`,
default DEFAULT_HORIZONS_DAYS):

    survival_<H>d float32         S(H) = exp(-Σ_b λ_b · days at risk in bin b before H)
    risk float64                  cumulative hazard at the first horizon (higher = sooner)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from ehrmotor.artifacts import atomic_path, check_output
from ehrmotor.errors import InputError
from ehrmotor.finetune.bundle import load_task_bundle
from ehrmotor.meds.labels import read_label_set, read_prediction_times, time_to_event_days
from ehrmotor.model.head import time_at_risk
from ehrmotor.model.task_models import BINARY, recorded_task
from ehrmotor.representations import bundle_features

log = logging.getLogger(__name__)
DEFAULT_HORIZONS_DAYS = (365.0,)


def _labels(path: Path) -> pl.DataFrame:
    """subject_id, prediction_time and, when the file holds labels, `truth` (time-to-event:
    time_days and event too)."""
    try:
        label_set = read_label_set(path)
    except InputError:
        return read_prediction_times(path)  # prediction times alone: no truth to copy
    frame = label_set.frame
    if label_set.kind == "time_to_event":
        return time_to_event_days(frame).select("subject_id", "prediction_time", "time_days",
                                                "event")
    if label_set.kind == "boolean":
        return frame.select("subject_id", "prediction_time", truth="boolean_value")
    return frame.select("subject_id", "prediction_time")


def survival(log_hazards: torch.Tensor, edges: Sequence[float],
             horizons_days: Sequence[float]) -> np.ndarray:
    """S(H) (n, horizons) of log-hazards per day (n, bins) over bins starting at `edges`."""
    edge = torch.tensor(list(edges), dtype=torch.float64)
    horizon = torch.tensor(list(horizons_days), dtype=torch.float64)
    exposure = time_at_risk(horizon, edge)  # (horizons, bins)
    cumulative = torch.exp(log_hazards.double()) @ exposure.T  # (n, horizons)
    return torch.exp(-cumulative).numpy()


def predictions(model: Any, features: np.ndarray, frame: pl.DataFrame,
                horizons_days: Sequence[float]) -> pl.DataFrame:
    """The prediction table (module docstring) of representations `features` (n, hidden) at
    the labels of `frame` (same order)."""
    task = recorded_task(model.config)
    with torch.no_grad():
        scores = model.head(torch.from_numpy(features).to(next(model.parameters()).dtype))
    keys = frame.select("subject_id", "prediction_time")
    if task is not None and task.kind == BINARY:
        probability = torch.sigmoid(scores.double()).numpy()
        truth = frame["truth"] if "truth" in frame.columns else pl.lit(None, pl.Boolean)
        out = keys.with_columns(boolean_value=truth)
    else:
        surv = survival(scores, model.config.bin_edges_days, horizons_days)
        probability = 1.0 - surv[:, 0]
        first = horizons_days[0]
        truth = pl.lit(None, pl.Boolean)
        if "event" in frame.columns:
            within = pl.col("event") & (pl.col("time_days") <= first)
            truth = pl.when(within | (pl.col("time_days") >= first)).then(within)
        out = keys.with_columns(boolean_value=frame.select(truth.alias("t"))["t"])
        out = out.with_columns(
            [pl.Series(f"survival_{h:g}d", surv[:, i].astype(np.float32))
             for i, h in enumerate(horizons_days)]
            + [pl.Series("risk", -np.log(np.clip(surv[:, 0], 1e-300, None)))])
    return out.with_columns(
        predicted_boolean_probability=pl.Series(probability.astype(np.float32)),
        predicted_boolean_value=pl.Series(probability >= 0.5),
    ).cast({"boolean_value": pl.Boolean})


def predict(model_path: str | Path, meds: str | Path, labels: str | Path, out: str | Path,
            horizons_days: Sequence[float] = DEFAULT_HORIZONS_DAYS, num_proc: int = 1,
            tokens_per_batch: int | None = None, device: str | None = None) -> Path:
    """Write the predictions of the fine-tuned bundle at `model_path` for the labels to `out`
    (parquet, atomically); return its path."""
    out = Path(out)
    check_output(out, "file")
    if not horizons_days or any(not h > 0 for h in horizons_days):
        raise InputError(f"predict: horizons must be positive days; got {list(horizons_days)}")
    bundle = load_task_bundle(model_path)
    frame = _labels(Path(labels)).sort("subject_id", "prediction_time", maintain_order=True)
    result = bundle_features(meds, bundle, frame.select("subject_id", "prediction_time"),
                             num_proc=num_proc, tokens_per_batch=tokens_per_batch, device=device)
    table = predictions(bundle.model.cpu(), result["features"], frame, horizons_days)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        table.write_parquet(tmp)
    log.info("predict: %d predictions to %s", table.height, out)
    return out
