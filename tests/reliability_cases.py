"""The reliability table (`CASES`: input mutation, command, expected exit status, message
fragment) and the shared read-only inputs of test_reliability*.py (`make_world`)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl
from broken_meds import BROKEN
from reliability_world import World

PRETRAIN_TOML = """\
[pretrain]
preset = "tiny"
tokens_per_batch = 2048
gradient_accumulation_steps = 1
max_steps = 2
eval_steps = 2
save_steps = 2
warmup_steps = 1
"""


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Case:
    """One row: `setup(world, root)` makes the mutated input in `root` and returns argv."""

    command: str
    setup: Callable[[World, Path], list[str]]
    fragment: str
    status: int = 2
    writes: bool = False  # True: the command may add complete artifacts (checked separately)


def copy_meds(world: World, root: Path) -> Path:
    """A copy of the synthetic data (data and metadata; athena linked, it is large)."""
    target = root / "meds"
    shutil.copytree(world.meds / "data", target / "data")
    shutil.copytree(world.meds / "metadata", target / "metadata")
    return target


def tiny_athena(root: Path, concept_rows: list[str] | None = None,
                concept_tail: str = "") -> Path:
    """A three-concept Athena folder for the tiny dataset (rows after the header)."""
    folder = root / "athena"
    folder.mkdir(parents=True)
    header = ("concept_id\tconcept_name\tdomain_id\tvocabulary_id\tconcept_class_id\t"
              "standard_concept\tconcept_code\tvalid_start_date\tvalid_end_date\tinvalid_reason")
    rows = concept_rows if concept_rows is not None else [
        "1\tType 2 diabetes\tCondition\tICD10CM\t3-char nonbill code\tS\tE11\t19700101\t20991231\t",
        "2\tType 2 diabetes w/o complication\tCondition\tICD10CM\t4-char billing code\tS\tE11.9\t"
        "19700101\t20991231\t",
        "3\tCreatinine\tMeasurement\tLOINC\tLab Test\tS\t2345-7\t19700101\t20991231\t",
    ]
    (folder / "CONCEPT.csv").write_text("\n".join([header, *rows]) + "\n" + concept_tail)
    (folder / "CONCEPT_RELATIONSHIP.csv").write_text(
        "concept_id_1\tconcept_id_2\trelationship_id\tvalid_start_date\tvalid_end_date\t"
        "invalid_reason\n2\t1\tIs a\t19700101\t20991231\t\n")
    (folder / "CONCEPT_ANCESTOR.csv").write_text(
        "ancestor_concept_id\tdescendant_concept_id\tmin_levels_of_separation\t"
        "max_levels_of_separation\n1\t2\t1\t1\n")
    return folder


def prepare_tiny(athena: Callable[[Path], Path] | None = None,
                 change_meds: Callable[[Path], None] | None = None,
                 config: str | None = None) -> Callable[[World, Path], list[str]]:
    def setup(world: World, root: Path) -> list[str]:
        meds = root / "meds"
        shutil.copytree(world.tiny_meds, meds)
        if change_meds is not None:
            change_meds(meds)
        argv = ["prepare", "--meds", str(meds), "--out", str(root / "work"), "--workers", "1"]
        if athena is not None:
            argv += ["--athena", str(athena(root))]
        if config is not None:
            (root / "config.toml").write_text(config)
            argv += ["--config", str(root / "config.toml")]
        return argv
    return setup


def set_code(row: int, code: str) -> Callable[[Path], None]:
    def change(meds: Path) -> None:
        path = meds / "data/train/0.parquet"
        table = pl.read_parquet(path)
        codes = table["code"].to_list()
        codes[row] = code
        table.with_columns(code=pl.Series(codes)).write_parquet(path)
    return change


def pretrain_with(config: str, *flags: str) -> Callable[[World, Path], list[str]]:
    def setup(world: World, root: Path) -> list[str]:
        shutil.copytree(world.prepared, root / "work" / "pretraining_files")
        (root / "config.toml").write_text(config)
        return ["pretrain", "--work", str(root / "work"), "--config", str(root / "config.toml"),
                *flags]
    return setup


def with_bundle(command: str, change: Callable[[Path], None],
                *flags: str) -> Callable[[World, Path], list[str]]:
    def setup(world: World, root: Path) -> list[str]:
        bundle = root / "model"
        shutil.copytree(world.bundle, bundle)
        change(bundle)
        if command == "embed":
            return ["embed", "--model", str(bundle), "--meds", str(world.meds), "--labels",
                    str(world.labels), "--out", str(root / "embeddings.parquet"), *flags]
        return ["evaluate", "--model", str(bundle), "--meds", str(world.meds), "--labels",
                str(world.labels), "--out", str(root / "evaluation"), *flags]
    return setup


def truncate(name: str, keep: float = 0.5) -> Callable[[Path], None]:
    def change(bundle: Path) -> None:
        data = (bundle / name).read_bytes()
        (bundle / name).write_bytes(data[: int(len(data) * keep)])
    return change


def delete(name: str) -> Callable[[Path], None]:
    return lambda bundle: (bundle / name).unlink()


def write(name: str, text: str) -> Callable[[Path], None]:
    return lambda bundle: (bundle / name).write_text(text)


def edit_config(**changes: object) -> Callable[[Path], None]:
    def change(bundle: Path) -> None:
        config = json.loads((bundle / "config.json").read_text())
        for key, value in changes.items():
            if value is None:
                config.pop(key)
            else:
                config[key] = value
        (bundle / "config.json").write_text(json.dumps(config))
    return change


def only_pickle(bundle: Path) -> None:
    (bundle / "model.safetensors").rename(bundle / "pytorch_model.bin")


def embed_into(make_out: Callable[[Path], Path]) -> Callable[[World, Path], list[str]]:
    def setup(world: World, root: Path) -> list[str]:
        return ["embed", "--model", str(world.bundle), "--meds", str(world.meds), "--labels",
                str(world.labels), "--out", str(make_out(root))]
    return setup


def existing_folder(root: Path) -> Path:
    folder = root / "results"
    (folder / "inner").mkdir(parents=True)
    (folder / "inner" / "precious.txt").write_text("do not delete\n")
    return folder


def existing_text_file(root: Path) -> Path:
    path = root / "notes.txt"
    path.write_text("do not replace\n")
    return path


def evaluate_flags(*flags: str) -> Callable[[World, Path], list[str]]:
    def setup(world: World, root: Path) -> list[str]:
        return ["evaluate", "--model", str(world.bundle), "--meds", str(world.meds),
                "--out", str(root / "evaluation"), *flags]
    return setup


def synth_over(world: World, root: Path) -> list[str]:
    existing_folder(root)
    return ["synth", "--subjects", "10", "--out", str(root / "results"), "--force"]


def file_as_out(command: str) -> Callable[[World, Path], list[str]]:
    def setup(world: World, root: Path) -> list[str]:
        existing_text_file(root)
        if command == "prepare":
            return ["prepare", "--meds", str(world.tiny_meds), "--out", str(root / "notes.txt")]
        if command == "pretrain":
            return ["pretrain", "--work", str(root / "notes.txt")]
        return evaluate_flags()(world, root)[:-2] + ["--out", str(root / "notes.txt")]
    return setup


def locked(command: str) -> Callable[[World, Path], list[str]]:
    """The work folder is held by a live process (this one, through another lock holder)."""
    def setup(world: World, root: Path) -> list[str]:
        work = root / "work"
        work.mkdir()
        holder = subprocess.Popen(
            [sys.executable, "-c", "import sys, time; from ehrmotor.lock import work_lock\n"
             "with work_lock(sys.argv[1], 'prepare'):\n print('held', flush=True)\n"
             " time.sleep(60)", str(work)], stdout=subprocess.PIPE, text=True)
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        LOCK_HOLDERS.append(holder)
        if command == "prepare":
            return ["prepare", "--meds", str(world.tiny_meds), "--out", str(work)]
        shutil.copytree(world.prepared, work / "pretraining_files")
        (root / "config.toml").write_text(PRETRAIN_TOML)
        return ["pretrain", "--work", str(work), "--config", str(root / "config.toml")]
    return setup


LOCK_HOLDERS: list[subprocess.Popen[str]] = []
TRUNCATED = "4\tMetformin\tDrug\tRxNorm\tIngredient\tS\t6809\t1970"  # cut mid-row
BAD_ID = "x5\tAspirin\tDrug\tRxNorm\tIngredient\tS\t1191\t19700101\t20991231\t"
DUPLICATE = "3\tCreatinine again\tMeasurement\tLOINC\tLab Test\tS\t2345-8\t19700101\t20991231\t"

CASES: dict[str, Case] = {
    # output safety
    "embed --out an existing folder": Case("embed", embed_into(existing_folder), "is a folder"),
    "embed --out a non-parquet file": Case("embed", embed_into(existing_text_file),
                                           "not a parquet file"),
    "evaluate --out a file": Case("evaluate", file_as_out("evaluate"), "is a file"),
    "prepare --out a file": Case("prepare", file_as_out("prepare"), "is a file"),
    "pretrain --work a file": Case("pretrain", file_as_out("pretrain"), "notes.txt"),
    "synth --force over a folder it did not write": Case("synth", synth_over,
                                                         "not a dataset written by"),
    # strict configuration
    "prepare config [prepar]": Case("prepare", prepare_tiny(config="[prepar]\nvocab_size = 9\n"),
                                    "unknown table [prepar]"),
    "prepare config key outside a table": Case(
        "prepare", prepare_tiny(config="vocab_size = 9\n[prepare]\n"), "outside any table"),
    "pretrain config [pretrian]": Case("pretrain", pretrain_with('[pretrian]\npreset = "tiny"\n'),
                                       "unknown table [pretrian]"),
    # MEDS content
    "empty code": Case("prepare", prepare_tiny(change_meds=set_code(2, "")), "empty"),
    "code with a newline": Case("prepare", prepare_tiny(change_meds=set_code(2, "ICD10CM//E1\n1")),
                                "control character"),
    "code with a tab": Case("validate", lambda w, r: [
        "validate", str(_changed_tiny(w, r, set_code(3, "LOINC//2345\t7")))], "control character"),
    # Athena
    "Athena truncated last line": Case("prepare", prepare_tiny(
        athena=lambda root: tiny_athena(root, concept_tail=TRUNCATED)), "line 5"),
    "Athena non-integer concept_id": Case("prepare", prepare_tiny(
        athena=lambda root: tiny_athena(root, concept_tail=BAD_ID + "\n")), "concept_id"),
    "Athena duplicate concept_id": Case("prepare", prepare_tiny(
        athena=lambda root: tiny_athena(root, concept_tail=DUPLICATE + "\n")),
        "concept_id 3 is also on line 4"),
    # pretrain settings the model rejects
    "pretrain tokens_per_batch below a window": Case(
        "pretrain", pretrain_with(PRETRAIN_TOML.replace("2048", "64")), "tokens_per_batch"),
    "pretrain num_heads not dividing hidden_size": Case(
        "pretrain", pretrain_with(PRETRAIN_TOML + "hidden_size = 64\nnum_heads = 6\n"),
        "num_heads"),
    "pretrain negative hidden_size": Case(
        "pretrain", pretrain_with(PRETRAIN_TOML + "hidden_size = -8\n"), "hidden_size"),
    # broken bundles
    **{f"{command} bundle: {name}": Case(command, with_bundle(command, change), fragment)
       for command in ("embed", "evaluate")
       for name, change, fragment in [
           ("truncated model.safetensors", truncate("model.safetensors"), "model.safetensors"),
           ("missing model.safetensors", delete("model.safetensors"), "model.safetensors"),
           ("only pytorch_model.bin", only_pickle, "pytorch_model.bin"),
           ("config.json not JSON", write("config.json", "{not json"), "config.json"),
           ("config.json without hidden_size", edit_config(hidden_size=None), "config.json"),
           ("config.json with another hidden_size", edit_config(hidden_size=96), "config.json"),
           ("missing dictionary.msgpack", delete("dictionary.msgpack"), "dictionary.msgpack"),
           ("corrupt dictionary.msgpack", truncate("dictionary.msgpack", 0.7),
            "dictionary.msgpack"),
       ]},
    # out-of-range flags
    "evaluate --horizon-days 0": Case("evaluate", evaluate_flags("--horizon-days", "0"),
                                      "--horizon-days"),
    "evaluate --horizon-days -30": Case("evaluate", evaluate_flags("--horizon-days", "-30"),
                                        "--horizon-days"),
    "evaluate --horizon-days nan": Case("evaluate", evaluate_flags("--horizon-days", "nan"),
                                        "--horizon-days"),
    "evaluate --seed -1": Case("evaluate", evaluate_flags("--seed", "-1"), "--seed"),
    "evaluate --repeats 0": Case("evaluate", evaluate_flags("--repeats", "0"), "--repeats"),
    "evaluate --train-sizes 0": Case("evaluate", evaluate_flags("--train-sizes", "0"),
                                     "--train-sizes"),
    "embed --tokens-per-batch 1": Case("embed", lambda w, r: embed_into(
        lambda root: root / "e.parquet")(w, r) + ["--tokens-per-batch", "1"],
        "--tokens-per-batch"),
    "synth --seed -1": Case("synth", lambda w, r: ["synth", "--subjects", "5", "--seed", "-1",
                                                   "--out", str(r / "s")], "--seed"),
    # an --out inside an input
    "prepare --out inside --meds": Case("prepare", lambda w, r: [
        "prepare", "--meds", str(copy_meds(w, r)), "--out", str(r / "meds/data/work")],
        "is inside --meds"),
    "label --out inside --meds": Case("label", lambda w, r: [
        "label", "--meds", str(copy_meds(w, r)), "--out", str(r / "meds/labels")],
        "is inside --meds"),
    "evaluate --out inside --meds": Case("evaluate", lambda w, r: [
        "evaluate", "--model", str(w.bundle), "--meds", str(copy_meds(w, r)), "--out",
        str(r / "meds/evaluation")], "is inside --meds"),
    "embed --out inside --meds": Case("embed", lambda w, r: embed_inside_meds(w, r),
                                      "is inside --meds"),
    "embed --out is --labels": Case("embed", lambda w, r: embed_over_labels(w, r), "is --labels"),
    # a model too large for the memory
    "pretrain hidden_size 1000000": Case(
        "pretrain", pretrain_with(PRETRAIN_TOML + "hidden_size = 1000000\n"),
        "parameters and training needs about"),
    # one writer per work folder
    "prepare while another holds the work folder": Case("prepare", locked("prepare"), "in use by"),
    "pretrain while another holds the work folder": Case("pretrain", locked("pretrain"),
                                                         "in use by"),
}


def embed_inside_meds(world: World, root: Path) -> list[str]:
    meds = copy_meds(world, root)
    return ["embed", "--model", str(world.bundle), "--meds", str(meds), "--labels",
            str(world.labels), "--out", str(meds / "data" / "embeddings.parquet")]


def embed_over_labels(world: World, root: Path) -> list[str]:
    labels = Path(shutil.copy(world.labels, root / "labels.parquet"))
    return ["embed", "--model", str(world.bundle), "--meds", str(world.meds), "--labels",
            str(labels), "--out", str(labels)]


def _changed_tiny(world: World, root: Path, change: Callable[[Path], None]) -> Path:
    meds = root / "meds"
    shutil.copytree(world.tiny_meds, meds)
    change(meds)
    return meds


# The bad-MEDS rows of broken_meds, through the two commands that read MEDS.
for _name, _broken in BROKEN.items():
    if _broken.warning:
        continue
    for _command in ("validate", "prepare"):
        def _setup(world: World, root: Path, broken=_broken, command=_command) -> list[str]:
            meds = broken.breaks(_copy_tiny(world, root))
            if command == "validate":
                return ["validate", str(meds)]
            return ["prepare", "--meds", str(meds), "--out", str(root / "work")]
        CASES[f"{_command} MEDS: {_name}"] = Case(_command, _setup, _broken.says[0])


def _copy_tiny(world: World, root: Path) -> Path:
    meds = root / "meds"
    shutil.copytree(world.tiny_meds, meds)
    return meds
