"""Tests of `ehrmotor.evaluate.heads` on simulated data with a known hazard or label model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sksurv.util import Surv

from ehrmotor.evaluate.boosted import fit_lightgbm_binary, fit_lightgbm_survival
from ehrmotor.evaluate.heads import (
    MIN_TIME_DAYS,
    Head,
    HeadError,
    _logistic_loss,
    fit_cox,
    fit_logistic,
)
from ehrmotor.evaluate.metrics import auroc, harrell_c
from ehrmotor.evaluate.penalties import inner_folds
from ehrmotor.evaluate.piecewise import (
    _poisson_objective,
    fit_piecewise_exponential,
    motor_bin_features,
)
from ehrmotor.model.config import MotorConfig
from ehrmotor.model.head import MotorHead

EDGES = np.array([0.0, 30.0, 90.0, 180.0, 365.0, 730.0])
BETA = np.array([0.9, -0.7, 0.5])


@dataclass(frozen=True)
class Cohort:
    x: np.ndarray  # (n, d)
    bin_features: np.ndarray  # (n, bins, d): x plus per-bin noise
    time: np.ndarray
    event: np.ndarray
    label: np.ndarray


def cohort(n: int, seed: int, d: int = 12) -> Cohort:
    """Exponential event times with log-hazard x[:, :3] · BETA, uniform censoring (days)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    linear = x[:, :3] @ BETA
    event_time = rng.exponential(300 * np.exp(-linear))
    censor_time = rng.uniform(20, 900, n)
    bin_features = x[:, None, :] + 0.1 * rng.normal(size=(n, len(EDGES), d))
    label = linear + rng.normal(size=n) > 0.3
    return Cohort(x, bin_features, np.minimum(event_time, censor_time),
                  event_time <= censor_time, label)


@pytest.fixture(scope="module")
def train() -> Cohort:
    return cohort(400, seed=0)


@pytest.fixture(scope="module")
def test() -> Cohort:
    return cohort(400, seed=1)


SURVIVAL_HEADS: dict[str, tuple[Callable[..., Head], Callable[[Cohort], tuple[Any, ...]]]] = {
    "cox": (fit_cox, lambda c: (c.x, c.time, c.event)),
    "piecewise_exponential": (fit_piecewise_exponential,
                              lambda c: (c.bin_features, c.time, c.event, EDGES)),
    "lightgbm": (fit_lightgbm_survival, lambda c: (c.x, c.time, c.event)),
}
BINARY_HEADS: dict[str, Callable[..., Head]] = {
    "logistic": fit_logistic, "lightgbm": fit_lightgbm_binary}


def features(name: str, data: Cohort) -> np.ndarray:
    return data.bin_features if name == "piecewise_exponential" else data.x


@pytest.mark.parametrize("name", SURVIVAL_HEADS)
def test_survival_heads_rank_by_the_hazard_with_proper_survival(name: str, train: Cohort,
                                                                test: Cohort) -> None:
    fit, arguments = SURVIVAL_HEADS[name]
    head = fit(*arguments(train), seed=0)
    assert harrell_c(test.time, test.event, head.risk(features(name, test))) > 0.7
    days = np.array([0.0, 1.0, 10.0, 50.0, 200.0, 500.0, 2000.0])
    survival = head.survival(features(name, test), days)
    assert survival is not None and survival.shape == (len(test.time), len(days))
    assert np.all((survival >= 0) & (survival <= 1))
    assert np.all(np.diff(survival, axis=1) <= 1e-12)
    assert survival[:, 0] == pytest.approx(1.0)
    assert survival[:, -1].mean() < 0.5  # the hazard is not negligible


@pytest.mark.parametrize("name", BINARY_HEADS)
def test_binary_heads_separate_the_classes(name: str, train: Cohort, test: Cohort) -> None:
    head = BINARY_HEADS[name](train.x, train.label, seed=0)
    probability = head.risk(test.x)
    assert auroc(test.label, probability) > 0.75
    assert np.all((probability >= 0) & (probability <= 1))
    assert head.survival(test.x, np.array([1.0])) is None


