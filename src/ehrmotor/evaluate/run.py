"""Downstream evaluation: linear probes on MOTOR representations vs. a count-feature baseline.

`evaluate(meds_dir, model_path, out_dir, outcomes=...)` builds tasks (`ehrmotor.evaluate.tasks`):
for each outcome (a name and its codes, given by the caller) a time-to-event task (metric
`c_index`, Harrell's C) and a binary task at `horizon_days` (metric `auroc`), or one binary task
from a MEDS label file. Both feature sets, MOTOR (`compute_features`) and counts
(`ehrmotor.evaluate.counts`), get the same probes (`ehrmotor.evaluate.probes`: a mostly-ridge Cox
model for time to event, an L2 logistic regression for binary tasks, each tuned by inner CV).

Subjects are split once (seeded) into a probe-training pool (POOL_FRACTION) and a test set. For
each train size (None = the whole pool, fitted once since every draw is the pool) and repeat a
seeded subsample of the pool is fitted and scored on the test set; subsamples with fewer than two
events (or, for binary tasks, two negatives) are skipped and counted. `mean` is the mean test
metric over repeats; `ci_low`/`ci_high` are the 2.5/97.5 percentiles of that mean over `bootstrap`
resamples of the test subjects (the same resamples for every feature set). When the caller knows
the true hazards (a simulated dataset), its `oracle` function gives them at the prediction times
and they are scored the same way (features "oracle").

Written to out_dir: results.csv (RESULT_SCHEMA), results.md and learning_curves.png
(`ehrmotor.evaluate.report`), labels.parquet (the task table).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
from tqdm import tqdm

from ehrmotor.artifacts import atomic_path
from ehrmotor.errors import InputError
from ehrmotor.evaluate.counts import count_features, feature_matrix, select_features
from ehrmotor.evaluate.metrics import bootstrap_weights
from ehrmotor.evaluate.probes import ProbeTask, fit_probe, probe_tasks
from ehrmotor.evaluate.report import markdown_table, plot_learning_curves
from ehrmotor.evaluate.tasks import check_outcomes, held_out_tasks, label_file_task

if TYPE_CHECKING:
    from ehrmotor.bundle import Bundle

log = logging.getLogger(__name__)

# (outcome, subject_ids (n,) int64, prediction_times (n,) datetime64[us]) -> the true hazard at
# each (nan where unknown), or None when there is none for that outcome.
Oracle = Callable[[str, np.ndarray, np.ndarray], np.ndarray | None]
POOL_FRACTION = 0.6

RESULT_SCHEMA: dict[str, pl.DataType] = {
    "outcome": pl.String(), "metric": pl.String(), "features": pl.String(),
    "train_size": pl.Int64(), "n_test": pl.Int64(), "events_test": pl.Int64(),
    "mean": pl.Float64(), "ci_low": pl.Float64(), "ci_high": pl.Float64(),
    "repeats_used": pl.Int64(), "repeats_skipped": pl.Int64(), "train_pool": pl.Int64(),
}


# --------------------------------------------------------------------------- one task


def _summary(task: ProbeTask, test: np.ndarray, risks: np.ndarray,
             boot: np.ndarray) -> tuple[float, float, float]:
    """Mean metric over the risk rows and its bootstrap percentile interval."""
    if risks.shape[0] == 0:
        return np.nan, np.nan, np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of all-nan rows
        mean = float(np.nanmean(task.score(test, risks)))
        means = np.array([np.nanmean(task.score(test, risks, w)) for w in boot])
    means = means[np.isfinite(means)]
    if not np.isfinite(mean) or len(means) == 0:
        return mean, np.nan, np.nan
    low, high = np.percentile(means, [2.5, 97.5])
    return mean, float(low), float(high)


def evaluate_task(task: ProbeTask, index: int, features: dict[str, np.ndarray],
                  train_sizes: Sequence[int | None], repeats: int, seed: int, bootstrap: int,
                  oracle: np.ndarray | None) -> list[dict[str, object]]:
    """Result rows (RESULT_SCHEMA) of one task; `oracle` is the true hazard per task entry."""
    pool, test = np.flatnonzero(task.in_pool), np.flatnonzero(~task.in_pool)
    base = {"outcome": task.outcome, "metric": task.metric, "n_test": len(test),
            "events_test": int(task.event[test].sum()), "train_pool": len(pool)}
    boot = bootstrap_weights(len(test), bootstrap, (seed, 23, index))
    sizes = sorted({len(pool) if s is None else s for s in train_sizes if (s or 0) <= len(pool)})
    if len(sizes) < len(train_sizes):
        log.info("evaluate: %s/%s: pool of %d; train sizes %s kept", task.outcome, task.metric,
                 len(pool), sizes)
    rows: list[dict[str, object]] = []
    for size in sizes:
        draws = 1 if size == len(pool) else repeats
        subsamples = [np.sort(np.random.default_rng([seed, index, size, r]).choice(
            pool, size, replace=False)) for r in range(draws)]
        usable = [s for s in subsamples if task.usable(s)]
        for name, matrix in features.items():
            risks = []
            for repeat, subsample in enumerate(usable):
                try:
                    probe = fit_probe(task, matrix[task.rows[subsample]], subsample,
                                      seed + repeat)
                except ArithmeticError as exc:
                    log.warning("evaluate: %s/%s %s n=%d: fit failed (%s)", task.outcome,
                                task.metric, name, size, exc)
                    continue
                risks.append(probe(matrix[task.rows[test]]))
            mean, low, high = _summary(task, test, np.array(risks).reshape(len(risks), len(test)),
                                       boot)
            rows.append(base | {"features": name, "train_size": size, "mean": mean,
                                "ci_low": low, "ci_high": high, "repeats_used": len(risks),
                                "repeats_skipped": draws - len(risks)})
        log.info("evaluate: %s/%s n=%d: %s", task.outcome, task.metric, size, ", ".join(
            f"{r['features']} {r['mean']:.3f}" for r in rows[-len(features):]))
    if oracle is not None:
        finite = np.isfinite(oracle[test])
        if not finite.all():
            log.warning("evaluate: %s: no true hazard for %d test subjects; oracle left them "
                        "out", task.outcome, int((~finite).sum()))
        kept = test[finite]
        mean, low, high = _summary(task, kept, oracle[kept][None, :], boot[:, finite])
        rows.append(base | {"features": "oracle", "train_size": None, "n_test": len(kept),
                            "events_test": int(task.event[kept].sum()), "mean": mean,
                            "ci_low": low, "ci_high": high, "repeats_used": 1,
                            "repeats_skipped": 0})
    return rows


# --------------------------------------------------------------------------- the stage


@dataclass(frozen=True)
class EvaluationResult:
    """What `evaluate` wrote: the results table, its markdown rendering and the files."""

    results: pl.DataFrame
    table_markdown: str
    out_dir: Path
    results_csv: Path
    results_md: Path
    learning_curves: Path
    labels: Path


def motor_features(meds_dir: Path, bundle: Bundle, points: pl.DataFrame,
                   tokens_per_batch: int | None) -> np.ndarray:
    """MOTOR representations (n, hidden) at `points`, rows in `points` order."""
    from ehrmotor.embed import bundle_features  # imports torch and the model

    result = bundle_features(meds_dir, bundle, points, tokens_per_batch=tokens_per_batch)
    times = np.asarray(result["feature_times"], dtype="datetime64[us]")
    if not (np.array_equal(result["subject_ids"], points["subject_id"].to_numpy())
            and np.array_equal(times, points["prediction_time"].to_numpy())):
        raise RuntimeError("compute_features returned rows out of (subject_id, prediction_time) "
                           "order")
    return np.asarray(result["features"], dtype=np.float64)


def _oracle_hazards(oracle: Oracle, task: ProbeTask, points: pl.DataFrame,
                    cache: dict[str, np.ndarray | None]) -> np.ndarray | None:
    """The oracle's true hazard of the task's outcome at each task entry, or None."""
    if task.outcome not in cache:
        hazards = oracle(task.outcome, points["subject_id"].to_numpy(),
                         points["prediction_time"].to_numpy())
        if hazards is not None:
            hazards = np.asarray(hazards, dtype=np.float64)
            if hazards.shape != (points.height,):
                raise ValueError(f"oracle: {task.outcome}: expected {points.height} hazards, "
                                 f"got shape {hazards.shape}")
        cache[task.outcome] = hazards
    hazards = cache[task.outcome]
    return None if hazards is None else hazards[task.rows]


def evaluate(meds_dir: Path, model_path: Path, out_dir: Path, *,
             outcomes: Mapping[str, Sequence[str]] | None = None, oracle: Oracle | None = None,
             horizon_days: float = 365,
             train_sizes: Sequence[int | None] = (50, 100, 500, None), repeats: int = 5,
             seed: int = 0, labels_path: Path | None = None, tokens_per_batch: int | None = None,
             bootstrap: int = 200, max_count_features: int = 2000) -> EvaluationResult:
    """Probe MOTOR and count features on downstream tasks; write and return the results.

    meds_dir: the MEDS dataset; model_path: a bundle from `pretrain` (with its ontology; read
    by `load_bundle`, which raises BundleError for a missing, incomplete or corrupt one);
    outcomes: outcome name → its codes, e.g. {"death": ["MEDS_DEATH"], "heart_failure":
    ["ICD10CM/I50"]} (see `tasks.outcome_matcher`); oracle: the true hazards of a
    simulated dataset (see `Oracle`; scored for the outcomes, not for a label file);
    horizon_days: binary-task horizon in days; train_sizes: probe-training subjects per fit
    (None = the whole pool); repeats: subsamples per size; labels_path: a MEDS label parquet to
    use instead of the outcomes; bootstrap: resamples for the intervals; max_count_features:
    count features kept. Deterministic given `seed` (and a deterministic oracle). See the
    module docstring for what is written to `out_dir`.
    """
    meds_dir, model_path, out_dir = Path(meds_dir), Path(model_path), Path(out_dir)
    _check_settings(repeats, bootstrap, seed, train_sizes)
    if labels_path is None and not outcomes:
        raise InputError("evaluate: give outcomes (name → codes) or a label file")
    outcome_codes = check_outcomes(outcomes or {})
    from ehrmotor.bundle import load_bundle  # imports torch and the model

    bundle = load_bundle(model_path)  # a bad bundle fails before any work
    out_dir.mkdir(parents=True, exist_ok=True)
    if labels_path is not None:
        tasks = label_file_task(meds_dir, Path(labels_path))
        oracle = None
    else:
        tasks = held_out_tasks(meds_dir, outcome_codes, horizon_days=horizon_days, seed=seed)
    if tasks.is_empty():
        raise InputError(f"{labels_path or meds_dir}: no labels to evaluate")
    labels_file = out_dir / "labels.parquet"
    with atomic_path(labels_file) as tmp:
        tasks.write_parquet(tmp)
    points = tasks.select("subject_id", "prediction_time").unique().sort(
        "subject_id", "prediction_time")
    in_pool = _probe_training_pool(points, seed)
    features = _feature_sets(meds_dir, bundle, points, in_pool, tokens_per_batch,
                             max_count_features)

    hazards: dict[str, np.ndarray | None] = {}
    rows: list[dict[str, object]] = []
    all_tasks = probe_tasks(tasks, points, in_pool)
    for index, task in enumerate(tqdm(all_tasks, desc="evaluate", unit="task", disable=None)):
        truth = _oracle_hazards(oracle, task, points, hazards) if oracle is not None else None
        rows += evaluate_task(task, index, features, train_sizes, repeats, seed, bootstrap,
                              truth)
    results = pl.DataFrame(rows, schema=RESULT_SCHEMA)
    return _write_results(results, out_dir, labels_file)


def _check_settings(repeats: int, bootstrap: int, seed: int,
                    train_sizes: Sequence[int | None]) -> None:
    """InputError naming the first of `evaluate`'s numeric settings that cannot work."""
    if repeats < 1 or bootstrap < 1 or seed < 0:
        raise InputError(f"repeats and bootstrap must be at least 1 and seed at least 0, got "
                         f"{repeats}, {bootstrap}, {seed}")
    if any(size is not None and size < 1 for size in train_sizes):
        raise InputError(f"train sizes must be at least 1 (or None), got {list(train_sizes)}")


