"""The few-shot protocol (as EHRSHOT and the MOTOR paper evaluate): who trains, who tests, and
which heads are fitted on which features.

- A fixed, seeded test set: `test_fraction` of the evaluation subjects (`split_subjects`); the
  others form the training pool. A subject is in the test set of every task or of none.
- Training sets of k subjects (`kshot_draws`; sizes count subjects, never label rows): for each
  k in `k_values` below the task's pool size, `replicates` seeded draws from the subjects of the
  pool that have labels in the task; k = "all" (None) is the whole pool, fitted once.
- Heads (`METHODS`, from `ehrmotor.evaluate.heads`, `piecewise` and `boosted`; penalties and
  boosting rounds chosen on inner folds that keep each subject's rows together): for time to
  event a Cox model and the piecewise-exponential MOTOR head on the MOTOR time bins, on the
  embeddings, and a Cox model and LightGBM on the count features; for binary labels logistic
  regression on either, and LightGBM on counts. The demographic baseline (age, and sex where
  the data has it) is fitted beside them: a Cox model for time to event, logistic regression
  for binary labels. It is fitted first on each draw, and every other head adjusts for it: its
  score (the baseline's linear predictor; the raw demographic columns if the baseline could not
  be fitted) is appended to the head's features and left unpenalised (`with_demographics`), so
  that a head whose penalty removes every other feature ranks exactly as the baseline does, and
  "MOTOR − best baseline" measures what the representation adds to age and sex. A draw whose
  training labels cannot be fitted (no event, one class, or a `HeadError` from the head) is
  skipped and counted, never dropped silently.

`fit_task` returns each fit's predictions on the task's test rows (`Fit`): the risk score, and
for time to event the survival curve at the days the integrated Brier score is read at and at
the horizon (for the prediction files).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ehrmotor.evaluate.boosted import fit_lightgbm_binary, fit_lightgbm_survival
from ehrmotor.evaluate.heads import (
    ClassifierHead,
    CoxHead,
    Head,
    HeadError,
    LogisticModel,
    fit_cox,
    fit_logistic,
)
from ehrmotor.evaluate.piecewise import fit_piecewise_exponential
from ehrmotor.evaluate.tasks import BINARY, TIME_TO_EVENT

log = logging.getLogger(__name__)

K_VALUES: tuple[int | None, ...] = (16, 32, 64, 128, 256, 512, None)  # None: the whole pool


def k_label(k: int | None) -> str:
    """"16", or "all" for the whole pool."""
    return "all" if k is None else str(k)


# --------------------------------------------------------------------------- who trains, who tests


def split_subjects(subject_ids: np.ndarray, test_fraction: float,
                   seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(test, pool) subject ids, each sorted: round(test_fraction · n) subjects of a seeded
    permutation of the sorted unique `subject_ids` are the test set."""
    subjects = np.unique(np.asarray(subject_ids, dtype=np.int64))
    shuffled = np.random.default_rng([seed, 5]).permutation(subjects)
    size = round(test_fraction * len(subjects))
    return np.sort(shuffled[:size]), np.sort(shuffled[size:])


@dataclass(frozen=True)
class Draw:
    """One training set: `k` subjects (None: the whole pool), replicate `replicate`."""

    k: int | None
    replicate: int
    subjects: np.ndarray  # sorted subject ids


def kshot_draws(pool: np.ndarray, k_values: Sequence[int | None], replicates: int,
                seed: int) -> list[Draw]:
    """The training sets of the protocol, drawn from `pool` (subject ids), deterministic in
    `seed`: `replicates` draws of k subjects for each k below len(pool), one of the whole pool
    for None. Sizes at or above the pool size are left out (the whole pool covers them)."""
    pool = np.unique(np.asarray(pool, dtype=np.int64))
    draws = []
    for k in k_values:
        if k is None:
            draws.append(Draw(None, 0, pool))
        elif k < len(pool):
            draws += [Draw(k, r, np.sort(np.random.default_rng([seed, 17, k, r]).choice(
                pool, k, replace=False))) for r in range(replicates)]
    return draws


# --------------------------------------------------------------------------- the heads


@dataclass(frozen=True)
class Targets:
    """Training targets: time (days) and event for time to event; label for binary."""

    time: np.ndarray | None
    event: np.ndarray

    @property
    def days(self) -> np.ndarray:
        """The times of time-to-event targets (ValueError for binary ones)."""
        if self.time is None:
            raise ValueError("binary targets have no times")
        return self.time