def test_piecewise_exponential_recovers_bin_hazards_without_covariates() -> None:
    rng = np.random.default_rng(2)
    n, edges = 3000, np.array([0.0, 50.0, 150.0, 400.0])
    rates = np.array([1 / 200, 1 / 400, 1 / 800, 1 / 1000])  # per day, in each bin
    # invert the piecewise-linear cumulative hazard at Exp(1) draws
    widths = np.diff(edges)
    cumulative_at_edges = np.r_[0.0, np.cumsum(rates[:-1] * widths)]
    draws = rng.exponential(size=n)
    bins = np.searchsorted(cumulative_at_edges, draws, side="right") - 1
    event_time = edges[bins] + (draws - cumulative_at_edges[bins]) / rates[bins]
    censor_time = rng.uniform(0, 1200, n)
    time, event = np.minimum(event_time, censor_time), event_time <= censor_time
    no_features = np.zeros((n, len(edges), 3))
    head = fit_piecewise_exponential(no_features, time, event, edges, seed=0)

    exposure = np.clip(np.maximum(time, MIN_TIME_DAYS)[:, None] - edges, 0,
                       np.r_[widths, np.inf]).sum(axis=0)
    in_bin = np.searchsorted(edges, time[event], side="left") - 1
    events = np.bincount(np.maximum(in_bin, 0), minlength=len(edges))
    assert events.min() > 100
    np.testing.assert_allclose(np.exp(head.log_rates), events / exposure, rtol=0.01)
    np.testing.assert_allclose(np.exp(head.log_rates), rates, rtol=0.15)
    # survival is exact for the fitted rates: S(t) = exp(-Σ rate_b · days in bin b by t)
    days = np.array([25.0, 100.0, 1000.0])
    in_bins = np.clip(days[None, :] - edges[:, None], 0, np.r_[widths, np.inf][:, None])
    expected = np.exp(-np.exp(head.log_rates) @ in_bins)
    np.testing.assert_allclose(head.survival(no_features[:2], days), np.tile(expected, (2, 1)))


def test_loss_gradients_match_finite_differences() -> None:
    """The smooth losses the elastic net minimises: the piecewise head's Poisson likelihood with
    its rate prior, and the logistic head's mean log loss."""
    rng = np.random.default_rng(4)
    phi = rng.normal(size=(30, 4, 3))
    exposure = rng.uniform(0, 50, (30, 4))
    events = (rng.random((30, 4)) < 0.2).astype(float)
    z, label = rng.normal(size=(30, 3)), (rng.random(30) < 0.3).astype(float)
    for loss_of, size in ((lambda p: _poisson_objective(p, phi, exposure, events, 40.0), 7),
                          (lambda p: _logistic_loss(p, z, label), 4)):
        params = rng.normal(-2, 0.3, size)
        _, gradient = loss_of(params)
        step = 1e-6
        numeric = [(loss_of(params + step * unit)[0] - loss_of(params - step * unit)[0])
                   / (2 * step) for unit in np.eye(size)]
        np.testing.assert_allclose(gradient, numeric, rtol=1e-5, atol=1e-8)


def test_piecewise_risk_is_the_cumulative_hazard_at_the_horizon(train: Cohort) -> None:
    for fit, x in ((fit_piecewise_exponential, (train.bin_features, train.time, train.event,
                                                EDGES)),
                   (fit_lightgbm_survival, (train.x, train.time, train.event))):
        head = fit(*x, seed=0, horizon_days=365.0)
        features = x[0][:20]
        np.testing.assert_allclose(head.risk(features),
                                   -np.log(head.survival(features, np.array([365.0]))[:, 0]))


def test_cox_survival_matches_sksurv_breslow_baseline(train: Cohort, test: Cohort) -> None:
    head = fit_cox(train.x, train.time, train.event, seed=0)
    reference = clone(head.model).set_params(model__fit_baseline_model=True)
    reference.fit(train.x, Surv.from_arrays(train.event, np.maximum(train.time, MIN_TIME_DAYS)))
    days = np.array([5.0, 60.0, 300.0, 800.0])
    functions = reference.predict_survival_function(test.x[:10], alpha=head.alpha)
    expected = np.stack([function(days) for function in functions])
    np.testing.assert_allclose(head.survival(test.x[:10], days), expected, rtol=1e-6)


def test_heads_refuse_data_without_two_events_or_two_of_each_class(train: Cohort) -> None:
    one_event = np.zeros(len(train.time), dtype=bool)
    one_event[0] = True
    for name, (fit, arguments) in SURVIVAL_HEADS.items():
        *inputs, _ = arguments(train)[:3]
        extra = (EDGES,) if name == "piecewise_exponential" else ()
        with pytest.raises(HeadError, match="fewer than 2 events"):
            fit(*inputs, one_event, *extra, seed=0)
    one_class = np.ones(len(train.x), dtype=bool)
    for fit_binary in BINARY_HEADS.values():
        with pytest.raises(HeadError, match="fewer than 2 of a class"):
            fit_binary(train.x, one_class, seed=0)
        with pytest.raises(ValueError):  # HeadError is a ValueError
            fit_binary(train.x, ~one_class, seed=0)