def _probe_training_pool(points: pl.DataFrame, seed: int) -> np.ndarray:
    """Whether each label of `points` belongs to a subject of the probe-training pool.

    POOL_FRACTION of the subjects, drawn once with `seed`; the others form the test set.
    """
    subjects = points["subject_id"].unique().sort().to_numpy()
    shuffled = np.random.default_rng([seed, 5]).permutation(subjects)
    pool_subjects = shuffled[:round(POOL_FRACTION * len(subjects))]
    in_pool = np.isin(points["subject_id"].to_numpy(), pool_subjects)
    log.info("evaluate: %d labels of %d subjects (%d in the probe-training pool)", points.height,
             len(subjects), len(pool_subjects))
    return in_pool


def _feature_sets(meds_dir: Path, bundle: Bundle, points: pl.DataFrame, in_pool: np.ndarray,
                  tokens_per_batch: int | None, max_count_features: int) -> dict[str, np.ndarray]:
    """The MOTOR and count feature matrices (rows in `points` order) the probes compare.

    The count features kept are the `max_count_features` most frequent in the training pool.
    """
    motor = motor_features(meds_dir, bundle, points, tokens_per_batch)
    long = count_features(meds_dir, points, bundle.ontology)
    names = select_features(long, np.flatnonzero(in_pool), max_count_features)
    counts = feature_matrix(long, names, points.height)
    log.info("evaluate: MOTOR %d features, counts %d features", motor.shape[1], counts.shape[1])
    return {"motor": motor, "counts": counts}


def _write_results(results: pl.DataFrame, out_dir: Path, labels_file: Path) -> EvaluationResult:
    """Write results.csv, results.md and learning_curves.png to `out_dir`."""
    results_csv, results_md = out_dir / "results.csv", out_dir / "results.md"
    with atomic_path(results_csv) as tmp:
        results.write_csv(tmp)
    table = markdown_table(results)
    with atomic_path(results_md) as tmp:
        tmp.write_text(table + "\n", encoding="utf-8")
    curves = plot_learning_curves(results, out_dir / "learning_curves.png")
    log.info("evaluate: wrote %s, %s, %s", results_csv, results_md, curves)
    return EvaluationResult(results, table, out_dir, results_csv, results_md, curves, labels_file)
