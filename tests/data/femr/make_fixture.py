"""Train a tiny femr 0.2.4 MOTOR model and record femr's compute_features (run by make_fixture.sh).

Runs in femr's own virtual environment (benchmarks/femr/make_venv.sh), on CPU:
    python make_fixture.py MEDS_READER_DB ATHENA_DIR OUT_DIR
Writes OUT_DIR/model/ (femr's config.json, model.safetensors, dictionary.msgpack),
OUT_DIR/labels.parquet (subject_id, prediction_time: each at a distinct femr position time) and
OUT_DIR/features.parquet (subject_id, feature_time, embedding: femr's rows, sorted; a label whose
femr windows overlap has two rows, one per window).

femr 0.2.4 on CPU needs three things patched here, and only here: xformers (CUDA only) is replaced
by the stand-in of benchmarks/femr/femr_stand_ins.py (shared with `bench_train.py --vs-femr`),
`torch.cuda.synchronize` (called unconditionally by compute_features) is a no-op, and
EmbeddingBag gets its fp16 per-sample weights cast to the table's dtype (CPU refuses mixed
dtypes; CUDA autocast casts them).
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2] / "benchmarks" / "femr"))

import femr_stand_ins  # noqa: E402

femr_stand_ins.install()

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

torch.cuda.synchronize = lambda *args, **kwargs: None
_embedding_bag_forward = torch.nn.EmbeddingBag.forward


def _embedding_bag_same_dtype(self, input, offsets=None, per_sample_weights=None):
    if per_sample_weights is not None:
        per_sample_weights = per_sample_weights.to(self.weight.dtype)
    return _embedding_bag_forward(self, input, offsets, per_sample_weights)


torch.nn.EmbeddingBag.forward = _embedding_bag_same_dtype

import femr.models.config  # noqa: E402
import femr.models.processor  # noqa: E402
import femr.models.tasks  # noqa: E402
import femr.models.tokenizer.hierarchical_tokenizer as femr_tokenizer  # noqa: E402
import femr.models.transformer  # noqa: E402
import femr.ontology  # noqa: E402
import meds_reader  # noqa: E402

SEED = 4
NUM_PROC = 4  # femr 0.2.4's convert_dataset breaks with 1-3 (from_generator(num_proc // 4))
TRAIN_TOKENS_PER_BATCH = 2048
FEATURE_TOKENS_PER_BATCH = 256  # below the longest subjects: femr's label windows are exercised
TRAIN_STEPS = 30
LABELS_PER_SUBJECT = 3
SIZES = dict(hidden_size=64, intermediate_size=96, n_heads=4, n_layers=4, attention_width=16,
             use_normed_ages=True, hidden_act="swiglu")


def train_model(db, ontology, out: Path):
    tokenizer = femr_tokenizer.HierarchicalTokenizer.train(
        db, vocab_size=384, ontology=ontology, num_numeric=24, min_fraction=1 / 200)
    task = femr.models.tasks.MOTORTask.fit_pretraining_task_info(
        db, tokenizer, num_tasks=48, num_bins=6, final_layer_size=16, min_fraction=1 / 200)
    processor = femr.models.processor.FEMRBatchProcessor(tokenizer, task)
    batches = processor.convert_dataset(db, tokens_per_batch=TRAIN_TOKENS_PER_BATCH,
                                        min_subjects_per_batch=4, num_proc=NUM_PROC)
    batches.set_format("pt")
    transformer_config = femr.models.config.FEMRTransformerConfig(
        vocab_size=tokenizer.vocab_size, is_hierarchical=True, **SIZES)
    config = femr.models.config.FEMRModelConfig.from_transformer_task_configs(
        transformer_config, task.get_task_config())
    model = femr.models.transformer.FEMRModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(TRAIN_STEPS):
        batch = processor.collate([batches[step % len(batches)]])
        loss, _ = model(**batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        print(f"step {step} loss {float(loss):.4f}", flush=True)
    with torch.no_grad():  # a short training leaves most weights near init: spread them
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return tokenizer


def pick_labels(db, tokenizer, rng):
    processor = femr.models.processor.FEMRBatchProcessor(tokenizer)
    labels, lengths = [], []
    for subject_id in sorted(int(s) for s in db):
        data = processor.convert_subject(db[subject_id])["transformer"]
        lengths.append(len(data["ages"]))
        times = np.unique(data["timestamps"][1:])  # position 0 is birth
        if len(times) == 0:
            continue
        chosen = rng.choice(times, size=min(LABELS_PER_SUBJECT, len(times)), replace=False)
        for seconds in sorted(chosen.tolist()):
            when = datetime.datetime(1970, 1, 1) + datetime.timedelta(seconds=int(seconds))
            labels.append({"subject_id": subject_id, "prediction_time": when})
    print(f"positions per subject: max {max(lengths)}, median {int(np.median(lengths))}")
    return labels


def main() -> None:
    database, athena, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    model_dir = out / "model"
    with meds_reader.SubjectDatabase(database, num_threads=NUM_PROC) as db:
        ontology = femr.ontology.Ontology(athena)
        ontology.prune_to_dataset(db, remove_ontologies={"SPL", "HemOnc"})
        tokenizer = train_model(db, ontology, model_dir)
        labels = pick_labels(db, tokenizer, rng)
        result = femr.models.transformer.compute_features(
            db, str(model_dir), labels, num_proc=NUM_PROC,
            tokens_per_batch=FEATURE_TOKENS_PER_BATCH, ontology=ontology)
    order = np.lexsort((result["feature_times"], result["subject_ids"]))
    times = np.array([label["prediction_time"] for label in labels], dtype="datetime64[us]")
    subjects = np.array([label["subject_id"] for label in labels], dtype=np.int64)
    # femr computes a label twice where its windows overlap (needs_exact batching): keep all rows.
    row_keys = set(zip(result["subject_ids"].tolist(), result["feature_times"].tolist(),
                       strict=True))
    label_keys = set(zip(subjects.tolist(), times.astype("datetime64[s]").tolist(), strict=True))
    if row_keys != label_keys:
        raise SystemExit("femr's rows do not cover exactly the labels")
    features = result["features"][order].astype(np.float32)
    table = pa.table({
        "subject_id": result["subject_ids"][order].astype(np.int64),
        "feature_time": result["feature_times"][order].astype("datetime64[us]"),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(features.reshape(-1)),
                                                       features.shape[1]),
    })
    label_table = pa.table({"subject_id": subjects, "prediction_time": times})
    pq.write_table(label_table, out / "labels.parquet")
    pq.write_table(table, out / "features.parquet")
    (out / "fixture.json").write_text(json.dumps({
        "femr": "0.2.4", "tokens_per_batch": FEATURE_TOKENS_PER_BATCH, "num_proc": NUM_PROC,
        "labels": len(labels), "femr_rows": table.num_rows, "seed": SEED, **SIZES},
        indent=2) + "\n")
    print(f"{len(labels)} labels, femr rows {features.shape}")


if __name__ == "__main__":
    main()
