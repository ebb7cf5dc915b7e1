"""`load_bundle`: every corrupt, incomplete or mismatched bundle is a one-line BundleError naming
the file, from the library and from `ehrmotor embed` / `ehrmotor evaluate` (exit status 2).

Each case copies the session's tiny bundle (`tiny_bundle` in conftest) and damages the copy.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import msgpack
import polars as pl
import pytest

from ehrmotor import bundle as bundle_module
from ehrmotor.bundle import load_bundle
from ehrmotor.cli import main
from ehrmotor.embed import compute_features
from ehrmotor.errors import BundleError, InputError
from ehrmotor.vocabulary.tokenizer import Tokenizer

Damage = Callable[[Path], None]
MARKER = "unpickled.marker"


class Trap:
    """Unpickling this touches a marker file next to it: proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def edit_json(name: str, change: Callable[[dict[str, Any]], Any]) -> Damage:
    def damage(bundle: Path) -> None:
        document = json.loads((bundle / name).read_text())
        change(document)
        (bundle / name).write_text(json.dumps(document))
    return damage


def edit_dictionary(change: Callable[[dict[str, Any]], Any]) -> Damage:
    def damage(bundle: Path) -> None:
        path = bundle / "dictionary.msgpack"
        document = msgpack.unpackb(path.read_bytes(), raw=False)
        change(document)
        path.write_bytes(msgpack.packb(document, use_bin_type=True))
    return damage


def truncate(name: str, keep: float) -> Damage:
    def damage(bundle: Path) -> None:
        data = (bundle / name).read_bytes()
        (bundle / name).write_bytes(data[:int(len(data) * keep)])
    return damage


def remove(name: str) -> Damage:
    def damage(bundle: Path) -> None:
        target = bundle / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    return damage


def pickle_only(bundle: Path) -> None:
    (bundle / "model.safetensors").unlink()
    (bundle / "pytorch_model.bin").write_bytes(pickle.dumps(Trap(bundle / MARKER), protocol=2))


def append(name: str, extra: bytes) -> Damage:
    def damage(bundle: Path) -> None:
        with (bundle / name).open("ab") as handle:
            handle.write(extra)
    return damage


def write(name: str, data: str | bytes) -> Damage:
    def damage(bundle: Path) -> None:
        (bundle / name).write_bytes(data.encode() if isinstance(data, str) else data)
    return damage


def corrupt_ontology(bundle: Path) -> None:
    next((bundle / "ontology").glob("*.parquet")).write_bytes(b"x")


