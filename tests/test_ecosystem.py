"""Ecosystem conventions: Hugging Face Auto classes and model card, meds-evaluation prediction
files, reasons for metric cells without a number, LICENSE and CITATION.cff."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from ehrmotor.model import MotorEncoder
from ehrmotor.model_card import write_model_card

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
    assert "time-to-event" in meta["tags"] and "fingerprint" not in meta
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
