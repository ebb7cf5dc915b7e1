"""Train a tiny femr 0.2.1 CLMBR model (the released models' layout) and record its features.

Runs in femr 0.2.1's own virtual environment (see make_fixture.sh), on CPU:
    python make_fixture.py MEDS_DIR OUT_DIR
femr 0.2.1 reads ESDS patients (a `datasets.Dataset` of {patient_id, events: [{time,
measurements: [{code, numeric_value, text_value}]}]}), not meds_reader: the MEDS rows are grouped
into that shape here (rows without a time are put at the subject's first time, the birth).
Writes OUT_DIR/model/ (femr's config.json, model.safetensors, dictionary.msgpack),
OUT_DIR/labels.parquet (subject_id, prediction_time: each at a femr position time) and
OUT_DIR/features.parquet (subject_id, feature_time, embedding: what femr's FEMRModel with its
`labeled_patients` task head returns for those labels, sorted).
femr 0.2.1 has no compute_features and its CLMBRTask cannot run (it reads an unset
`self.config`): the few training steps compute the CLMBR next-code loss here with femr's own
CLMBR head (task_model.final_layer).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2] / "benchmarks" / "femr"))

import femr021_stand_ins  # noqa: E402

femr021_stand_ins.install()

import datasets  # noqa: E402
import femr.models.processor  # noqa: E402
import femr.models.tasks  # noqa: E402
import femr.models.tokenizer  # noqa: E402
import femr.models.transformer  # noqa: E402
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SEED = 4
TRAIN_STEPS = 20
LABELS_PER_SUBJECT = 4
SIZES = dict(hidden_size=64, intermediate_size=96, n_heads=4, n_layers=3, attention_width=16)


def esds_patients(meds: Path) -> list[dict]:
    rows = pl.read_parquet(meds / "data" / "*" / "*.parquet")
    rows = rows.with_columns(pl.col("time").fill_null(pl.col("time").min().over("subject_id")))
    rows = rows.sort(["subject_id", "time"], maintain_order=True)
    patients = []
    for (subject_id,), subject in rows.group_by(["subject_id"], maintain_order=True):
        events = []
        for (when,), event in subject.group_by(["time"], maintain_order=True):
            events.append({"time": when, "measurements": [
                {"code": r["code"], "numeric_value": r["numeric_value"],
                 "text_value": r["text_value"]} for r in event.iter_rows(named=True)]})
        patients.append({"patient_id": int(subject_id), "events": events})
    return patients


def train(patients, tokenizer, out: Path):
    transformer_config = femr.models.transformer.FEMRTransformerConfig(
        vocab_size=len(tokenizer.dictionary["vocab"]), is_hierarchical=False, **SIZES)
    task_config = femr.models.transformer.FEMRTaskConfig(task_type="clmbr",
                                                         clmbr_vocab_size=len(tokenizer.dictionary["vocab"]))
    config = femr.models.transformer.FEMRModelConfig.from_transformer_task_configs(
        transformer_config, task_config)
    model = femr.models.transformer.FEMRModel(config)
    processor = femr.models.processor.FEMRBatchProcessor(tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(TRAIN_STEPS):
        batch = processor.convert_patient(patients[step % len(patients)], tensor_type="pt")
        hidden = model.transformer(batch["transformer"])[0]
        valid = batch["transformer"]["valid_tokens"][0]
        tokens = batch["transformer"]["tokens"][0].long()
        logits = model.task_model.final_layer(hidden[valid][:-1])
        loss = F.cross_entropy(logits, tokens[valid][1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        print(f"step {step} loss {float(loss):.4f}", flush=True)
    with torch.no_grad():  # a short training leaves most weights near init: spread them
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def pick_labels(patients, tokenizer, rng):
    processor = femr.models.processor.FEMRBatchProcessor(tokenizer)
    labels = []
    for patient in patients:
        data = processor.convert_patient(patient)["transformer"]
        times = np.unique(data["timestamps"][data["valid_tokens"]][1:])
        if len(times) == 0:
            continue
        chosen = rng.choice(times, size=min(LABELS_PER_SUBJECT, len(times)), replace=False)
        for seconds in sorted(chosen.tolist()):
            labels.append({"patient_id": patient["patient_id"],
                           "prediction_time": np.datetime64(int(seconds), "s").astype(object)})
    return labels


def features(patients, model_dir: Path, labels):
    tokenizer = femr.models.tokenizer.FEMRTokenizer.from_pretrained(str(model_dir))
    task = femr.models.tasks.LabeledPatientTask(labels)
    model = femr.models.transformer.FEMRModel.from_pretrained(
        str(model_dir), task_config=task.get_task_config())
    model.eval()
    processor = femr.models.processor.FEMRBatchProcessor(tokenizer, task)
    ids, times, rows = [], [], []
    with torch.no_grad():
        for patient in patients:
            if patient["patient_id"] not in task.label_map:
                continue
            batch = processor.convert_patient(patient, tensor_type="pt")
            patient_ids, when, values = model(batch)
            ids.append(np.asarray(patient_ids))
            times.append(np.asarray(when, dtype="datetime64[us]"))
            rows.append(values.numpy().astype(np.float32))
    return np.concatenate(ids), np.concatenate(times), np.concatenate(rows)


def main() -> None:
    meds, out = Path(sys.argv[1]), Path(sys.argv[2])
    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    patients = esds_patients(meds)
    dataset = datasets.Dataset.from_list(patients)
    tokenizer = femr.models.tokenizer.train_tokenizer(dataset, vocab_size=256)
    model_dir = out / "model"
    train(patients, tokenizer, model_dir)
    labels = pick_labels(patients, tokenizer, rng)
    ids, times, values = features(patients, model_dir, labels)
    order = np.lexsort((times, ids))
    table = pa.table({
        "subject_id": ids[order].astype(np.int64),
        "feature_time": times[order],
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(values[order].reshape(-1)),
                                                       values.shape[1]),
    })
    label_table = pa.table({
        "subject_id": np.array([label["patient_id"] for label in labels], dtype=np.int64),
        "prediction_time": np.array([label["prediction_time"] for label in labels],
                                    dtype="datetime64[us]")})
    pq.write_table(label_table, out / "labels.parquet")
    pq.write_table(table, out / "features.parquet")
    (out / "fixture.json").write_text(json.dumps({
        "femr": "0.2.1", "labels": len(labels), "femr_rows": table.num_rows, "seed": SEED,
        "vocab_size": len(tokenizer.dictionary["vocab"]), **SIZES}, indent=2) + "\n")
    print(f"{len(labels)} labels, femr rows {values.shape}")


if __name__ == "__main__":
    main()
