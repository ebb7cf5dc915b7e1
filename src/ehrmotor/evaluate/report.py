"""The evaluation's files: results.csv, results.md, a k-shot plot per task, predictions in the
meds-evaluation schema and the landmark labels. Every file is written atomically.

results.md has, per task, one table per metric: a row per k (training subjects; "all" is the
whole pool), a column per method, cells "0.712 [0.650, 0.770]" (mean over replicates [95%
subject-bootstrap interval]; "(3/5)" when draws were skipped; "(penalty raised in 2 of 5 draws)"
when Cox fits needed a stronger penalty), the "MOTOR − best baseline" column and, where the
generator's true hazards are known, an "oracle" row. Uno's C and the integrated Brier score
name their tau and the test events before it above the table. A cell without a number
shows why instead (its note in results.csv: "too few events (4 < 10)", "no comparable pairs in
the test set", "horizon beyond follow-up: ...", "no draw could be fitted (5 skipped); fit failed:
..."), a cell without an interval "0.080 [no interval: undefined in 40 of 200 bootstrap
resamples ...]".

Predictions of the k = "all" fit on the test labels, one file per task and method, in the
meds-evaluation `PredictionSchema` (the MEDS label schema plus two prediction columns, exactly
these types: strict validators reject float64 probabilities):

    predictions/<task>/<method>.parquet
        subject_id int64, prediction_time timestamp[us], boolean_value bool,
        predicted_boolean_value bool (probability >= 0.5),
        predicted_boolean_probability float (float32)

Binary tasks: every test label; the probability is the head's. Time-to-event tasks (heads with a
survival curve): boolean_value is "the event happened within the horizon" (`horizon_days` of
the evaluation, days after prediction_time) and the probability is 1 - S(horizon); a label
censored before the horizon has no such answer and is left out of this file. All test labels,
those censored before the horizon included, are in

    predictions/<task>/time_to_event/<method>.parquet
        the five columns above (boolean_value null where censored before the horizon), and
        horizon_days float64, survival_probability float (S(horizon), float32),
        risk float64 (the head's risk score: higher = sooner), time_days float64 (days to the
        event or to censoring), event bool (True: time_days is the event's).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ehrmotor.artifacts import atomic_path
from ehrmotor.evaluate.metrics import MIN_AT_RISK, MIN_AT_RISK_SHARE
from ehrmotor.evaluate.protocol import methods_for
from ehrmotor.evaluate.scoring import DIFFERENCE, ORACLE, Metric, metrics_for
from ehrmotor.evaluate.tasks import TIME_TO_EVENT, Task, file_stem
from ehrmotor.meds.labels import LabelSet, write_label_set

KIND_TITLES = {TIME_TO_EVENT: "time to event", "binary": "binary"}
PREDICTION_SCHEMA = pl.Schema({
    "subject_id": pl.Int64(), "prediction_time": pl.Datetime("us"),
    "boolean_value": pl.Boolean(), "predicted_boolean_value": pl.Boolean(),
    "predicted_boolean_probability": pl.Float32(),
})
TIME_TO_EVENT_PREDICTION_SCHEMA = pl.Schema({
    **PREDICTION_SCHEMA, "horizon_days": pl.Float64(), "survival_probability": pl.Float32(),
    "risk": pl.Float64(), "time_days": pl.Float64(), "event": pl.Boolean(),
})


@dataclass(frozen=True)
class TaskPredictions:
    """One head's k = "all" predictions on a task's test labels.

    Binary: `label` the label, `probability` the head's. Time to event: `label` whether the
    label is an event, `time_days` its days to the event or censoring, `probability` 1 -
    S(horizon_days) and `risk` the head's risk score.
    """

    task: str
    method: str
    keys: pl.DataFrame  # subject_id, prediction_time
    label: np.ndarray
    probability: np.ndarray
    time_days: np.ndarray | None = None
    risk: np.ndarray | None = None
    horizon_days: float | None = None


@dataclass(frozen=True)
class Report:
    results: pl.DataFrame
    tasks: Sequence[Task]
    predictions: Sequence[TaskPredictions]
    landmark_labels: Sequence[LabelSet]
    horizon_days: float


# --------------------------------------------------------------------------- results.md


def cell(row: dict[str, Any], signed: bool = False, digits: int = 3) -> str:
    """"0.712 [0.650, 0.770]", the row's note (why) when it has no number, "0.080 [no interval:
    why]" without an interval, and "(fitted/draws)" when draws were skipped."""
    mean = float(row["mean"])
    note = str(row["note"] or "")
    if not np.isfinite(mean):
        return note or "no value (no reason recorded)"
    number = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    low, high = float(row["ci_low"]), float(row["ci_high"])
    why = note[note.find("no interval"):] if "no interval" in note else "no interval"
    text = (f"{number} [{low:.{digits}f}, {high:.{digits}f}]" if np.isfinite(low)
            else f"{number} [{why}]")
    if note.startswith("penalty raised"):
        text += f" ({note.split(':')[0]})"
    fitted, skipped = int(row["replicates_fitted"]), int(row["replicates_skipped"])
    return f"{text} ({fitted}/{fitted + skipped})" if skipped else text


