"""Shared inputs of the `ehrmotor pretrain` tests (test_pretrain*.py; a plugin of conftest.py):
the session's prepared work folder (conftest `tiny_bundle`'s, 300 subjects; each run copies its
`pretraining_files/` into a folder of its own), a CLI config, and readers of what a run wrote."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ehrmotor.motor_task.tasks import MotorTask
from ehrmotor.sequences.batching import TokenBudgetBatchSampler, collate_windows, window_lengths
from ehrmotor.sequences.shards import load_prepared
from ehrmotor.vocabulary.bags import BagTable

TOKENS = 2048
CLI_CONFIG = """\
[pretrain]
preset = "tiny"
tokens_per_batch = 2048
gradient_accumulation_steps = 1
learning_rate = 1e-3
warmup_steps = 5
eval_steps = 10
save_steps = 10
logging_steps = 5
"""


@pytest.fixture(scope="module")
def prepared_files(tiny_bundle: tuple[Path, Path]) -> Path:
    """`pretraining_files/` of the session's synthetic data (conftest `tiny_bundle`'s, prepared
    with `synthetic_data.PREPARE_CONFIG`); shared, so runs copy it (`new_work`)."""
    return tiny_bundle[1].parent / "pretraining_files"


def new_work(prepared_files: Path, folder: Path) -> Path:
    work = folder / "work"
    shutil.copytree(prepared_files, work / "pretraining_files")
    return work


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "pretrain.toml"
    path.write_text(CLI_CONFIG)
    return path


def summary_of(work: Path) -> dict:
    return json.loads((work / "model" / "training_summary.json").read_text())



def val_batches(work: Path) -> Iterator[dict[str, torch.Tensor]]:
    """The val batches Trainer evaluates on (same sampler, no shuffling)."""
    val = load_prepared(work / "pretraining_files" / "val_batches")
    task_map = torch.from_numpy(task_of(work).task_map())
    bags = BagTable.load(work / "pretraining_files" / "tokenizer")
    for indices in TokenBudgetBatchSampler(window_lengths(val), TOKENS, shuffle=False):
        yield collate_windows([val[int(i)] for i in indices], labels=True, task_map=task_map,
                              bags=bags)


def bundle_mtimes(work: Path) -> dict[str, int]:
    return {p.relative_to(work).as_posix(): p.stat().st_mtime_ns
            for p in sorted((work / "model").rglob("*")) if p.is_file()}


def error_lines(err: str) -> list[str]:
    """stderr without log records."""
    return [line for line in err.strip().splitlines()
            if not re.match(r"(DEBUG|INFO|WARNING) ", line)]


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1, lines
    assert lines[0].startswith("ehrmotor pretrain: error: pretrain: "), lines
    return lines[0]


def task_of(work: Path) -> MotorTask:
    return MotorTask.load(work / "pretraining_files" / "motor_task.json")