# id: (damage, file named in the message, pattern the message must match)
CASES: dict[str, tuple[Damage, str, str]] = {
    "safetensors_truncated": (truncate("model.safetensors", 0.5), "model.safetensors",
                              r"not a readable safetensors file \(.*incomplete metadata"),
    "safetensors_header_only": (truncate("model.safetensors", 0.00004), "model.safetensors",
                                r"not a readable safetensors file"),
    "safetensors_missing": (remove("model.safetensors"), "model.safetensors",
                            r"model\.safetensors: not found; expected the safetensors weights"),
    "only_pytorch_model_bin": (pickle_only, "pytorch_model.bin",
                               r"pytorch_model\.bin is not loaded because it is a pickle"),
    "config_missing": (remove("config.json"), "config.json", r"config\.json: not found"),
    "config_not_json": (write("config.json", '{"hidden_size": 64,'), "config.json",
                        r"config\.json: not valid JSON \(.*\); expected the MotorConfig"),
    "config_not_an_object": (write("config.json", "[1, 2]"), "config.json",
                             r"config\.json: holds a JSON list"),
    "config_lacks_keys": (edit_json("config.json", lambda c: [c.pop("hidden_size"),
                                                             c.pop("num_layers")]),
                          "config.json", r"config\.json: missing keys hidden_size, num_layers"),
    "config_size_not_an_integer": (edit_json("config.json",
                                             lambda c: c.update(hidden_size="64")),
                                   "config.json",
                                   r"hidden_size is \"64\"; expected a positive integer"),
    "config_rejected_by_motor_config": (edit_json("config.json", lambda c: c.update(num_heads=5)),
                                        "config.json", r"config\.json: hidden_size 64 must split "
                                                       r"into 5 heads"),
    "config_other_model_type": (edit_json("config.json", lambda c: c.update(model_type="bert")),
                                "config.json", r"model_type \"bert\"; expected 'ehrmotor'"),
    "config_hidden_size_changed": (edit_json("config.json", lambda c: c.update(hidden_size=128)),
                                   "config.json", r"model\.safetensors: does not match .*"
                                                  r"config\.json: \d+ tensors of another shape"),
    "config_more_layers": (edit_json("config.json", lambda c: c.update(num_layers=3)),
                           "config.json",
                           r"does not match .*: 6 tensors missing \(motor\.layers\.2\."),
    "config_fewer_layers": (edit_json("config.json", lambda c: c.update(num_layers=1)),
                            "config.json",
                            r"does not match .*: 6 unexpected tensors \(motor\.layers\.1"),
    "config_vocab_size_changed": (edit_json("config.json", lambda c: c.update(vocab_size=2001)),
                                  "dictionary.msgpack",
                                  r"config\.json: vocab_size 2001 but .*dictionary\.msgpack has "
                                  r"2000 entries"),
    "dictionary_other_vocabulary": (edit_dictionary(lambda d: d["entries"].pop()),
                                    "dictionary.msgpack", r"vocab_size 2000 but .* has 1999 "),
    "dictionary_missing": (remove("dictionary.msgpack"), "dictionary.msgpack",
                           r"dictionary\.msgpack: not found"),
    "dictionary_extra_data": (append("dictionary.msgpack", b"\x01\x02"), "dictionary.msgpack",
                              r"dictionary\.msgpack: not a valid msgpack file \(.*extra data"),
    "dictionary_truncated": (truncate("dictionary.msgpack", 0.5), "dictionary.msgpack",
                             r"not a valid msgpack file"),
    "dictionary_not_a_map": (write("dictionary.msgpack", b"\x93\x01\x02\x03"),
                             "dictionary.msgpack", r"holds a msgpack list; expected a map"),
    "dictionary_format_version": (edit_dictionary(lambda d: d.update(format_version=2)),
                                  "dictionary.msgpack", r"format_version 2; expected 1"),
    "dictionary_lacks_keys": (edit_dictionary(lambda d: d.pop("time_stats")),
                              "dictionary.msgpack", r"missing keys time_stats"),
    "dictionary_bad_entry": (edit_dictionary(lambda d: d["entries"][3].pop("code")),
                             "dictionary.msgpack", r"entry 3 lacks code"),
    "summary_not_json": (write("training_summary.json", "{"), "training_summary.json",
                         r"not readable JSON"),
    "summary_bad_unseen_splits": (edit_json("training_summary.json",
                                            lambda s: s.update(unseen_splits="held_out")),
                                  "training_summary.json", r"unseen_splits is \"held_out\"; "
                                                           r"expected a list"),
    "ontology_missing": (remove("ontology"), "ontology", r"ontology: not found"),
    "ontology_file_corrupt": (corrupt_ontology, "ontology/", r"ontology/.*\.parquet"),
}


@pytest.fixture(scope="module")
def source(tiny_bundle: tuple[Path, Path]) -> tuple[Path, Path]:
    return tiny_bundle


def damaged_copy(bundle: Path, target: Path, damage: Damage) -> Path:
    shutil.copytree(bundle, target)
    damage(target)
    return target


def assert_one_line_naming(message: str, name: str, pattern: str) -> None:
    assert "\n" not in message and "\r" not in message, message
    assert name in message, message
    assert re.search(pattern, message), message


def test_intact_bundle_loads(source: tuple[Path, Path]) -> None:
    bundle = load_bundle(source[1])
    assert len(bundle.tokenizer) == bundle.config.vocab_size == 2000
    assert bundle.model.config.hidden_size == 64 and not bundle.model.training
    assert bundle.max_window == 1024 and bundle.path == source[1]
    # prepare's exclude_splits reach the bundle: evaluate keeps to those subjects
    assert bundle.unseen_splits == ("held_out",)


