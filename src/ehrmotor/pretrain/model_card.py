"""The bundle's model card: `README.md` in the Hugging Face model-card format.

YAML front matter (license, library_name, tags, base facts) and sections: model, training data,
training result, intended use and limitations, license, how to load, citation. Everything comes
from what the bundle and the prepared files already record when the bundle is written:

    bundle/config.json                  architecture (MotorConfig)
    bundle/training_summary.json        steps, parameters, val loss and its base rate, and
                                        the checkpoint step of an exported checkpoint
    prepared/config.json                prepare settings (excluded splits, vocabulary, tasks)
    prepared/split.csv                  subjects per split used by pretraining
    prepared/<train|val>_batches/prepare_stats.json   windows, prediction points and events

A fact that was not recorded is written as "not recorded", never guessed.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path
from typing import Any

from ehrmotor import __version__
from ehrmotor.artifacts import atomic_path

CARD_NAME = "README.md"
MOTOR_PAPER = ("Steinberg, Fries, Xu, Shah. MOTOR: A Time-to-Event Foundation Model For "
               "Structured Medical Records. ICLR 2024. https://arxiv.org/abs/2301.03150")
UNKNOWN = "not recorded"


def _json(path: Path) -> dict[str, Any]:
    """The JSON object at `path`, or {} when it is absent or unreadable (the card never fails
    a bundle)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _split_subjects(prepared: Path) -> dict[str, int]:
    """Subjects per split that pretraining drew from (prepare's split.csv)."""
    try:
        with (prepared / "split.csv").open(newline="", encoding="utf-8") as handle:
            return dict(Counter(row["split_name"] for row in csv.DictReader(handle)))
    except (OSError, KeyError, csv.Error):
        return {}


