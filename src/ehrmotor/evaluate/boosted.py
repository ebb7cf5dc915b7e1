"""LightGBM heads for `ehrmotor.evaluate`, boosted from the penalised linear fit.

Small trees (BOOSTING: 7 leaves, at least 20 rows in a leaf, L2 10) whose starting score
(LightGBM's init_score) is the penalised linear model's prediction: the Cox linear predictor
(`heads.fit_cox`) for time to event, the logistic log-odds (`heads.fit_logistic`) for binary
labels. The number of rounds, 0 (the linear model itself) to MAX_ROUNDS, is chosen by the
best mean, fewest rounds on a tie, of the held-out loss of inner subject-grouped folds
(`ehrmotor.evaluate.penalties`), the linear model refitted at its chosen penalty on each fold's
training part. At small k, where trees only overfit, the head stays the linear one.

- `fit_lightgbm_survival`: one Poisson row per (subject, bin) with time at risk, over
  BOOSTED_BINS bins at quantiles of the training event times: label = event in the bin, offset =
  log(days at risk) + the linear predictor and each bin's baseline, refitted without penalty
  (`piecewise.calibrate_linear`: the penalty shrank the predictor), features = x and the bin
  index. Its
  `risk` and `survival` are those of every piecewise head (`piecewise.PiecewiseHazard`).
- `fit_lightgbm_binary`: binary log loss from the logistic log-odds, recalibrated without penalty
  (intercept and scale).

Trees take NaN as missing; fits are single-threaded and deterministic given `seed`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from lightgbm import LGBMClassifier, LGBMModel, LGBMRegressor, record_evaluation
from sklearn.linear_model import LogisticRegression

from ehrmotor.evaluate.heads import (
    MAX_LOG_HAZARD,
    UNPENALISED_C,
    ClassifierHead,
    CoxHead,
    HeadError,
    LogisticModel,
    binary_targets,
    fit_cox,
    fit_logistic,
    refit_cox,
    refit_logistic,
    single_threaded,
    survival_targets,
)
from ehrmotor.evaluate.penalties import best_choice, fold_scores, inner_folds
from ehrmotor.evaluate.piecewise import PiecewiseHazard, bin_exposure, calibrate_linear

BOOSTING: dict[str, Any] = {
    "learning_rate": 0.05, "num_leaves": 7, "min_child_samples": 20, "reg_lambda": 10.0,
    "colsample_bytree": 0.8, "deterministic": True, "force_row_wise": True, "n_jobs": 1,
    "verbose": -1}
MAX_ROUNDS = 200
BOOSTED_BINS = 8
# A fold's boosting data: (x, label, init score) of its training part, then of its validation part.
FoldData = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _poisson_loss(label: np.ndarray, raw: np.ndarray) -> float:
    """LightGBM's `poisson` metric: mean of exp(raw) - label · raw."""
    return float(np.mean(np.exp(np.minimum(raw, MAX_LOG_HAZARD)) - label * raw))


def _log_loss(label: np.ndarray, raw: np.ndarray) -> float:
    """LightGBM's `binary_logloss` metric of log-odds `raw`."""
    probability = np.clip(1 / (1 + np.exp(-raw)), 1e-15, 1 - 1e-15)
    return float(-np.mean(label * np.log(probability) + (1 - label) * np.log(1 - probability)))


def _rounds(folds: list[tuple[np.ndarray, np.ndarray]],
            fold_data: Callable[[np.ndarray, np.ndarray], FoldData | None],
            model: Callable[[int], LGBMModel], metric: str,
            loss: Callable[[np.ndarray, np.ndarray], float]) -> int:
    """Rounds (0 to MAX_ROUNDS) by the best mean held-out `metric`, fewest on a tie
    (round 0: `loss` of the init score alone, the metric's own formula)."""

    def held_out(train: np.ndarray, val: np.ndarray) -> np.ndarray | None:
        data = fold_data(train, val)
        if data is None:
            return None
        x_train, y_train, init_train, x_val, y_val, init_val = data
        history: dict[str, Any] = {}
        model(MAX_ROUNDS).fit(x_train, y_train, init_score=init_train, eval_X=(x_val,),
                              eval_y=(y_val,), eval_init_score=[init_val], eval_metric=metric,
                              callbacks=[record_evaluation(history)])
        losses = np.r_[loss(y_val, init_val), history["valid_0"][metric]]
        # Training stops early when no split is left: the later rounds change nothing.
        losses = np.r_[losses, np.full(MAX_ROUNDS + 1 - len(losses), losses[-1])]
        return -losses

    return best_choice(fold_scores(folds, MAX_ROUNDS + 1, held_out), default=0)


@dataclass(frozen=True)
class BoostedSurvivalHead(PiecewiseHazard):
    """log-hazard per day in bin b = scale · Cox linear predictor + log_rates_b + trees (x, b)."""

    linear: CoxHead
    scale: float
    log_rates: np.ndarray  # (bins,)
    model: LGBMRegressor | None  # None: no round was chosen
    edges: np.ndarray  # (bins,) days
    risk_days: float

    def log_hazard(self, x: np.ndarray) -> np.ndarray:
        start = self.scale * self.linear.risk(x)[:, None] + self.log_rates[None, :]  # (n, bins)
        if self.model is None:
            return start
        raw = np.asarray(self.model.predict(_bin_rows(x, len(self.edges)), raw_score=True))
        return start + raw.reshape(len(x), len(self.edges))


def _bin_rows(x: np.ndarray, bins: int) -> np.ndarray:
    """(n · bins, f + 1): each row of x once per bin, with the bin index as the last feature."""
    return np.column_stack([np.repeat(np.asarray(x, dtype=np.float64), bins, axis=0),
                            np.tile(np.arange(bins, dtype=np.float64), len(x))])


