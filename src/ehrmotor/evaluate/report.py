"""The evaluation report: the results as a markdown table and as learning curves (PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ehrmotor.artifacts import atomic_path

FEATURE_LABELS = {"motor": "MOTOR", "counts": "counts", "oracle": "oracle"}


def _cell(row: dict[str, Any] | None) -> str:
    """"0.712 [0.650, 0.770]", or "n/a"."""
    if row is None or not np.isfinite(float(row["mean"])):
        return "n/a"
    interval = (f" [{row['ci_low']:.3f}, {row['ci_high']:.3f}]"
                if np.isfinite(float(row["ci_low"])) else "")
    return f"{row['mean']:.3f}{interval}"


def markdown_table(results: pl.DataFrame) -> str:
    """One row per outcome × metric × train size; columns MOTOR, counts, oracle."""
    lines = ["| outcome | metric | train size | test (events) | MOTOR | counts | oracle |",
             "|---|---|---:|---:|---|---|---|"]
    keys = results.select("outcome", "metric").unique(maintain_order=True).iter_rows()
    for outcome, metric in keys:
        task = results.filter((pl.col("outcome") == outcome) & (pl.col("metric") == metric))
        oracle = task.filter(pl.col("features") == "oracle").to_dicts()
        probes = task.filter(pl.col("features") != "oracle")
        for (size,) in probes.select("train_size").unique(maintain_order=True).iter_rows():
            cells = {r["features"]: r for r in probes.filter(pl.col("train_size") == size)
                     .to_dicts()}
            first = next(iter(cells.values()))
            shown = f"{size} (all)" if size == first["train_pool"] else str(size)
            lines.append(f"| {outcome} | {metric} | {shown} | {first['n_test']} "
                         f"({first['events_test']}) | {_cell(cells.get('motor'))} | "
                         f"{_cell(cells.get('counts'))} | {_cell(oracle[0] if oracle else None)} |")
    return "\n".join(lines)


def plot_learning_curves(results: pl.DataFrame, path: Path) -> Path:
    """Metric vs. train size per outcome (C-index, else AUROC): MOTOR and counts with their
    intervals, the oracle as a dashed line. Drawn on matplotlib's Agg canvas (no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    primary = results.sort(pl.col("metric") != "c_index", maintain_order=True).unique(
        "outcome", keep="first", maintain_order=True).select("outcome", "metric")
    tasks = primary.rows()
    columns = max(1, min(3, len(tasks)))
    rows = max(1, -(-len(tasks) // columns))
    figure = Figure(figsize=(4.2 * columns, 3.4 * rows))
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for axis, (outcome, metric) in zip(axes, tasks, strict=False):
        task = results.filter((pl.col("outcome") == outcome) & (pl.col("metric") == metric)
                              & pl.col("mean").is_finite())
        axis.set_title(outcome)
        axis.set_ylabel("C-index" if metric == "c_index" else "AUROC")
        oracle = task.filter(pl.col("features") == "oracle")["mean"]
        if oracle.len():
            axis.axhline(oracle[0], linestyle="--", color="grey", label="oracle")
        sizes = task.filter(pl.col("features") != "oracle")["train_size"].unique().sort()
        if sizes.is_empty():
            axis.text(0.5, 0.5, "too few events", ha="center", transform=axis.transAxes)
            continue
        for name, marker in (("motor", "o"), ("counts", "s")):
            line = task.filter(pl.col("features") == name).sort("train_size")
            mean = line["mean"].to_numpy()
            spread = np.abs(np.stack([mean - line["ci_low"].to_numpy(),
                                      line["ci_high"].to_numpy() - mean]))
            axis.errorbar(line["train_size"].to_numpy(), mean, yerr=np.nan_to_num(spread),
                          marker=marker, capsize=3, label=FEATURE_LABELS[name])
        axis.set_xscale("log")
        axis.set_xticks(sizes.to_list(), [str(size) for size in sizes], minor=False)
        axis.set_xticks([], minor=True)
        axis.set_xlabel("probe-training subjects")
        axis.legend(fontsize="small")
    for axis in axes[len(tasks):]:
        axis.set_axis_off()
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=100, format="png")
    return path
