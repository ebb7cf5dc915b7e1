"""`compute_features`: patient representations at label times, with femr's call and result.

`compute_features(db, model_path, labels)` loads the bundle and returns `bundle_features`
(`ehrmotor.representations`: the result and its policies); a bundle written by
`ehrmotor convert-femr` is featurized as femr does (`ehrmotor.femr.features`).
`write_embeddings` writes a result as the parquet file of `ehrmotor embed`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ehrmotor.artifacts import atomic_path
from ehrmotor.bundle import load_bundle
from ehrmotor.femr.features import femr_bundle_features
from ehrmotor.representations import bundle_features, check_sizes
from ehrmotor.sequences.labelled import LabelsLike, read_labels
from ehrmotor.vocabulary.ontology import Ontology

log = logging.getLogger(__name__)


def compute_features(db: Any, model_path: str | Path, labels: LabelsLike, num_proc: int = 1,
                     tokens_per_batch: int | None = None,
                     device: str | torch.device | None = None,
                     ontology: Ontology | str | Path | None = None,
                     context: int | None = None) -> dict[str, np.ndarray]:
    """Representations at label times (`ehrmotor.representations`: the result and policies).

    db: a MEDS directory, a `meds_reader.SubjectDatabase` or the path of one. model_path: a
    bundle written by `pretrain` (checked by `load_bundle`, which raises BundleError). labels:
    see `read_labels`. num_proc: processes reading shards (1 = in this process).
    tokens_per_batch: positions per forward pass, at least the context (default: the context).
    device: default CUDA when available, else CPU. ontology: default `model_path/ontology`.
    context: positions per window (default: the model's training context).
    """
    if context is not None:  # a bad setting fails before the bundle is read
        check_sizes(context, tokens_per_batch)
    if isinstance(labels, str | Path):  # so does a bad label file
        labels = read_labels(labels)
    if (femr_result := femr_bundle_features(db, model_path, labels, tokens_per_batch)) is not None:
        return femr_result  # a bundle written by `ehrmotor convert-femr`
    bundle = load_bundle(model_path, ontology=ontology)
    return bundle_features(db, bundle, labels, num_proc=num_proc,
                           tokens_per_batch=tokens_per_batch, device=device, context=context)


def write_embeddings(result: Mapping[str, np.ndarray], out_path: str | Path) -> Path:
    """Write a `compute_features` result as parquet, atomically; return the path.

    Columns: subject_id int64, prediction_time timestamp[us] (the feature_times, exactly),
    embedding fixed_size_list<float32>[hidden].
    """
    features = np.ascontiguousarray(result["features"], dtype=np.float32)
    subjects, times = result["subject_ids"], result["feature_times"]
    if features.ndim != 2 or not len(subjects) == len(times) == features.shape[0]:
        raise ValueError(f"result: subject_ids ({len(subjects)}), feature_times ({len(times)}) "
                         f"and features {features.shape} must have one row per label")
    table = pa.table({
        "subject_id": pa.array(np.asarray(subjects, dtype=np.int64)),
        "prediction_time": pa.array(np.asarray(times).astype("datetime64[us]")),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(features.reshape(-1)),
                                                       features.shape[1]),
    })
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        pq.write_table(table, tmp)
    log.info("write_embeddings: %d rows of %d dimensions to %s", table.num_rows,
             features.shape[1], os.fspath(out))
    return out
