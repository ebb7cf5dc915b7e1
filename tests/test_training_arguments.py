"""Pretrain settings that only reach Hugging Face `TrainingArguments`: compile and FSDP."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ehrmotor.checkpoints import RESUMABLE_CHANGES
from ehrmotor.config import ConfigError, PretrainConfig, load_config
from ehrmotor.errors import PretrainError
from ehrmotor.pretrain import setup as pretrain_setup
from ehrmotor.pretrain.setup import training_arguments


def test_compile_turns_on_trainers_torch_compile_and_may_change_on_resume(tmp_path: Path) -> None:
    assert training_arguments(PretrainConfig(compile=True), tmp_path, True, 64).torch_compile
    assert not training_arguments(PretrainConfig(), tmp_path, True, 64).torch_compile
    assert "compile" in RESUMABLE_CHANGES


def test_fsdp_shards_each_transformer_block_and_keeps_a_full_state_dict(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pretrain_setup, "fsdp_devices_available", lambda: True)  # arguments only
    args = training_arguments(PretrainConfig(fsdp=True), tmp_path, True, 64)
    assert args.fsdp
    assert args.fsdp_config["transformer_layer_cls_to_wrap"] == ["MotorBlock"]
    assert args.fsdp_plugin_args["transformer_cls_names_to_wrap"] == "MotorBlock"
    assert args.fsdp_plugin_args["state_dict_type"] == "FULL_STATE_DICT"
    assert not training_arguments(PretrainConfig(), tmp_path, True, 64).fsdp


def test_fsdp_without_gpus_is_one_line_instead_of_being_silently_dropped(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(PretrainError, match="fsdp needs GPUs"):
        training_arguments(PretrainConfig(fsdp=True), tmp_path, True, 64)


@pytest.mark.parametrize("name", ["compile", "fsdp"])
def test_the_switches_are_bools_in_the_config_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f"[pretrain]\n{name} = true\n")
    assert getattr(load_config(PretrainConfig, path, "pretrain"), name) is True
    path.write_text(f'[pretrain]\n{name} = "yes"\n')
    with pytest.raises(ConfigError, match=f"key '{name}' has value 'yes'; expected a bool"):
        load_config(PretrainConfig, path, "pretrain")
