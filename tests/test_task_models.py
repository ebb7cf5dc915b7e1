"""Task models (`ehrmotor.model.task_models`): losses and gradients against written-out
references, the head's start from the pretrained MOTOR head, the forward pass, save and reload."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from ehrmotor.model import MotorConfig, MotorModel
from ehrmotor.model.task_models import (
    MotorForBinary,
    MotorForTimeToEvent,
    TaskSpec,
    binary_loss,
    recorded_task,
    task_model_class,
    time_to_event_loss,
)

EDGES = [0.0, 10.0, 100.0]
CODES = ["A", "B", "C", "D", "E"]


def _config() -> MotorConfig:
    return MotorConfig.preset("tiny", vocab_size=40, num_tasks=len(CODES), num_bins=len(EDGES),
                              bin_edges_days=EDGES, initial_log_rates=[-5.0, -4.0, -3.0, -6.0,
                                                                       -7.0], max_window=16)


def _reference_nll(log_hazards: list[float], days: float, event: bool) -> tuple[float, list[float]]:
    """-log L of one label and its gradient by log-hazard, written out bin by bin."""
    loss, gradient = 0.0, []
    event_bin = max(b for b, edge in enumerate(EDGES) if edge < days)
    for b, h in enumerate(log_hazards):
        width = EDGES[b + 1] - EDGES[b] if b + 1 < len(EDGES) else math.inf
        at_risk = min(max(days - EDGES[b], 0.0), width)
        hit = 1.0 if event and b == event_bin else 0.0
        loss += math.exp(h) * at_risk - hit * h
        gradient.append(math.exp(h) * at_risk - hit)
    return loss, gradient


def test_time_to_event_loss_and_gradient_match_the_written_out_likelihood() -> None:
    generator = torch.Generator().manual_seed(3)
    log_hazards = (torch.randn(6, len(EDGES), generator=generator) - 3).requires_grad_()
    days = torch.tensor([5.0, 10.0, 50.0, 100.0, 400.0, 0.5])
    event = torch.tensor([True, False, True, True, False, False])
    loss = time_to_event_loss(log_hazards, days, event, EDGES)
    loss.backward()
    rows = [_reference_nll(log_hazards[i].tolist(), float(days[i]), bool(event[i]))
            for i in range(6)]
    assert loss.item() == pytest.approx(sum(r[0] for r in rows) / 6, rel=1e-5)
    expected = torch.tensor([r[1] for r in rows]) / 6
    torch.testing.assert_close(log_hazards.grad, expected, rtol=1e-5, atol=1e-7)


def test_binary_loss_and_gradient_match_cross_entropy() -> None:
    logits = torch.tensor([-2.0, 0.0, 1.5, 3.0], requires_grad=True)
    label = torch.tensor([0.0, 1.0, 1.0, 0.0])
    loss = binary_loss(logits, label)
    loss.backward()
    p = torch.sigmoid(logits.detach())
    reference = -(label * p.log() + (1 - label) * (1 - p).log()).mean()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    torch.testing.assert_close(logits.grad, (p - label) / 4)


def _pretrained() -> MotorModel:
    torch.manual_seed(0)
    return MotorModel(_config()).eval()


def test_time_to_event_head_starts_from_the_outcomes_pretraining_task() -> None:
    pretrained = _pretrained()
    model = MotorForTimeToEvent.from_motor(
        pretrained, TaskSpec("b", "time_to_event", ("X", "C")), CODES)
    assert torch.equal(model.head.task.weight[0], pretrained.head.tasks.weight[2])
    assert torch.equal(model.head.bias, pretrained.head.bias[:, 2])
    assert torch.equal(model.head.bins.weight, pretrained.head.bins.weight)
    assert recorded_task(model.config) == TaskSpec("b", "time_to_event", ("X", "C"))
    assert model.config.finetune_task["pretrained_task"] == 2
    state = pretrained.motor.state_dict()
    assert all(torch.equal(value, state[name]) for name, value in model.motor.state_dict().items())


def test_time_to_event_head_without_a_task_starts_at_the_mean_row_and_event_rate() -> None:
    pretrained = _pretrained()
    model = MotorForTimeToEvent.from_motor(
        pretrained, TaskSpec("z", "time_to_event", ("Z",), base_rate=0.002), CODES)
    torch.testing.assert_close(model.head.task.weight[0], pretrained.head.tasks.weight.mean(0))
    torch.testing.assert_close(model.head.bias, torch.full((len(EDGES),), math.log(0.002)))
    assert model.config.finetune_task["pretrained_task"] is None


def _batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {"entries": torch.randint(0, 40, (12,), generator=generator),
            "weights": torch.ones(12), "bag_offsets": torch.arange(0, 12, 2),
            "time_features": torch.randn(6, 3, generator=generator),
            "age_days": torch.tensor([0.0, 400, 900, 0, 300, 800]),
            "segment_ids": torch.tensor([0, 0, 0, 1, 1, 1]),
            "point_indices": torch.tensor([2, 4])}


def test_forward_reads_the_representation_at_the_points_and_its_loss() -> None:
    pretrained = _pretrained()
    model = MotorForTimeToEvent.from_motor(pretrained, TaskSpec("c", "time_to_event", ("C",)),
                                           CODES).eval()
    batch = _batch()
    days, event = torch.tensor([30.0, 200.0]), torch.tensor([1.0, 0.0])
    output = model(**batch, event_days=days, event=event)
    inputs = {k: v for k, v in batch.items() if k != "point_indices"}
    hidden = pretrained.encode(**inputs)[batch["point_indices"]]
    torch.testing.assert_close(output.representations, hidden)
    log_hazards = pretrained.head(hidden)[:, :, 2]
    torch.testing.assert_close(output.scores, log_hazards)
    torch.testing.assert_close(output.loss, time_to_event_loss(log_hazards, days, event, EDGES))
    binary = MotorForBinary.from_motor(pretrained, TaskSpec("y", "binary", base_rate=0.25))
    logits = binary(**batch, outcome=torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(logits.scores, torch.full((2,), math.log(1 / 3)))


@pytest.mark.parametrize("kind", ["time_to_event", "binary"])
def test_task_models_save_and_reload_as_they_were(tmp_path: Path, kind: str) -> None:
    model = task_model_class_for(kind).from_motor(_pretrained(), TaskSpec("t", kind,
                                                                          base_rate=0.1), CODES)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01)
    model.save_pretrained(tmp_path)
    loaded = task_model_class(MotorConfig.from_pretrained(tmp_path)).from_pretrained(tmp_path)
    assert type(loaded) is type(model)
    assert recorded_task(loaded.config) == TaskSpec("t", kind, base_rate=0.1)
    expected = model.state_dict()
    assert all(torch.equal(value, expected[name]) for name, value in loaded.state_dict().items())
    with pytest.raises(ValueError, match="cannot load it as"):
        (MotorForBinary if kind == "time_to_event" else MotorForTimeToEvent).from_pretrained(
            tmp_path)


def task_model_class_for(kind: str) -> type[MotorForTimeToEvent] | type[MotorForBinary]:
    return MotorForTimeToEvent if kind == "time_to_event" else MotorForBinary


def test_a_pretraining_bundle_needs_a_task(tmp_path: Path) -> None:
    _pretrained().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="pass task="):
        MotorForTimeToEvent.from_pretrained(tmp_path)
    model = MotorForBinary.from_pretrained(tmp_path, task=TaskSpec("y", "binary"))
    assert recorded_task(model.config) == TaskSpec("y", "binary")
