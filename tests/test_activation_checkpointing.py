"""Activation checkpointing (`PretrainConfig.gradient_checkpointing`; on a model,
`activation_checkpointing_enable()`): the same loss and gradients as without it, with less kept
for the backward pass, and a pretraining run with it on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from ehrmotor.config import ConfigError, PretrainConfig, load_config
from ehrmotor.model import MotorConfig, MotorModel
from ehrmotor.pretrain import run as pretrain_run
from ehrmotor.pretrain.run import pretrain

BIN_EDGES = [0.0, 7.0, 60.0, 365.0]
NUM_TASKS = 6
VOCAB = 50


def packed_batch(lengths: list[int], seed: int) -> dict[str, torch.Tensor]:
    """Random packed positions of subjects with `lengths` positions, a prediction point every
    third position, and sparse MOTOR labels (`ehrmotor.model.LABELS`) at the points."""
    generator = torch.Generator().manual_seed(seed)
    positions = sum(lengths)
    bag_sizes = torch.randint(1, 5, (positions,), generator=generator)
    entries = torch.randint(0, VOCAB, (int(bag_sizes.sum()),), generator=generator)
    point_indices = torch.arange(0, positions, 3)
    censor_days = 1 + torch.rand(point_indices.shape, generator=generator) * 1000
    observed = torch.rand(len(point_indices), NUM_TASKS, generator=generator) < 0.4
    label_point, label_task = observed.nonzero(as_tuple=True)
    return {
        "entries": entries, "weights": torch.rand(entries.shape, generator=generator),
        "bag_offsets": torch.cumsum(bag_sizes, 0) - bag_sizes,
        "time_features": torch.rand(positions, 3, generator=generator),
        "age_days": 7000 + torch.cumsum(torch.rand(positions, generator=generator) * 30, 0),
        "segment_ids": torch.repeat_interleave(torch.arange(len(lengths)),
                                               torch.tensor(lengths)),
        "point_indices": point_indices, "censor_days": censor_days, "label_point": label_point,
        "label_task": label_task,
        "label_days": torch.rand(label_point.shape, generator=generator)
        * censor_days[label_point],
    }


def loss_and_gradients(model: MotorModel, batch: dict[str, torch.Tensor], autocast: bool
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """The loss, each parameter's gradient, and the bytes autograd kept for the backward pass."""
    kept = [0]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        kept[0] += tensor.numel() * tensor.element_size()
        return tensor

    model.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {name: parameter.grad.clone()
                           for name, parameter in model.named_parameters()
                           if parameter.grad is not None}, kept[0]


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(autocast: bool) -> None:
    torch.manual_seed(0)
    config = MotorConfig.preset("tiny", num_layers=3, vocab_size=VOCAB, num_tasks=NUM_TASKS,
                                bin_edges_days=BIN_EDGES, initial_log_rates=[-5.0] * NUM_TASKS)
    model = MotorModel(config).train()
    batch = packed_batch([40, 1, 70, 25], seed=3)
    plain_loss, plain_gradients, plain_kept = loss_and_gradients(model, batch, autocast)
    model.activation_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in model.motor.layers)
    loss, gradients, kept = loss_and_gradients(model, batch, autocast)

    # Only each block's input is kept; what is inside it is recomputed in the backward pass.
    assert kept < plain_kept / 2, (kept, plain_kept)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, plain_loss, rtol=0, atol=0)
    assert gradients.keys() == plain_gradients.keys() == dict(model.named_parameters()).keys()
    for name, gradient in gradients.items():
        torch.testing.assert_close(gradient, plain_gradients[name], rtol=1e-5, atol=1e-7,
                                   msg=lambda message, name=name: f"{name}: {message}")
    model.activation_checkpointing_disable()
    assert not any(layer.gradient_checkpointing for layer in model.motor.layers)


def test_gradient_checkpointing_is_a_pretrain_setting_that_must_be_a_bool(tmp_path: Path) -> None:
    path = tmp_path / "ehrmotor.toml"
    path.write_text("[pretrain]\ngradient_checkpointing = true\n")
    assert load_config(PretrainConfig, path, "pretrain").gradient_checkpointing is True
    assert PretrainConfig().gradient_checkpointing is False
    path.write_text("[pretrain]\ngradient_checkpointing = 1\n")
    with pytest.raises(ConfigError,
                       match="key 'gradient_checkpointing' has value 1; expected a bool"):
        load_config(PretrainConfig, path, "pretrain")


def test_pretrain_with_gradient_checkpointing_trains_with_checkpointed_blocks(
        tiny_bundle: tuple[Path, Path], tmp_path: Path) -> None:
    work = tmp_path / "work"
    shutil.copytree(tiny_bundle[1].parent / "pretraining_files", work / "pretraining_files")
    built: list[MotorModel] = []

    def recording(config: MotorConfig) -> MotorModel:
        built.append(MotorModel(config))
        return built[-1]

    config = PretrainConfig(preset="tiny", tokens_per_batch=2048, gradient_accumulation_steps=1,
                            max_steps=3, eval_steps=3, save_steps=3, warmup_steps=1,
                            logging_steps=1, gradient_checkpointing=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pretrain_run, "MotorModel", recording)
        assert pretrain(work, config) == work / "model"
    assert all(layer.gradient_checkpointing for layer in built[0].motor.layers)
    summary = json.loads((work / "model" / "training_summary.json").read_text())
    assert summary["global_step"] == 3
    assert summary["config"]["gradient_checkpointing"] is True
    assert torch.isfinite(torch.tensor([summary["train_loss"], summary["val_loss"]])).all()
    # The bundle loads as any other: checkpointing is a training setting, not saved in the model.
    loaded = MotorModel.from_pretrained(work / "model")
    assert not any(layer.gradient_checkpointing for layer in loaded.motor.layers)
