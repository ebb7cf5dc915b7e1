"""Piecewise-exponential heads for `ehrmotor.evaluate`: a hazard constant within time bins.

- `fit_piecewise_exponential`: the MOTOR head for one task on frozen per-bin features
  (`motor_bin_features`): log-hazard in bin b = w · features_b + alpha_b, by Poisson likelihood
  on (subject, bin) exposures with an elastic-net penalty on w (mostly L2, PE_L1_RATIO of L1;
  demographic features appended to every bin left unpenalised); the penalty on a path from the
  strongest that leaves one penalised feature in, by the best mean held-out
  likelihood of inner grouped folds (`ehrmotor.evaluate.penalties`).
- `PiecewiseHazard`: what every piecewise head shares (the LightGBM survival head of
  `ehrmotor.evaluate.boosted` too): `risk` is the cumulative hazard up to `risk_days` (default:
  the last training event time); `survival` is exact from the bin hazards.

Shared conventions (targets, `HeadError`, single-threaded fits) are those of
`ehrmotor.evaluate.heads`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ehrmotor.evaluate.heads import MAX_LOG_HAZARD, single_threaded, survival_targets
from ehrmotor.evaluate.penalties import (
    best_choice,
    elastic_net,
    fold_scores,
    inner_folds,
    path_from,
    penalty_factors,
    unpenalised_start,
)

PE_L1_RATIO = 0.1  # the penalty is mostly L2, with a little L1 so that the path starts sparse
PE_N_PENALTIES = 12
PE_PATH_START = 0.9  # the strongest penalty, as a share of the one with every weight 0
PE_PENALTY_SPAN = 1000.0  # the weakest penalty, as a share of the strongest
PE_PRIOR_EVENTS = 0.5  # each bin's rate: a gamma prior of half an event at the pooled rate


def bin_exposure(time: np.ndarray, event: np.ndarray,
                  edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Days at risk and events per (subject, bin), both (n, bins), as
    the MOTOR head's bins (`ehrmotor.model.head`): bin b covers (edges_b, edges_b+1], the last
    is unbounded."""
    width = np.r_[np.diff(edges), np.inf]
    exposure = np.clip(time[:, None] - edges[None, :], 0.0, width[None, :])
    event_bin = np.maximum(np.searchsorted(edges, time, side="left") - 1, 0)
    events = (np.arange(len(edges))[None, :] == event_bin[:, None]) & event[:, None]
    return exposure, events.astype(np.float64)


class PiecewiseHazard:
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
class PiecewiseExponentialHead(PiecewiseHazard):
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
                       events: np.ndarray, prior_exposure: float) -> tuple[float, np.ndarray]:
    """Poisson negative log-likelihood per subject with the rate prior, and its gradient, in
    params = (w (f,), alpha (bins,))."""
    weights, alpha = params[:phi.shape[2]], params[phi.shape[2]:]
    eta = np.minimum(phi @ weights + alpha, MAX_LOG_HAZARD)  # (n, bins)
    expected = exposure * np.exp(eta)
    prior = prior_exposure * np.exp(np.minimum(alpha, MAX_LOG_HAZARD))
    n = len(phi)
    loss = ((expected - events * eta).sum() + (prior - PE_PRIOR_EVENTS * alpha).sum()) / n
    residual = expected - events
    grad_w = np.einsum("nb,nbf->f", residual, phi) / n
    grad_alpha = (residual.sum(axis=0) + prior - PE_PRIOR_EVENTS) / n
    return float(loss), np.r_[grad_w, grad_alpha]


def _fit_poisson(phi: np.ndarray, exposure: np.ndarray, events: np.ndarray, penalty: float,
                 prior_exposure: float, factors: np.ndarray,
                 start: np.ndarray | None = None) -> np.ndarray:
    """(w (f,), alpha (bins,)) under the elastic-net penalty on w (`factors` (f,): 0 leaves a
    feature unpenalised), from `start` (the previous penalty's fit) or from w = 0 and each bin's
    smoothed events / exposure."""
    if start is None:
        start_rates = (events.sum(0) + PE_PRIOR_EVENTS) / (exposure.sum(0) + prior_exposure)
        start = np.r_[np.zeros(phi.shape[2]), np.log(start_rates)]
    return elastic_net(lambda params: _poisson_objective(params, phi, exposure, events,
                                                         prior_exposure),
                       start, np.r_[factors, np.zeros(phi.shape[1])], penalty, PE_L1_RATIO)


