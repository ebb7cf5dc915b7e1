"""Metrics for `ehrmotor.evaluate`, the "too few" rule and subject-level bootstrap intervals.

Time to event (times in days; `event` True where the event was seen, else the time is censoring):

- `harrell_c`: Harrell's C with the pairs of `sksurv.metrics.concordance_index_censored`;
- `uno_c`: Uno's IPCW C truncated at the task's horizon (`sksurv.metrics.concordance_index_ipcw`);
- `integrated_brier`: the IPCW integrated Brier score (`sksurv.metrics.integrated_brier_score`)
  on a grid of days (`brier_grid`).

The IPCW metrics weigh test subjects by the censoring distribution G (a reverse Kaplan-Meier,
`censoring_survival`) estimated on `train_time`/`train_event`: pass the largest labelled sample
there is (the whole training pool, or the test set itself), not a k-shot training set of 16.

Uno's C and the integrated Brier score only read the test set up to tau (`at_risk_tau`): the
latest test time with at least MIN_AT_RISK_SHARE of the test labels and MIN_AT_RISK of them still
at risk, capped at the horizon; with fewer than MIN_EVENTS_BEFORE_TAU events before tau they have
no number (beyond it a handful of labels would decide the metric, and its interval says nothing).

Binary: `auroc`, `auprc` (average precision, as scikit-learn's). Every metric is nan where it is
undefined (no comparable pair, one class, G unknown); `ehrmotor.evaluate.reasons` says why.

Intervals: `subject_resamples` draws test subjects (all rows of a drawn subject come together; ACES
labels have many rows per subject); `interval` and `paired_difference` take percentiles of a metric
over those resamples, all metrics of a table over the same ones. A resample where a metric is nan
(e.g. no positive subject drawn) is skipped. Skipping the resamples that miss a rare class would
narrow an interval, so two guards hold: `too_few` keeps test sets under MIN_TEST_EVENTS events or
MIN_TEST_POSITIVES positives (or negatives) out of the table, and an interval is nan when more than
MAX_SKIPPED_SHARE of the resamples were skipped (`interval_with_reason` says so).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
from scipy.stats import rankdata

TIED_RISK = 1e-8  # risks this close count as tied (scikit-survival's tolerance; here chained)
MIN_TEST_EVENTS = 10  # time-to-event test sets with fewer events print no number
MIN_TEST_POSITIVES = 2  # binary test sets with fewer positives (or negatives) print no number
MIN_AT_RISK_SHARE = 0.1  # tau: at least this share of the test labels still at risk ...
MIN_AT_RISK = 10  # ... and at least this many
MIN_EVENTS_BEFORE_TAU = 10  # Uno's C and the Brier score need this many test events before tau
MAX_SKIPPED_SHARE = 0.1  # an interval over resamples with more nan draws than this is nan
INTERVAL_PERCENTILES = (2.5, 97.5)


def concordance(time: np.ndarray, event: np.ndarray, risk: np.ndarray,
                weights: np.ndarray | None = None) -> np.ndarray:
    """Harrell's C of each row of `risk` (R, n) (or of a 1-d `risk`); nan without pairs.

    Pairs as in `sksurv.metrics.concordance_index_censored`: an event i is comparable with j when
    time_j > time_i, or time_j == time_i and j is censored; tied risks count one half. `weights`
    (n,) are row multiplicities: a pair counts weight_i * weight_j. O(n log² n) per row of risk
    (a bootstrap of thousands of rows stays in milliseconds per resample).
    """
    return _concordance(time, event, risk, weights, None)


def _concordance(time: np.ndarray, event: np.ndarray, risk: np.ndarray,
                 weights: np.ndarray | None, event_weights: np.ndarray | None) -> np.ndarray:
    """`concordance` where a pair (i, j) also counts `event_weights`[i] (Uno's IPCW weights)."""
    risk = np.atleast_2d(np.asarray(risk, dtype=np.float64))
    time = np.asarray(time, dtype=np.float64)
    event = np.asarray(event, dtype=bool)
    if risk.shape[1] != len(time) or len(event) != len(time):
        raise ValueError(f"time {time.shape}, event {event.shape} and risk {risk.shape} disagree")
    weight = np.ones(len(time)) if weights is None else np.asarray(weights, dtype=np.float64)
    first = weight if event_weights is None else weight * np.asarray(event_weights, np.float64)
    # Rows by time, events before censorings at a time: the rows comparable with an event are
    # then the suffix from its time's first censored row (or the next time) on.
    order = np.lexsort((~event, time))
    time, event, weight, first, risk = (time[order], event[order], weight[order], first[order],
                                        risk[:, order])
    censored_before = np.r_[0, np.cumsum(~event)]
    group_end = np.searchsorted(time, time, side="right")
    start = group_end - (censored_before[group_end]
                         - censored_before[np.searchsorted(time, time, side="left")])
    query = np.flatnonzero(event & (first > 0))
    result = np.full(risk.shape[0], np.nan)
    for row, scores in enumerate(risk):
        ranks = _tie_ranks(scores)
        less, tied, total = _suffix_sums(ranks, weight, start[query], ranks[query])
        if (denominator := float(first[query] @ total)) > 0:
            result[row] = float(first[query] @ (less + 0.5 * tied)) / denominator
    return result


def _tie_ranks(risk: np.ndarray) -> np.ndarray:
    """Dense ranks of `risk`; a value within TIED_RISK of the next smaller one shares its rank."""
    order = np.argsort(risk, kind="stable")
    ranks = np.empty(len(risk), dtype=np.int64)
    ranks[order] = np.cumsum(np.r_[False, np.diff(risk[order]) > TIED_RISK])
    return ranks


def _suffix_sums(ranks: np.ndarray, weight: np.ndarray, start: np.ndarray,
                 own: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each query q: Σ weight_j over rows j >= start_q with ranks_j < own_q, with
    ranks_j == own_q, and all of them, in O(n log² n).

    Suffix = all rows minus the prefix [0, start), which splits into aligned blocks of 2^L rows,
    one for each bit L set in start (as in a Fenwick tree); each level's block sums come from
    one sort of (block, rank) keys and binary searches in it.
    """
    n, width = len(ranks), int(ranks.max()) + 2 if len(ranks) else 1
    less, tied, total = np.zeros(len(own)), np.zeros(len(own)), np.zeros(len(own))
    for level in range(n.bit_length()):  # start <= n: its bits stop below n.bit_length()
        keys = (np.arange(n) >> level) * width + ranks
        by_key = np.argsort(keys, kind="stable")
        keys, cumulative = keys[by_key], np.r_[0.0, np.cumsum(weight[by_key])]
        inside = ((start >> level) & 1) == 1
        base = ((start >> level) - 1) * width
        low, high = np.searchsorted(keys, base), np.searchsorted(keys, base + width)
        below = np.searchsorted(keys, base + own)
        upto = np.searchsorted(keys, base + own, side="right")
        less -= inside * (cumulative[below] - cumulative[low])
        tied -= inside * (cumulative[upto] - cumulative[below])
        total -= inside * (cumulative[high] - cumulative[low])
    by_rank = np.argsort(ranks, kind="stable")
    ordered, cumulative = ranks[by_rank], np.r_[0.0, np.cumsum(weight[by_rank])]
    below, upto = np.searchsorted(ordered, own, "left"), np.searchsorted(ordered, own, "right")
    less += cumulative[below]
    tied += cumulative[upto] - cumulative[below]
    total += cumulative[-1]
    return less, tied, total


def comparable_pairs(time: np.ndarray, event: np.ndarray) -> float:
    """Number of pairs Harrell's C compares (see `concordance`)."""
    time, event = np.asarray(time, dtype=np.float64), np.asarray(event, dtype=bool)
    ordered, censored = np.sort(time), np.sort(time[~event])
    at = time[event]
    later = len(time) - np.searchsorted(ordered, at, side="right")
    tied = np.searchsorted(censored, at, side="right") - np.searchsorted(censored, at)
    return float((later + tied).sum())


def harrell_c(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's C of `risk` (n,) (higher = event sooner); nan without a comparable pair."""
    return float(concordance(time, event, risk)[0])


def censoring_survival(train_time: np.ndarray, train_event: np.ndarray,
                       days: np.ndarray) -> np.ndarray:
    """G(t) = P(censored after t), a reverse Kaplan-Meier of `train_*`, at `days`.

    As sksurv's `CensoringDistributionEstimator`: events at a time leave the risk set before the
    censorings there; G is right-continuous. nan past the last training time unless G reached 0.
    """
    time = np.asarray(train_time, dtype=np.float64)
    event = np.asarray(train_event, dtype=bool)
    if len(time) == 0 or len(event) != len(time):
        raise ValueError(f"need matching, non-empty train time {time.shape} and event "
                         f"{event.shape}")
    unique, inverse = np.unique(time, return_inverse=True)
    rows = np.bincount(inverse, minlength=len(unique))
    at_risk = len(time) - (np.cumsum(rows) - rows)  # rows with time >= unique[k]
    events = np.bincount(inverse, weights=event, minlength=len(unique))
    censored = rows - events
    remaining = at_risk - events
    ratio = np.divide(censored, remaining, out=np.zeros(len(unique)), where=censored > 0)
    survival = np.cumprod(1.0 - ratio)
    days = np.asarray(days, dtype=np.float64)
    index = np.searchsorted(unique, days, side="right") - 1
    result = np.where(index >= 0, survival[np.maximum(index, 0)], 1.0)
    beyond = days > unique[-1]
    result[beyond] = 0.0 if survival[-1] == 0 else np.nan
    return result


def uno_c(train_time: np.ndarray, train_event: np.ndarray, time: np.ndarray, event: np.ndarray,
          risk: np.ndarray, horizon_days: float) -> float:
    """Uno's IPCW C at tau = `horizon_days` (as `sksurv.metrics.concordance_index_ipcw`).

    Harrell's pairs, each weighted by 1 / G(time_i)^2 of its earlier event i, counting only
    events before the horizon; G from `train_*` (see the module docstring). nan when there is no
    such pair or G is 0 or unknown at a needed event time.
    """
    time = np.asarray(time, dtype=np.float64)
    event = np.asarray(event, dtype=bool)
    counted = event & (time < horizon_days)
    g = censoring_survival(train_time, train_event, time[counted])
    if not np.all(g > 0):  # also catches nan
        return float("nan")
    event_weights = np.zeros(len(time))
    event_weights[counted] = 1.0 / g**2
    return float(_concordance(time, event, risk, None, event_weights)[0])


def at_risk_tau(time: np.ndarray, horizon_days: float) -> float:
    """tau (days): the latest test time at which at least max(MIN_AT_RISK, MIN_AT_RISK_SHARE ×
    labels) test labels are still at risk (time >= tau), capped at `horizon_days`; nan when the
    test set has fewer labels than that."""
    time = np.sort(np.asarray(time, dtype=np.float64))[::-1]
    needed = max(MIN_AT_RISK, int(np.ceil(MIN_AT_RISK_SHARE * len(time))))
    if len(time) < needed:
        return float("nan")
    return float(min(time[needed - 1], horizon_days))


def events_before(time: np.ndarray, event: np.ndarray, tau: float) -> int:
    """The number of events before `tau` (those Uno's C at tau counts)."""
    return int((np.asarray(event, dtype=bool) & (np.asarray(time, np.float64) < tau)).sum())


def brier_grid(time: np.ndarray, event: np.ndarray, horizon_days: float,
               points: int = 20) -> np.ndarray:
    """`points` evenly spaced days from the first test time to the horizon, inside follow-up.

    The grid ends at the horizon, or where test follow-up thins out first (the 95th percentile of
    test times, below the last one, as sksurv requires); empty when that span is empty.
    """
    time = np.asarray(time, dtype=np.float64)
    if len(time) != len(event) or points < 2:
        raise ValueError(f"need matching time/event and points >= 2; got {len(time)}, "
                         f"{len(event)}, {points}")
    if len(time) == 0:
        return np.empty(0)
    start = float(time.min())
    end = min(float(horizon_days), float(np.percentile(time, 95)))
    if end >= time.max():
        end = float(np.nextafter(time.max(), -np.inf))
    return np.linspace(start, end, points) if end > start else np.empty(0)


def integrated_brier(train_time: np.ndarray, train_event: np.ndarray, time: np.ndarray,
                     event: np.ndarray, survival: np.ndarray, days: np.ndarray) -> float:
    """IPCW integrated Brier score of `survival` (n, len(days)) = S(days | x) on increasing `days`.

    As `sksurv.metrics.integrated_brier_score`: at day t a subject with an event by t scores
    S(t)^2 / G(time_i), one still at risk after t scores (1 - S(t))^2 / G(t) (weights 0 where
    G = 0), averaged over subjects, integrated by the trapezoid rule and divided by the span.
    Unlike sksurv it does not insist that `days` lie inside the test follow-up (resamples move
    it); nan with fewer than 2 days or where G is unknown.
    """
    time = np.asarray(time, dtype=np.float64)
    event = np.asarray(event, dtype=bool)
    days = np.asarray(days, dtype=np.float64)
    survival = np.asarray(survival, dtype=np.float64)
    if survival.shape != (len(time), len(days)) or np.any(np.diff(days) <= 0):
        raise ValueError(f"survival {survival.shape} must be (subjects {len(time)}, days "
                         f"{len(days)}) on strictly increasing days")
    if len(days) < 2 or len(time) == 0:
        return float("nan")
    case = event[:, None] & (time[:, None] <= days[None, :])  # (n, d)
    control = time[:, None] > days[None, :]
    needed = event & (time <= days[-1])
    g_time = np.ones(len(time))
    g_time[needed] = censoring_survival(train_time, train_event, time[needed])
    g_days = censoring_survival(train_time, train_event, days)
    if np.isnan(g_time).any() or np.isnan(g_days).any():
        return float("nan")
    inverse_time = np.divide(1.0, g_time, out=np.zeros(len(time)), where=g_time > 0)
    inverse_days = np.divide(1.0, g_days, out=np.zeros(len(days)), where=g_days > 0)
    scores = (survival**2 * case * inverse_time[:, None]
              + (1.0 - survival)**2 * control * inverse_days[None, :]).mean(axis=0)
    return float(np.trapezoid(scores, days) / (days[-1] - days[0]))


def auroc(label: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (tied scores count one half); nan when one class is missing."""
    label = np.asarray(label, dtype=bool)
    positives = int(label.sum())
    negatives = len(label) - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = rankdata(np.asarray(score, dtype=np.float64))  # Mann-Whitney U from average ranks
    return float((ranks[label].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def auprc(label: np.ndarray, score: np.ndarray) -> float:
    """Average precision Σ (recall_k - recall_{k-1}) · precision_k over distinct thresholds
    (scikit-learn's `average_precision_score`); nan when one class is missing."""
    label = np.asarray(label, dtype=bool)
    if label.all() or not label.any():
        return float("nan")
    order = np.argsort(-np.asarray(score, dtype=np.float64), kind="mergesort")
    ordered = np.asarray(score, dtype=np.float64)[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(ordered)), len(ordered) - 1]
    true_positives = np.cumsum(label[order])[last_of_tie]
    precision = true_positives / (last_of_tie + 1)
    recall = true_positives / true_positives[-1]
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def too_few(event_or_label: np.ndarray, kind: str) -> str | None:
    """None when a test set can be scored, else the table cell's text saying why not.

    kind "time_to_event": at least MIN_TEST_EVENTS events; "binary": at least MIN_TEST_POSITIVES
    positives and as many negatives. Counts are label rows.
    """
    values = np.asarray(event_or_label, dtype=bool)
    positives = int(values.sum())
    if kind == "time_to_event":
        return None if positives >= MIN_TEST_EVENTS else (
            f"too few events ({positives} < {MIN_TEST_EVENTS})")
    if kind == "binary":
        if positives < MIN_TEST_POSITIVES:
            return f"too few positives ({positives} < {MIN_TEST_POSITIVES})"
        negatives = len(values) - positives
        if negatives < MIN_TEST_POSITIVES:
            return f"too few negatives ({negatives} < {MIN_TEST_POSITIVES})"
        return None
    raise ValueError(f"kind must be 'time_to_event' or 'binary'; got {kind!r}")


class Resamples(list[np.ndarray]):
    """Row indices of bootstrap resamples of a test set of `rows` rows (see `subject_resamples`)."""

    def __init__(self, draws: Iterable[np.ndarray], rows: int) -> None:
        super().__init__(draws)
        self.rows = rows

    @property
    def full(self) -> np.ndarray:
        """All rows of the test set, in order."""
        return np.arange(self.rows)


def subject_resamples(subject_ids: np.ndarray, resamples: int,
                      seed: int | Sequence[int]) -> Resamples:
    """Cluster-bootstrap resamples of the test rows whose subjects are `subject_ids` (rows,).

    Each resample draws as many subjects as there are, with replacement, and holds the row
    indices of all rows of each drawn subject (repeated as often as it was drawn). The same seed
    gives the same resamples.
    """
    subject_ids = np.asarray(subject_ids)
    subjects, inverse = np.unique(subject_ids, return_inverse=True)
    by_subject = np.argsort(inverse, kind="stable")  # rows grouped by subject
    counts = np.bincount(inverse, minlength=len(subjects))
    starts = np.cumsum(counts) - counts
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        drawn = rng.integers(0, len(subjects), len(subjects))
        lengths = counts[drawn]
        shift = np.repeat(starts[drawn] - (np.cumsum(lengths) - lengths), lengths)
        draws.append(by_subject[shift + np.arange(lengths.sum())])
    return Resamples(draws, len(subject_ids))


def _percentile_interval(values: np.ndarray) -> tuple[float, float, str | None]:
    """(low, high, None), or (nan, nan, why) when too many resamples were undefined."""
    kept = values[~np.isnan(values)]
    skipped = len(values) - len(kept)
    if len(kept) == 0 or skipped > MAX_SKIPPED_SHARE * len(values):
        return float("nan"), float("nan"), (
            f"no interval: undefined in {skipped} of {len(values)} bootstrap resamples "
            f"(more than {MAX_SKIPPED_SHARE:.0%}; too few events or positives to resample)")
    low, high = np.percentile(kept, INTERVAL_PERCENTILES)
    return float(low), float(high), None


def interval(metric: Callable[[np.ndarray], float],
             resamples: Sequence[np.ndarray]) -> tuple[float, float]:
    """2.5 and 97.5 percentiles of `metric(rows)` over the resamples (see the module docstring
    for the nan draws it skips)."""
    low, high, _ = interval_with_reason(metric, resamples)
    return low, high


def interval_with_reason(metric: Callable[[np.ndarray], float],
                         resamples: Sequence[np.ndarray]) -> tuple[float, float, str | None]:
    """`interval` and, when it is nan, why ("no interval: undefined in 40 of 200 ...")."""
    return _percentile_interval(np.array([metric(rows) for rows in resamples], dtype=np.float64))


def paired_difference(metric_a: Callable[[np.ndarray], float],
                      metric_b: Callable[[np.ndarray], float],
                      resamples: Resamples) -> tuple[float, float, float]:
    """metric_a - metric_b on the full test set and its percentile interval over the same
    resamples (draws where either metric is nan are skipped; see the module docstring)."""
    full, low, high, _ = paired_difference_with_reason(metric_a, metric_b, resamples)
    return full, low, high


def paired_difference_with_reason(
        metric_a: Callable[[np.ndarray], float], metric_b: Callable[[np.ndarray], float],
        resamples: Resamples) -> tuple[float, float, float, str | None]:
    """`paired_difference` and, when its interval is nan, why."""
    full = float(metric_a(resamples.full) - metric_b(resamples.full))
    differences = np.array([metric_a(rows) - metric_b(rows) for rows in resamples],
                           dtype=np.float64)
    return (full, *_percentile_interval(differences))