@dataclass(frozen=True)
class FitContext:
    """What a head is fitted with besides its features and targets."""

    seed: int
    groups: np.ndarray  # subject id of each training row: inner folds keep a subject together
    bin_edges_days: Sequence[float]  # the MOTOR time bins
    horizon_days: float  # piecewise heads score the cumulative hazard up to here
    # The heads fitted on this draw so far, by method name (`_fit_one` adds each): LightGBM
    # starts from the linear head of the same features, every adjusted head takes the
    # demographic baseline's score.
    fitted: dict[str, Head] = field(default_factory=dict)


FitHead = Callable[[np.ndarray, Targets, FitContext, int], Head]  # ..., unpenalised columns


@dataclass(frozen=True)
class Method:
    """A head fitted on one feature set: `name` in results.csv, `title` in results.md."""

    name: str
    title: str
    family: str  # "motor", or a baseline family: "counts" or "demographics"
    kind: str  # TIME_TO_EVENT or BINARY
    features: str  # "motor", "motor_bins", "counts" or "demographics" (`features.FeatureSets`)
    fit: FitHead
    adjusted: bool = True  # the demographic features appended, unpenalised (`with_demographics`)


def _cox(x: np.ndarray, t: Targets, c: FitContext, unpenalised: int) -> Head:
    return fit_cox(x, t.days, t.event, seed=c.seed, groups=c.groups, unpenalised=unpenalised)


def _motor_head(x: np.ndarray, t: Targets, c: FitContext, unpenalised: int) -> Head:
    return fit_piecewise_exponential(x, t.days, t.event, list(c.bin_edges_days), seed=c.seed,
                                     horizon_days=c.horizon_days, groups=c.groups,
                                     unpenalised=unpenalised)


def _boosted_survival(x: np.ndarray, t: Targets, c: FitContext, unpenalised: int) -> Head:
    linear = c.fitted.get("counts_cox")
    return fit_lightgbm_survival(x, t.days, t.event, seed=c.seed, horizon_days=c.horizon_days,
                                 groups=c.groups,
                                 linear=linear if isinstance(linear, CoxHead) else None,
                                 unpenalised=unpenalised)


def _logistic(x: np.ndarray, t: Targets, c: FitContext, unpenalised: int) -> Head:
    return fit_logistic(x, t.event, seed=c.seed, groups=c.groups, unpenalised=unpenalised)


def _boosted_binary(x: np.ndarray, t: Targets, c: FitContext, unpenalised: int) -> Head:
    linear = c.fitted.get("counts_logistic")
    return fit_lightgbm_binary(x, t.event, seed=c.seed, groups=c.groups,
                               linear=linear if isinstance(linear, ClassifierHead) else None,
                               unpenalised=unpenalised)


METHODS: tuple[Method, ...] = (
    Method("motor_cox", "MOTOR Cox", "motor", TIME_TO_EVENT, "motor", _cox),
    Method("motor_head", "MOTOR head", "motor", TIME_TO_EVENT, "motor_bins", _motor_head),
    Method("counts_cox", "counts Cox", "counts", TIME_TO_EVENT, "counts", _cox),
    Method("counts_lightgbm", "counts LightGBM", "counts", TIME_TO_EVENT, "counts",
           _boosted_survival),
    Method("age_sex_cox", "age (+sex) Cox", "demographics", TIME_TO_EVENT, "demographics", _cox,
           adjusted=False),
    Method("motor_logistic", "MOTOR logistic", "motor", BINARY, "motor", _logistic),
    Method("counts_logistic", "counts logistic", "counts", BINARY, "counts", _logistic),
    Method("counts_lightgbm", "counts LightGBM", "counts", BINARY, "counts", _boosted_binary),
    Method("age_sex_logistic", "age (+sex) logistic", "demographics", BINARY, "demographics",
           _logistic, adjusted=False),
)
BASELINE_FAMILIES = ("counts", "demographics")  # what "MOTOR − best baseline" compares with


def methods_for(kind: str) -> tuple[Method, ...]:
    """The methods of a task kind, in report order."""
    return tuple(m for m in METHODS if m.kind == kind)


# --------------------------------------------------------------------------- fitting one task


@dataclass(frozen=True)
class Fit:
    """One head fitted on one draw: its predictions on the test rows, or why it was skipped."""

    draw: Draw
    risk: np.ndarray | None = None  # (test rows,)
    survival: np.ndarray | None = None  # (test rows, len(days)) for time to event, if any
    skipped: str | None = None
    horizon_survival: np.ndarray | None = None  # (test rows,) S(horizon | x), time to event
    fallback: str | None = None  # the head's fallback (a raised Cox penalty), if it took one


