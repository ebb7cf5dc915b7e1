"""The feature sets the protocol's heads are fitted on, one row per prediction point.

Points are the distinct (subject_id, prediction_time) of every task's labels, sorted, so that
each representation is computed once whatever the number of tasks:

- `motor` (n, hidden): the model's representations (`ehrmotor.representations.bundle_features`,
  one call);
- `motor_bins` (n, bins, f): the pretrained MOTOR head's per-bin features of those
  (`piecewise.motor_bin_features`), for the piecewise-exponential head on the MOTOR time bins;
- `counts` (n, features): ontology-expanded counts over all time and the last year, last lab
  values and age (`ehrmotor.evaluate.counts`), the `max_features` most frequent in the training
  pool;
- `demographics` (n, 1 + sexes): age at the prediction time and a one-hot sex where the data
  has a sex or gender code family (`ehrmotor.evaluate.demographics`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from ehrmotor.evaluate.counts import count_features, feature_matrix, select_features
from ehrmotor.evaluate.demographics import demographic_features
from ehrmotor.evaluate.piecewise import motor_bin_features

if TYPE_CHECKING:
    from ehrmotor.bundle import Bundle

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeatureSets:
    """The feature matrices (rows in `points` order) and the MOTOR time bins."""

    points: pl.DataFrame  # subject_id, prediction_time
    matrices: dict[str, np.ndarray]  # "motor", "motor_bins", "counts", "demographics"
    bin_edges_days: list[float]


def motor_features(meds_dir: Path, bundle: Bundle, points: pl.DataFrame,
                   tokens_per_batch: int | None) -> np.ndarray:
    """MOTOR representations (n, hidden) at `points`, rows in `points` order."""
    from ehrmotor.representations import bundle_features  # imports torch and the model

    result = bundle_features(meds_dir, bundle, points, tokens_per_batch=tokens_per_batch)
    times = np.asarray(result["feature_times"], dtype="datetime64[us]")
    if not (np.array_equal(result["subject_ids"], points["subject_id"].to_numpy())
            and np.array_equal(times, points["prediction_time"].to_numpy())):
        raise RuntimeError("compute_features returned rows out of (subject_id, prediction_time) "
                           "order")
    return np.asarray(result["features"], dtype=np.float64)


def build_features(meds_dir: Path, bundle: Bundle, points: pl.DataFrame,
                   pool_rows: np.ndarray, *, tokens_per_batch: int | None,
                   max_features: int) -> FeatureSets:
    """The feature sets at `points` (subject_id, prediction_time; unique and sorted); the count
    features kept are chosen on `pool_rows` (training-pool points), never on the test set."""
    motor = motor_features(meds_dir, bundle, points, tokens_per_batch)
    bins = motor_bin_features(bundle.model.head, motor).astype(np.float64)
    long = count_features(meds_dir, points, bundle.ontology)
    names = select_features(long, pool_rows, max_features)
    counts = feature_matrix(long, names, points.height)
    demographics, _ = demographic_features(meds_dir, points)
    log.info("evaluate: %d points; MOTOR %d features (head bins %s), counts %d features",
             points.height, motor.shape[1], "×".join(map(str, bins.shape[1:])), counts.shape[1])
    return FeatureSets(points, {"motor": motor, "motor_bins": bins, "counts": counts,
                                "demographics": demographics},
                       list(bundle.config.bin_edges_days))
