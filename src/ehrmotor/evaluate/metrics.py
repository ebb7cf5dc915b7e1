"""Metrics for `ehrmotor.evaluate`: Harrell's C, AUROC and bootstrap resamples.

Harrell's C (`concordance`) counts pairs as scikit-survival does and takes subject weights, so that
a bootstrap resample (`bootstrap_weights`) is a weight vector; AUROC (`auroc`) wraps scikit-learn.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import roc_auc_score

PAIR_CHUNK = 4_000_000  # pairwise comparisons held in memory at once by `concordance`
TIED_RISK = 1e-8  # risk scores closer than this count as tied (as in scikit-survival)


def concordance(time: np.ndarray, event: np.ndarray, risk: np.ndarray,
                weights: np.ndarray | None = None) -> np.ndarray:
    """Harrell's C of each row of `risk` (R, n) (or of a 1-d `risk`); nan without pairs.

    Pairs as in `sksurv.metrics.concordance_index_censored`: an event i is comparable with j when
    time_j > time_i, or time_j == time_i and j is censored; tied risks count one half. `weights`
    (n,) are subject multiplicities (a bootstrap resample): a pair counts weight_i * weight_j.
    """
    risk = np.atleast_2d(np.asarray(risk, dtype=np.float64))
    time = np.asarray(time, dtype=np.float64)
    event = np.asarray(event, dtype=bool)
    weight = np.ones(len(time)) if weights is None else np.asarray(weights, dtype=np.float64)
    numerator = np.zeros(risk.shape[0])
    denominator = 0.0
    events = np.flatnonzero(event & (weight > 0))
    chunk = max(1, PAIR_CHUNK // max(1, len(time) * risk.shape[0]))
    for start in range(0, len(events), chunk):
        i = events[start:start + chunk]
        later = time[None, :] > time[i, None]
        tied_censored = (time[None, :] == time[i, None]) & ~event[None, :]
        pair_weight = (later | tied_censored) * weight[i, None] * weight[None, :]  # (c, n)
        diff = risk[:, i, None] - risk[:, None, :]  # (R, c, n)
        score = np.where(np.abs(diff) <= TIED_RISK, 0.5, (diff > 0).astype(np.float64))
        numerator += (score * pair_weight).sum(axis=(1, 2))
        denominator += float(pair_weight.sum())
    if denominator == 0:
        return np.full(risk.shape[0], np.nan)
    return numerator / denominator


def comparable_pairs(time: np.ndarray, event: np.ndarray) -> float:
    """Number of pairs Harrell's C compares (see `concordance`)."""
    later = time[None, :] > time[event, None]
    tied = (time[None, :] == time[event, None]) & ~event[None, :]
    return float((later | tied).sum())


def auroc(label: np.ndarray, risk: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """AUROC (`roc_auc_score`) of each row of `risk` (R, n); nan when one class is missing."""
    risk = np.atleast_2d(risk)
    keep = np.ones(len(label), dtype=bool) if weights is None else np.asarray(weights) > 0
    if len(np.unique(np.asarray(label)[keep])) < 2:
        return np.full(risk.shape[0], np.nan)
    w = None if weights is None else np.asarray(weights)[keep]
    return np.array([roc_auc_score(label[keep], r[keep], sample_weight=w) for r in risk])


def bootstrap_weights(n: int, resamples: int, seed: Sequence[int]) -> np.ndarray:
    """(resamples, n) multiplicities of n subjects in percentile-bootstrap resamples."""
    draws = np.random.default_rng(list(seed)).integers(0, n, (resamples, n))
    weights = np.zeros((resamples, n))
    np.add.at(weights, (np.repeat(np.arange(resamples), n), draws.ravel()), 1.0)
    return weights