def _metric_table(rows: pl.DataFrame, metric: Metric, titles: dict[str, str],
                  pool: int) -> list[str]:
    methods = [m for m in titles if m in set(rows["method"])]
    columns = [*(titles[m] for m in methods), "MOTOR − best baseline"]
    better = "higher" if metric.higher_is_better else "lower"
    first = rows.row(0, named=True)
    tau = (f"; tau = {first['tau_days']:g} days, {first['events_before_tau']} test events "
           "before tau" if first["tau_days"] is not None and np.isfinite(first["tau_days"])
           else "")
    lines = [f"**{metric.title}** ({better} is better{tau})", "",
             "| k | " + " | ".join(columns) + " |",
             "|---|" + "---|" * len(columns)]
    by_k = rows.filter(pl.col("method") != ORACLE)
    for k in by_k["k"].unique(maintain_order=True).to_list():
        cells = {r["method"]: r for r in by_k.filter(pl.col("k") == k).iter_rows(named=True)}
        shown = [cell(cells[m], digits=metric.digits) if m in cells else "" for m in methods]
        shown.append(cell(cells[DIFFERENCE], True, metric.digits) if DIFFERENCE in cells else "")
        label = f"all ({pool})" if k == "all" else k
        lines.append(f"| {label} | " + " | ".join(shown) + " |")
    oracle = rows.filter(pl.col("method") == ORACLE).to_dicts()
    if oracle:
        shown = [cell(oracle[0], digits=metric.digits), *[""] * (len(columns) - 1)]
        lines.append("| oracle (true hazard) | " + " | ".join(shown) + " |")
    return lines


def markdown(report: Report) -> str:
    """results.md: a section per task, a table per metric (see the module docstring)."""
    lines = ["# Evaluation", "",
             "Mean over k-shot replicates on a fixed test set of subjects, [95% subject-bootstrap "
             "interval]; k = training subjects drawn from the pool (all = the whole pool). "
             "MOTOR − best baseline: the best MOTOR head minus the best baseline head (counts or "
             "age (+sex)) of the row, with a paired bootstrap interval. Uno's C and the "
             f"integrated Brier score read the test set up to tau: the last day with at least "
             f"{MIN_AT_RISK_SHARE:.0%} and {MIN_AT_RISK} test labels at risk, at most the "
             "horizon."]
    results = report.results
    for task in report.tasks:
        rows = results.filter(pl.col("task") == task.name)
        if rows.is_empty():
            continue
        first = rows.row(0, named=True)
        lines += ["", f"## {task.name} ({KIND_TITLES[task.kind]})", "",
                  _test_set_line(task, first), ""]
        titles = {m.name: m.title for m in methods_for(task.kind)}
        pool = _pool_size(task, first["test_subjects"])
        for metric in metrics_for(task.kind, report.horizon_days):
            metric_rows = rows.filter(pl.col("metric") == metric.name)
            if metric_rows.is_empty():
                continue
            lines += _metric_table(metric_rows, metric, titles, pool)
            lines.append("")
    return "\n".join(lines).rstrip("\n")


def _test_set_line(task: Task, first: dict[str, Any]) -> str:
    """"Test set: 300 subjects, 1012 labels, 64 events (29 subjects with one)."."""
    what = "events" if task.kind == TIME_TO_EVENT else "positives"
    having = first["test_event_subjects"]
    return (f"Test set: {first['test_subjects']} subjects, {first['test_rows']} labels, "
            f"{first['test_events']} {what} ({having} subject{'s' * (having != 1)} with one).")


def _pool_size(task: Task, test_subjects: int) -> int:
    return task.labels["subject_id"].n_unique() - test_subjects


# --------------------------------------------------------------------------- plots


