"""Reliability: every bad input, bad setting and resource fault ends in one line, exit 2, and
nothing is deleted, replaced or half-written.

The table `CASES` holds (input mutation, command, expected exit status, expected message fragment)
rows. Each row runs in a folder of its own; the runner snapshots that folder before the command
and checks afterwards that it is unchanged (or, for the rows that may write, that only complete
artifacts appeared). The existing bad-MEDS cases of `broken_meds.BROKEN` run through `validate`
and `prepare` as rows too. Resource faults (a full disk, a read-only folder, a file size limit) run
in a subprocess on a small tmpfs and are skipped where this process may not mount one.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pytest
from broken_meds import BROKEN
from meds_builders import write_meds

from ehrmotor.artifacts import clean_stale_temporaries, fingerprint_files
from ehrmotor.cli import main
from ehrmotor.errors import WorkFolderBusy
from ehrmotor.lock import LOCK_FILE, work_lock
from ehrmotor.processes import process_pool

LOG_LINE = re.compile(r"(DEBUG|INFO|WARNING|ERROR) ")
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


# --------------------------------------------------------------------------- shared inputs


@dataclass(frozen=True)
class World:
    """Read-only inputs shared by the rows; each row copies what it changes into `root`."""

    meds: Path  # synthetic MEDS (300 subjects) with athena/
    bundle: Path  # tiny model bundle trained on it
    prepared: Path  # its work folder's pretraining_files/
    labels: Path  # a valid label parquet for `meds`
    tiny_meds: Path  # the three-subject dataset of meds_builders


@pytest.fixture(scope="session")
def world(tiny_bundle: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> World:
    meds, bundle = tiny_bundle
    root = tmp_path_factory.mktemp("reliability")
    events = pl.concat([pl.read_parquet(p) for p in sorted((meds / "data").rglob("*.parquet"))])
    last = (events.filter(pl.col("time").is_not_null()).group_by("subject_id")
            .agg(prediction_time=pl.col("time").max(), birth=pl.col("time").min())
            .filter(pl.col("prediction_time") > pl.col("birth") + pl.duration(days=2))
            .drop("birth").sort("subject_id").head(40)
            .with_columns(boolean_value=pl.col("subject_id") % 2 == 0))
    labels = root / "labels.parquet"
    last.write_parquet(labels)
    return World(meds, bundle, bundle.parent / "pretraining_files", labels,
                 write_meds(root / "tiny_meds"))


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Relative path → (size, mtime in ns) of every file under `folder`; (-1, 0) for folders."""
    if not folder.exists():
        return {}
    found = {}
    for path in folder.rglob("*"):
        info = path.lstat()
        found[path.relative_to(folder).as_posix()] = (
            (-1, 0) if path.is_dir() else (info.st_size, info.st_mtime_ns))
    return found


def error_lines(err: str) -> list[str]:
    """stderr without log records and progress bars."""
    return [line for line in err.strip().splitlines()
            if line.strip() and not LOG_LINE.match(line) and "\r" not in line]


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


# The bad-MEDS rows of test_validate, through the two commands that read MEDS.
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


@pytest.fixture(autouse=True)
def _stop_lock_holders() -> Iterator[None]:
    yield
    while LOCK_HOLDERS:
        holder = LOCK_HOLDERS.pop()
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_bad_input_is_one_line_exit_2_and_nothing_is_written(
        case: Case, world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "case"
    root.mkdir()
    argv = case.setup(world, root)
    before = snapshot(root)
    capsys.readouterr()
    status = run_main(argv)
    err = capsys.readouterr().err
    assert status == case.status, err[-3000:]
    assert "Traceback" not in err
    lines = error_lines(err)
    if case.command == "validate":  # a report: one line per finding, each one line
        lines = [line for line in lines if line.startswith("error: ")]
        assert any(case.fragment in line for line in lines), lines
    else:
        if lines and lines[0].startswith("usage: "):  # argparse: the usage, then the error
            lines = [line for line in lines if line.startswith(f"ehrmotor {case.command}: ")]
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"ehrmotor {case.command}: error: "), lines
        assert case.fragment in lines[0], lines
    if not case.writes:
        assert snapshot(root) == before, "the command changed its folder"