@dataclass(frozen=True)
class TaskData:
    """A task's rows and targets, split into the training pool and the test set.

    `rows`: each label's index into the feature matrices; `subjects`: its subject id.
    """

    rows: np.ndarray
    subjects: np.ndarray
    targets: Targets
    test: np.ndarray  # label indices of test subjects
    pool_subjects: np.ndarray
    days: np.ndarray = field(default_factory=lambda: np.zeros(0))  # integrated-Brier grid

    def take(self, where: np.ndarray) -> Targets:
        time = None if self.targets.time is None else self.targets.time[where]
        return Targets(time, self.targets.event[where])


def with_demographics(x: np.ndarray, demographics: np.ndarray) -> np.ndarray:
    """x (n, f) or per-bin x (n, bins, f) with the demographic columns (n, d) appended (to every
    bin)."""
    if x.ndim == 3:
        demographics = np.broadcast_to(demographics[:, None, :],
                                       (len(x), x.shape[1], demographics.shape[1]))
    return np.concatenate([x, demographics.astype(x.dtype)], axis=-1)


def baseline_score(head: Head | None, demographics: np.ndarray) -> np.ndarray | None:
    """(n, 1) the linear predictor of a fitted demographic baseline (Cox risk, logistic
    log-odds) at these demographic rows; None for another head or none."""
    if isinstance(head, CoxHead):
        return head.risk(demographics)[:, None]
    model = getattr(head, "model", None) if isinstance(head, ClassifierHead) else None
    if isinstance(model, LogisticModel):
        return model.decision_function(demographics)[:, None]
    return None


def _design(method: Method, features: dict[str, np.ndarray], rows: np.ndarray,
            baseline: Head | None) -> tuple[np.ndarray, int]:
    """The method's feature rows and how many trailing columns are unpenalised: the draw's
    demographic baseline score (one column), or the raw demographics without a baseline."""
    x = features[method.features][rows]
    if not method.adjusted:
        return x, 0
    demographics = features["demographics"][rows]
    score = baseline_score(baseline, demographics)
    adjustment = demographics if score is None else score
    return with_demographics(x, adjustment), adjustment.shape[1]


def _fit_one(method: Method, features: dict[str, np.ndarray], data: TaskData, train: np.ndarray,
             draw: Draw, context: FitContext) -> Fit:
    targets = data.take(train)
    positives = int(targets.event.sum())
    if positives == 0 or (targets.time is None and positives == len(train)):
        what = "no event" if targets.time is not None else "one class"
        return Fit(draw, skipped=f"{what} among {len(train)} training labels")
    baseline = next((context.fitted[m.name] for m in METHODS if m.family == "demographics"
                     and m.kind == method.kind and m.name in context.fitted), None)
    x_train, unpenalised = _design(method, features, data.rows[train], baseline)
    try:
        head = method.fit(x_train, targets, context, unpenalised)
    except HeadError as error:
        return Fit(draw, skipped=str(error))
    context.fitted[method.name] = head
    x_test, _ = _design(method, features, data.rows[data.test], baseline)

    survival = head.survival(x_test, data.days) if targets.time is not None else None
    at_horizon = (head.survival(x_test, np.array([context.horizon_days]))
                  if survival is not None else None)  # for the prediction files
    fallback = getattr(head, "fallback", None)
    if fallback:
        log.info("evaluate: %s k=%s replicate %d: %s", method.name, k_label(draw.k),
                 draw.replicate, fallback)
    return Fit(draw, np.asarray(head.risk(x_test), dtype=np.float64),
               None if survival is None else np.asarray(survival, dtype=np.float64),
               horizon_survival=(None if at_horizon is None
                                 else np.asarray(at_horizon, dtype=np.float64)[:, 0]),
               fallback=fallback)


def fit_task(data: TaskData, methods: Sequence[Method], features: dict[str, np.ndarray],
             draws: Sequence[Draw], *, seed: int, bin_edges_days: Sequence[float],
             horizon_days: float) -> dict[str, list[Fit]]:
    """Every method fitted on every draw (training labels: those of the draw's subjects)."""
    fits: dict[str, list[Fit]] = {m.name: [] for m in methods}
    for index, draw in enumerate(draws):
        train = np.flatnonzero(np.isin(data.subjects, draw.subjects))
        context = FitContext(seed + index, data.subjects[train], bin_edges_days, horizon_days)
        # The demographic baseline first: the other heads adjust for its score.
        for method in sorted(methods, key=lambda m: m.family != "demographics"):
            fit = _fit_one(method, features, data, train, draw, context)
            if fit.skipped:
                log.info("evaluate: %s k=%s replicate %d skipped: %s", method.name,
                         k_label(draw.k), draw.replicate, fit.skipped)
            fits[method.name].append(fit)
    return fits
