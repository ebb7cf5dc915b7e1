"""MOTOR encoder, head and loss: shapes, gradients, labels, saving and loading (the encoder alone,
bundles written before the split), presets, no cross-subject leakage."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from model_reference import (
    dense_labels,
    dense_motor_loss,
    per_task_labels,
    piecewise_exponential_nll,
)
from safetensors.torch import load_file, save_file

from ehrmotor.model import (
    LABELS,
    PRESETS,
    MotorConfig,
    MotorEncoder,
    MotorModel,
    current_weight_name,
    motor_loss,
)

logger = logging.getLogger(__name__)

BIN_EDGES = [0.0, 7.0, 60.0, 365.0]
NUM_TASKS = 6
VOCAB = 50


def tiny_config(**overrides: object) -> MotorConfig:
    rates = [math.log(rate) for rate in (1e-2, 3e-3, 1e-3, 5e-4, 1e-4, 2e-2)]
    settings = {"vocab_size": VOCAB, "num_tasks": NUM_TASKS, "bin_edges_days": BIN_EDGES,
                "initial_log_rates": rates, **overrides}
    return MotorConfig.preset("tiny", **settings)


def tiny_model(seed: int = 0, **overrides: object) -> MotorModel:
    torch.manual_seed(seed)
    return MotorModel(tiny_config(**overrides)).eval()


def sparse_labels(points: int, seed: int) -> dict[str, torch.Tensor]:
    """Observed (point, task) events with their days, and days to censoring per point."""
    generator = torch.Generator().manual_seed(seed)
    censor_days = 1 + torch.rand(points, generator=generator) * 1000
    pairs = torch.rand(points, NUM_TASKS, generator=generator) < 0.4
    label_point, label_task = pairs.nonzero(as_tuple=True)
    label_days = torch.rand(label_point.shape, generator=generator) * censor_days[label_point]
    return {"label_point": label_point, "label_task": label_task, "label_days": label_days,
            "censor_days": censor_days}


def random_batch(lengths: list[int], seed: int, labels: bool = True) -> dict[str, torch.Tensor]:
    """A packed batch of subjects with the given numbers of positions; with labels, the training
    collate's sparse labels (`LABELS`)."""
    generator = torch.Generator().manual_seed(seed)
    positions = sum(lengths)
    bag_sizes = torch.randint(1, 5, (positions,), generator=generator)
    bag_offsets = torch.cumsum(bag_sizes, 0) - bag_sizes
    entries = torch.randint(0, VOCAB, (int(bag_sizes.sum()),), generator=generator)
    weights = torch.rand(entries.shape, generator=generator)
    segment_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    gaps = torch.rand(positions, generator=generator) * 30
    starts = torch.cumsum(torch.tensor([0, *lengths[:-1]]), 0)
    age_days = torch.cat([torch.cumsum(gaps[s:s + n], 0) + 365 * (i + 20)
                          for i, (s, n) in enumerate(zip(starts.tolist(), lengths, strict=True))])
    time_features = torch.stack([age_days / 365 / 100, torch.log1p(age_days), torch.log1p(gaps)],
                                dim=1)
    point_indices = torch.cat([s + torch.arange(0, n, 3) for s, n in
                               zip(starts.tolist(), lengths, strict=True)])
    inputs = {"entries": entries, "weights": weights, "bag_offsets": bag_offsets,
              "time_features": time_features, "age_days": age_days, "segment_ids": segment_ids,
              "point_indices": point_indices}
    if not labels:
        return inputs
    return {**inputs, **sparse_labels(point_indices.shape[0], seed)}


def encoder_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The packed positions alone: what `MotorEncoder` and `MotorModel.encode` take."""
    return {k: v for k, v in batch.items() if k != "point_indices" and k not in LABELS}


def perturbed(model: MotorModel) -> MotorModel:
    """`model` with every parameter moved, so that loaded values differ from a fresh init."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return model


def test_tiny_forward_backward_gives_finite_loss_and_gradients_everywhere() -> None:
    model = tiny_model().train()
    batch = random_batch([30, 1, 70, 12], seed=1)
    output = model(**batch)
    points = batch["point_indices"].shape[0]
    assert output.log_hazards.shape == (points, len(BIN_EDGES), NUM_TASKS)
    assert output.log_hazards.dtype == torch.float32
    assert output.representations.shape == (points, model.config.hidden_size)
    assert torch.isfinite(output.loss)
    output.loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, f"no gradient for {name}"
        assert torch.isfinite(parameter.grad).all(), f"non-finite gradient for {name}"
        assert parameter.grad.abs().sum() > 0, f"zero gradient for {name}"


