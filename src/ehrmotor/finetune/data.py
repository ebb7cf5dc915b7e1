"""The labels of one task as model inputs, by the one featurization path of
`ehrmotor.representations`.

`task_labels` reads a label file or folder (anything `evaluate` reads: MEDS label files, ACES
output, ehrmotor's time-to-event labels) into `subject_id`, `prediction_time` and the targets of
its kind (`ehrmotor.model.task_models.TARGETS`): time-to-event `event_days` (days to the event,
or to censoring) and `event`; binary `outcome` (boolean_value).

`task_windows` cuts the windows `compute_features` would cut for those labels (MEDS shards ->
positions -> `embedding_windows` ending at each label's position) and returns one row per window
in the prepared layout (`window_sequences`), with `points` (the labels' local indices), `labels`
(their row numbers in the label table) and one list column per target riding along, ready for
`ehrmotor.sequences.batching.collate_windows`. Unknown subjects and labels on or before the
birth date are refused with one-line InputErrors (as `compute_features` refuses them).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from ehrmotor.bundle import Bundle
from ehrmotor.errors import InputError
from ehrmotor.meds.labels import LabelSet, read_label_set, time_to_event_days
from ehrmotor.model.task_models import BINARY, TARGETS, TIME_TO_EVENT
from ehrmotor.sequences.batching import collate_windows
from ehrmotor.sequences.labelled import label_positions, read_positions
from ehrmotor.sequences.positions import list_series
from ehrmotor.sequences.windows import embedding_windows, first_rows, window_sequences

MIN_CODED_SHARE = 0.5  # below this share of positions with a known code, the vocabulary is wrong


def task_labels(labels: str | Path | LabelSet) -> tuple[str, str, pl.DataFrame]:
    """(task name, kind, frame) of the one task in a label file or folder; the frame holds
    subject_id, prediction_time and the kind's targets, sorted by subject and time."""
    label_set = labels if isinstance(labels, LabelSet) else read_label_set(labels)
    where = ", ".join(str(f) for f in label_set.files) or label_set.name
    frame = label_set.frame
    if label_set.kind == TIME_TO_EVENT:
        frame = time_to_event_days(frame).select(
            "subject_id", "prediction_time", event_days="time_days", event="event")
        kind = TIME_TO_EVENT
    elif label_set.kind == "boolean":
        frame = frame.select("subject_id", "prediction_time", outcome="boolean_value")
        kind = BINARY
    else:
        raise InputError(f"{where}: {label_set.kind} labels cannot be fine-tuned on; give "
                         "boolean_value or time-to-event labels")
    if frame.is_empty():
        raise InputError(f"{where}: no labels")
    return label_set.name, kind, frame.sort("subject_id", "prediction_time")


def task_windows(db: Any, bundle: Bundle, labels: pl.DataFrame, kind: str,
                 num_proc: int = 1) -> pl.DataFrame:
    """Windows with the labels riding along (module docstring); `labels` as `task_labels`
    returns them (rows numbered in that order)."""
    if bundle.max_window is None:
        raise InputError(f"{bundle.path}: records no training context (max_window)")
    table = labels.with_row_index("label")
    positions = read_positions(db, table, (bundle.tokenizer, bundle.ontology), num_proc)
    plan = embedding_windows(label_positions(table, positions), bundle.max_window).join(
        first_rows(positions), on="subject_id", how="left", maintain_order="left")
    rows = window_sequences(positions, plan).with_columns(points=plan["points"],
                                                          labels=plan["labels"])
    order = plan["labels"].explode().to_numpy()
    offsets = np.concatenate([[0], np.cumsum(plan["labels"].list.len().to_numpy())])
    targets = [list_series(name, offsets, table[name].cast(pl.Float32).to_numpy()[order])
               for name in TARGETS[kind]]
    return rows.with_columns(targets)


def check_vocabulary(windows: pl.DataFrame, where: str) -> None:
    """InputError when most positions hold no code of the model's vocabulary (data coded with
    another vocabulary than the model was pretrained on)."""
    sizes = windows["bag_sizes"].explode().to_numpy()
    share = float((sizes > 0).mean()) if len(sizes) else 0.0
    if share < MIN_CODED_SHARE:
        raise InputError(f"{where}: only {share:.0%} of the labelled subjects' positions hold a "
                         "code of the model's vocabulary; the model was pretrained on data coded "
                         "otherwise (expected at least "
                         f"{MIN_CODED_SHARE:.0%})")


class TaskCollator:
    """`collate_windows` plus the targets of a task kind, concatenated over the points."""

    def __init__(self, kind: str) -> None:
        self.targets = TARGETS[kind]

    def __call__(self, rows: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        batch = collate_windows(rows)
        for name in self.targets:
            batch[name] = torch.cat([row[name] for row in rows]).float()
        return batch