def run_main(argv: list[str]) -> int:
    """`ehrmotor ARGV` in this process; argparse's usage errors exit through SystemExit."""
    try:
        return main(argv)
    except SystemExit as exited:
        return int(exited.code or 0)


def test_the_table_covers_every_command() -> None:
    commands = {case.command for case in CASES.values()}
    assert commands == {"validate", "prepare", "pretrain", "embed", "evaluate", "synth", "label"}
    assert len(CASES) >= 60


# --------------------------------------------------------------------------- warnings, not errors


def test_birth_after_events_is_warned_by_validate(world: World, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    def late_birth(meds: Path) -> None:
        path = meds / "data/train/0.parquet"
        table = pl.read_parquet(path)
        # subject 1's birth moves after its diagnosis and lab (2010) and note (2011)
        table = table.with_columns(time=pl.when((pl.col("subject_id") == 1)
                                                & (pl.col("code") == "MEDS_BIRTH"))
                                   .then(pl.datetime(2012, 1, 1)).otherwise(pl.col("time")))
        table.sort("subject_id", "time", nulls_last=False).write_parquet(path)
    meds = _changed_tiny(world, tmp_path, late_birth)
    assert main(["validate", str(meds)]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "MEDS_BIRTH" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: "), err
    assert "1 subject" in warnings[0] and "1" in warnings[0]


# --------------------------------------------------------------------------- --debug


def test_debug_shows_the_traceback_of_a_one_line_error(world: World, tmp_path: Path) -> None:
    existing_folder(tmp_path)
    argv = ["embed", "--model", str(world.bundle), "--meds", str(world.meds), "--labels",
            str(world.labels), "--out", str(tmp_path / "results")]
    for extra, env in (([], {"EHRMOTOR_DEBUG": "1"}), (["--debug"], {})):
        result = run_cli([*argv, *extra], env=env)
        assert result.returncode == 1 and "Traceback" in result.stderr, result.stderr[-2000:]
        assert "OutputError" in result.stderr
    assert (tmp_path / "results" / "inner" / "precious.txt").read_text() == "do not delete\n"


def test_an_internal_bug_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    from ehrmotor.meds import validate as validate_module

    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("an internal invariant failed")
    monkeypatch.setattr(validate_module, "validate_dataset", broken)
    monkeypatch.setattr("ehrmotor.meds.validate_dataset", broken)
    with pytest.raises(ValueError, match="internal invariant"):
        main(["validate", str(tmp_path)])


# --------------------------------------------------------------------------- resource faults


def run_cli(argv: list[str], env: dict[str, str] | None = None,
            preexec: Callable[[], None] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ehrmotor", *argv], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, preexec_fn=preexec,
                          timeout=timeout)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB tmpfs mounted at tmp_path/disk (skipped where mounting is not allowed)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def assert_no_partial_artifacts(folder: Path) -> None:
    """Only complete artifacts: no temporaries, and every artifact has its manifest."""
    for path in folder.rglob("*"):
        assert ".tmp-" not in path.name and ".old-" not in path.name, path
    files = folder / "pretraining_files"
    if files.exists():
        for artifact in files.iterdir():
            if artifact.name.endswith(".manifest.json") or artifact.name == "config.json":
                continue
            assert (files / f"{artifact.name}.manifest.json").exists(), artifact


def assert_one_error_line(result: subprocess.CompletedProcess[str], command: str,
                          fragment: str) -> None:
    lines = error_lines(result.stderr)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert len(lines) == 1 and lines[0].startswith(f"ehrmotor {command}: error: "), lines
    assert fragment in lines[0], lines


def test_prepare_on_a_full_disk_is_one_line_and_leaves_only_complete_artifacts(
        world: World, small_disk: Path) -> None:
    result = run_cli(["prepare", "--meds", str(world.meds), "--athena", str(world.meds / "athena"),
                      "--out", str(small_disk / "work"), "--workers", "1"])
    assert_one_error_line(result, "prepare", "No space left on device")
    assert_no_partial_artifacts(small_disk / "work")


def test_embed_on_a_full_disk_is_one_line_and_writes_nothing(world: World,
                                                             small_disk: Path) -> None:
    (small_disk / "filler").write_bytes(b"\0" * (3 * 2**20 - 8192))
    result = run_cli(["embed", "--model", str(world.bundle), "--meds", str(world.meds),
                      "--labels", str(world.labels), "--out", str(small_disk / "e.parquet")])
    assert_one_error_line(result, "embed", "No space left on device")
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


@pytest.mark.parametrize("command", ["prepare", "embed"])
def test_a_read_only_out_is_one_line(world: World, small_disk: Path, command: str) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    if command == "prepare":
        argv = ["prepare", "--meds", str(world.tiny_meds), "--out", str(small_disk / "work")]
    else:
        argv = ["embed", "--model", str(world.bundle), "--meds", str(world.meds), "--labels",
                str(world.labels), "--out", str(small_disk / "e.parquet")]
    assert_one_error_line(run_cli(argv), command, "Read-only file system")


def test_a_file_size_limit_is_one_line_and_leaves_only_complete_artifacts(
        world: World, tmp_path: Path) -> None:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))
    result = run_cli(["prepare", "--meds", str(world.meds), "--athena", str(world.meds / "athena"),
                      "--out", str(tmp_path / "work"), "--workers", "1"], preexec=limit)
    assert_one_error_line(result, "prepare", "File too large")
    assert_no_partial_artifacts(tmp_path / "work")