def test_loss_equals_hand_written_piecewise_exponential_nll() -> None:
    generator = torch.Generator().manual_seed(2)
    log_hazards = torch.randn(3, 4, 2, generator=generator) - 3
    time_at_risk = torch.rand(3, 4, 2, generator=generator) * 50
    event_in_bin = torch.zeros(3, 4, 2, dtype=torch.bool)
    event_in_bin[0, 1, 0] = event_in_bin[2, 3, 1] = True
    total = 0.0
    for point in range(3):
        for task in range(2):
            for bin_ in range(4):
                hazard = math.exp(float(log_hazards[point, bin_, task]))
                total += hazard * float(time_at_risk[point, bin_, task])
                if event_in_bin[point, bin_, task]:
                    total -= float(log_hazards[point, bin_, task])
    loss = piecewise_exponential_nll(log_hazards, time_at_risk, event_in_bin)
    assert loss.item() == pytest.approx(total / (3 * 2), rel=1e-5)


def test_model_loss_equals_nll_of_the_binned_labels() -> None:
    model = tiny_model()
    batch = random_batch([30, 45], seed=10)
    output = model(**batch)
    labels = sparse_labels(len(batch["point_indices"]), 10)
    time_at_risk, event_in_bin = dense_labels(**labels, bin_edges_days=BIN_EDGES,
                                              num_tasks=NUM_TASKS)
    expected = piecewise_exponential_nll(output.log_hazards, time_at_risk, event_in_bin)
    torch.testing.assert_close(output.loss, expected, atol=0, rtol=1e-5)
    event_days, is_event = per_task_labels(**labels, num_tasks=NUM_TASKS)
    torch.testing.assert_close(
        dense_motor_loss(output.log_hazards, event_days, is_event, BIN_EDGES), expected,
        atol=0, rtol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sparse_loss_and_its_gradient_equal_the_dense_loss(seed: int) -> None:
    """`motor_loss` never builds (P, bins, tasks) labels; it equals the loss written out over
    them, in value and in gradient, with events on bin edges, at 0 and at censoring."""
    generator = torch.Generator().manual_seed(seed)
    log_hazards = (torch.randn(40, len(BIN_EDGES), NUM_TASKS, generator=generator) - 4)
    labels = sparse_labels(40, seed)
    labels["label_days"][:4] = torch.tensor([0.0, 7.0, 60.0, 365.0])
    labels["label_days"] = torch.minimum(labels["label_days"],
                                         labels["censor_days"][labels["label_point"]])
    sparse = log_hazards.clone().requires_grad_()
    loss = motor_loss(sparse, **labels, bin_edges_days=BIN_EDGES)
    loss.backward()
    dense = log_hazards.clone().requires_grad_()
    event_days, is_event = per_task_labels(**labels, num_tasks=NUM_TASKS)
    expected = dense_motor_loss(dense, event_days, is_event, BIN_EDGES)
    expected.backward()
    torch.testing.assert_close(loss, expected, atol=0, rtol=1e-5)
    torch.testing.assert_close(sparse.grad, dense.grad, atol=1e-7, rtol=1e-5)


def test_forward_takes_labels_only_as_the_four_sparse_tensors() -> None:
    model = tiny_model()
    batch = random_batch([30, 45], seed=10)
    assert model(**random_batch([30, 45], seed=10, labels=False)).loss is None
    with pytest.raises(ValueError, match="labels need all of censor_days"):
        model(**{k: v for k, v in batch.items() if k != "label_days"})
    with pytest.raises(TypeError, match="event_days"):
        model(**random_batch([30, 45], seed=10, labels=False),
              event_days=batch["censor_days"][:, None], is_event=batch["censor_days"][:, None] > 0)


def brute_force_dense_labels(label_point: list[int], label_task: list[int],
                             label_days: list[float], censor_days: list[float],
                             edges: list[float], num_tasks: int) -> tuple[list, list]:
    events = {(p, t): d for p, t, d in zip(label_point, label_task, label_days, strict=True)}
    time_at_risk = [[[0.0] * num_tasks for _ in edges] for _ in censor_days]
    event_in_bin = [[[False] * num_tasks for _ in edges] for _ in censor_days]
    for point, censor in enumerate(censor_days):
        for task in range(num_tasks):
            days = events.get((point, task), censor)
            for bin_, start in enumerate(edges):
                end = edges[bin_ + 1] if bin_ + 1 < len(edges) else math.inf
                time_at_risk[point][bin_][task] = min(max(days - start, 0.0), end - start)
                inside = start < days <= end or (bin_ == 0 and days == 0)
                event_in_bin[point][bin_][task] = (point, task) in events and inside
    return time_at_risk, event_in_bin


def test_binned_labels_equal_brute_force_loop() -> None:
    generator = torch.Generator().manual_seed(3)
    censor_days = (torch.rand(9, generator=generator) * 800).tolist()
    pairs = (torch.rand(9, NUM_TASKS, generator=generator) < 0.5).nonzero().tolist()
    label_point = [p for p, _ in pairs]
    label_task = [t for _, t in pairs]
    label_days = [censor_days[p] * float(torch.rand(1, generator=generator)) for p in label_point]
    label_days[:4] = [0.0, 7.0, 60.0, 365.0]  # on the edges
    label_days = [min(d, censor_days[p]) for d, p in zip(label_days, label_point, strict=True)]

    time_at_risk, event_in_bin = dense_labels(
        torch.tensor(label_point), torch.tensor(label_task), torch.tensor(label_days),
        torch.tensor(censor_days), BIN_EDGES, NUM_TASKS)
    expected_risk, expected_events = brute_force_dense_labels(
        label_point, label_task, [float(torch.tensor(d)) for d in label_days],
        [float(torch.tensor(c)) for c in censor_days], BIN_EDGES, NUM_TASKS)

    torch.testing.assert_close(time_at_risk, torch.tensor(expected_risk), atol=1e-3, rtol=1e-6)
    assert torch.equal(event_in_bin, torch.tensor(expected_events))
    assert event_in_bin.sum() == len(pairs)  # one event bin per observed pair


def test_save_and_load_round_trip_with_strict_json_config(tmp_path: Path) -> None:
    model = perturbed(tiny_model(seed=4))  # loaded values, not fresh initialisation, come back
    batch = random_batch([20, 33], seed=5)
    expected = model(**batch)
    model.save_pretrained(tmp_path)

    def reject(constant: str) -> None:
        raise ValueError(f"config.json holds {constant}")

    document = json.loads((tmp_path / "config.json").read_text(), parse_constant=reject)
    assert document["model_type"] == "ehrmotor"
    assert document["bin_edges_days"] == BIN_EDGES
    assert (tmp_path / "model.safetensors").exists()

    loaded = MotorModel.from_pretrained(tmp_path).eval()
    actual = loaded(**batch)
    torch.testing.assert_close(actual.log_hazards, expected.log_hazards, atol=0, rtol=0)
    torch.testing.assert_close(actual.loss, expected.loss, atol=0, rtol=0)


def test_config_rejects_values_that_are_not_strict_json() -> None:
    with pytest.raises(ValueError, match="finite"):
        tiny_config(bin_edges_days=[0.0, 7.0, math.inf])
    with pytest.raises(ValueError, match="finite"):
        tiny_config(initial_log_rates=[math.nan] * NUM_TASKS)
    with pytest.raises(ValueError, match="tasks"):
        tiny_config(initial_log_rates=[0.0] * (NUM_TASKS + 1))


def test_head_bias_starts_at_initial_log_rates() -> None:
    model = tiny_model()
    rates = torch.tensor(model.config.initial_log_rates)
    assert torch.equal(model.head.bias, rates.expand(len(BIN_EDGES), NUM_TASKS))
    no_rates = MotorModel(tiny_config(initial_log_rates=[]))
    assert torch.equal(no_rates.head.bias, torch.zeros(len(BIN_EDGES), NUM_TASKS))


def test_factorized_head_equals_the_direct_one_in_values_and_gradients() -> None:
    head = tiny_model(final_layer_size=256).head  # hidden 64
    with torch.no_grad():
        head.norm.weight.uniform_(0.5, 1.5)
    assert head.factorized_pays(100) and not head.factorized_pays(80)
    representations = torch.randn(40, 64, requires_grad=True)
    results = []
    for factorized in (False, True):
        head.zero_grad()
        representations.grad = None
        out = head(representations, factorized=factorized)
        (out.exp() * torch.linspace(0, 1, out.numel()).view_as(out)).sum().backward()
        results.append([out.detach(), representations.grad]
                       + [parameter.grad for parameter in head.parameters()])
    for direct, factorized_result in zip(*results, strict=True):
        torch.testing.assert_close(factorized_result, direct)


def test_bf16_autocast_forward_on_cpu_gives_finite_fp32_loss() -> None:
    model = tiny_model()
    batch = random_batch([40, 25], seed=6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(**batch)
    assert output.loss.dtype == torch.float32
    assert torch.isfinite(output.loss)
    reference = model(**batch).loss
    assert output.loss.item() == pytest.approx(reference.item(), rel=0.05)


def test_one_subject_does_not_change_another_in_the_same_pack() -> None:
    model = tiny_model()
    batch = random_batch([25, 40, 18], seed=7)
    changed = random_batch([25, 40, 18], seed=8)
    edited = dict(batch)
    middle = batch["segment_ids"] == 1
    bag_sizes = torch.diff(batch["bag_offsets"], append=torch.tensor([len(batch["entries"])]))
    in_middle = torch.repeat_interleave(middle, bag_sizes)
    edited["entries"] = torch.where(in_middle, (batch["entries"] + 7) % VOCAB, batch["entries"])
    edited["weights"] = torch.where(in_middle, batch["weights"] * 3, batch["weights"])
    edited["time_features"] = torch.where(middle[:, None], changed["time_features"],
                                          batch["time_features"])
    edited["age_days"] = torch.where(middle, changed["age_days"] + 1000, batch["age_days"])

    before = model(**batch).representations
    after = model(**edited).representations
    point_subject = batch["segment_ids"][batch["point_indices"]]
    others = point_subject != 1
    torch.testing.assert_close(after[others], before[others], atol=1e-6, rtol=0)
    assert not torch.allclose(after[~others], before[~others])


def test_rotary_encoding_sees_only_age_differences() -> None:
    model = tiny_model()
    batch = random_batch([30], seed=9)
    shifted = {**batch, "age_days": batch["age_days"] + 123.0}
    torch.testing.assert_close(model(**shifted).representations, model(**batch).representations,
                               atol=1e-3, rtol=1e-3)


def test_presets_are_the_size_defaults_and_none_keeps_the_presets_value() -> None:
    assert {name: getattr(MotorConfig(), name) for name in PRESETS["base"]} == PRESETS["base"]
    assert MotorConfig.preset("tiny", final_layer_size=None).final_layer_size == 32
    assert MotorConfig.preset("tiny", final_layer_size=16).final_layer_size == 16
    assert MotorConfig.preset("small", num_layers=None).num_layers == 6
    with pytest.raises(ValueError, match="unknown preset"):
        MotorConfig.preset("huge")


@pytest.mark.parametrize(("preset", "low", "high"), [
    ("tiny", 1e6, 3e6), ("small", 60e6, 90e6), ("base", 120e6, 150e6)])
def test_preset_parameter_counts(preset: str, low: float, high: float) -> None:
    config = MotorConfig.preset(preset, vocab_size=16384, num_tasks=8192, num_bins=8)
    with torch.device("meta"):
        count = MotorModel(config).count_parameters()
    logger.info("%s preset (vocab 16384, 8192 tasks, 8 bins): %d parameters", preset, count)
    assert low < count < high


def test_encoder_loads_alone_from_a_pretraining_bundle(tmp_path: Path) -> None:
    model = perturbed(tiny_model(seed=11))
    model.save_pretrained(tmp_path)
    head = {name for name in model.state_dict() if name.startswith("head.")}
    assert set(model.state_dict()) == head | {
        f"motor.{name}" for name in MotorEncoder(model.config).state_dict()}

    encoder, info = MotorEncoder.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"] and not info["error_msgs"]
    assert head and not info["unexpected_keys"]  # the head is dropped quietly, nothing else
    batch = random_batch([20, 33], seed=12)
    with torch.no_grad():
        hidden = encoder.eval()(**encoder_inputs(batch))
        torch.testing.assert_close(hidden, model.encode(**encoder_inputs(batch)), atol=0, rtol=0)
        torch.testing.assert_close(hidden[batch["point_indices"]],
                                   model(**batch).representations, atol=0, rtol=0)


def test_bundle_written_before_the_split_loads_the_same_model(tmp_path: Path) -> None:
    model = perturbed(tiny_model(seed=13))
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    # The layout before the split: encoder tensors at the top level, no `motor.` prefix.
    old = {name.removeprefix("motor."): tensor for name, tensor in load_file(weights).items()}
    save_file(old, weights, metadata={"format": "pt"})
    assert {current_weight_name(name) for name in old} == set(model.state_dict())

    loaded, info = MotorModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys",
                                         "error_msgs")), info
    batch = random_batch([20, 33], seed=14)
    torch.testing.assert_close(loaded.eval()(**batch).log_hazards, model(**batch).log_hazards,
                               atol=0, rtol=0)
    loaded.save_pretrained(tmp_path / "again")  # saved again in today's names
    assert set(load_file(tmp_path / "again" / "model.safetensors")) == set(model.state_dict())
