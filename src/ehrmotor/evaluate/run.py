"""`evaluate`: the few-shot protocol on MOTOR embeddings against count features.

Labels: landmark time-to-event labels of outcomes (`ehrmotor.evaluate.landmarks`; a name and its
codes, given by the caller) and/or MEDS label files (`ehrmotor.meds.labels.read_label_sets`: a
folder of several outcome files is several tasks; boolean labels are binary tasks, time-to-event
labels are used as they are). Only subjects of the evaluation splits count
(`tasks.evaluation_subjects`). The protocol (`ehrmotor.evaluate.protocol`):
a fixed test set of subjects, k-shot training sets drawn from the pool, the heads of each task
kind on the feature sets (`ehrmotor.evaluate.features`), scored on the test set with
subject-bootstrap intervals (`ehrmotor.evaluate.scoring`; Uno's C and the integrated Brier score up
to tau, `metrics.at_risk_tau`). Beside MOTOR and the count features, every task has a demographic
baseline (age, and sex where the data has it: `ehrmotor.evaluate.demographics`).
When the caller knows the true hazards of an outcome (a simulated dataset), its `oracle` gives
them at the test labels and they are scored as a reference row.

Written to out_dir (`ehrmotor.evaluate.report`): results.csv (`scoring.RESULT_SCHEMA`),
results.md, kshot_<task>.png, predictions/<task>/<method>.parquet (the k = "all" fit, the
meds-evaluation schema; for time to event, the event within the horizon and 1 - S(horizon), with
predictions/<task>/time_to_event/<method>.parquet adding risk and survival; see
`ehrmotor.evaluate.report`) and labels/<outcome>.parquet (the landmark labels, readable by
`read_label_set` and `ehrmotor embed --labels`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
from tqdm import tqdm

from ehrmotor.errors import InputError
from ehrmotor.evaluate.features import FeatureSets, build_features
from ehrmotor.evaluate.landmarks import LandmarkSettings, landmark_label_sets
from ehrmotor.evaluate.metrics import at_risk_tau, brier_grid, subject_resamples
from ehrmotor.evaluate.protocol import (
    K_VALUES,
    Fit,
    Targets,
    TaskData,
    fit_task,
    kshot_draws,
    methods_for,
    split_subjects,
)
from ehrmotor.evaluate.report import Report, TaskPredictions, write_report
from ehrmotor.evaluate.scoring import (
    RESULT_SCHEMA,
    score_difference,
    score_method,
    score_oracle,
    task_scoring,
)
from ehrmotor.evaluate.scoring import metrics_for as task_metrics
from ehrmotor.evaluate.tasks import (
    DEFAULT_SPLITS,
    TIME_TO_EVENT,
    Task,
    check_label_kinds,
    check_outcomes,
    evaluation_subjects,
    tasks_from_label_sets,
)
from ehrmotor.meds import read_splits_file
from ehrmotor.meds.labels import LabelSet, read_label_sets
from ehrmotor.meds.read import HELD_OUT_FILE

log = logging.getLogger(__name__)

# (outcome, subject_ids (n,) int64, prediction_times (n,) datetime64[us]) -> the true hazard at
# each (nan where unknown), or None when there is none for that outcome.
Oracle = Callable[[str, np.ndarray, np.ndarray], np.ndarray | None]


@dataclass(frozen=True)
class ProtocolSettings:
    """The protocol's settings: k values (None = the whole pool), replicates per k, the test
    share of subjects, the horizon of Uno's C and of the Brier grid (days), bootstrap resamples,
    the seed, the evaluation splits, the count features kept and the embedding batch budget."""

    k_values: tuple[int | None, ...] = K_VALUES
    replicates: int = 5
    test_fraction: float = 0.5
    horizon_days: float = 365.0
    bootstrap: int = 200
    seed: int = 0
    splits: tuple[str, ...] = DEFAULT_SPLITS
    max_count_features: int = 2000
    tokens_per_batch: int | None = None

    def check(self) -> None:
        """InputError naming the first setting that cannot work."""
        if self.replicates < 1 or self.bootstrap < 1 or self.seed < 0:
            raise InputError(f"replicates and bootstrap must be at least 1 and seed at least 0, "
                             f"got {self.replicates}, {self.bootstrap}, {self.seed}")
        if not self.k_values or any(k is not None and k < 1 for k in self.k_values):
            raise InputError(f"k values must be at least 1 (or all), got {list(self.k_values)}")
        if not 0 < self.test_fraction < 1:
            raise InputError(f"test_fraction must be between 0 and 1, got {self.test_fraction}")
        if not 0 < self.horizon_days < float("inf"):
            raise InputError(f"horizon_days must be a positive number, got {self.horizon_days}")
        if self.max_count_features < 1:
            raise InputError(f"max_count_features must be at least 1, got "
                             f"{self.max_count_features}")


@dataclass(frozen=True)
class EvaluationResult:
    """What `evaluate` wrote: the results table, its markdown rendering and the files."""

    results: pl.DataFrame
    table_markdown: str
    out_dir: Path
    files: dict[str, Path]  # results_csv, results_md, and one entry per plot and label file


def evaluate(meds_dir: Path, model_path: Path, out_dir: Path, *,
             outcomes: Mapping[str, Sequence[str]] | None = None,
             labels: Sequence[Path] = (), task_name: str | None = None,
             oracle: Oracle | None = None, settings: ProtocolSettings = ProtocolSettings(),
             landmarks: LandmarkSettings | None = None,
             splits_file: Path | None = None) -> EvaluationResult:
    """Run the protocol on the tasks of `outcomes` and `labels`; write and return the results.

    meds_dir: the MEDS dataset; model_path: a bundle from `pretrain` (read by `load_bundle`,
    which raises BundleError for a missing, incomplete or corrupt one); outcomes: outcome name →
    its codes, e.g. {"death": ["MEDS_DEATH"], "heart_failure": ["ICD10CM/I50"]} (landmark
    labels, see `ehrmotor.evaluate.landmarks`); labels: MEDS label files or folders (a folder
    may hold several tasks: `ehrmotor.meds.label_paths.label_tasks`), `task_name` naming the one
    task of the one path; oracle: see `Oracle`; landmarks: how landmark labels are drawn (default
    `LandmarkSettings()`); splits_file: the MEDS split file naming the evaluation subjects
    (default: the bundle's subject_splits.parquet, which prepare wrote for data without one, else
    meds_dir's). Deterministic given
    the settings (and a deterministic oracle). InputError for bad settings, outcomes or label
    files, all before the model is read.
    """
    meds_dir, out_dir = Path(meds_dir), Path(out_dir)
    landmarks = landmarks or LandmarkSettings()
    settings.check()
    landmarks.check()
    checked = check_outcomes(outcomes or {})
    label_sets = _read_label_files(labels, task_name)
    if not checked and not label_sets:
        raise InputError("evaluate: give outcomes (name → codes) or label files")
    from ehrmotor.bundle import load_bundle  # imports torch and the model

    bundle = load_bundle(Path(model_path))  # a bad bundle fails before any work
    if splits_file is None and (bundle.path / HELD_OUT_FILE).is_file():
        splits_file = bundle.path / HELD_OUT_FILE  # the split pretraining was held out by
    splits = unseen_splits(_listed_splits(settings.splits, splits_file), bundle.unseen_splits,
                           bundle.path)
    subjects = evaluation_subjects(meds_dir, splits, splits_file)
    outcome_sets = (landmark_label_sets(meds_dir, checked, landmarks, splits=splits,
                                        splits_file=splits_file) if checked else [])
    tasks = [*tasks_from_label_sets(meds_dir, outcome_sets, subjects, from_outcomes=True),
             *tasks_from_label_sets(meds_dir, label_sets, subjects, from_outcomes=False)]
    tasks = _usable_tasks(tasks)
    points = (pl.concat([t.labels.select("subject_id", "prediction_time") for t in tasks])
              .unique().sort("subject_id", "prediction_time"))
    test, pool = split_subjects(points["subject_id"].to_numpy(), settings.test_fraction,
                                settings.seed)
    log.info("evaluate: %d tasks, %d labels at %d points of %d subjects (%d test, %d pool)",
             len(tasks), sum(t.labels.height for t in tasks), points.height, len(test) +
             len(pool), len(test), len(pool))
    features = build_features(
        meds_dir, bundle, points, np.flatnonzero(np.isin(points["subject_id"].to_numpy(), pool)),
        tokens_per_batch=settings.tokens_per_batch, max_features=settings.max_count_features)
    rows: list[dict[str, object]] = []
    predictions: list[TaskPredictions] = []
    for index, task in enumerate(tqdm(tasks, desc="evaluate", unit="task", disable=None)):
        task_rows, task_predictions = evaluate_task(
            task, index, features, test, settings, oracle if task.from_outcome else None)
        rows += task_rows
        predictions += task_predictions
    results = pl.DataFrame(rows, schema=RESULT_SCHEMA)
    report = Report(results, tasks, predictions, outcome_sets, settings.horizon_days)
    table, files = write_report(report, out_dir)
    return EvaluationResult(results, table, out_dir, files)


def _listed_splits(splits: Sequence[str], splits_file: Path | None) -> tuple[str, ...]:
    """The `splits` that `splits_file` lists subjects under (all of them when it lists none, or is
    missing: `evaluation_subjects` then says so), so that a split prepare's own held-out file never
    had is not reported as one pretraining saw."""
    if splits_file is None or not Path(splits_file).is_file():
        return tuple(splits)
    listed = set(read_splits_file(Path(splits_file))["split"].drop_nulls().to_list())
    return tuple(name for name in splits if name in listed) or tuple(splits)


def unseen_splits(splits: Sequence[str], unseen: Sequence[str] | None,
                  bundle: Path) -> tuple[str, ...]:
    """The evaluation `splits` that pretraining never saw (the bundle's `unseen` splits, when it
    recorded them): the others are left out with a warning; InputError when none is left."""
    if unseen is None:
        return tuple(splits)
    kept = tuple(name for name in splits if name in unseen)
    seen = [name for name in splits if name not in unseen]
    if not kept:
        raise InputError(f"evaluate: the model {bundle} was pretrained on the {', '.join(seen)} "
                         f"subjects (prepare left out only {', '.join(unseen) or 'none'}); "
                         "evaluate other splits, or prepare with exclude_splits naming them")
    if seen:
        log.warning("evaluate: %s left out: the model was pretrained on those subjects (prepare's "
                    "exclude_splits: %s)", ", ".join(seen), ", ".join(unseen) or "none")
    return kept


def _read_label_files(paths: Sequence[Path], task_name: str | None) -> list[LabelSet]:
    if task_name is not None and len(paths) != 1:
        raise InputError(f"--task-name names the task of one label path; got {len(paths)} paths")
    label_sets = [label_set for path in paths
                  for label_set in read_label_sets(Path(path), task_name=task_name)]
    check_label_kinds(label_sets)
    names = [label_set.name for label_set in label_sets]
    if len(set(names)) < len(names):
        raise InputError(f"label files: two tasks are named alike ({', '.join(names)}); give "
                         "each a file or folder of its own name")
    return label_sets


def _usable_tasks(tasks: list[Task]) -> list[Task]:
    """Tasks with labels; InputError when none has, or when two share a name."""
    names = [task.name for task in tasks]
    if len(set(names)) < len(names):
        raise InputError(f"evaluate: tasks named alike ({', '.join(names)}); rename a label "
                         "file or drop the outcome of the same name")
    for task in tasks:
        if task.labels.is_empty():
            log.warning("evaluate: %s: no label of an evaluation subject; left out", task.name)
    kept = [task for task in tasks if not task.labels.is_empty()]
    if not kept:
        raise InputError("evaluate: no label of an evaluation subject in any task (evaluation "
                         "subjects: the held_out and tuning splits unless chosen otherwise)")
    return kept


def task_data(task: Task, points: pl.DataFrame, test_subjects: np.ndarray,
              horizon_days: float) -> TaskData:
    """The task's labels as indices into `points`, with its test set and training pool."""
    indexed = task.labels.join(points.with_row_index("row"),
                               on=["subject_id", "prediction_time"], maintain_order="left")
    subjects = indexed["subject_id"].to_numpy()
    in_test = np.isin(subjects, test_subjects)
    time = indexed["time_days"].to_numpy() if task.kind == TIME_TO_EVENT else None
    event = indexed[task.target].to_numpy().astype(bool)
    test = np.flatnonzero(in_test)
    # The Brier grid ends at tau, as Uno's C (`metrics.at_risk_tau`).
    tau = at_risk_tau(time[test], horizon_days) if time is not None else float("nan")
    days = (brier_grid(time[test], event[test], tau) if time is not None and np.isfinite(tau)
            else np.zeros(0))
    return TaskData(indexed["row"].to_numpy().astype(np.int64), subjects, Targets(time, event),
                    test, np.unique(subjects[~in_test]), days)


def evaluate_task(task: Task, index: int, features: FeatureSets, test_subjects: np.ndarray,
                  settings: ProtocolSettings,
                  oracle: Oracle | None) -> tuple[list[dict[str, object]], list[TaskPredictions]]:
    """The result rows of one task and its k = "all" test predictions."""
    data = task_data(task, features.points, test_subjects, settings.horizon_days)
    draws = kshot_draws(data.pool_subjects, settings.k_values, settings.replicates,
                        settings.seed)
    methods = methods_for(task.kind)
    fits = fit_task(data, methods, features.matrices, draws, seed=settings.seed,
                    bin_edges_days=features.bin_edges_days, horizon_days=settings.horizon_days)
    resamples = subject_resamples(data.subjects[data.test], settings.bootstrap,
                                  [settings.seed, 29, index])
    scoring = task_scoring(task.name, task.kind, data, resamples, settings.horizon_days)
    hazard = _oracle_hazard(oracle, task, features.points, data)
    ks = list(dict.fromkeys(draw.k for draw in draws))
    rows: list[dict[str, object]] = []
    for metric in task_metrics(task.kind, settings.horizon_days):
        for k in ks:
            cells = {}
            for method in methods:
                row = score_method(scoring, method, metric, k,
                                   [fit for fit in fits[method.name] if fit.draw.k == k])
                if row is not None:
                    cells[method.name] = row
            difference = score_difference(scoring, metric, k, cells, methods, fits)
            rows += [*cells.values(), *([difference] if difference else [])]
        if hazard is not None and (oracle_row := score_oracle(scoring, metric, hazard)):
            rows.append(oracle_row)
    log.info("evaluate: %s: %d test labels (%d events or positives), pool of %d subjects",
             task.name, len(data.test), scoring.base["test_events"], len(data.pool_subjects))
    return rows, _predictions(task, features.points, data, fits, settings.horizon_days)


def _oracle_hazard(oracle: Oracle | None, task: Task, points: pl.DataFrame,
                   data: TaskData) -> np.ndarray | None:
    """The oracle's true hazard of the task's outcome at each test label, or None."""
    if oracle is None:
        return None
    rows = data.rows[data.test]
    hazard = oracle(task.name, points["subject_id"].to_numpy()[rows],
                    points["prediction_time"].to_numpy()[rows])
    if hazard is None:
        return None
    hazard = np.asarray(hazard, dtype=np.float64)
    if hazard.shape != (len(rows),):
        raise ValueError(f"oracle: {task.name}: expected {len(rows)} hazards, got shape "
                         f"{hazard.shape}")
    return hazard


def _predictions(task: Task, points: pl.DataFrame, data: TaskData, fits: dict[str, list[Fit]],
                 horizon_days: float) -> list[TaskPredictions]:
    """The k = "all" fit's test predictions of each method: binary probabilities, or for time
    to event 1 - S(horizon) (heads with a survival curve)."""
    keys = points[data.rows[data.test]]
    label = data.targets.event[data.test]
    final = [(method, fit) for method, method_fits in fits.items() for fit in method_fits
             if fit.draw.k is None and fit.risk is not None]
    if task.kind != TIME_TO_EVENT:
        return [TaskPredictions(task.name, method, keys, label, fit.risk) for method, fit in final
                if fit.risk is not None]
    time = data.targets.time[data.test] if data.targets.time is not None else None
    return [TaskPredictions(task.name, method, keys, label, 1.0 - fit.horizon_survival,
                            time_days=time, risk=fit.risk, horizon_days=horizon_days)
            for method, fit in final if fit.horizon_survival is not None and time is not None]
