"""Piecewise-exponential heads for `ehrmotor.evaluate`: a hazard constant within time bins.

- `fit_piecewise_exponential`: the MOTOR head for one task on frozen per-bin features
  (`motor_bin_features`): log-hazard in bin b = w · features_b + alpha_b, by L2-penalised Poisson
  likelihood on (subject, bin) exposures; the penalty by inner CV on held-out likelihood.
- `fit_lightgbm_survival`: gradient-boosted trees on (subject, bin) rows, Poisson objective with
  log-exposure offsets, over BOOSTED_BINS bins at quantiles of the training event times.

Both heads' `risk` is the cumulative hazard up to `horizon_days` (default: the last training
event time); `survival` is exact from the bin hazards. Shared conventions (targets, inner folds,
`HeadError`, single-threaded fits) are those of `ehrmotor.evaluate.heads`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from lightgbm import LGBMRegressor
from scipy.optimize import minimize

from ehrmotor.evaluate.heads import (
    BOOSTING,
    MAX_LOG_HAZARD,
    cv_best,
    inner_folds,
    single_threaded,
    survival_targets,
)

PE_PENALTIES = (10.0, 1.0, 0.1, 0.01, 0.001)  # strongest first: ties keep the stronger
PE_PRIOR_EVENTS = 0.5  # each bin's rate: a gamma prior of half an event at the pooled rate
BOOSTED_BINS = 8

def _bin_exposure(time: np.ndarray, event: np.ndarray,
                  edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Days at risk and events per (subject, bin), both (n, bins), as
    `ehrmotor.model.head.bin_labels`: bin b covers (edges_b, edges_b+1], the last is unbounded."""
    width = np.r_[np.diff(edges), np.inf]
    exposure = np.clip(time[:, None] - edges[None, :], 0.0, width[None, :])
    event_bin = np.maximum(np.searchsorted(edges, time, side="left") - 1, 0)
    events = (np.arange(len(edges))[None, :] == event_bin[:, None]) & event[:, None]
    return exposure, events.astype(np.float64)


