"""The bundle fingerprint: `pretrain` records a digest of each part (fingerprint.json) and
`load_bundle` refuses a part that was not written with the others, naming it.

Each case copies the session's tiny bundle (conftest `tiny_bundle`) and swaps or edits one part
so that it still passes every structural check (same entry count, same tensor shapes).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import msgpack
import polars as pl
import pytest

from ehrmotor.bundle import FINGERPRINT_FILE, load_bundle, record_fingerprint
from ehrmotor.cli import main
from ehrmotor.errors import BundleError

Swap = Callable[[Path], None]
LOG = re.compile(r"(DEBUG|INFO|WARNING) ")


def other_vocabulary(bundle: Path) -> None:
    """The dictionary of another vocabulary with as many entries (one code renamed)."""
    path = bundle / "dictionary.msgpack"
    document = msgpack.unpackb(path.read_bytes(), raw=False)
    entry = next(e for e in document["entries"] if e.get("code"))
    entry["code"] = entry["code"] + "X"
    path.write_bytes(msgpack.packb(document, use_bin_type=True))


def other_weights(bundle: Path) -> None:
    """Weights of the same shapes with other values: the last byte of the data flipped."""
    path = bundle / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def edit_json(name: str, key: str, value: object) -> Swap:
    def swap(bundle: Path) -> None:
        document = json.loads((bundle / name).read_text())
        document[key] = value
        (bundle / name).write_text(json.dumps(document))
    return swap


def other_config(bundle: Path) -> None:
    edit_json("config.json", "rms_norm_eps", 2e-6)(bundle)


def other_motor_task(bundle: Path) -> None:
    path = bundle / "motor_task.json"
    path.write_text(path.read_text() + "\n")


def other_ontology(bundle: Path) -> None:
    """An ontology folder with one more file in it."""
    source = next((bundle / "ontology").glob("*.parquet"))
    shutil.copy(source, source.with_name("extra.parquet"))


SWAPS: dict[str, tuple[Swap, str]] = {
    "dictionary of another vocabulary of the same size": (other_vocabulary,
                                                          "dictionary.msgpack"),
    "weights of the same shapes": (other_weights, "model.safetensors"),
    "config.json": (other_config, "config.json"),
    "motor_task.json": (other_motor_task, "motor_task.json"),
    "ontology/": (other_ontology, "ontology"),
    "training_summary.json": (edit_json("training_summary.json", "global_step", 7),
                              "training_summary.json"),
}


@pytest.fixture
def bundle(tiny_bundle: tuple[Path, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_bundle[1], tmp_path / "model"))


def test_the_fingerprint_is_on_the_loaded_bundle(bundle: Path) -> None:
    recorded = json.loads((bundle / FINGERPRINT_FILE).read_text())
    loaded = load_bundle(bundle)
    assert re.fullmatch(r"[0-9a-f]{64}", loaded.fingerprint)
    assert loaded.fingerprint == recorded["fingerprint"]
    assert sorted(recorded["parts"]) == sorted([
        "config.json", "model.safetensors", "dictionary.msgpack", "motor_task.json", "ontology",
        "training_summary.json"])


@pytest.mark.parametrize("case", list(SWAPS))
def test_a_foreign_part_is_a_one_line_error_naming_it(case: str, bundle: Path) -> None:
    swap, part = SWAPS[case]
    swap(bundle)
    with pytest.raises(BundleError) as raised:
        load_bundle(bundle)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"{bundle / part}: not the {part} this bundle was written with"), \
        message
    assert FINGERPRINT_FILE in message


def test_recording_again_accepts_the_edited_bundle_with_another_fingerprint(
        bundle: Path) -> None:
    before = load_bundle(bundle).fingerprint
    other_vocabulary(bundle)
    assert record_fingerprint(bundle) == load_bundle(bundle).fingerprint != before


def test_a_bundle_without_a_fingerprint_is_refused_with_what_to_do(bundle: Path) -> None:
    (bundle / FINGERPRINT_FILE).unlink()
    with pytest.raises(BundleError, match=r"fingerprint\.json: not found; this bundle was "
                                          r"written by an older ehrmotor.*rerun `ehrmotor "
                                          r"pretrain"):
        load_bundle(bundle)


def test_an_edited_fingerprint_record_is_refused(bundle: Path) -> None:
    edit_json(FINGERPRINT_FILE, "fingerprint", "0" * 64)(bundle)
    with pytest.raises(BundleError, match=r"fingerprint\.json: not a fingerprint record"):
        load_bundle(bundle)


def test_a_missing_recorded_part_is_named(bundle: Path) -> None:
    (bundle / "motor_task.json").unlink()
    with pytest.raises(BundleError, match=r"motor_task\.json: not found; expected the "
                                          r"motor_task\.json written with this bundle"):
        load_bundle(bundle)


@pytest.mark.parametrize("command", ["embed", "evaluate"])
def test_the_commands_end_with_one_line_and_status_2(
        command: str, bundle: Path, tiny_bundle: tuple[Path, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    other_vocabulary(bundle)
    labels = tmp_path / "labels.parquet"
    pl.DataFrame({"subject_id": [1], "prediction_time": [datetime(2020, 1, 1)]},
                 schema={"subject_id": pl.Int64, "prediction_time": pl.Datetime("us")}
                 ).write_parquet(labels)
    out = tmp_path / ("e.parquet" if command == "embed" else "evaluation")
    argv = [command, "--model", str(bundle), "--meds", str(tiny_bundle[0]), "--out", str(out)]
    capsys.readouterr()
    assert main([*argv, "--labels", str(labels)] if command == "embed" else argv) == 2
    lines = [line for line in capsys.readouterr().err.strip().splitlines()
             if not LOG.match(line)]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"ehrmotor {command}: error: {bundle / 'dictionary.msgpack'}: "
                               "not the dictionary.msgpack"), lines


def test_a_split_file_added_to_a_bundle_is_refused(bundle: Path) -> None:
    """The bundle's subject_splits.parquet decides whom evaluate evaluates: one slipped in later
    (a pretraining subject relabelled held_out) must not pass."""
    pl.DataFrame({"subject_id": [1], "split": ["held_out"]}).write_parquet(
        bundle / "subject_splits.parquet")
    with pytest.raises(BundleError, match="subject_splits.parquet: not part of this bundle"):
        load_bundle(bundle)
