"""`compute_features` for a bundle written by `ehrmotor convert-femr`: femr's features on CPU.

`ehrmotor.compute_features` (and `ehrmotor embed`) hand a converted bundle here
(`is_femr_bundle`). The result is ehrmotor's: one row per label, sorted by (subject_id,
prediction_time), feature_times the labels' prediction times, features float32 (n, hidden).

A bundle of femr's released layout (femr 0.2.0 / 0.2.1) is featurized by `released`
(whole histories, flat tokens). What femr 0.2.4's own compute_features computes, label by label:
- positions and bags as femr builds them (`tokens`); a label reads the last position at or
  before its prediction_time. Labels before a subject's first position after the birth day are
  refused (femr silently drops them and every later label of that subject).
- windows as femr's exact batching cuts them with max_length = `tokens_per_batch` (default
  femr's 1024): a subject's labels are covered greedily, a window of n positions is position 0
  (the birth bag) then the n - 1 positions ending at its last label. Where femr's windows
  overlap, femr computes such a label twice; here it is read from the first window (the longer
  history).
- the model in fp32 (femr's autocast is CUDA-only, so femr on CPU runs fp32 too). Time data and
  bag weights are float16-rounded but, as femr's compute_features gets them back from its
  `datasets` cache, float32 tensors: femr squares the time data in fp32 there (its
  `convert_subject` path squares in fp16, which moves the fixture's features by up to 1.5e-3).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from safetensors.torch import load_file
from tqdm import tqdm

from ehrmotor.errors import BundleError, InputError
from ehrmotor.femr.model import (
    CONFIG_FILE,
    DICTIONARY_FILE,
    MODEL_TYPE,
    ONTOLOGY_DIR,
    PARENTS_FILE,
    WEIGHTS_FILE,
    FemrHybridConfig,
    FemrHybridEncoder,
)
from ehrmotor.femr.released import (
    LAYOUT as RELEASED,
)
from ehrmotor.femr.released import (
    FemrReleasedEncoder,
    flat_vocabulary,
    released_features,
)
from ehrmotor.femr.tokens import (
    TIME_COLUMNS,
    FemrVocabulary,
    femr_positions,
    locate_labels,
)

log = logging.getLogger(__name__)

FEMR_TOKENS_PER_BATCH = 1024  # femr 0.2.4's compute_features default
REMOVED_VOCABULARIES = ("SPL", "HemOnc")  # never ancestors unless the data has the code


@dataclass(frozen=True)
class FemrBundle:
    path: Path
    config: FemrHybridConfig
    model: FemrHybridEncoder | FemrReleasedEncoder
    vocabulary: FemrVocabulary | dict[str, pl.DataFrame]  # the latter: `flat_vocabulary`
    parents: pl.DataFrame  # code, parent (empty for the released layout)


def is_femr_bundle(path: str | Path) -> bool:
    """True for a folder whose config.json says model_type "ehrmotor-femr-hybrid"."""
    config = Path(path) / CONFIG_FILE
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("model_type") == MODEL_TYPE
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return False


def load_femr_bundle(path: str | Path) -> FemrBundle:
    bundle = Path(path)
    try:
        config = FemrHybridConfig.from_json_file(bundle / CONFIG_FILE)
        released = config.layout == RELEASED
        model = FemrReleasedEncoder(config) if released else FemrHybridEncoder(config)
        weights = load_file(bundle / WEIGHTS_FILE)
        encoder = {k: v for k, v in weights.items() if not k.startswith("head.")}
        model.load_state_dict(encoder, strict=True)
        vocabulary = (flat_vocabulary(bundle / DICTIONARY_FILE) if released
                      else FemrVocabulary.load(bundle / DICTIONARY_FILE))
        parents = (pl.DataFrame(schema={"code": pl.String, "parent": pl.String}) if released
                   else pl.read_parquet(bundle / ONTOLOGY_DIR / PARENTS_FILE))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise BundleError(f"{bundle}: not a usable converted femr bundle "
                          f"({' '.join(str(exc).split())[:300]})") from exc
    return FemrBundle(bundle, config, model.eval(), vocabulary, parents)


def ancestors_of(parents: pl.DataFrame, codes: pl.Series) -> pl.DataFrame:
    """code, ancestor (self included) for `codes` through the parent edges."""
    from ehrmotor.vocabulary.ontology import _closure, _reachable

    data = codes.unique().drop_nulls()
    vocab = parents["parent"].str.split("/").list.first()
    usable = parents.filter(~vocab.is_in(list(REMOVED_VOCABULARIES))
                            | pl.col("parent").is_in(data.implode()))
    kept = _reachable(usable, data)
    closure = _closure(usable.filter(pl.col("code").is_in(kept.implode())), kept)
    return closure.filter(pl.col("code").is_in(data.implode())).select("code", "ancestor")


def read_events(db: Any, subjects: np.ndarray) -> pl.DataFrame:
    """MEDS events of `subjects` (DATA_COLUMNS, in file order) from a MEDS folder or a
    meds_reader database (object or path)."""
    from ehrmotor.meds import data_files, scan_shard
    from ehrmotor.sequences.labelled import meds_reader_events

    if hasattr(db, "path_to_database") or (Path(db) / "meds_reader.version").exists():
        import meds_reader

        reader = db if hasattr(db, "path_to_database") else meds_reader.SubjectDatabase(str(db))
        known = set(iter(reader))
        return meds_reader_events(reader[int(s)] for s in subjects if int(s) in known)
    wanted = pl.Series(subjects).implode()
    frames = [scan_shard(f).filter(pl.col("subject_id").is_in(wanted)).collect()
              for f in data_files(Path(db))]
    return pl.concat(frames)


def label_positions(labels: pl.DataFrame, positions: pl.DataFrame) -> pl.DataFrame:
    """labels plus `position`: the last position >= 1 at or before prediction_time."""
    later = positions.filter(pl.col("position") >= 1).select("subject_id", "time", "position")
    return locate_labels(labels, later, "position", missing="are not in the data",
                         before="the subject's first event after the birth day",
                         known=positions["subject_id"])


def femr_windows(label_positions: np.ndarray, max_length: int) -> list[tuple[int, int]]:
    """femr's exact covering of one subject's sorted label positions: (start, end) windows."""
    windows, start, end = [], 0, None
    for position in label_positions.tolist():
        if position - start + 1 >= max_length:
            if end is not None:
                windows.append((start, end))
            start, end = position - max_length + 1, position
        else:
            end = position
    windows.append((start, end))
    return windows


def _plan(located: pl.DataFrame, max_length: int) -> pl.DataFrame:
    """subject_id, start, end, positions of each window (first window covering each label)."""
    rows = []
    for subject, group in located.group_by("subject_id", maintain_order=True):
        marks = np.unique(group["position"].to_numpy())
        for start, end in femr_windows(marks, max_length):
            rows.append((subject[0], start, end))
    return pl.DataFrame(rows, schema={"subject_id": pl.Int64, "start": pl.Int64,
                                      "end": pl.Int64}, orient="row")


def _assign(located: pl.DataFrame, plan: pl.DataFrame) -> pl.DataFrame:
    """label, window, offset (the label's index inside its window): first covering window."""
    windows = plan.with_row_index("window")
    return (located.join(windows, on="subject_id", how="inner")
            .filter((pl.col("position") > pl.col("start")) & (pl.col("position") <= pl.col("end")))
            .group_by("label").agg(pl.all().sort_by("window").first())
            .with_columns(offset=pl.when(pl.col("start") == 0).then(pl.col("position"))
                          .otherwise(pl.col("position") - pl.col("start")))
            .select("label", "window", "offset").sort("label"))


def _window_rows(plan: pl.DataFrame, first_row: dict[int, int]) -> list[np.ndarray]:
    """Row indices (into the positions table) of each window: birth, then start+1 .. end."""
    rows = []
    for subject, start, end in plan.iter_rows():
        base = first_row[subject]
        rest = np.arange(base + start + 1, base + end + 1)
        rows.append(np.concatenate(([base], rest)) if start else np.arange(base, base + end + 1))
    return rows


def _batches(lengths: list[int], budget: int) -> list[list[int]]:
    groups: list[list[int]] = [[]]
    used = 0
    for index, length in enumerate(lengths):
        if groups[-1] and used + length > budget:
            groups.append([])
            used = 0
        groups[-1].append(index)
        used += length
    return groups


def _inputs(rows: np.ndarray, segments: np.ndarray, positions: dict[str, np.ndarray],
            bag_ptr: np.ndarray, bags: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    counts = bag_ptr[rows + 1] - bag_ptr[rows]
    starts = np.repeat(bag_ptr[rows] - np.concatenate(([0], np.cumsum(counts)[:-1])), counts)
    picks = starts + np.arange(counts.sum())
    return {
        "entries": torch.from_numpy(bags["entry"][picks]),
        "weights": torch.from_numpy(bags["weight"][picks]),
        "bag_offsets": torch.from_numpy(np.concatenate(([0], np.cumsum(counts)))),
        "ages_days": torch.from_numpy(positions["age_days"][rows]),
        "time_data": torch.from_numpy(positions["time_data"][rows]),
        "segment_ids": torch.from_numpy(segments),
    }


def _encode(bundle: FemrBundle, positions: pl.DataFrame, bags: pl.DataFrame, plan: pl.DataFrame,
            assigned: pl.DataFrame, budget: int, features: np.ndarray) -> None:
    first = positions.with_row_index("row").filter(pl.col("position") == 0)
    first_row = dict(zip(first["subject_id"].to_list(), first["row"].to_list(), strict=True))
    columns = {"age_days": positions["age_days"].to_numpy(),
               "time_data": positions.select(TIME_COLUMNS).to_numpy()
               .astype(np.float16).astype(np.float32)}  # femr's batches: fp16 values, fp32 math
    keyed = positions.select("subject_id", "position").with_row_index("row")
    rows_of_bags = bags.join(keyed, on=["subject_id", "position"], how="left",
                             maintain_order="left")["row"].to_numpy()
    bag_ptr = np.searchsorted(rows_of_bags, np.arange(positions.height + 1))
    bag_columns: dict[str, np.ndarray] = {"entry": bags["entry"].to_numpy().astype(np.int64),
                   "weight": bags["weight"].to_numpy().astype(np.float32)}
    window_rows = _window_rows(plan, first_row)
    by_window = assigned.group_by("window").agg("label", "offset")
    labels_of = {w: (np.array(ls), np.array(os)) for w, ls, os in by_window.iter_rows()}
    groups = _batches([len(r) for r in window_rows], budget)
    with torch.no_grad():
        for group in tqdm(groups, desc="femr features", unit="batch", disable=None):
            lengths = [len(window_rows[w]) for w in group]
            rows = np.concatenate([window_rows[w] for w in group])
            segments = np.repeat(np.arange(len(group)), lengths)
            hidden = bundle.model(**_inputs(rows, segments, columns, bag_ptr, bag_columns))
            starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
            for window, start in zip(group, starts, strict=True):
                if window in labels_of:
                    label, offset = labels_of[window]
                    features[label] = hidden[start + offset].numpy()


def femr_features(db: Any, bundle: FemrBundle, labels: pl.DataFrame,
                  tokens_per_batch: int | None = None) -> dict[str, np.ndarray]:
    """compute_features for a loaded femr bundle; labels as
    `ehrmotor.sequences.labelled.read_labels` gives."""
    budget = FEMR_TOKENS_PER_BATCH if tokens_per_batch is None else int(tokens_per_batch)
    if budget < 2:
        raise InputError(f"tokens_per_batch must be at least 2; got {budget}")
    table = labels.sort("subject_id", "prediction_time", maintain_order=True) \
        .with_row_index("label").with_columns(pl.col("prediction_time").cast(pl.Datetime("us")))
    result = {
        "subject_ids": table["subject_id"].to_numpy().astype(np.int64),
        "feature_times": table["prediction_time"].to_numpy().astype("datetime64[us]"),
        "features": np.zeros((table.height, bundle.config.hidden_size), dtype=np.float32),
    }
    if table.is_empty():
        return result
    events = read_events(db, table["subject_id"].unique().sort().to_numpy())
    if isinstance(bundle.model, FemrReleasedEncoder) and isinstance(bundle.vocabulary, dict):
        released_features(bundle.model, bundle.vocabulary, events, table, budget,
                          result["features"])
        return result
    assert isinstance(bundle.vocabulary, FemrVocabulary)
    ancestors = ancestors_of(bundle.parents, events["code"])
    positions, bags = femr_positions(events, bundle.vocabulary, ancestors)
    located = label_positions(table.select("label", "subject_id", "prediction_time"), positions)
    plan = _plan(located, budget)
    log.info("femr features: %d labels of %d subjects in %d windows", table.height,
             table["subject_id"].n_unique(), plan.height)
    _encode(bundle, positions, bags, plan, _assign(located, plan), budget, result["features"])
    return result


def femr_bundle_features(db: Any, model_path: str | Path, labels: Any,
                         tokens_per_batch: int | None = None) -> dict[str, np.ndarray] | None:
    """`compute_features` when model_path is a converted femr bundle, else None."""
    if not is_femr_bundle(model_path):
        return None
    from ehrmotor.sequences.labelled import read_labels

    return femr_features(db, load_femr_bundle(model_path), read_labels(labels), tokens_per_batch)
