"""Read a femr model folder, check it, and write it as an ehrmotor femr bundle (`convert_femr`).

A femr model folder (`FEMRModel.save_pretrained` + the tokenizer's `save_pretrained`) holds
config.json (with `transformer_config`, optionally `task_config`), model.safetensors and
dictionary.msgpack. The bundle written (same bytes for the same inputs):

    config.json         FemrHybridConfig (model_type "ehrmotor-femr-hybrid"; `layout` "hybrid" for
                        femr 0.2.4, "released" for femr 0.2.0 / 0.2.1, see `ehrmotor.femr.released`)
    model.safetensors   the weights under our names (`femr_weight_name`), keys sorted
    dictionary.msgpack  femr's dictionary, byte for byte (femr's tokenizer semantics read it)
    ontology/parents.parquet   code, parent: the Athena parent edges (`--athena`), sorted (the
                        hierarchical tokenizer of femr 0.2.4 only; the released layout's flat
                        tokenizer needs none and --athena is ignored there)

The layout is told by the weights: `transformer.in_norm.scale` is the released layout, else
femr 0.2.4's. Refusals (ConversionError, one line): not a femr model folder; a femr layout or
version this does not know (the keys it did not expect are named); femr 0.2.4 with a flat
tokenizer, the released layout with a hierarchical one; a hierarchical tokenizer without an
ontology.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import msgpack
import polars as pl
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ehrmotor.errors import InputError, OutputError, one_line
from ehrmotor.femr.model import (
    CONFIG_FILE,
    DICTIONARY_FILE,
    MODEL_TYPE,
    ONTOLOGY_DIR,
    PARENTS_FILE,
    WEIGHTS_FILE,
    FemrHybridConfig,
)
from ehrmotor.femr.released import LAYOUT as RELEASED
from ehrmotor.femr.released import released_config

SHOWN = 4  # keys named in a message
HAWK_PARTS = {  # torch_hawk's RecurrentBlock names -> ours (RecurrentBlock in model/hawk.py)
    "linear_x.weight": "linear_x.weight", "linear_x.bias": "linear_x.bias",
    "linear_y.weight": "linear_y.weight", "linear_y.bias": "linear_y.bias",
    "linear_out.weight": "linear_out.weight", "linear_out.bias": "linear_out.bias",
    "conv_1d.w": "conv_weight", "conv_1d.b": "conv_bias", "rg_lru.a_param": "a_param",
    "rg_lru.input_gate.w": "input_gate_weight", "rg_lru.input_gate.b": "input_gate_bias",
    "rg_lru.a_gate.w": "a_gate_weight", "rg_lru.a_gate.b": "a_gate_bias",
}
MOTOR_HEAD = ("final_layer.weight", "final_layer.bias", "task_layer.weight", "task_layer.bias",
              "task_time_bias", "norm.weight")
TRANSFORMER_KEYS = ("vocab_size", "is_hierarchical", "hidden_size", "intermediate_size",
                    "n_heads", "n_layers", "attention_width", "use_normed_ages", "use_bias",
                    "hidden_act")


class ConversionError(InputError):
    """A femr model folder that cannot be converted (one line: the file and the reason)."""


def _named(keys: list[str]) -> str:
    more = f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else ""
    return ", ".join(keys[:SHOWN]) + more


def read_femr_config(folder: Path) -> dict[str, Any]:
    """femr's config.json as a dict; refuses a folder that is not a femr model."""
    needed = (CONFIG_FILE, WEIGHTS_FILE, DICTIONARY_FILE)
    missing = [name for name in needed if not (folder / name).is_file()]
    if not folder.is_dir() or missing:
        what = "not a folder" if not folder.is_dir() else f"no {', '.join(missing)}"
        raise ConversionError(f"{folder}: not a femr model folder ({what}); expected "
                              f"{CONFIG_FILE}, {WEIGHTS_FILE} and {DICTIONARY_FILE}")
    try:
        raw = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConversionError(f"{folder / CONFIG_FILE}: not JSON ({exc})") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("transformer_config"), dict):
        raise ConversionError(f"{folder / CONFIG_FILE}: not a femr model config (no "
                              "transformer_config object)")
    return raw