def _poisson_rows(x: np.ndarray, time: np.ndarray, event: np.ndarray, edges: np.ndarray,
                  start: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features, label, init score) of the (subject, bin) rows with time at risk, `start`
    (n, bins) the log-hazard boosting starts from."""
    exposure, events = bin_exposure(time, event, edges)
    keep = exposure.ravel() > 0
    offset = np.log(np.where(exposure > 0, exposure, 1.0)) + start
    return _bin_rows(x, len(edges))[keep], events.ravel()[keep], offset.ravel()[keep]


def fit_lightgbm_survival(x: np.ndarray, time: np.ndarray, event: np.ndarray, *, seed: int,
                          horizon_days: float | None = None, groups: np.ndarray | None = None,
                          linear: CoxHead | None = None,
                          unpenalised: int = 0) -> BoostedSurvivalHead:
    """Fit the boosted survival head on features x (n, f), times (days) and event flags (n,),
    from `linear` (`fit_cox` of the same x, targets, seed, groups and `unpenalised`: fitted here
    if None)."""
    time, event = survival_targets(x, time, event)
    quantiles = np.quantile(time[event], np.linspace(0, 1, BOOSTED_BINS + 1)[1:-1])
    edges = np.r_[0.0, np.unique(quantiles[quantiles > 0])]
    linear = linear or fit_cox(x, time, event, seed=seed, groups=groups, unpenalised=unpenalised)

    def fold_data(train: np.ndarray, val: np.ndarray) -> FoldData | None:
        try:
            refit = refit_cox(linear, x[train], time[train], event[train])
        except (ArithmeticError, HeadError):
            return None
        train_linear, val_linear = refit.risk(x[train]), refit.risk(x[val])
        scale, rates = calibrate_linear(train_linear, time[train], event[train], edges)
        return (*_poisson_rows(x[train], time[train], event[train], edges,
                               scale * train_linear[:, None] + rates),
                *_poisson_rows(x[val], time[val], event[val], edges,
                               scale * val_linear[:, None] + rates))

    def model(rounds: int) -> LGBMRegressor:
        return LGBMRegressor(objective="poisson", n_estimators=rounds, **BOOSTING,
                             random_state=seed)

    with single_threaded():
        rounds = _rounds(inner_folds(event, seed, groups), fold_data, model, "poisson",
                         _poisson_loss)
        risk = linear.risk(x)
        scale, rates = calibrate_linear(risk, time, event, edges)
        features, label, init = _poisson_rows(x, time, event, edges, scale * risk[:, None] + rates)
        boosted = model(rounds).fit(features, label, init_score=init) if rounds else None
    risk_days = float(horizon_days) if horizon_days is not None else float(time[event].max())
    return BoostedSurvivalHead(linear, scale, rates, boosted, edges, risk_days)


@dataclass(frozen=True)
class BoostedClassifierHead:
    """A binary head: probability = sigmoid(intercept + scale · logistic log-odds + trees(x))."""

    linear: LogisticModel  # the logistic head's model (decision_function: log-odds)
    intercept: float
    scale: float
    model: LGBMClassifier | None  # None: no round was chosen

    def risk(self, x: np.ndarray) -> np.ndarray:
        raw = self.intercept + self.scale * self.linear.decision_function(x)
        if self.model is not None:
            raw = raw + np.asarray(self.model.predict(np.asarray(x, np.float64), raw_score=True))
        return np.asarray(1 / (1 + np.exp(-raw)), dtype=np.float64)

    def survival(self, x: np.ndarray, days: np.ndarray) -> None:
        return None


def _calibrate_log_odds(log_odds: np.ndarray, label: np.ndarray) -> tuple[float, float]:
    """(intercept, scale) of the unpenalised logistic fit of `label` on log-odds that the
    logistic head's penalty shrank."""
    fit = LogisticRegression(C=UNPENALISED_C).fit(log_odds[:, None], label)
    return float(fit.intercept_[0]), float(fit.coef_[0, 0])


def fit_lightgbm_binary(x: np.ndarray, label: np.ndarray, *, seed: int,
                        groups: np.ndarray | None = None,
                        linear: ClassifierHead | None = None,
                        unpenalised: int = 0) -> BoostedClassifierHead:
    """Fit the boosted binary head on features x (n, f) and boolean labels (n,), from `linear`
    (`fit_logistic` of the same x, labels, seed, groups and `unpenalised`: fitted here if
    None)."""
    label = binary_targets(x, label)
    x = np.asarray(x, dtype=np.float64)
    logistic = (linear or fit_logistic(x, label, seed=seed, groups=groups,
                                       unpenalised=unpenalised)).model
    if not isinstance(logistic, LogisticModel):
        raise TypeError(f"linear must be a fit_logistic head, got {type(logistic).__name__}")

    def fold_data(train: np.ndarray, val: np.ndarray) -> FoldData:
        refit = refit_logistic(logistic, x[train], label[train])
        train_odds, val_odds = refit.decision_function(x[train]), refit.decision_function(x[val])
        intercept, scale = _calibrate_log_odds(train_odds, label[train])
        return (x[train], label[train], intercept + scale * train_odds, x[val], label[val],
                intercept + scale * val_odds)

    def model(rounds: int) -> LGBMClassifier:
        return LGBMClassifier(n_estimators=rounds, **BOOSTING, random_state=seed)

    with single_threaded():
        rounds = _rounds(inner_folds(label, seed, groups), fold_data, model, "binary_logloss",
                         _log_loss)
        odds = logistic.decision_function(x)
        intercept, scale = _calibrate_log_odds(odds, label)
        boosted = (model(rounds).fit(x, label, init_score=intercept + scale * odds)
                   if rounds else None)
    return BoostedClassifierHead(logistic, intercept, scale, boosted)