def plot_kshot(report: Report, task: Task, path: Path) -> Path:
    """Each metric of the task against k (log2 axis; "all" at the pool size), a line and its
    interval band per method, the oracle as a dashed line. matplotlib's Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = report.results.filter(pl.col("task") == task.name)
    metrics = [m for m in metrics_for(task.kind, report.horizon_days)
               if m.name in set(rows["metric"])]
    figure = Figure(figsize=(4.4 * max(1, len(metrics)), 3.6))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, max(1, len(metrics)), squeeze=False).ravel()
    pool = _pool_size(task, int(rows["test_subjects"][0])) if rows.height else 0
    for axis, metric in zip(axes, metrics, strict=False):
        axis.set_title(f"{task.name}: {metric.title}", fontsize="medium")
        axis.set_xlabel("training subjects (k)")
        shown = rows.filter((pl.col("metric") == metric.name) & pl.col("mean").is_finite())
        if shown.is_empty():
            note = rows["note"].drop_nulls()
            axis.text(0.5, 0.5, note[0] if note.len() else "no value", ha="center",
                      transform=axis.transAxes)
            continue
        for method in methods_for(task.kind):
            line = shown.filter(pl.col("method") == method.name)
            if line.is_empty():
                continue
            x = np.array([pool if k == "all" else int(k) for k in line["k"]], dtype=float)
            axis.plot(x, line["mean"].to_numpy(), marker="o", label=method.title)
            axis.fill_between(x, line["ci_low"].to_numpy(), line["ci_high"].to_numpy(),
                              alpha=0.15)
        oracle = shown.filter(pl.col("method") == ORACLE)["mean"]
        if oracle.len():
            axis.axhline(oracle[0], linestyle="--", color="grey", label="oracle")
        axis.set_xscale("log", base=2)
        ks = shown.filter(pl.col("method") != ORACLE)["k"].unique(maintain_order=True).to_list()
        axis.set_xticks([pool if k == "all" else int(k) for k in ks],
                        [f"all\n({pool})" if k == "all" else k for k in ks])
        axis.set_xticks([], minor=True)
        axis.legend(fontsize="small")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=90, format="png")
    return path


# --------------------------------------------------------------------------- files


def _write(frame: pl.DataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        frame.write_parquet(tmp)
    return path


def write_predictions(predictions: TaskPredictions, path: Path) -> Path:
    """A binary head's test predictions in the meds-evaluation schema (module docstring)."""
    probability = np.asarray(predictions.probability, dtype=np.float32)
    frame = predictions.keys.select("subject_id", "prediction_time").with_columns(
        boolean_value=pl.Series(predictions.label.astype(bool)),
        predicted_boolean_value=pl.Series(probability >= 0.5),
        predicted_boolean_probability=pl.Series(probability),
    ).cast(PREDICTION_SCHEMA)
    return _write(frame, path)


def horizon_outcome(time_days: np.ndarray, event: np.ndarray,
                    horizon_days: float) -> tuple[np.ndarray, np.ndarray]:
    """(known, happened): whether a label answers "event within horizon_days?" (an event by
    then, or follow-up reaching it) and, where known, the answer."""
    within = np.asarray(event, dtype=bool) & (time_days <= horizon_days)
    return within | (time_days >= horizon_days), within


def write_time_to_event_predictions(predictions: TaskPredictions, meds_path: Path,
                                    full_path: Path) -> tuple[Path, Path]:
    """A time-to-event head's test predictions at the horizon: the meds-evaluation file (labels
    known at the horizon) and the full file (module docstring)."""
    if predictions.time_days is None or predictions.horizon_days is None:
        raise ValueError(f"{predictions.task}/{predictions.method}: time-to-event predictions "
                         "need time_days and horizon_days")
    time_days = np.asarray(predictions.time_days, dtype=np.float64)
    known, within = horizon_outcome(time_days, predictions.label, predictions.horizon_days)
    probability = np.clip(np.asarray(predictions.probability, dtype=np.float64), 0.0, 1.0)
    risk = predictions.risk if predictions.risk is not None else probability
    frame = predictions.keys.select("subject_id", "prediction_time").with_columns(
        boolean_value=pl.Series(within).set(pl.Series(~known), None),
        predicted_boolean_value=pl.Series(probability >= 0.5),
        predicted_boolean_probability=pl.Series(probability.astype(np.float32)),
        horizon_days=pl.lit(float(predictions.horizon_days)),
        survival_probability=pl.Series((1.0 - probability).astype(np.float32)),
        risk=pl.Series(np.asarray(risk, dtype=np.float64)),
        time_days=pl.Series(time_days),
        event=pl.Series(np.asarray(predictions.label, dtype=bool)),
    ).cast(TIME_TO_EVENT_PREDICTION_SCHEMA)
    meds = frame.filter(pl.Series(known)).select(list(PREDICTION_SCHEMA))
    return _write(meds, meds_path), _write(frame, full_path)


def _write_prediction_files(predictions: TaskPredictions, out_dir: Path) -> dict[str, Path]:
    folder = out_dir / "predictions" / file_stem(predictions.task)
    name, key = f"{file_stem(predictions.method)}.parquet", (
        f"predictions/{predictions.task}/{predictions.method}")
    if predictions.time_days is None:
        return {key: write_predictions(predictions, folder / name)}
    meds, full = write_time_to_event_predictions(predictions, folder / name,
                                                 folder / "time_to_event" / name)
    return {key: meds, f"{key}/time_to_event": full}


def write_report(report: Report, out_dir: Path) -> tuple[str, dict[str, Path]]:
    """Write every file of the report to `out_dir`; return results.md's text and the files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"results_csv": out_dir / "results.csv", "results_md": out_dir / "results.md"}
    with atomic_path(files["results_csv"]) as tmp:
        report.results.write_csv(tmp)
    table = markdown(report)
    with atomic_path(files["results_md"]) as tmp:
        tmp.write_text(table + "\n", encoding="utf-8")
    for task in report.tasks:
        path = out_dir / f"kshot_{file_stem(task.name)}.png"
        files[f"kshot/{task.name}"] = plot_kshot(report, task, path)
    for predictions in report.predictions:
        files.update(_write_prediction_files(predictions, out_dir))
    for label_set in report.landmark_labels:
        path = out_dir / "labels" / f"{file_stem(label_set.name)}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        files[f"labels/{label_set.name}"] = write_label_set(label_set, path)
    return table, files
