"""Downstream heads for `ehrmotor.evaluate`: one model per task, fitted on a feature matrix.

Each `fit_*` returns a `Head`: `risk(x)` (n,) is higher for an event sooner or a positive label
(binary heads: its probability); `survival(x, days)` is S(days | x) (n, len(days)), None if binary.

- `fit_cox`: Cox model, elastic net that is mostly ridge (`CoxnetSurvivalAnalysis`, l1_ratio
  COX_L1_RATIO), alpha on the path by inner CV on Harrell's C; survival by a Breslow baseline.
- `fit_piecewise_exponential`: the MOTOR head for one task on frozen per-bin features
  (`motor_bin_features`): log-hazard in bin b = w · features_b + alpha_b, by L2-penalised Poisson
  likelihood on (subject, bin) exposures; the penalty by inner CV on held-out likelihood.
- `fit_logistic`: L2 logistic regression, C by inner CV on AUROC.
- `fit_lightgbm_binary`, `fit_lightgbm_survival`: LightGBM, small fixed settings (BOOSTING).

Linear heads mean-impute NaN features and standardise; LightGBM takes NaN as missing. Times are
days, floored at MIN_TIME_DAYS (an event on the prediction day still needs time at risk). A fit the
data cannot support (under 2 events, or 2 of a class) raises `HeadError`. Piecewise heads' `risk`
is the cumulative hazard up to `horizon_days` (default: the last training event time). `groups`
(the rows' subject ids) keeps a subject's rows in one inner fold. Fits are single-threaded and
deterministic given `seed`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from lightgbm import LGBMClassifier, LGBMRegressor
from scipy.optimize import minimize
from sklearn.exceptions import ConvergenceWarning
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sksurv.linear_model import CoxnetSurvivalAnalysis
from sksurv.util import Surv
from threadpoolctl import threadpool_limits

from ehrmotor.evaluate.metrics import auroc, comparable_pairs, concordance

COX_L1_RATIO = 0.1
COX_N_ALPHAS = 8
COX_ALPHA_MIN_RATIO = 0.01
LOGISTIC_C = (0.001, 0.01, 0.1, 1.0)
PE_PENALTIES = (10.0, 1.0, 0.1, 0.01, 0.001)  # strongest first: ties keep the stronger
PE_PRIOR_EVENTS = 0.5  # each bin's rate: a gamma prior of half an event at the pooled rate
INNER_FOLDS = 3
MIN_TIME_DAYS = 0.5
MAX_LOG_HAZARD = 50.0  # exp() overflow guard
BOOSTED_BINS = 8
BOOSTING: dict[str, Any] = {
    "n_estimators": 150, "learning_rate": 0.05, "num_leaves": 15, "min_child_samples": 5,
    "colsample_bytree": 0.8, "reg_lambda": 1.0, "deterministic": True, "force_row_wise": True,
    "n_jobs": 1, "verbose": -1}


class HeadError(ValueError):
    """The training data cannot support this head (too few events, one class)."""


class Head(Protocol):
    def risk(self, x: np.ndarray) -> np.ndarray: ...

    def survival(self, x: np.ndarray, days: np.ndarray) -> np.ndarray | None: ...


@contextmanager
def _fitting() -> Iterator[None]:
    """One BLAS thread (many threads on 2 busy cores run 10-30x slower) and no solver chatter."""
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.filterwarnings("ignore", "all coefficients are zero", UserWarning)
        yield


def _pipeline(model: object) -> Pipeline:
    return Pipeline([("impute", SimpleImputer(keep_empty_features=True)),
                     ("scale", StandardScaler()), ("model", model)])


def _survival_targets(x: np.ndarray, time: np.ndarray,
                      event: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    time = np.maximum(np.asarray(time, dtype=np.float64), MIN_TIME_DAYS)
    event = np.asarray(event, dtype=bool)
    if not len(x) == len(time) == len(event) or np.isnan(time).any():
        raise ValueError(f"x {len(x)}, time {len(time)}, event {len(event)} rows, or nan times")
    if event.sum() < 2:
        raise HeadError(f"fewer than 2 events ({int(event.sum())})")
    return time, event


def _binary_targets(x: np.ndarray, label: np.ndarray) -> np.ndarray:
    label = np.asarray(label, dtype=bool)
    if len(x) != len(label):
        raise ValueError(f"x has {len(x)} rows, label {len(label)}")
    if min(positives := int(label.sum()), len(label) - positives) < 2:
        raise HeadError(f"fewer than 2 of a class ({positives} of {len(label)} positive)")
    return label


def _inner_folds(strata: np.ndarray, seed: int,
                 groups: np.ndarray | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified inner folds, by subject when `groups` is given; none when too small.

    With groups, the folds are bounded by the subjects on each side of `strata` (a subject with
    many label rows counts once), and folds whose training or validation part lacks either side
    are left out: when a draw's events belong to two subjects, a fold would otherwise train
    without any event."""
    if groups is None:
        splits = min(INNER_FOLDS, int(strata.sum()), int((~strata).sum()))
    else:
        splits = min(INNER_FOLDS, len(np.unique(groups[strata])), len(np.unique(groups[~strata])))
    if splits < 2:
        return []
    kind = StratifiedKFold if groups is None else StratifiedGroupKFold
    folds = kind(splits, shuffle=True, random_state=seed).split(np.zeros(len(strata)), strata,
                                                                groups)
    return [(train, val) for train, val in folds
            if all(0 < strata[part].sum() < len(part) for part in (train, val))]


