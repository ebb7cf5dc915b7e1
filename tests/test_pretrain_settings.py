"""`ehrmotor pretrain` settings (`ehrmotor.pretrain.setup`): bad settings and missing inputs are
refused before training, with one line and nothing written."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from pretrain_fixtures import (  # noqa: F401 (fixtures)
    TOKENS,
    error_lines,
    new_work,
    one_error_line,
)

from ehrmotor.cli import main
from ehrmotor.config import PretrainConfig
from ehrmotor.errors import PretrainError
from ehrmotor.pretrain import run as pretrain_run
from ehrmotor.pretrain import setup as pretrain_setup
from ehrmotor.pretrain.run import pretrain
from ehrmotor.sequences.batching import window_lengths
from ehrmotor.sequences.shards import load_prepared


def test_pretrain_without_prepared_files_exits_2_with_one_line_naming_prepare(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pretrain", "--work", str(tmp_path), "--preset", "tiny"]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1, lines
    assert lines[0].startswith("ehrmotor pretrain: error: ")
    assert "`ehrmotor prepare`" in lines[0]
    assert not (tmp_path / "model").exists()


def longest_window(work: Path) -> int:
    files = work / "pretraining_files"
    return max(int(window_lengths(load_prepared(files / name)).max())
               for name in ("train_batches", "val_batches"))


def test_tokens_per_batch_below_the_longest_window_exits_2_before_writing(
        prepared_files: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    work = new_work(prepared_files, tmp_path)
    longest = longest_window(work)
    assert main(["pretrain", "--work", str(work), "--preset", "tiny", "--tokens-per-batch",
                 str(longest - 1)]) == 2
    line = one_error_line(capsys)
    assert f"tokens_per_batch {longest - 1} is smaller than the longest prepared window " \
           f"({longest} positions); set tokens_per_batch to at least {longest}" in line, line
    assert not (work / "pretraining_output").exists()
    assert not (work / "model").exists()


@pytest.mark.parametrize(("setting", "message"), [
    ("num_heads = 5", "num_heads 5 does not divide hidden_size 64 into heads of even size"),
    ("num_heads = 0", "num_heads must be at least 1, got 0"),
    ("hidden_size = 66", "num_heads 4 does not divide hidden_size 66"),
    ("learning_rate = -1e-3", "learning_rate must be positive, got -0.001"),
    ("learning_rate = nan", "learning_rate must be a finite number, got nan"),
    ("adam_beta2 = 1.0", "adam_beta2 must be in [0, 1), got 1.0"),
    ("warmup_steps = -1", "warmup_steps must be at least 0, got -1"),
])
def test_bad_model_or_training_setting_exits_2_naming_it_before_writing(
        prepared_files: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], setting: str,
        message: str) -> None:
    work = new_work(prepared_files, tmp_path)
    config = tmp_path / "bad.toml"
    config.write_text(f'[pretrain]\npreset = "tiny"\ntokens_per_batch = {TOKENS}\n{setting}\n')
    assert main(["pretrain", "--work", str(work), "--config", str(config)]) == 2
    line = one_error_line(capsys)
    assert message in line, line
    assert not (work / "pretraining_output").exists()
    assert not (work / "model").exists()


def test_a_config_the_model_rejects_is_one_line_pretrain_error(
        prepared_files: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def reject(*args: object, **kwargs: object) -> None:
        raise ValueError("rope_theta must be a positive finite number; got 0.0\nmore detail")

    monkeypatch.setattr(pretrain_setup.MotorConfig, "preset", reject)
    prepared = pretrain_setup.load_prepared_files(new_work(prepared_files, tmp_path))
    with pytest.raises(PretrainError) as raised:
        pretrain_setup.build_model_config(PretrainConfig(preset="tiny"), prepared)
    assert str(raised.value) == "pretrain: rope_theta must be a positive finite number; got 0.0"


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_stale_temporaries_of_dead_processes_are_removed_live_ones_kept(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    work = tmp_path / "work"
    for name in pretrain_run.BUNDLE_FILES:  # a complete bundle: pretrain has nothing else to do
        (work / "model").mkdir(parents=True, exist_ok=True)
        (work / "model" / name).write_text("{}")
    dead = dead_pid()
    stale = [work / f".model.tmp-{dead}", work / f".model.old-{dead}"]
    for folder in stale:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"cut short")
    with subprocess.Popen(["sleep", "60"]) as sleeper:
        try:
            live = work / f".model.tmp-{sleeper.pid}"
            live.mkdir()
            caplog.set_level("INFO", logger="ehrmotor")
            assert pretrain(work, PretrainConfig(preset="tiny")) == work / "model"
            assert live.is_dir()
        finally:
            sleeper.kill()
    for folder in stale:
        assert not folder.exists(), folder
        assert f"removed {folder}, left by an interrupted run" in caplog.text
    assert str(live) not in caplog.text


def test_unknown_pretrain_config_key_exits_2_naming_the_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[pretrain]\npreset = "tiny"\nlearnig_rate = 1e-3\n')
    assert main(["pretrain", "--work", str(tmp_path), "--config", str(config)]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1, lines
    assert "unknown key 'learnig_rate'" in lines[0] and "[pretrain]" in lines[0]