def test_fits_are_deterministic_given_the_seed(train: Cohort) -> None:
    small = cohort(120, seed=3)
    for name, (fit, arguments) in SURVIVAL_HEADS.items():
        first, second = (fit(*arguments(small), seed=7) for _ in range(2))
        assert np.array_equal(first.risk(features(name, train)),
                              second.risk(features(name, train)))
    for fit_binary in BINARY_HEADS.values():
        first, second = (fit_binary(small.x, small.label, seed=7) for _ in range(2))
        assert np.array_equal(first.risk(train.x), second.risk(train.x))


def test_heads_take_missing_features(train: Cohort, test: Cohort) -> None:
    rng = np.random.default_rng(5)
    x = np.where(rng.random(train.x.shape) < 0.2, np.nan, train.x)
    x[:, -1] = np.nan  # a feature never observed
    bin_features = np.where(rng.random(train.bin_features.shape) < 0.2, np.nan,
                            train.bin_features)
    heads = [fit_cox(x, train.time, train.event, seed=0),
             fit_lightgbm_survival(x, train.time, train.event, seed=0),
             fit_logistic(x, train.label, seed=0), fit_lightgbm_binary(x, train.label, seed=0)]
    test_x = np.where(rng.random(test.x.shape) < 0.2, np.nan, test.x)
    for head in heads:
        assert np.isfinite(head.risk(test_x)).all()
    head = fit_piecewise_exponential(bin_features, train.time, train.event, EDGES, seed=0)
    assert harrell_c(test.time, test.event, head.risk(test.bin_features)) > 0.7


def test_inner_folds_keep_a_subjects_rows_together() -> None:
    groups = np.repeat(np.arange(45), 4)
    strata = np.repeat(np.arange(45) % 3 == 0, 4)  # 15 event subjects, 60 event rows
    folds = inner_folds(strata, seed=0, groups=groups)
    assert len(folds) == 3
    for train_rows, val_rows in folds:
        assert not set(groups[train_rows]) & set(groups[val_rows])
        assert len(np.unique(groups[val_rows][strata[val_rows]])) >= 4


def test_no_inner_folds_below_five_event_subjects_per_fold() -> None:
    """14 event subjects (56 event rows) are too few to score a penalty on 3 folds; 15 are not.
    Without groups the rows count."""
    groups = np.repeat(np.arange(60), 4)
    assert inner_folds(np.repeat(np.arange(60) < 14, 4), seed=0, groups=groups) == []
    assert len(inner_folds(np.repeat(np.arange(60) < 15, 4), seed=0, groups=groups)) == 3
    assert len(inner_folds(np.repeat(np.arange(60) < 14, 4), seed=0, groups=None)) == 3
    assert inner_folds(np.arange(60) < 14, seed=0, groups=None) == []
    assert inner_folds(np.arange(60) >= 46, seed=0, groups=None) == []  # the rarer side counts


@pytest.mark.parametrize("event_subjects", [1, 2, 3])
def test_grouped_fits_work_when_the_events_belong_to_few_subjects(event_subjects: int) -> None:
    """ACES-style labels: many rows per subject, all events from one to three subjects. Every
    inner fold used trains and validates on both sides, and the fits succeed."""
    rng = np.random.default_rng(event_subjects)
    groups = np.repeat(np.arange(20), 3)
    event = groups < event_subjects
    x = rng.normal(size=(60, 4))
    time = rng.uniform(1, 100, 60)
    for train_rows, val_rows in inner_folds(event, seed=0, groups=groups):
        for part in (train_rows, val_rows):
            assert 0 < event[part].sum() < len(part)
    assert np.isfinite(fit_cox(x, time, event, seed=0, groups=groups).risk(x)).all()
    label = groups < max(event_subjects, 2)  # logistic needs two positive rows
    assert np.isfinite(fit_logistic(x, label, seed=0, groups=groups).risk(x)).all()


def test_motor_bin_features_are_what_the_motor_head_projects() -> None:
    torch.manual_seed(0)
    config = MotorConfig.preset("tiny", vocab_size=32, num_tasks=3, num_bins=4,
                                bin_edges_days=[0, 30, 90, 365])
    head = MotorHead(config)
    with torch.no_grad():
        head.norm.weight.uniform_(0.5, 1.5)
        head.bias.normal_()
    embeddings = torch.randn(5, config.hidden_size)
    got = motor_bin_features(head, embeddings.numpy())
    assert got.shape == (5, 4, config.final_layer_size) and got.dtype == np.float32
    with torch.no_grad():
        expected = head(embeddings)  # (5, bins, tasks)
        projected = torch.from_numpy(got) @ head.tasks.weight.T + head.bias
    torch.testing.assert_close(projected, expected, rtol=1e-5, atol=1e-5)
