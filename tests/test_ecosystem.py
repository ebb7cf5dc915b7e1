"""Ecosystem conventions: Hugging Face Auto classes and model card, meds-evaluation prediction
files, reasons for metric cells without a number, LICENSE and CITATION.cff."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml
from flexible_schema import Optional
from meds import LabelSchema

from ehrmotor.evaluate.metrics import interval_with_reason, subject_resamples
from ehrmotor.evaluate.protocol import METHODS, Draw, Fit, Method, Targets, TaskData, fit_task
from ehrmotor.evaluate.report import (
    TIME_TO_EVENT_PREDICTION_SCHEMA,
    Report,
    TaskPredictions,
    cell,
    write_predictions,
    write_report,
)
from ehrmotor.evaluate.run import _predictions
from ehrmotor.evaluate.scoring import (
    RESULT_SCHEMA,
    metrics_for,
    score_difference,
    score_method,
    task_scoring,
)
from ehrmotor.model import MotorEncoder
from ehrmotor.pretrain.model_card import write_model_card

ROOT = Path(__file__).resolve().parents[1]


def packed_batch(vocab_size: int, positions: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    """Two subjects' positions with two vocabulary entries each (see `MotorEncoder`)."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "entries": torch.randint(0, vocab_size, (2 * positions,), generator=generator),
        "weights": torch.ones(2 * positions),
        "bag_offsets": torch.arange(0, 2 * positions, 2),
        "time_features": torch.randn(positions, 3, generator=generator),
        "age_days": torch.arange(positions, dtype=torch.float32) * 30.0,
        "segment_ids": torch.tensor([0] * (positions // 2) + [1] * (positions - positions // 2)),
    }


# --------------------------------------------------------------------------- predictions


# meds-evaluation's `PredictionSchema` (kamilest/meds-evaluation, src/meds_evaluation/schema.py):
# the MEDS label schema, no extra columns, plus these two optional columns; `validate` compares
# types exactly. Annotations built as objects: this module's annotations are strings.
StrictPredictionSchema = type("StrictPredictionSchema", (LabelSchema,), {"__annotations__": {
    "predicted_boolean_value": Optional(pa.bool_()),
    "predicted_boolean_probability": Optional(pa.float32())}})


def prediction_keys(rows: int) -> pl.DataFrame:
    start = datetime(2020, 1, 1)
    return pl.DataFrame({
        "subject_id": np.arange(rows, dtype=np.int64) + 1000,
        "prediction_time": [start + timedelta(days=int(day)) for day in range(rows)],
    }).cast({"prediction_time": pl.Datetime("us")})


def test_binary_prediction_file_passes_the_strict_meds_evaluation_schema(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    predictions = TaskPredictions("readmission", "motor_logistic", prediction_keys(20),
                                  rng.random(20) < 0.3, rng.random(20))  # float64 from a head
    table = pq.read_table(write_predictions(predictions, tmp_path / "motor_logistic.parquet"))
    StrictPredictionSchema.validate(table)
    assert {field.name: field.type for field in table.schema} == {
        "subject_id": pa.int64(), "prediction_time": pa.timestamp("us"),
        "boolean_value": pa.bool_(), "predicted_boolean_value": pa.bool_(),
        "predicted_boolean_probability": pa.float32()}


def test_time_to_event_predictions_at_the_horizon(tmp_path: Path) -> None:
    """A time-to-event task writes, per head, the MEDS file (labels known at the horizon) and
    the full file with risk and survival; censored-before-horizon rows: null boolean_value."""
    # days to event or censoring: event before 365, event after, censored after, censored before
    time = np.array([100.0, 500.0, 400.0, 200.0, 365.0, 30.0])
    event = np.array([True, True, False, False, True, False])
    data = TaskData(np.arange(6), np.arange(6), Targets(time, event), np.arange(6),
                    np.zeros(0, dtype=np.int64))
    fit = Fit(Draw(None, 0, np.zeros(0, dtype=np.int64)), risk=np.linspace(2, -1, 6),
              horizon_survival=np.array([0.2, 0.9, 0.7, 0.6, 0.5, 0.95]))
    skipped = Fit(Draw(None, 0, np.zeros(0, dtype=np.int64)), skipped="no event")
    task = SimpleNamespace(name="death", kind="time_to_event")
    made = _predictions(task, prediction_keys(6), data,  # type: ignore[arg-type]
                        {"motor_head": [fit], "counts_cox": [skipped]}, 365.0)
    assert [p.method for p in made] == ["motor_head"]
    report = Report(pl.DataFrame(schema=RESULT_SCHEMA), [], made, [], 365.0)
    _, files = write_report(report, tmp_path)
    meds_file = tmp_path / "predictions" / "death" / "motor_head.parquet"
    full_file = tmp_path / "predictions" / "death" / "time_to_event" / "motor_head.parquet"
    assert files["predictions/death/motor_head"] == meds_file
    assert files["predictions/death/motor_head/time_to_event"] == full_file

    full = pl.read_parquet(full_file)
    assert full.schema == TIME_TO_EVENT_PREDICTION_SCHEMA
    assert full["boolean_value"].to_list() == [True, False, False, None, True, None]
    probability = full["predicted_boolean_probability"].to_numpy()
    assert ((probability >= 0) & (probability <= 1)).all()
    np.testing.assert_allclose(probability, 1 - fit.horizon_survival, rtol=1e-6)
    np.testing.assert_allclose(full["survival_probability"].to_numpy(), fit.horizon_survival,
                               rtol=1e-6)
    assert full["risk"].to_list() == fit.risk.tolist() and (full["horizon_days"] == 365).all()
    assert full["time_days"].to_list() == time.tolist() and full["event"].to_list() == \
        event.tolist()

    table = pq.read_table(meds_file)
    StrictPredictionSchema.validate(table)
    assert table.column("subject_id").to_pylist() == [1000, 1001, 1002, 1004]
    assert table.column("boolean_value").to_pylist() == [True, False, False, True]


def test_fits_carry_survival_at_the_horizon() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(80, 4))
    time = rng.exponential(300, 80) * np.exp(-0.5 * x[:, 0])
    event = rng.random(80) < 0.7
    data = TaskData(np.arange(80), np.arange(80), Targets(time, event), np.arange(60, 80),
                    np.arange(60), days=np.array([50.0, 100.0]))
    cox = next(m for m in METHODS if m.name == "motor_cox")
    features = {"motor": x, "demographics": x[:, 3:]}
    fits = fit_task(data, [cox], features, [Draw(None, 0, np.arange(60))], seed=0,
                    bin_edges_days=[0.0, 100.0], horizon_days=365.0)
    fit = fits["motor_cox"][0]
    assert fit.skipped is None and fit.horizon_survival is not None
    assert fit.horizon_survival.shape == (20,)
    assert ((fit.horizon_survival >= 0) & (fit.horizon_survival <= 1)).all()
    assert (fit.horizon_survival <= fit.survival[:, -1] + 1e-12).all()  # 365 after 100 days


# --------------------------------------------------------------------------- cells


def test_metric_cells_without_a_number_say_why() -> None:
    """Every event after the horizon: Uno's C has no number and says so; draws that could not
    be fitted say how the fit failed; an interval over too-thin resamples says why it is
    missing."""
    rng = np.random.default_rng(2)
    time = rng.uniform(100, 900, 60)
    event = np.r_[np.ones(12, dtype=bool), np.zeros(48, dtype=bool)]
    data = TaskData(np.arange(60), np.arange(60), Targets(time, event), np.arange(40),
                    np.arange(40, 60), days=np.array([150.0, 300.0]))
    scoring = task_scoring("t", "time_to_event", data, subject_resamples(np.arange(40), 20, 0))
    method = Method("motor_cox", "MOTOR Cox", "motor", "time_to_event", "motor", METHODS[0].fit)
    fitted = [Fit(Draw(None, 0, np.arange(40, 60)), risk=rng.normal(size=40),
                  survival=np.full((40, 2), 0.5))]
    harrell, uno, _ = metrics_for("time_to_event", 50.0)
    row = score_method(scoring, method, uno, None, fitted)
    assert row is not None and np.isnan(row["mean"])
    assert row["note"] == "no events before the horizon (50 days) in the test set"
    assert cell(row) == row["note"]

    skipped = [Fit(Draw(16, r, np.arange(40, 56)), skipped="no event among 16 training labels")
               for r in range(2)]
    row = score_method(scoring, method, harrell, 16, skipped)
    assert row is not None
    assert row["note"] == ("no draw could be fitted (2 skipped); fit failed: no event among 16 "
                           "training labels")

    counts = Method("counts_cox", "counts Cox", "counts", "time_to_event", "counts",
                    METHODS[0].fit)
    fitted_16 = [Fit(Draw(16, r, np.arange(40, 56)), risk=rng.normal(size=40)) for r in range(2)]
    cells = {"motor_cox": row, "counts_cox": score_method(scoring, counts, harrell, 16, fitted_16)}
    difference = score_difference(scoring, harrell, 16, cells, [method, counts],
                                  {"motor_cox": skipped, "counts_cox": fitted_16})
    assert difference is not None and np.isnan(difference["mean"])
    assert difference["note"] == f"no MOTOR head has a number ({row['note']})"

    low, high, why = interval_with_reason(lambda rows: np.nan if rows[0] % 2 else 0.5,
                                          subject_resamples(np.arange(40), 20, 1))
    assert np.isnan(low) and np.isnan(high)
    assert why is not None and why.startswith("no interval: undefined in ")
    shown = cell({"mean": 0.08, "ci_low": low, "ci_high": high, "note": why,
                  "replicates_fitted": 1, "replicates_skipped": 0})
    assert shown == f"0.080 [{why}]"


# --------------------------------------------------------------------------- Hugging Face


def test_auto_classes_load_a_bundle_like_the_encoder(tiny_bundle: tuple[Path, Path]) -> None:
    from transformers import AutoConfig, AutoModel, AutoModelForPreTraining

    import ehrmotor.model  # noqa: F401 - registers the Auto classes

    bundle = tiny_bundle[1]
    config = AutoConfig.from_pretrained(bundle)
    assert type(config).__name__ == "MotorConfig" and config.model_type == "ehrmotor"
    auto = AutoModel.from_pretrained(bundle).eval()
    encoder = MotorEncoder.from_pretrained(bundle).eval()
    assert type(auto) is MotorEncoder
    assert type(AutoModelForPreTraining.from_pretrained(bundle)).__name__ == "MotorModel"
    batch = packed_batch(config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(auto(**batch), encoder(**batch), rtol=0, atol=0)
    assert json.loads((bundle / "config.json").read_text())["model_type"] == "ehrmotor"


def test_import_ehrmotor_registers_and_the_encoder_loads_quietly(
        tiny_bundle: tuple[Path, Path]) -> None:
    """In a fresh interpreter: `import ehrmotor` is enough for AutoModel, and loading the
    encoder from a pretraining bundle reports no UNEXPECTED head tensors."""
    code = ("import ehrmotor, sys\n"
            "assert 'torch' not in sys.modules  # registration waits for transformers\n"
            "from transformers import AutoModel\n"
            "from transformers.utils import logging\n"
            "logging.set_verbosity_info()\n"
            f"model = AutoModel.from_pretrained({str(tiny_bundle[1])!r})\n"
            "from ehrmotor.model import MotorEncoder\n"
            f"MotorEncoder.from_pretrained({str(tiny_bundle[1])!r})\n"
            "print('loaded', type(model).__name__)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "loaded MotorEncoder" in done.stdout
    assert "UNEXPECTED" not in done.stdout + done.stderr


# --------------------------------------------------------------------------- model card


def test_bundle_has_a_model_card_with_front_matter_and_numbers(
        tiny_bundle: tuple[Path, Path], tmp_path: Path) -> None:
    bundle = tiny_bundle[1]
    card = (bundle / "README.md").read_text(encoding="utf-8")
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    meta = yaml.safe_load(front)
    assert meta["license"] == "apache-2.0" and meta["library_name"] == "ehrmotor"
    assert "time-to-event" in meta["tags"]
    recorded = json.loads((bundle / "fingerprint.json").read_text())["fingerprint"]
    assert meta["fingerprint"] == recorded  # the card names the bundle it describes
    summary = json.loads((bundle / "training_summary.json").read_text())
    config = json.loads((bundle / "config.json").read_text())
    assert meta["parameters"] == summary["parameters"]
    assert f"parameters: {summary['parameters']:,}" in body
    assert f"layers: {config['num_layers']}, hidden size {config['hidden_size']}" in body
    assert f"context: {config['max_window']:,} positions" in body
    assert f"validation loss: {summary['val_loss']:.4f} (base rate: " in body
    assert "held_out" in body and "- train: " in body and " subjects, " in body
    for section in ("## Intended use and limitations", "## License", "## How to load"):
        assert section in body
    copy = tmp_path / "model"
    copy.mkdir()
    for name in ("config.json", "training_summary.json"):
        (copy / name).write_bytes((bundle / name).read_bytes())
    path = write_model_card(copy, None, fingerprint="sha256:0123abcd")
    rewritten = path.read_text(encoding="utf-8")
    assert yaml.safe_load(rewritten.split("---\n")[1])["fingerprint"] == "sha256:0123abcd"
    assert "Training data: not recorded." in rewritten
    assert sorted(p.name for p in copy.iterdir()) == ["README.md", "config.json",
                                                       "training_summary.json"]


# --------------------------------------------------------------------------- repository


def test_license_and_citation_files() -> None:
    license_text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    assert citation["cff-version"] == "1.2.0" and citation["license"] == "Apache-2.0"
    assert citation["title"].startswith("ehrmotor")
    paper = citation["preferred-citation"]
    assert paper["title"].startswith("MOTOR: A Time-to-Event Foundation Model")
    assert [a["family-names"] for a in paper["authors"]] == ["Steinberg", "Fries", "Xu", "Shah"]
    assert paper["year"] == 2024