class _PiecewiseHazard:
    """A hazard constant within bins from `edges` (days); subclasses give `log_hazard` (n, bins)."""

    edges: np.ndarray
    risk_days: float

    def log_hazard(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def cumulative_hazard(self, x: np.ndarray, days: np.ndarray) -> np.ndarray:
        """H(days | x) (n, len(days)) = Σ_b hazard_b · days spent in bin b by then."""
        width = np.r_[np.diff(self.edges), np.inf]
        days = np.asarray(days, dtype=np.float64)
        in_bin = np.clip(days[None, :] - self.edges[:, None], 0.0, width[:, None])  # (bins, d)
        return np.exp(np.minimum(self.log_hazard(x), MAX_LOG_HAZARD)) @ in_bin

    def risk(self, x: np.ndarray) -> np.ndarray:
        return self.cumulative_hazard(x, np.array([self.risk_days]))[:, 0]

    def survival(self, x: np.ndarray, days: np.ndarray) -> np.ndarray:
        return np.exp(-self.cumulative_hazard(x, days))


@dataclass(frozen=True)
class PiecewiseExponentialHead(_PiecewiseHazard):
    """log-hazard per day in bin b = w · standardised(bin_features_b) + log_rates_b.

    x passed to `risk`/`survival` is bin_features (n, bins, f); risk = H(risk_days | x).
    """

    edges: np.ndarray  # (bins,) days
    mean: np.ndarray  # (f,) of the training features
    scale: np.ndarray  # (f,)
    weights: np.ndarray  # (f,)
    log_rates: np.ndarray  # (bins,)
    penalty: float
    risk_days: float

    def log_hazard(self, x: np.ndarray) -> np.ndarray:
        if np.shape(x)[1:] != (len(self.edges), len(self.mean)):
            raise ValueError(f"bin_features {np.shape(x)} must be (n, {len(self.edges)}, "
                             f"{len(self.mean)})")
        return _standardise(x, self.mean, self.scale) @ self.weights + self.log_rates


def _standardise(features: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(features - mean) / scale, a missing (NaN) feature at 0: mean imputation."""
    return np.nan_to_num((np.asarray(features, dtype=np.float64) - mean) / scale, nan=0.0)


def _poisson_objective(params: np.ndarray, phi: np.ndarray, exposure: np.ndarray,
                       events: np.ndarray, penalty: float,
                       prior_exposure: float) -> tuple[float, np.ndarray]:
    """Poisson negative log-likelihood per subject with the rate prior and the L2 penalty, and
    its gradient in params = (w (f,), alpha (bins,))."""
    weights, alpha = params[:phi.shape[2]], params[phi.shape[2]:]
    eta = np.minimum(phi @ weights + alpha, MAX_LOG_HAZARD)  # (n, bins)
    expected = exposure * np.exp(eta)
    prior = prior_exposure * np.exp(np.minimum(alpha, MAX_LOG_HAZARD))
    n = len(phi)
    loss = ((expected - events * eta).sum() + (prior - PE_PRIOR_EVENTS * alpha).sum()) / n
    residual = expected - events
    grad_w = np.einsum("nb,nbf->f", residual, phi) / n + penalty * weights
    grad_alpha = (residual.sum(axis=0) + prior - PE_PRIOR_EVENTS) / n
    return loss + 0.5 * penalty * float(weights @ weights), np.r_[grad_w, grad_alpha]


def _fit_poisson(phi: np.ndarray, exposure: np.ndarray, events: np.ndarray,
                 penalty: float, prior_exposure: float) -> np.ndarray:
    """L-BFGS from w = 0 and each bin's smoothed events / exposure."""
    start_rates = (events.sum(0) + PE_PRIOR_EVENTS) / (exposure.sum(0) + prior_exposure)
    start = np.r_[np.zeros(phi.shape[2]), np.log(start_rates)]
    result = minimize(_poisson_objective, start, jac=True, method="L-BFGS-B",
                      args=(phi, exposure, events, penalty, prior_exposure),
                      options={"maxiter": 500})
    return np.asarray(result.x)


def fit_piecewise_exponential(bin_features: np.ndarray, time: np.ndarray, event: np.ndarray,
                              bin_edges_days: Any, *, seed: int,
                              horizon_days: float | None = None,
                              groups: np.ndarray | None = None) -> PiecewiseExponentialHead:
    """Fit the MOTOR head of one task on frozen per-bin features (n, bins, f) (see
    `motor_bin_features`), bins starting at `bin_edges_days`; penalty by inner-CV likelihood."""
    features = np.asarray(bin_features, dtype=np.float64)
    edges = np.asarray(bin_edges_days, dtype=np.float64)
    if features.ndim != 3 or edges.shape != (features.shape[1],) or edges[0] != 0 \
            or np.any(np.diff(edges) <= 0):
        raise ValueError(f"need bin_features (n, bins, f) and bins increasing edges from 0; "
                         f"got {features.shape} and {edges}")
    time, event = survival_targets(features, time, event)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN feature columns
        mean = np.nan_to_num(np.nanmean(features, axis=(0, 1)))
        scale = np.nanstd(features, axis=(0, 1))
    scale = np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)
    phi = _standardise(features, mean, scale)
    exposure, events = _bin_exposure(time, event, edges)
    prior_exposure = PE_PRIOR_EVENTS * exposure.sum() / events.sum()  # at the pooled rate
    f = phi.shape[2]

    def held_out_likelihood(penalty: float, train: np.ndarray, val: np.ndarray) -> float:
        params = _fit_poisson(phi[train], exposure[train], events[train], penalty, prior_exposure)
        eta = np.minimum(phi[val] @ params[:f] + params[f:], MAX_LOG_HAZARD)
        return float((events[val] * eta - exposure[val] * np.exp(eta)).sum())

    with single_threaded():
        folds = inner_folds(event, seed, groups)
        best = cv_best(PE_PENALTIES, folds, held_out_likelihood) if folds else 1
        penalty = PE_PENALTIES[best]
        params = _fit_poisson(phi, exposure, events, penalty, prior_exposure)
    risk_days = float(horizon_days) if horizon_days is not None else float(time[event].max())
    return PiecewiseExponentialHead(edges, mean, scale, params[:f], params[f:], penalty,
                                    risk_days)


@dataclass(frozen=True)
class BoostedSurvivalHead(_PiecewiseHazard):
    """LightGBM Poisson model of the log-hazard per day from (features, bin index)."""

    model: LGBMRegressor
    edges: np.ndarray  # (bins,) days
    log_base_rate: float  # added to the trees' output (their offset in training)
    risk_days: float

    def log_hazard(self, x: np.ndarray) -> np.ndarray:
        raw = np.asarray(self.model.predict(_bin_rows(x, len(self.edges)), raw_score=True))
        return raw.reshape(len(x), len(self.edges)) + self.log_base_rate


def _bin_rows(x: np.ndarray, bins: int) -> np.ndarray:
    """(n · bins, f + 1): each row of x once per bin, with the bin index as the last feature."""
    return np.column_stack([np.repeat(np.asarray(x, dtype=np.float64), bins, axis=0),
                            np.tile(np.arange(bins, dtype=np.float64), len(x))])


def fit_lightgbm_survival(x: np.ndarray, time: np.ndarray, event: np.ndarray, *, seed: int,
                          horizon_days: float | None = None) -> BoostedSurvivalHead:
    """Fit gradient-boosted trees for time to event on features x (n, f), NaN as missing: bins
    start at 0 and at quantiles of the training event times (BOOSTED_BINS at most); each (subject,
    bin) with time at risk is a Poisson row: label = event in the bin, offset (init score) =
    log(days at risk) + log(pooled rate), features = x and the bin index."""
    time, event = survival_targets(x, time, event)
    quantiles = np.quantile(time[event], np.linspace(0, 1, BOOSTED_BINS + 1)[1:-1])
    edges = np.r_[0.0, np.unique(quantiles[quantiles > 0])]
    exposure, events = _bin_exposure(time, event, edges)
    log_base_rate = float(np.log(events.sum() / exposure.sum()))
    keep = exposure.ravel() > 0
    model = LGBMRegressor(objective="poisson", **BOOSTING, random_state=seed)
    with single_threaded():
        model.fit(_bin_rows(x, len(edges))[keep], events.ravel()[keep],
                  init_score=np.log(exposure.ravel()[keep]) + log_base_rate)
    risk_days = float(horizon_days) if horizon_days is not None else float(time[event].max())
    return BoostedSurvivalHead(model, edges, log_base_rate, risk_days)


def motor_bin_features(head: torch.nn.Module, embeddings: np.ndarray) -> np.ndarray:
    """The per-bin features (n, bins, f) float32 that the pretrained MOTOR head (an
    `ehrmotor.model.head.MotorHead`) projects onto its tasks, of embeddings (n, hidden)."""
    motor: Any = head
    bins, final, projection, norm = motor.num_bins, motor.final_layer_size, motor.bins, motor.norm
    with torch.no_grad():
        representations = torch.as_tensor(np.asarray(embeddings), dtype=torch.float32)
        per_bin = torch.nn.functional.linear(representations.to(projection.weight.device),
                                             projection.weight.float()).view(-1, bins, final)
        normed = torch.nn.functional.rms_norm(per_bin, (final,), norm.weight.float(), norm.eps)
    return normed.cpu().numpy()
