"""Step 4 of `prepare`: the MOTOR pretraining task (which codes, time bins, initial rates).

- Candidate tasks: the first `candidate_tasks` (prepare's setting) code entries of the
  vocabulary, in vocabulary order.
- Fitted on the sampled prediction points of train subjects (see `ehrmotor.motor_task.occurrences`;
  `count_tasks` per shard, from the occurrence runs): per task k, events n_k (the number of
  points at which k occurs later: each point has at most one event per task, its next
  occurrence) and exposure E_k = Σ_points min(days to k, days to censoring). The initial rate
  is n_k / E_k per day, i.e. the fraction of points with an event divided by the mean time to
  event or censoring; its log is the initial log-hazard of every time bin. A task is kept when
  n_k ≥ `min_task_events` and n_k ≥ `min_task_fraction` × points (events after at least that
  share of the prediction points) and its rate is above zero; the others are dropped and
  counted.
- Points with no later occurrence of any task stay: they are censored for every task (femr drops
  them), and count in the points and exposures above.
- Time bins: quantiles of the observed times to event, pooled over tasks (from a bounded sample):
  `num_bins` bins with edges [0, q1, ..., q_{B-1}, +inf] in days.

Artifact `motor_task.json` (strict JSON; the open last edge is not written):
    format_version, num_bins, final_layer_size,
    bin_edges_days: [0, q1, ..., q_{B-1}]  (B finite edges; the last bin is unbounded)
    tasks: [{code, entry, candidate, events, exposure_days, rate_per_day}]  (model task order;
        candidate: the task's index among the candidates, as the datasets number tasks)
    dropped_tasks, candidate_tasks, points

The statistics are computed while the train dataset is written (one pass over the shards) and
kept in its folder (`TaskCounts.save`, `TaskCounts.load`), so changing a task setting refits the
task without reading the shards again.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ehrmotor.errors import InputError
from ehrmotor.motor_task.occurrences import US_PER_DAY, run_pairs
from ehrmotor.vocabulary.tokenizer import Tokenizer

FORMAT_VERSION = 2
SAMPLE_PER_SHARD = 200_000


def candidate_tasks(tokenizer: Tokenizer, count: int) -> pl.DataFrame:
    """code, entry, task: the first `count` code entries of the vocabulary."""
    codes = tokenizer.entries.filter(pl.col("kind") == "code").head(count)
    return codes.select("code", entry="index").with_row_index("task").with_columns(
        pl.col("task").cast(pl.Int32))


@dataclass(frozen=True)
class TaskCounts:
    """One shard's contribution: per-task events and exposure, points, a sample of event times."""

    points: int
    total_censor_days: float
    # task, events (points with a later occurrence of the task), exposure_reduction
    # (Σ over those points of days to censoring - days to the event)
    per_task: pl.DataFrame
    days_sample: np.ndarray

    STATISTICS = "task_statistics.arrow"
    DAYS = "task_days.arrow"
    TOTALS = "task_totals.json"

    @classmethod
    def combine(cls, counts: list[TaskCounts]) -> TaskCounts:
        """The counts of several shards as one (per-task sums; days samples in shard order)."""
        per_task = pl.concat([c.per_task for c in counts]).group_by("task").agg(
            pl.col("events").sum().cast(pl.UInt32), pl.col("exposure_reduction").sum()
        ).sort("task")
        days = np.concatenate([c.days_sample for c in counts]) if counts else np.array([])
        return cls(sum(c.points for c in counts), sum(c.total_censor_days for c in counts),
                   per_task, days)

    def save(self, folder: Path) -> None:
        """Write into `folder`: the per-task sums and the days sample (Arrow IPC), the points and
        total censoring days (JSON)."""
        self.per_task.write_ipc(folder / self.STATISTICS)
        pl.DataFrame({"days": self.days_sample}).write_ipc(folder / self.DAYS)
        (folder / self.TOTALS).write_text(json.dumps(
            {"points": self.points, "total_censor_days": self.total_censor_days}) + "\n")

    @classmethod
    def load(cls, folder: Path) -> TaskCounts:
        totals = json.loads((folder / cls.TOTALS).read_text())
        return cls(int(totals["points"]), float(totals["total_censor_days"]),
                   pl.read_ipc(folder / cls.STATISTICS),
                   pl.read_ipc(folder / cls.DAYS)["days"].to_numpy())