def hybrid_config(raw: dict[str, Any], folder: Path, layout: str = "hybrid"
                  ) -> FemrHybridConfig:
    """Our config from femr's (femr's defaults for absent transformer_config fields)."""
    layer = raw["transformer_config"]
    defaults = {"vocab_size": 32768, "is_hierarchical": False, "hidden_size": 768,
                "intermediate_size": 3072, "n_heads": 12, "n_layers": 6, "attention_width": 496,
                "use_normed_ages": False, "use_bias": True, "hidden_act": "gelu"}
    values = {k: layer.get(k, defaults[k]) for k in TRANSFORMER_KEYS}
    task = raw.get("task_config") or {}
    if layout == RELEASED:
        if values["is_hierarchical"]:
            raise ConversionError(f"{folder / CONFIG_FILE}: is_hierarchical is true in femr's "
                                  "released layout (femr 0.2.0 / 0.2.1 run only a flat tokenizer)")
        try:
            return released_config(values, task)
        except (TypeError, ValueError) as exc:
            raise ConversionError(f"{folder / CONFIG_FILE}: unsupported transformer_config "
                                  f"({exc})") from exc
    if not values["is_hierarchical"]:
        raise ConversionError(f"{folder / CONFIG_FILE}: is_hierarchical is false; only femr's "
                              "hierarchical tokenizer is supported (femr 0.2.4 runs no other)")
    motor = dict(task.get("task_kwargs", {})) if task.get("task_type") == "motor" else {}
    if "time_bins" in motor:  # strict JSON: femr's last bin edge, infinity, is written as null
        motor["time_bins"] = [b if math.isfinite(b) else None for b in motor["time_bins"]]
    try:
        return FemrHybridConfig(
            vocab_size=int(values["vocab_size"]), hidden_size=int(values["hidden_size"]),
            intermediate_size=int(values["intermediate_size"]), num_heads=int(values["n_heads"]),
            num_layers=int(values["n_layers"]), attention_width=int(values["attention_width"]),
            use_normed_ages=bool(values["use_normed_ages"]), hidden_act=str(values["hidden_act"]),
            use_bias=bool(values["use_bias"]), motor_task=dict(motor),
            task_type=str(task.get("task_type") or ""))
    except (TypeError, ValueError) as exc:
        raise ConversionError(f"{folder / CONFIG_FILE}: unsupported transformer_config "
                              f"({exc})") from exc


def released_weight_name(name: str) -> str | None:
    """Our name for a femr 0.2.0 / 0.2.1 weight name, or None for one that layout lacks."""
    if name in ("task_model.final_layer.weight", "task_model.final_layer.bias"):
        return "head." + name.removeprefix("task_model.")  # the CLMBR head
    rest = name.removeprefix("transformer.")
    if rest in ("embed.weight", "in_norm.scale", "out_norm.scale"):
        return rest.replace(".scale", ".weight")
    layer = re.fullmatch(r"layers\.(\d+)\.(norm\.scale|(input|output)_proj\.(weight|bias))", rest)
    if layer and name.startswith("transformer."):
        return f"layers.{layer[1]}.{layer[2].replace('.scale', '.weight')}"
    return None


def femr_layout(folder: Path) -> str:
    """"released" when the weights hold femr 0.2.0 / 0.2.1's `transformer.in_norm.scale`."""
    path = folder / WEIGHTS_FILE
    try:
        with safe_open(path, framework="pt") as handle:
            names = set(handle.keys())
    except (SafetensorError, OSError, ValueError) as exc:
        raise ConversionError(f"{path}: unreadable safetensors file ({one_line(exc)})") from exc
    return RELEASED if "transformer.in_norm.scale" in names else "hybrid"