def _penalty_path(phi: np.ndarray, exposure: np.ndarray, events: np.ndarray,
                  prior_exposure: float, factors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(PE_N_PENALTIES penalties strongest first, the fit with every penalised weight 0): from
    just below the penalty at which every penalised weight is 0 (`penalties.path_from`) down by
    PE_PENALTY_SPAN."""
    free = factors == 0
    null = _fit_poisson(phi[:, :, free], exposure, events, 0.0, prior_exposure,
                        factors[free])
    start = unpenalised_start(factors, null)
    eta = np.minimum(phi @ start[:len(factors)] + start[len(factors):], MAX_LOG_HAZARD)
    residual = exposure * np.exp(eta) - events
    gradient = np.einsum("nb,nbf->f", residual, phi[:, :, ~free]) / len(phi)
    return path_from(gradient, PE_L1_RATIO, PE_PATH_START, PE_PENALTY_SPAN,
                     PE_N_PENALTIES, adjusted=bool(free.any())), start


def _held_out_likelihood(phi: np.ndarray, exposure: np.ndarray, events: np.ndarray,
                         penalties: np.ndarray, prior_exposure: float, factors: np.ndarray,
                         train: np.ndarray, val: np.ndarray) -> np.ndarray:
    """Poisson log-likelihood per validation subject of each penalty, fitted along the path
    (warm starts) on the training rows."""
    f, params, scores = phi.shape[2], None, []
    for penalty in penalties:
        params = _fit_poisson(phi[train], exposure[train], events[train], float(penalty),
                              prior_exposure, factors, params)
        eta = np.minimum(phi[val] @ params[:f] + params[f:], MAX_LOG_HAZARD)
        scores.append(float((events[val] * eta - exposure[val] * np.exp(eta)).sum()) / len(val))
    return np.array(scores)


def calibrate_linear(linear: np.ndarray, time: np.ndarray, event: np.ndarray,
                     edges: np.ndarray) -> tuple[float, np.ndarray]:
    """(scale, log_rates (bins,)) of the unpenalised fit log-hazard in bin b = scale · linear +
    log_rates_b, for a linear predictor (n,) that its penalty shrank (time in days, bins from
    `edges`, the same rate prior as the MOTOR head)."""
    exposure, events = bin_exposure(time, event, edges)
    phi = np.repeat(np.asarray(linear, dtype=np.float64)[:, None, None], len(edges), axis=1)
    prior_exposure = PE_PRIOR_EVENTS * exposure.sum() / max(events.sum(), 1.0)
    params = _fit_poisson(phi, exposure, events, 0.0, prior_exposure, np.zeros(1))
    return float(params[0]), params[1:]


def fit_piecewise_exponential(bin_features: np.ndarray, time: np.ndarray, event: np.ndarray,
                              bin_edges_days: Any, *, seed: int,
                              horizon_days: float | None = None,
                              groups: np.ndarray | None = None,
                              unpenalised: int = 0) -> PiecewiseExponentialHead:
    """Fit the MOTOR head of one task on frozen per-bin features (n, bins, f) (see
    `motor_bin_features`), bins starting at `bin_edges_days`; the penalty on its path by the
    best mean held-out likelihood of inner grouped folds. The last
    `unpenalised` features (the demographics, the same in every bin) are not penalised."""
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
    exposure, events = bin_exposure(time, event, edges)
    prior_exposure = PE_PRIOR_EVENTS * exposure.sum() / events.sum()  # at the pooled rate
    f = phi.shape[2]
    factors = penalty_factors(f, unpenalised)
    with single_threaded():
        penalties, params = _penalty_path(phi, exposure, events, prior_exposure, factors)
        scores = fold_scores(inner_folds(event, seed, groups), len(penalties),
                             lambda train, val: _held_out_likelihood(
                                 phi, exposure, events, penalties, prior_exposure, factors,
                                 train, val))
        best = best_choice(scores, default=0)
        for penalty in penalties[:best + 1]:  # warm starts along the path, as in the folds
            params = _fit_poisson(phi, exposure, events, float(penalty), prior_exposure, factors,
                                  params)
    risk_days = float(horizon_days) if horizon_days is not None else float(time[event].max())
    return PiecewiseExponentialHead(edges, mean, scale, params[:f], params[f:],
                                    float(penalties[best]), risk_days)


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
