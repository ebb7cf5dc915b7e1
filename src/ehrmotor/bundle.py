"""Loading a model bundle written by `ehrmotor pretrain`: the one place bundles are read.

A bundle is a folder holding config.json (`MotorConfig`), model.safetensors (the weights),
dictionary.msgpack (`Tokenizer`), ontology/ (`Ontology`), and optionally training_summary.json.
The training context (positions per window) is config.json's `max_window` (None in a converted
femr bundle, which records none). `load_bundle` checks all of it up front and raises
`BundleError`, one line naming the file and what was expected, for anything it cannot use:

- config.json that is missing, not JSON, not an object, lacks a field, has a wrong model_type or
  sizes that `MotorConfig` rejects;
- model.safetensors that is missing (a pytorch_model.bin is never loaded: it is a pickle, and
  unpickling can run arbitrary code), truncated or otherwise unreadable, or whose tensors do not
  match config.json (missing, unexpected or of another shape); transformers' own loading report
  is checked again after loading, so nothing is ever silently re-initialised;
- dictionary.msgpack that is missing or corrupt (see `Tokenizer.load`), or whose number of entries
  differs from config.json's vocab_size;
- an unreadable training_summary.json or bad unseen_splits in it; a missing or corrupt ontology;
- parts that were not written together: fingerprint.json (FINGERPRINT_FILE) records, when
  `pretrain` writes the bundle, a SHA-256 digest of each part (FINGERPRINTED_PARTS: config.json,
  model.safetensors, dictionary.msgpack, motor_task.json, ontology/, training_summary.json and,
  when prepare held subjects out itself, subject_splits.parquet) and one
  fingerprint over them (`Bundle.fingerprint`). A part whose content differs (say the dictionary
  of another vocabulary of the same size) is named; a bundle without the file (written before
  ehrmotor recorded it) is refused with the advice to rerun `ehrmotor pretrain`. Checked last,
  after the structural checks above, so a damaged part keeps its own message. The weights are
  hashed whole (a base-size model.safetensors, 508 MiB, hashes in about 0.3 s): a header
  digest would not tell apart two trainings of the same shape.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from transformers.utils import logging as hf_logging

from ehrmotor.artifacts import fingerprint_files, write_json
from ehrmotor.errors import BundleError, InputError, one_line
from ehrmotor.meds.read import HELD_OUT_FILE
from ehrmotor.model import MotorConfig, MotorModel, current_weight_name
from ehrmotor.vocabulary.ontology import Ontology, OntologyError
from ehrmotor.vocabulary.tokenizer import Tokenizer

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PICKLED_WEIGHTS_FILE = "pytorch_model.bin"
DICTIONARY_FILE = "dictionary.msgpack"
SUMMARY_FILE = "training_summary.json"
ONTOLOGY_DIR = "ontology"
MOTOR_TASK_FILE = "motor_task.json"
FINGERPRINT_FILE = "fingerprint.json"
FINGERPRINT_VERSION = 1
# The parts one fingerprint ties together; all but the summary must be present.
FINGERPRINTED_PARTS = (CONFIG_FILE, WEIGHTS_FILE, DICTIONARY_FILE, MOTOR_TASK_FILE, ONTOLOGY_DIR,
                       SUMMARY_FILE, HELD_OUT_FILE)
OPTIONAL_PARTS = (SUMMARY_FILE, HELD_OUT_FILE)
MODEL_TYPE = "ehrmotor"
# config.json fields that shape the weights (positive integers) or change what the model computes.
SIZE_KEYS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
             "num_tasks", "num_bins", "final_layer_size", "time_features", "attention_width")
BEHAVIOUR_KEYS = ("rms_norm_eps", "rope_theta")
SHOWN = 3  # offending tensor names shown in a message
BY_PRETRAIN = "written by `ehrmotor pretrain`"


@dataclass(frozen=True)
class Bundle:
    """A loaded model bundle: the model (eval mode, loaded on CPU) and what reading data for it
    needs."""

    path: Path
    config: MotorConfig
    model: MotorModel
    tokenizer: Tokenizer
    ontology: Ontology
    max_window: int | None  # training context: config.json's (None: not recorded)
    unseen_splits: tuple[str, ...] | None = None  # MEDS splits left out of pretraining, if known
    fingerprint: str = ""  # SHA-256 (hex) over the digests of the parts (fingerprint.json)


def load_bundle(path: str | Path, ontology: Ontology | str | Path | None = None) -> Bundle:
    """Load and check the bundle at `path`; raises BundleError (see the module docstring).

    ontology: an `Ontology` or the folder of a saved one to use instead of `path/ontology`
    (a bad folder raises the ontology's own InputError, not a BundleError).
    """
    bundle = Path(path)
    if not bundle.is_dir():
        what = "not found" if not bundle.exists() else "not a folder"
        raise BundleError(f"{bundle}: {what}; expected a model bundle folder {BY_PRETRAIN}")
    config = _load_config(bundle / CONFIG_FILE)
    tokenizer = _load_tokenizer(bundle)
    if len(tokenizer) != config.vocab_size:
        raise BundleError(f"{bundle / CONFIG_FILE}: vocab_size {config.vocab_size} but "
                          f"{bundle / DICTIONARY_FILE} has {len(tokenizer)} entries; expected the "
                          "dictionary the model was trained with")
    unseen_splits = _load_summary(bundle / SUMMARY_FILE)
    weights = _checked_weights(bundle, config)
    loaded_ontology = _load_ontology(bundle, ontology)
    model = _load_model(bundle, weights, config)  # the costly step last
    # After the structural checks, which name what is wrong with a damaged part.
    fingerprint = check_fingerprint(bundle)
    return Bundle(bundle, config, model, tokenizer, loaded_ontology, config.max_window,
                  unseen_splits, fingerprint)


def _part_digest(path: Path) -> str:
    """SHA-256 (hex) of a file's content, or of a folder's files (relative paths and contents)."""
    if path.is_dir():
        return fingerprint_files([p for p in path.rglob("*") if p.is_file()], path)
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _combined(parts: dict[str, str]) -> str:
    digest = hashlib.sha256()
    for name in sorted(parts):
        digest.update(f"{name}\0{parts[name]}\0".encode())
    return digest.hexdigest()


def record_fingerprint(bundle: str | Path, *, checkpoint_step: int | None = None) -> str:
    """Write `bundle/fingerprint.json` for the parts there now; return the fingerprint.

    Called by `pretrain` once every part is in place (a part written afterwards would not
    match); tools that assemble a bundle themselves call it last too. checkpoint_step: the
    Trainer checkpoint the weights come from (`pretrain --export-checkpoint`), recorded too.
    """
    bundle = Path(bundle)
    parts = {name: _part_digest(bundle / name) for name in FINGERPRINTED_PARTS
             if name not in OPTIONAL_PARTS or (bundle / name).exists()}
    fingerprint = _combined(parts)
    record: dict[str, Any] = {"format_version": FINGERPRINT_VERSION, "fingerprint": fingerprint,
                              "parts": parts}
    if checkpoint_step is not None:
        record["checkpoint_step"] = checkpoint_step
    write_json(bundle / FINGERPRINT_FILE, record)
    return fingerprint


def _recorded_fingerprint(path: Path) -> dict[str, str]:
    """The parts' digests recorded in fingerprint.json; BundleError when it cannot be used."""
    if not path.is_file():
        raise BundleError(f"{path}: not found; this bundle was written by an older ehrmotor, "
                          "whose bundles do not tie their parts together; rerun `ehrmotor "
                          "pretrain --work WORK` to write a current bundle")
    recorded = _read_json(path, "the fingerprint")
    if not isinstance(recorded, dict):
        recorded = {}
    parts = recorded.get("parts")
    if (recorded.get("format_version") != FINGERPRINT_VERSION or not isinstance(parts, dict)
            or not all(isinstance(v, str) for v in parts.values())
            or recorded.get("fingerprint") != _combined(parts)):
        raise BundleError(f"{path}: not a fingerprint record of format {FINGERPRINT_VERSION} "
                          f"(or edited); expected the fingerprint {BY_PRETRAIN}")
    return parts


def check_fingerprint(bundle: str | Path) -> str:
    """The fingerprint of `bundle`, after checking each part against fingerprint.json;
    BundleError naming the first part that was not written with the others."""
    bundle = Path(bundle)
    recorded = _recorded_fingerprint(bundle / FINGERPRINT_FILE)
    for name in sorted(set(recorded) | {n for n in FINGERPRINTED_PARTS
                                        if n not in OPTIONAL_PARTS or (bundle / n).exists()}):
        path = bundle / name
        if name not in recorded:
            raise BundleError(f"{path}: not part of this bundle when it was written (not in "
                              f"{FINGERPRINT_FILE}); remove it or rerun `ehrmotor pretrain`")
        if not path.exists():
            raise BundleError(f"{path}: not found; expected the {name} written with this "
                              f"bundle ({FINGERPRINT_FILE} records it)")
        if _part_digest(path) != recorded[name]:
            raise BundleError(f"{path}: not the {name} this bundle was written with (its digest "
                              f"differs from the one in {FINGERPRINT_FILE}: a part of another "
                              "bundle or an edited file); restore the bundle's own or rerun "
                              "`ehrmotor pretrain`")
    return _combined(recorded)



def _load_config(path: Path) -> MotorConfig:
    expected = f"expected the MotorConfig JSON {BY_PRETRAIN}"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise BundleError(f"{path}: not found; {expected}") from exc
    except OSError as exc:
        raise BundleError(f"{path}: cannot read ({exc.strerror or exc}); {expected}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: not valid JSON ({one_line(exc)}); {expected}") from exc
    if not isinstance(raw, dict):
        raise BundleError(f"{path}: holds a JSON {type(raw).__name__}; {expected} (an object)")
    if raw.get("model_type", MODEL_TYPE) != MODEL_TYPE:
        raise BundleError(f"{path}: model_type {json.dumps(raw['model_type'])[:40]}; expected "
                          f"{MODEL_TYPE!r}")
    missing = [key for key in (*SIZE_KEYS, *BEHAVIOUR_KEYS) if key not in raw]
    if missing:
        raise BundleError(f"{path}: missing keys {', '.join(missing)}; {expected}")
    for key in SIZE_KEYS:
        value = raw[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise BundleError(f"{path}: {key} is {json.dumps(value)[:40]}; expected a positive "
                              "integer")
    try:
        config = MotorConfig.from_dict(raw)
    except (ValueError, TypeError, KeyError) as exc:
        raise BundleError(f"{path}: {one_line(exc)}") from exc
    if not isinstance(config, MotorConfig):  # from_dict may hand back (config, unused kwargs)
        raise BundleError(f"{path}: not a MotorConfig; {expected}")
    return config


def _load_tokenizer(bundle: Path) -> Tokenizer:
    try:
        return Tokenizer.load(bundle)
    except BundleError:
        raise
    except InputError as exc:  # Tokenizer.load names the file
        raise BundleError(one_line(exc)) from exc


def _weights_file(bundle: Path) -> Path:
    """bundle/model.safetensors, checked to exist and to be a complete safetensors file."""
    weights = bundle / WEIGHTS_FILE
    if not weights.exists():
        if (bundle / PICKLED_WEIGHTS_FILE).exists():
            raise BundleError(f"{weights}: not found; {bundle / PICKLED_WEIGHTS_FILE} is not "
                              "loaded because it is a pickle (unpickling can run arbitrary code); "
                              f"expected the safetensors weights {BY_PRETRAIN}")
        raise BundleError(f"{weights}: not found; expected the safetensors weights {BY_PRETRAIN}")
    if not weights.is_file():
        raise BundleError(f"{weights}: not a file; expected the safetensors weights {BY_PRETRAIN}")
    return weights


def _stored_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from the safetensors header (which safetensors checks against the
    file size, so a truncated file fails here)."""
    try:
        with safe_open(str(weights), framework="pt") as stored:
            names = list(stored.keys())  # a safe_open handle is not iterable
            return {name: tuple(stored.get_slice(name).get_shape()) for name in names}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise BundleError(f"{weights}: not a readable safetensors file ({one_line(exc)}); "
                          f"expected the complete weights {BY_PRETRAIN}") from exc


def _named(names: list[str]) -> str:
    shown = ", ".join(names[:SHOWN])
    return f"{shown} and {len(names) - SHOWN} more" if len(names) > SHOWN else shown


def _shape_problems(stored: dict[str, tuple[int, ...]],
                    wanted: dict[str, tuple[int, ...]]) -> list[str]:
    """Missing, unexpected and mismatched tensors of the file against the config's model."""
    problems = []
    missing = sorted(set(wanted) - set(stored))
    unexpected = sorted(set(stored) - set(wanted))
    mismatched = sorted(name for name in set(stored) & set(wanted) if stored[name] != wanted[name])
    if missing:
        problems.append(f"{len(missing)} tensors missing ({_named(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors ({_named(unexpected)})")
    if mismatched:
        first = mismatched[0]
        problems.append(f"{len(mismatched)} tensors of another shape (e.g. {first}: "
                        f"{list(stored[first])} in the file, {list(wanted[first])} for the config)")
    return problems


def _checked_weights(bundle: Path, config: MotorConfig) -> Path:
    """bundle/model.safetensors, checked to hold exactly the tensors of `config`'s model."""
    weights = _weights_file(bundle)
    stored = {current_weight_name(name): shape  # bundles from before the encoder/head split
              for name, shape in _stored_shapes(weights).items()}
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        wanted = {name: tuple(tensor.shape) for name, tensor in MotorModel(config).state_dict()
                  .items()}
    problems = _shape_problems(stored, wanted)
    if problems:
        raise BundleError(f"{weights}: does not match {bundle / CONFIG_FILE}: "
                          f"{'; '.join(problems)}; expected the weights saved with this config")
    return weights


def _load_model(bundle: Path, weights: Path, config: MotorConfig) -> MotorModel:
    """The model with the weights of `weights`; transformers' loading report must be clean."""
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a bar for 19 tensors is noise on every embed/evaluate
    try:
        loaded: Any = MotorModel.from_pretrained(bundle, config=config, use_safetensors=True,
                                                 output_loading_info=True)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise BundleError(f"{weights}: cannot be loaded ({one_line(exc)}); expected the "
                          f"weights {BY_PRETRAIN}") from exc
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    model, info = loaded  # output_loading_info: (model, report)
    reported = _loading_problems(info)
    if reported:
        raise BundleError(f"{weights}: does not match {bundle / CONFIG_FILE}: {reported}; "
                          "expected the weights saved with this config")
    model.eval()
    return model


def _loading_problems(info: dict[str, Any]) -> str:
    """transformers' loading report (missing, unexpected, mismatched keys, errors) as one line."""
    parts = []
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        entries = [str(entry[0] if isinstance(entry, tuple) else entry)
                   for entry in info.get(key) or []]
        if entries:
            parts.append(f"{key.replace('_', ' ')} {' '.join(_named(sorted(entries)).split())}")
    return "; ".join(parts)


def _read_json(path: Path, what: str) -> Any:
    """The JSON value in `path`; BundleError naming `what` it should hold when unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: not readable JSON ({one_line(exc)}); expected {what} "
                          f"{BY_PRETRAIN}") from exc


def _load_summary(path: Path) -> tuple[str, ...] | None:
    """unseen_splits of training_summary.json (None where not recorded)."""
    if not path.exists():
        return None
    summary = _read_json(path, "the training summary")
    if not isinstance(summary, dict):
        raise BundleError(f"{path}: holds a JSON {type(summary).__name__}; expected an object")
    splits = summary.get("unseen_splits")
    if splits is not None and not (isinstance(splits, list)
                                   and all(isinstance(name, str) for name in splits)):
        raise BundleError(f"{path}: unseen_splits is {json.dumps(splits)[:40]}; expected a list "
                          "of split names")
    return tuple(splits) if splits is not None else None


def _load_ontology(bundle: Path, ontology: Ontology | str | Path | None) -> Ontology:
    if isinstance(ontology, Ontology):
        return ontology
    if ontology is not None:
        try:
            return Ontology.load(Path(ontology))
        except OntologyError as exc:
            raise OntologyError(one_line(exc)) from exc
    folder = bundle / ONTOLOGY_DIR
    if not folder.is_dir():
        raise BundleError(f"{folder}: not found; expected the ontology folder {BY_PRETRAIN}")
    try:
        return Ontology.load(folder)
    except OntologyError as exc:  # names the file
        message = one_line(exc)
        if "expected" not in message:
            message += f"; expected the ontology folder {BY_PRETRAIN}"
        raise BundleError(message) from exc