def femr_weight_name(name: str, layout: str = "hybrid") -> str | None:
    """Our name for a femr weight name, or None for a name that layout does not have."""
    if layout == RELEASED:
        return released_weight_name(name)
    head = re.fullmatch(r"task_model\.(.+)", name)
    if head:
        return f"head.{head[1]}" if head[1] in MOTOR_HEAD else None
    match = re.fullmatch(r"transformer\.(.+)", name)
    if not match:
        return None
    rest = match[1]
    if rest in ("embed_bag.weight", "in_norm.weight", "out_norm.weight"):
        return rest.replace("embed_bag", "embed")
    layer = re.fullmatch(r"layers\.(\d+)\.(.+)", rest)
    if not layer:
        return None
    index, part = layer[1], layer[2]
    if part in ("norm.weight", "input_proj.weight", "input_proj.bias", "output_proj.weight",
                "output_proj.bias"):
        return f"layers.{index}.{part}"
    hawk = re.fullmatch(r"hawk_module\.(.+)", part)
    if hawk and hawk[1] in HAWK_PARTS:
        return f"layers.{index}.recurrent.{HAWK_PARTS[hawk[1]]}"
    return None


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(path, framework="pt") as handle:
            return {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as exc:
        raise ConversionError(f"{path}: unreadable safetensors file ({one_line(exc)})") from exc


def mapped_weights(folder: Path, config: FemrHybridConfig) -> dict[str, torch.Tensor]:
    """femr's tensors under our names; refuses unexpected, missing or misshapen tensors."""
    from ehrmotor.femr.model import FemrHybridEncoder
    from ehrmotor.femr.released import FemrReleasedEncoder

    weights = _read_weights(folder / WEIGHTS_FILE)
    unknown = sorted(n for n in weights if femr_weight_name(n, config.layout) is None)
    if unknown:
        known = ("femr 0.2.0 / 0.2.1 (released layout)" if config.layout == RELEASED
                 else "femr 0.2.4")
        raise ConversionError(f"{folder / WEIGHTS_FILE}: not a {known} model; unexpected keys "
                              f"{_named(unknown)}")
    ours = {femr_weight_name(n, config.layout): t.float().contiguous()
            for n, t in weights.items()}
    encoder = FemrReleasedEncoder if config.layout == RELEASED else FemrHybridEncoder
    expected = {n: p.shape for n, p in encoder(config).state_dict().items()}
    missing = sorted(n for n in expected if n not in ours)
    wrong = sorted(n for n, shape in expected.items() if n in ours and ours[n].shape != shape)
    if missing or wrong:
        what = f"missing {_named(missing)}" if missing else f"shapes differ for {_named(wrong)}"
        raise ConversionError(f"{folder / WEIGHTS_FILE}: does not match {CONFIG_FILE} ({what})")
    return {n: t for n, t in sorted(ours.items()) if n is not None}


def _check_dictionary(folder: Path, config: FemrHybridConfig) -> None:
    path = folder / DICTIONARY_FILE
    try:
        dictionary = msgpack.unpackb(path.read_bytes(), strict_map_key=False)
        size = len(dictionary["vocab"])
        if config.layout != RELEASED:
            dictionary["age_stats"]["age"]["std"]  # noqa: B018  (femr's time features need it)
    except (ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
        raise ConversionError(f"{path}: not a femr dictionary ({one_line(exc)})") from exc
    if size != config.vocab_size:
        raise ConversionError(f"{path}: {size} entries but {folder / CONFIG_FILE} says "
                              f"vocab_size {config.vocab_size}")


def _write_parents(athena: Path, directory: Path) -> None:
    from ehrmotor.vocabulary.athena import read_athena

    _, edges, _ = read_athena(athena)
    directory.mkdir()
    edges.filter(pl.col("code") != pl.col("parent")).unique().sort("code", "parent") \
        .write_parquet(directory / PARENTS_FILE, statistics=False)


def _check_replaceable(target: Path) -> None:
    """Refuse to replace anything but an empty folder or an earlier convert-femr bundle."""
    if not target.exists() or (target.is_dir() and not any(target.iterdir())):
        return
    try:
        ours = json.loads((target / CONFIG_FILE).read_text(encoding="utf-8"))["model_type"]
    except (OSError, ValueError, KeyError, TypeError):
        ours = None
    if ours != MODEL_TYPE:
        raise OutputError(f"--out {target}: exists and is not a bundle written by convert-femr; "
                          "choose another folder (nothing else is ever replaced)")


def convert_femr(folder: str | Path, out: str | Path, athena: str | Path | None = None) -> Path:
    """Convert the femr model at `folder` into a bundle at `out` (replaced atomically)."""
    source, target = Path(folder), Path(out)
    raw = read_femr_config(source)
    config = hybrid_config(raw, source, femr_layout(source))
    _check_dictionary(source, config)
    weights = mapped_weights(source, config)
    if athena is None and config.layout != RELEASED:
        raise ConversionError(f"{source / CONFIG_FILE}: the tokenizer is hierarchical; give the "
                              "Athena vocabulary it was trained with (--athena DIR)")
    _check_replaceable(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    staging.chmod(0o755)
    try:
        (staging / CONFIG_FILE).write_text(config.to_json(), encoding="utf-8")
        save_file(weights, staging / WEIGHTS_FILE, metadata={"format": "pt"})
        shutil.copyfile(source / DICTIONARY_FILE, staging / DICTIONARY_FILE)
        if athena is not None and config.layout != RELEASED:
            _write_parents(Path(athena), staging / ONTOLOGY_DIR)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target