def count_tasks(points: pl.DataFrame, runs: pl.DataFrame, last_time: pl.DataFrame,
                seed: int) -> TaskCounts:
    """Reduce one shard's labels to task statistics, without listing its (point, task) pairs.

    points: time, censor_days per point; runs: their `occurrences.occurrence_runs`; last_time:
    `occurrences.last_event_times`. A run of n points labelled by an occurrence at time o adds n
    events and n · (last_time - o) days of exposure reduction (each point's days to censoring minus
    its days to the event). The days sample is `SAMPLE_PER_SHARD` pairs drawn with `seed` (all pairs
    when there are fewer).
    """
    per_run = runs.join(last_time, on="subject_id", how="left", maintain_order="left").select(
        "task", events=pl.col("stop") - pl.col("start"),
        exposure_reduction=(pl.col("stop") - pl.col("start")).cast(pl.Float64)
        * (pl.col("last_time") - pl.col("time")).cast(pl.Float64) / US_PER_DAY,
    )
    per_task = per_run.group_by("task").agg(pl.col("events").sum().cast(pl.UInt32),
                                            pl.col("exposure_reduction").sum())
    pairs = int(per_run["events"].sum() or 0)
    if pairs > SAMPLE_PER_SHARD:
        index = np.sort(np.random.default_rng(seed).choice(pairs, SAMPLE_PER_SHARD,
                                                           replace=False))
    else:
        index = np.arange(pairs)
    days = run_pairs(runs, points["time"].to_numpy(), index)["days"].to_numpy()
    return TaskCounts(points.height, float(points["censor_days"].cast(pl.Float64).sum()),
                      per_task, days.astype(np.float64))


@dataclass
class MotorTask:
    """The fitted task: task codes with initial rates, and time-bin edges in days."""

    # task (model order), code, entry, candidate, events, exposure_days, rate_per_day
    tasks: pl.DataFrame
    bin_edges_days: list[float]  # finite edges, first 0; the last bin is unbounded
    final_layer_size: int | None  # None: the model preset decides
    dropped_tasks: int
    candidate_tasks: int
    points: int

    @property
    def num_bins(self) -> int:
        return len(self.bin_edges_days)

    @classmethod
    def fit(cls, candidates: pl.DataFrame, counts: TaskCounts, *, num_bins: int,
            final_layer_size: int | None, min_task_events: int,
            min_task_fraction: float) -> MotorTask:
        """Keep the candidates with at least `min_task_events` events, events after at least
        `min_task_fraction` of the points, and a rate above zero; fit the time bins.

        counts: the train shards' `TaskCounts`, combined (`TaskCounts.combine`)."""
        if counts.points == 0:
            raise InputError("no prediction points among train subjects; cannot fit MOTOR task")
        tasks = (
            candidates.join(counts.per_task, on="task", how="left")
            .with_columns(pl.col("events").fill_null(0),
                          exposure_days=counts.total_censor_days
                          - pl.col("exposure_reduction").fill_null(0.0))
            .with_columns(rate_per_day=pl.col("events") / pl.col("exposure_days"))
        )
        kept = tasks.filter((pl.col("events") >= min_task_events)
                            & (pl.col("events") >= min_task_fraction * counts.points)
                            & (pl.col("rate_per_day") > 0))
        kept = kept.sort("task").drop("exposure_reduction").rename(
            {"task": "candidate"}).with_row_index("task")
        days = counts.days_sample
        inner = np.quantile(days, np.arange(1, num_bins) / num_bins) if len(days) else []
        edges = [0.0, *sorted({float(e) for e in inner if e > 0})]
        return cls(kept.select(pl.col("task").cast(pl.Int32), "code", "entry",
                               pl.col("candidate").cast(pl.Int32), "events", "exposure_days",
                               "rate_per_day"),
                   edges, final_layer_size, candidates.height - kept.height, candidates.height,
                   counts.points)

    def task_map(self) -> np.ndarray:
        """(candidate_tasks,) the model task of each candidate task, -1 for a dropped one."""
        mapping = np.full(self.candidate_tasks, -1, dtype=np.int64)
        mapping[self.tasks["candidate"].to_numpy()] = self.tasks["task"].to_numpy()
        return mapping

    def initial_log_rates(self) -> np.ndarray:
        """(num_tasks,) log of each task's rate per day: the initial log-hazard of every bin."""
        return np.log(self.tasks["rate_per_day"].to_numpy())

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION, "num_bins": self.num_bins,
            "final_layer_size": self.final_layer_size, "bin_edges_days": self.bin_edges_days,
            "tasks": self.tasks.select("code", "entry", "candidate", "events", "exposure_days",
                                       "rate_per_day").to_dicts(),
            "dropped_tasks": self.dropped_tasks, "candidate_tasks": self.candidate_tasks,
            "points": self.points,
        }

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=1, allow_nan=False) + "\n")

    @classmethod
    def load(cls, path: Path) -> MotorTask:
        document = json.loads(path.read_text())
        if document.get("format_version") != FORMAT_VERSION:
            raise InputError(f"{path}: format_version {document.get('format_version')!r}; "
                             f"expected {FORMAT_VERSION}")
        tasks = pl.DataFrame(document["tasks"], schema={
            "code": pl.String, "entry": pl.UInt32, "candidate": pl.Int32, "events": pl.UInt32,
            "exposure_days": pl.Float64, "rate_per_day": pl.Float64,
        }).with_row_index("task").with_columns(pl.col("task").cast(pl.Int32))
        if not all(math.isfinite(e) for e in document["bin_edges_days"]):
            raise InputError(f"{path}: bin_edges_days must be finite")
        return cls(tasks, document["bin_edges_days"], document["final_layer_size"],
                   document["dropped_tasks"], document["candidate_tasks"], document["points"])