@pytest.mark.parametrize("case", list(CASES))
def test_damaged_bundle_is_a_one_line_bundle_error(case: str, source: tuple[Path, Path],
                                                   tmp_path: Path) -> None:
    damage, name, pattern = CASES[case]
    bundle = damaged_copy(source[1], tmp_path / "model", damage)
    with pytest.raises(BundleError) as raised:
        load_bundle(bundle)
    assert_one_line_naming(str(raised.value), name, pattern)
    assert not (bundle / MARKER).exists()  # no pickle was ever loaded


@pytest.mark.parametrize(("case", "pattern"), [
    ("config_more_layers",
     r"model\.safetensors: does not match .*: missing keys motor\.layers\.2\."),
    ("config_fewer_layers",
     r"model\.safetensors: does not match .*: unexpected keys motor\.layers\.1\."),
    ("config_hidden_size_changed", r"model\.safetensors: cannot be loaded \("),
], ids=["more_layers", "fewer_layers", "hidden_size_changed"])
def test_transformers_loading_report_is_checked_too(case: str, pattern: str,
                                                    source: tuple[Path, Path], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the header check, from_pretrained would re-initialise missing weights silently;
    its loading report (or its size-mismatch error) still ends in a BundleError."""
    monkeypatch.setattr(bundle_module, "_shape_problems", lambda stored, wanted: [])
    bundle = damaged_copy(source[1], tmp_path / "model", CASES[case][0])
    with pytest.raises(BundleError) as raised:
        load_bundle(bundle)
    assert_one_line_naming(str(raised.value), "model.safetensors", pattern)


def test_missing_bundle_folder_is_a_bundle_error(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"nowhere: not found; expected a model bundle folder"):
        load_bundle(tmp_path / "nowhere")


def test_compute_features_raises_the_bundle_error(source: tuple[Path, Path],
                                                  tmp_path: Path) -> None:
    meds, model = source
    bundle = damaged_copy(model, tmp_path / "model", CASES["config_hidden_size_changed"][0])
    with pytest.raises(BundleError, match="does not match"):
        compute_features(meds, bundle, [])


def test_tokenizer_load_outside_a_bundle_raises_input_error(source: tuple[Path, Path],
                                                            tmp_path: Path) -> None:
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    (folder / "dictionary.msgpack").write_bytes(
        (source[1] / "dictionary.msgpack").read_bytes() + b"\x00")
    with pytest.raises(InputError) as raised:
        Tokenizer.load(folder)
    assert not isinstance(raised.value, BundleError)
    assert_one_line_naming(str(raised.value), str(folder / "dictionary.msgpack"), "extra data")


def cli_error(err: str, command: str) -> str:
    """The error line of stderr, which must be the only line apart from log records."""
    lines = [line for line in err.strip().splitlines()
             if not re.match(r"(DEBUG|INFO|WARNING) ", line)]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"ehrmotor {command}: error: "), err
    return lines[0]


@pytest.mark.parametrize(("command", "case"), [("embed", "safetensors_truncated"),
                                               ("evaluate", "dictionary_extra_data")])
def test_cli_reports_a_damaged_bundle_in_one_line_with_status_2(
        command: str, case: str, source: tuple[Path, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    meds, model = source
    damage, name, pattern = CASES[case]
    bundle = damaged_copy(model, tmp_path / "model", damage)
    args = [command, "--model", str(bundle), "--meds", str(meds), "--out",
            str(tmp_path / "out")]
    if command == "embed":
        labels = tmp_path / "labels.parquet"
        pl.DataFrame({"subject_id": [1], "prediction_time": [datetime(2020, 1, 1)]},
                     schema={"subject_id": pl.Int64, "prediction_time": pl.Datetime("us")}
                     ).write_parquet(labels)
        args += ["--labels", str(labels)]
    capsys.readouterr()
    assert main(args) == 2
    assert_one_line_naming(cli_error(capsys.readouterr().err, command), name, pattern)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
