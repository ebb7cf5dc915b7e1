"""A bundle's representations at label times: the one featurization path.

`bundle_features(db, bundle, labels)` (with a bundle loaded by `load_bundle`) is what
`ehrmotor.embed.compute_features` (femr's call and result), `ehrmotor evaluate` and `ehrmotor
predict` compute. It returns one row per label, sorted by (subject_id, prediction_time); labels
with equal keys (duplicates included) keep their input order:

    subject_ids    int64 (n,)
    feature_times  datetime64[us] (n,)  each label's prediction_time, exactly as given
    features       float32 (n, hidden)  the model's final representation (`MotorModel.encode`)

The path is training's up to the encoder: MEDS shards (`meds.scan_shard`, or a meds_reader
database; `ehrmotor.sequences.labelled`) -> `positions.build_positions` -> `windows` ->
`batching.pack`, `collate_windows` (all in `ehrmotor.sequences`) -> `MotorModel.encode`; only the
windows cut differ, and no labels ride along (just the points read).

Policies:
- A label's representation is read at the last position whose time is at or before its
  prediction_time (MEDS: the label may use data at exactly that time). Before anything is built,
  each subject's events after its latest prediction_time are dropped (its static, birth and first
  events are kept so that birth never moves), so no later event can reach a label.
- Position 0 folds together the static events and every event of the birth day, so a label on the
  birth day could see events after its prediction_time: labels on or before the birth date are
  refused with an InputError (a ValueError), as are labels of subjects absent from the data.
- Windows as training sees a position (`ehrmotor.sequences.windows`): position 0, then at most
  context - 1 positions ending at the label's. The context is the model's
  (`MotorConfig.max_window`). At a training point whose
  history fits one training window, the representation equals the one training computed.
- `tokens_per_batch` is only a packing budget (default and minimum: the context). `model.encode`
  runs under `torch.no_grad()`, under bf16 autocast where pretraining's precision "auto" picks it
  (`precision.auto_uses_bf16`: CUDA, and CPUs with AMX-BF16 for models at least 256 wide),
  else in fp32; on CUDA batches are padded to `tokens_per_batch` so the attention kernel
  keeps one shape.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Any

import numpy as np
import polars as pl
import torch
from tqdm import tqdm

from ehrmotor.bundle import Bundle
from ehrmotor.errors import InputError
from ehrmotor.model import MotorModel
from ehrmotor.precision import auto_uses_bf16
from ehrmotor.sequences.batching import collate_windows, frame_rows, pack, pad_batch
from ehrmotor.sequences.labelled import LabelsLike, label_positions, read_labels, read_positions
from ehrmotor.sequences.windows import (
    embedding_windows,
    first_rows,
    positions_per_window,
    window_sequences,
)

log = logging.getLogger(__name__)


def check_sizes(context: int | None, tokens_per_batch: int | None) -> tuple[int, int]:
    """(context, packing budget); InputError for a context below 2 or a budget below it."""
    if context is None:
        raise InputError("the model bundle records no training context (max_window in "
                         "config.json, as in a converted femr model); pass context")
    if context < 2:
        raise InputError(f"context must be at least 2 (position 0 and one more); got {context}")
    budget = context if tokens_per_batch is None else tokens_per_batch
    if budget < context:
        raise InputError(f"tokens_per_batch {budget} is smaller than the context of {context} "
                         f"positions; a window must fit one batch: set it to at least {context}")
    return context, budget


def _encode(model: MotorModel, positions: pl.DataFrame, plan: pl.DataFrame,
            tokens_per_batch: int, device: torch.device, features: np.ndarray) -> None:
    """Fill `features` at each window's `labels` with the representations at its `points`.

    plan: `embedding_windows` with `first_row`, in packing order. On CUDA every batch is padded to
    `tokens_per_batch` positions.
    """
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16)
                if auto_uses_bf16(device.type, model.config.hidden_size, training=False)
                else nullcontext())
    lengths = positions_per_window(plan).to_numpy()
    for batch in tqdm(pack(lengths, np.arange(len(lengths)), tokens_per_batch),
                      desc="features", unit="batch", disable=None):
        chosen = plan.slice(batch[0], len(batch))
        rows = window_sequences(positions, chosen).with_columns(points=chosen["points"])
        inputs = collate_windows(frame_rows(rows))
        if device.type == "cuda":
            inputs = pad_batch(inputs, tokens_per_batch)
        point_indices = inputs.pop("point_indices").to(device)
        with torch.no_grad(), autocast:
            hidden = model.encode(**{k: v.to(device) for k, v in inputs.items()})  # (T, hidden)
        labels = chosen["labels"].explode().to_numpy()
        features[labels] = hidden[point_indices].float().cpu().numpy()


def bundle_features(db: Any, bundle: Bundle, labels: LabelsLike, num_proc: int = 1,
                    tokens_per_batch: int | None = None,
                    device: str | torch.device | None = None,
                    context: int | None = None) -> dict[str, np.ndarray]:
    """`compute_features` with a bundle already loaded by `load_bundle`."""
    context, budget = check_sizes(bundle.max_window if context is None else context,
                                  tokens_per_batch)
    table = read_labels(labels).sort("subject_id", "prediction_time", maintain_order=True) \
        .with_row_index("label")
    model = bundle.model.eval()
    result = {
        "subject_ids": table["subject_id"].to_numpy().astype(np.int64),
        "feature_times": table["prediction_time"].to_numpy().astype("datetime64[us]"),
        "features": np.zeros((table.height, model.config.hidden_size), dtype=np.float32),
    }
    if table.is_empty():
        return result
    positions = read_positions(db, table, (bundle.tokenizer, bundle.ontology), num_proc)
    plan = embedding_windows(label_positions(table, positions), context).join(
        first_rows(positions), on="subject_id", how="left", maintain_order="left")
    chosen = torch.device(device if device is not None
                          else "cuda" if torch.cuda.is_available() else "cpu")
    log.info("compute_features: %d labels of %d subjects in %d windows of up to %d positions "
             "on %s", table.height, table["subject_id"].n_unique(), plan.height, context, chosen)
    _encode(model.to(chosen), positions, plan, budget, chosen, result["features"])
    return result