def _cv_best(options: Sequence[Any], folds: list[tuple[np.ndarray, np.ndarray]],
             score: Callable[[Any, np.ndarray, np.ndarray], float]) -> int:
    """Index of the best mean `score(option, train, val)` over folds (skips nan; ties: first)."""
    means = [np.nanmean(scores) if not np.isnan(scores).all() else -np.inf for scores in
             (np.array([score(option, train, val) for train, val in folds]) for option in options)]
    return int(np.argmax(means))


@dataclass(frozen=True)
class CoxHead:
    """Cox model: risk = linear predictor; S(t|x) = exp(-H0(t) · exp(risk)) (Breslow H0)."""

    model: Pipeline
    alpha: float
    baseline_days: np.ndarray  # (m,) distinct training times
    baseline_cumulative_hazard: np.ndarray  # (m,) H0 at those days

    def risk(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.model.predict(x, alpha=self.alpha), dtype=np.float64)

    def survival(self, x: np.ndarray, days: np.ndarray) -> np.ndarray:
        at = np.searchsorted(self.baseline_days, np.asarray(days, np.float64), side="right")
        hazard = np.r_[0.0, self.baseline_cumulative_hazard][at]  # (d,) 0 before the first day
        relative = np.exp(np.minimum(self.risk(x), MAX_LOG_HAZARD))
        return np.exp(-relative[:, None] * hazard[None, :])