# --------------------------------------------------------------------------- never delete


def test_no_command_deletes_a_pre_existing_folder(world: World, tmp_path: Path) -> None:
    """embed, prepare, evaluate and synth pointed at a folder of the user's keep it intact."""
    folder = existing_folder(tmp_path)
    before = snapshot(folder)
    runs = [
        ["embed", "--model", str(world.bundle), "--meds", str(world.meds), "--labels",
         str(world.labels), "--out", str(folder)],
        ["synth", "--subjects", "5", "--out", str(folder)],
        ["synth", "--subjects", "5", "--out", str(folder), "--force"],
    ]
    for argv in runs:
        assert run_main(argv) == 2, argv
        assert snapshot(folder) == before, argv
    # prepare writes beside the user's files, in its own pretraining_files/ (here it stops at
    # the MOTOR task: three subjects are too few), and keeps the user's files
    assert run_main(["prepare", "--meds", str(world.tiny_meds), "--out", str(folder)]) == 2
    assert (folder / "pretraining_files" / "ontology").is_dir()
    assert (folder / "inner" / "precious.txt").read_text() == "do not delete\n"


def test_atomic_writes_replace_files_but_never_folders(tmp_path: Path) -> None:
    from ehrmotor.artifacts import atomic_path
    from ehrmotor.errors import OutputError

    folder = existing_folder(tmp_path)
    with pytest.raises(OutputError, match="is a folder"), atomic_path(folder) as tmp:
        tmp.write_text("x")
    assert (folder / "inner" / "precious.txt").exists()
    with pytest.raises(OutputError, match="refusing to replace"), atomic_path(folder) as tmp:
        tmp.mkdir()
    assert (folder / "inner" / "precious.txt").exists()
    assert not list(tmp_path.glob(".*tmp-*"))


# --------------------------------------------------------------------------- concurrency


def test_two_prepares_into_one_folder_the_second_stops_naming_the_first(
        world: World, tmp_path: Path) -> None:
    work = tmp_path / "work"
    argv = ["prepare", "--meds", str(world.meds), "--athena", str(world.meds / "athena"),
            "--out", str(work), "--workers", "1"]
    first = subprocess.Popen([sys.executable, "-m", "ehrmotor", *argv], stderr=subprocess.PIPE,
                             text=True)
    deadline = time.monotonic() + 60
    lock = work / LOCK_FILE
    while not (lock.exists() and lock.stat().st_size) and time.monotonic() < deadline:
        time.sleep(0.05)  # held and its holder written
    first.send_signal(signal.SIGSTOP)  # the first holds the lock however slow the second starts
    try:
        second = run_cli(argv)
    finally:
        first.send_signal(signal.SIGCONT)
    assert_one_error_line(second, "prepare", f"in use by `ehrmotor prepare` (pid {first.pid} ")
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert not (work / LOCK_FILE).exists()
    assert run_cli(argv).returncode == 0  # the lock was released