def _number(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or value is None:
        return UNKNOWN
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _data_lines(prepared: Path | None) -> list[str]:
    """The training-data section: subjects per split, windows, points and events."""
    if prepared is None:
        return [f"Training data: {UNKNOWN}."]
    settings = _json(prepared / "config.json")
    splits = _split_subjects(prepared)
    lines = []
    for part, split in (("train", "train"), ("val", "val")):
        stats = _json(prepared / f"{part}_batches" / "prepare_stats.json")
        lines.append(f"- {part}: {_number(splits.get(split))} subjects, "
                     f"{_number(stats.get('events'))} events, {_number(stats.get('windows'))} "
                     f"windows, {_number(stats.get('points'))} prediction points")
    excluded = settings.get("exclude_splits")
    lines.append("- MEDS splits left out of pretraining (kept for evaluation): "
                 + ((", ".join(excluded) or "none") if isinstance(excluded, list) else UNKNOWN))
    lines.append(f"- vocabulary: {_number(settings.get('vocab_size'))} entries requested; "
                 f"{_number(settings.get('candidate_tasks'))} candidate MOTOR tasks")
    return lines


def _front_matter(config: dict[str, Any], summary: dict[str, Any],
                  fingerprint: str | None) -> str:
    parameters, step = summary.get("parameters"), summary.get("checkpoint_step")
    lines = ["---", "license: apache-2.0", "library_name: ehrmotor", "tags:",
             *(f"- {tag}" for tag in ("ehrmotor", "motor", "meds", "ehr", "time-to-event",
                                      "survival-analysis", "foundation-model")),
             f"model_type: {config.get('model_type', 'ehrmotor')}"]
    if isinstance(parameters, int):
        lines.append(f"parameters: {parameters}")
    if isinstance(step, int):
        lines.append(f"checkpoint_step: {step}")
    lines.append(f"ehrmotor_version: {__version__}")
    if fingerprint is not None:
        lines.append(f"fingerprint: {json.dumps(fingerprint)}")
    return "\n".join([*lines, "---"])


def render_model_card(config: dict[str, Any], summary: dict[str, Any], prepared: Path | None,
                      fingerprint: str | None = None) -> str:
    """The card's text from config.json, training_summary.json and the prepared folder."""
    parameters = summary.get("parameters")
    window = config.get("max_window")
    val, base = summary.get("val_loss"), summary.get("base_rate_val_loss")
    result = [f"- training steps: {_number(summary.get('global_step'))}",
              f"- training loss (last): {_number(summary.get('train_loss'))}"]
    step = summary.get("checkpoint_step")
    if isinstance(step, int):
        result.insert(0, f"- exported from checkpoint step {step:,} of the pretraining run "
                         "(`ehrmotor pretrain --export-checkpoint`); training may have gone on")
    if isinstance(val, float) and isinstance(base, float):
        result.append(f"- validation loss: {val:.4f} (base rate: {base:.4f}; lower is better, "
                      f"{'below' if val < base else 'not below'} the base rate)")
    elif isinstance(val, float):
        result.append(f"- validation loss: {val:.4f} (base rate: {UNKNOWN})")
    else:
        result.append(f"- validation loss: {UNKNOWN} (no validation windows)")
    sections = [
        _front_matter(config, summary, fingerprint), "",
        "# MOTOR model (ehrmotor)", "",
        "A MOTOR time-to-event foundation model pretrained with ehrmotor "
        f"{__version__} on MEDS electronic health records.", "",
        "## Model", "",
        f"- parameters: {_number(parameters)}",
        f"- layers: {_number(config.get('num_layers'))}, hidden size "
        f"{_number(config.get('hidden_size'))}, heads {_number(config.get('num_heads'))}, "
        f"feed-forward {_number(config.get('intermediate_size'))}",
        f"- context: {_number(window)} positions per window; local attention over "
        f"{_number(config.get('attention_width'))} positions",
        f"- vocabulary: {_number(config.get('vocab_size'))} entries; MOTOR head: "
        f"{_number(config.get('num_tasks'))} tasks x {_number(config.get('num_bins'))} time bins",
        *([f"- fingerprint: `{fingerprint}`"] if fingerprint is not None else []),
        "", "## Training data", "", *_data_lines(prepared),
        "", "## Training result", "", *result,
        "", "## Intended use and limitations", "",
        "For research: patient representations (embeddings) for time-to-event and binary "
        "prediction heads fitted on labelled data from the same kind of records. It is not a "
        "medical device and must not guide individual care. It knows only the codes and the "
        "population it was pretrained on; check it on your own held-out data (`ehrmotor "
        "evaluate`) before relying on it. The weights may memorise rare code sequences of the "
        "training subjects: share the bundle only as the data's terms allow.",
        "", "## License", "",
        "The ehrmotor software is under the Apache License 2.0. The weights are derived from the "
        "training data above; its data-use terms apply to them as well.",
        "", "## How to load", "",
        "```python",
        "import ehrmotor  # registers the model type with transformers' Auto classes",
        "from transformers import AutoModel",
        "",
        'encoder = AutoModel.from_pretrained("path/to/model")  # MotorEncoder',
        "features = ehrmotor.compute_features(meds_dir, \"path/to/model\", labels)",
        "```",
        "", "## Citation", "", MOTOR_PAPER, ""]
    return "\n".join(sections)


def write_model_card(bundle_dir: Path, prepared_dir: Path | None = None, *,
                     summary: dict[str, Any] | None = None,
                     fingerprint: str | None = None) -> Path:
    """Write `bundle_dir/README.md` (atomically) and return its path.

    bundle_dir holds config.json and, unless `summary` is given, training_summary.json;
    prepared_dir is prepare's `pretraining_files/` (None: the data section says "not
    recorded"); fingerprint, when given, is shown in the front matter and the model section.
    """
    bundle_dir = Path(bundle_dir)
    config = _json(bundle_dir / "config.json")
    if summary is None:
        summary = _json(bundle_dir / "training_summary.json")
    text = render_model_card(config, summary, prepared_dir, fingerprint)
    path = bundle_dir / CARD_NAME
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