def _breslow(risk: np.ndarray, time: np.ndarray,
             event: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Breslow's cumulative baseline hazard: Σ_{t_k <= t} events_k / Σ_{time_i >= t_k} e^risk_i."""
    days, inverse = np.unique(time, return_inverse=True)
    relative = np.bincount(inverse, weights=np.exp(np.minimum(risk, MAX_LOG_HAZARD)))
    at_risk = np.cumsum(relative[::-1])[::-1]
    events = np.bincount(inverse, weights=event, minlength=len(days))
    return days, np.cumsum(events / at_risk)


def fit_cox(x: np.ndarray, time: np.ndarray, event: np.ndarray, *, seed: int,
            groups: np.ndarray | None = None) -> CoxHead:
    """Fit the Cox head on features x (n, f), times (days) and event flags (n,)."""
    time, event = _survival_targets(x, time, event)
    with _fitting():
        path = _pipeline(CoxnetSurvivalAnalysis(
            l1_ratio=COX_L1_RATIO, n_alphas=COX_N_ALPHAS, alpha_min_ratio=COX_ALPHA_MIN_RATIO))
        try:
            path.fit(x, Surv.from_arrays(event, time))
        except ArithmeticError as error:  # coxnet's "weights too large"
            raise HeadError(f"Cox fit failed: {error}") from error
        # The path starts at the smallest alpha with all coefficients zero: a constant score.
        alphas = [float(a) for a in path[-1].alphas_[1:]] or [float(path[-1].alphas_[0])]
        numerator, denominator = np.zeros(len(alphas)), 0.0
        for train, val in _inner_folds(event, seed, groups):
            fold = _pipeline(CoxnetSurvivalAnalysis(l1_ratio=COX_L1_RATIO, alphas=alphas))
            try:
                fold.fit(x[train], Surv.from_arrays(event[train], time[train]))
            except ArithmeticError:  # tiny folds
                continue
            # Folds are pooled by their number of comparable pairs.
            if pairs := comparable_pairs(time[val], event[val]):
                risks = np.stack([fold.predict(x[val], alpha=a) for a in alphas])
                numerator += concordance(time[val], event[val], risks) * pairs
                denominator += pairs
    best = int(np.argmax(numerator)) if denominator else len(alphas) // 2
    days, hazard = _breslow(path.predict(x, alpha=alphas[best]), time, event)
    return CoxHead(path, alphas[best], days, hazard)


@dataclass(frozen=True)
class ClassifierHead:
    """A binary head: risk is the predicted probability of a positive label."""

    model: Any  # a fitted classifier with predict_proba

    def risk(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.model.predict_proba(x)[:, 1], dtype=np.float64)

    def survival(self, x: np.ndarray, days: np.ndarray) -> None:
        return None


def fit_logistic(x: np.ndarray, label: np.ndarray, *, seed: int,
                 groups: np.ndarray | None = None) -> ClassifierHead:
    """Fit the L2 logistic head on features x (n, f) and boolean labels (n,)."""
    label = _binary_targets(x, label)

    def held_out_auroc(c: float, train: np.ndarray, val: np.ndarray) -> float:
        model = _pipeline(LogisticRegression(C=c, max_iter=1000)).fit(x[train], label[train])
        return auroc(label[val], model.decision_function(x[val]))

    with _fitting():
        folds = _inner_folds(label, seed, groups)  # ties: the smaller C
        best = _cv_best(LOGISTIC_C, folds, held_out_auroc) if folds else len(LOGISTIC_C) // 2
        model = _pipeline(LogisticRegression(C=LOGISTIC_C[best], max_iter=1000)).fit(x, label)
    return ClassifierHead(model)


def fit_lightgbm_binary(x: np.ndarray, label: np.ndarray, *, seed: int) -> ClassifierHead:
    """Fit a LightGBM classifier (BOOSTING settings) on features x (n, f), NaN as missing."""
    label = _binary_targets(x, label)
    model = LGBMClassifier(**BOOSTING, random_state=seed)
    with _fitting():
        return ClassifierHead(model.fit(np.asarray(x, dtype=np.float64), label))


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
    time, event = _survival_targets(features, time, event)
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

    with _fitting():
        folds = _inner_folds(event, seed, groups)
        best = _cv_best(PE_PENALTIES, folds, held_out_likelihood) if folds else 1
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
    time, event = _survival_targets(x, time, event)
    quantiles = np.quantile(time[event], np.linspace(0, 1, BOOSTED_BINS + 1)[1:-1])
    edges = np.r_[0.0, np.unique(quantiles[quantiles > 0])]
    exposure, events = _bin_exposure(time, event, edges)
    log_base_rate = float(np.log(events.sum() / exposure.sum()))
    keep = exposure.ravel() > 0
    model = LGBMRegressor(objective="poisson", **BOOSTING, random_state=seed)
    with _fitting():
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