def test_a_lock_left_by_a_killed_holder_is_taken_over(tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from ehrmotor.lock import work_lock\n"
         "with work_lock(sys.argv[1], 'pretrain'):\n print('held', flush=True)\n time.sleep(60)",
         str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    with pytest.raises(WorkFolderBusy, match=f"pid {holder.pid} "), work_lock(tmp_path, "prepare"):
        pass
    holder.kill()
    holder.wait()
    assert (tmp_path / LOCK_FILE).exists()  # SIGKILL: nobody removed it
    with caplog.at_level("WARNING"), work_lock(tmp_path, "prepare"):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert f"pid {holder.pid} " in caplog.text
    assert not (tmp_path / LOCK_FILE).exists()


def test_only_temporaries_of_dead_processes_are_cleaned(tmp_path: Path) -> None:
    dead = _dead_pid()
    live = subprocess.Popen(["sleep", "30"])
    try:
        for pid in (dead, live.pid, os.getpid()):
            (tmp_path / f".model.tmp-{pid}").mkdir()
        (tmp_path / ".model.old-1x").mkdir()  # not ours: name does not parse
        (tmp_path / "model.tmp-1").mkdir()  # not hidden: not ours
        removed = clean_stale_temporaries(tmp_path)
    finally:
        live.kill()
        live.wait()
    assert [p.name for p in removed] == [f".model.tmp-{dead}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f".model.tmp-{live.pid}", f".model.tmp-{os.getpid()}", ".model.old-1x", "model.tmp-1"])


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


# --------------------------------------------------------------------------- interruptions


def _sleep_in_worker(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def _pool_parent() -> None:  # run in a subprocess: start a pool, report worker pids, block
    with process_pool(2) as pool:
        pids = {pool.submit(os.getpid).result() for _ in range(8)}
        print(" ".join(map(str, sorted(pids))), flush=True)
        pool.submit(_sleep_in_worker, 120).result()


def test_workers_exit_when_their_parent_is_killed() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", "import test_reliability as t; t._pool_parent()"],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)})
    assert parent.stdout is not None
    workers = [int(pid) for pid in parent.stdout.readline().split()]
    assert workers
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(_running(pid) for pid in workers):
        time.sleep(0.2)
    assert not any(_running(pid) for pid in workers), "workers outlived their parent"


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_fingerprint_sees_a_same_size_edit_early_in_a_file(tmp_path: Path) -> None:
    shard = tmp_path / "0.parquet"
    shard.write_bytes(bytes(range(256)) * 8192)  # 2 MiB: the edit is 2 MiB before the end
    before = fingerprint_files([shard], tmp_path)
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert fingerprint_files([shard], tmp_path) != before


# --------------------------------------------------------------------------- links, memory


def test_prepare_and_label_write_through_a_link_to_a_folder(world: World, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]
                                                           ) -> None:
    target = tmp_path / "real"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    # prepare goes on (and stops at the MOTOR task: three subjects are too few)
    assert run_main(["prepare", "--meds", str(world.tiny_meds), "--out", str(link)]) == 2
    assert "is a file" not in capsys.readouterr().err
    assert (target / "pretraining_files" / "ontology").is_dir()
    assert not (target / LOCK_FILE).exists()
    labels = tmp_path / "labels-link"
    (tmp_path / "labels-real").mkdir()
    labels.symlink_to(tmp_path / "labels-real", target_is_directory=True)
    assert run_main(["label", "--meds", str(world.meds), "--out", str(labels), "--outcomes",
                     "hypertension"]) == 0
    assert labels.is_symlink() and (tmp_path / "labels-real" / "labels.json").is_file()
    assert not list(tmp_path.glob(".*tmp-*"))


def test_an_allocation_failure_building_the_model_is_one_line(
        world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from ehrmotor import train

    def no_memory(config: object) -> None:
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not "
                           "enough memory: you tried to allocate 1099511627776 bytes.")
    monkeypatch.setattr(train, "MotorModel", no_memory)
    argv = pretrain_with(PRETRAIN_TOML)(world, tmp_path)
    capsys.readouterr()
    assert run_main(argv) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("ehrmotor pretrain: error: pretrain: "), lines
    assert "parameters" in lines[0] and "smaller preset" in lines[0], lines
