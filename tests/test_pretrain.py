"""`ehrmotor pretrain` end to end on a few hundred synthetic subjects: learning and the bundle.

One in-process training long enough to learn (checked against two baselines, then reused for the
bundle tests) and the same under bf16 autocast. Resuming and distributed runs are in
test_pretrain_resume.py, refused settings in test_pretrain_settings.py; shared inputs in
pretrain_fixtures.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from model_reference import dense_labels, piecewise_exponential_nll
from pretrain_fixtures import (  # noqa: F401 (fixtures)
    TOKENS,
    bundle_mtimes,
    new_work,
    summary_of,
    val_batches,
)

from ehrmotor.cli import main
from ehrmotor.config import PretrainConfig
from ehrmotor.model import MotorModel
from ehrmotor.motor_task.tasks import MotorTask
from ehrmotor.pretrain import run as pretrain_run
from ehrmotor.pretrain.run import pretrain
from ehrmotor.sequences.batching import collate_windows
from ehrmotor.sequences.shards import load_prepared
from ehrmotor.vocabulary.bags import BagTable

# Every test here uses the 100-step training runs (minutes on 2 cores).
pytestmark = pytest.mark.slow

LEARN_STEPS = 100
# Observed on the session's 300-subject data (seed 0): base-rate val loss 1.812; constant
# hazards per (bin, task) fitted on train reach 1.806; after 100 steps the val loss is
# 1.787-1.791 over 12 training seeds (margins 0.021-0.026 and 0.015-0.020). A 20-step model
# reaches 1.801-1.804 over 7 seeds (0.009-0.011 below the base rate, only 0.002-0.005 below
# constant hazards): the second check is the one that needs the histories. The margins are about
# half to two thirds of the smallest seen.
BASE_RATE_MARGIN = 0.012
CONSTANT_HAZARD_MARGIN = 0.009
BUNDLE = ("config.json", "model.safetensors", "dictionary.msgpack", "motor_task.json",
          "training_summary.json", "ontology/parents.parquet", "ontology/ancestors.parquet")


@dataclass
class Trained:
    work: Path
    model: MotorModel  # the model object Trainer trained, best checkpoint reloaded
    matmul_dtypes: set[torch.dtype]  # of a feed-forward matmul's output in training


def train_tiny(work: Path, precision: str) -> Trained:
    """LEARN_STEPS steps of the tiny model on `work` in `precision` (PretrainConfig's)."""
    built: list[MotorModel] = []
    matmul_dtypes: set[torch.dtype] = set()
    hooks: list[torch.utils.hooks.RemovableHandle] = []

    def recording(config: object) -> MotorModel:
        built.append(MotorModel(config))
        hooks.append(built[-1].motor.layers[0].feed_forward.down.register_forward_hook(
            lambda module, inputs, output: matmul_dtypes.add(output.dtype)))
        return built[-1]

    config = PretrainConfig(preset="tiny", learning_rate=1e-3, warmup_steps=20,
                            tokens_per_batch=TOKENS, gradient_accumulation_steps=1,
                            max_steps=LEARN_STEPS, eval_steps=50, save_steps=50,
                            precision=precision)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pretrain_run, "MotorModel", recording)
        assert pretrain(work, config) == work / "model"
    assert len(built) == 1
    hooks[0].remove()
    return Trained(work, built[0].eval(), matmul_dtypes)


@pytest.fixture(scope="module")
def trained(prepared_files: Path, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    return train_tiny(new_work(prepared_files, tmp_path_factory.mktemp("trained")), "fp32")


@pytest.fixture(scope="module")
def trained_bf16(prepared_files: Path, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """`trained` under bf16 autocast, forced (so on CPUs without native bf16 too)."""
    return train_tiny(new_work(prepared_files, tmp_path_factory.mktemp("trained_bf16")), "bf16")


def binned(batch: dict[str, torch.Tensor], edges: list[float], num_tasks: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """time_at_risk, event_in_bin (P, bins, tasks) of a collated batch's labels."""
    return dense_labels(batch["label_point"], batch["label_task"], batch["label_days"],
                        batch["censor_days"], edges, num_tasks)


def constant_hazard_val_loss(work: Path) -> float:
    """Val loss of a history-free model: one hazard per (bin, task), fitted on train windows."""
    task = MotorTask.load(work / "pretraining_files" / "motor_task.json")
    edges, num_tasks = task.bin_edges_days, task.tasks.height
    train_rows = load_prepared(work / "pretraining_files" / "train_batches")
    bags = BagTable.load(work / "pretraining_files" / "tokenizer")
    at_risk = torch.zeros(len(edges), num_tasks)
    events = torch.zeros(len(edges), num_tasks)
    for start in range(0, len(train_rows), 64):
        rows = [train_rows[i] for i in range(start, min(start + 64, len(train_rows)))]
        batch = collate_windows(rows, labels=True, task_map=torch.from_numpy(task.task_map()),
                                bags=bags)
        time_at_risk, event_in_bin = binned(batch, edges, num_tasks)
        at_risk = at_risk + time_at_risk.sum(0)
        events = events + event_in_bin.sum(0)
    log_hazards = ((events + 0.5) / (at_risk + 1.0)).log()  # smoothed maximum likelihood
    losses = []
    for batch in val_batches(work):
        labels = binned(batch, edges, num_tasks)
        points = labels[0].shape[0]
        losses.append(float(piecewise_exponential_nll(log_hazards.expand(points, -1, -1),
                                                      *labels)))
    return sum(losses) / len(losses)


@pytest.mark.parametrize(("run", "matmul_dtype"), [("trained", torch.float32),
                                                   ("trained_bf16", torch.bfloat16)],
                         ids=["fp32", "bf16"])
def test_tiny_model_learns_beyond_the_base_rates(request: pytest.FixtureRequest, run: str,
                                                 matmul_dtype: torch.dtype) -> None:
    trained: Trained = request.getfixturevalue(run)
    assert trained.matmul_dtypes == {matmul_dtype}
    # Autocast casts on the fly: the weights, and so the optimizer's state, stay fp32.
    assert {parameter.dtype for parameter in trained.model.parameters()} == {torch.float32}
    summary = summary_of(trained.work)
    assert summary["global_step"] == LEARN_STEPS
    val_loss, base_rate = summary["val_loss"], summary["base_rate_val_loss"]
    assert val_loss < base_rate - BASE_RATE_MARGIN, summary
    # Beyond what per-bin rates alone can learn: the model uses the subjects' histories.
    constant_hazard = constant_hazard_val_loss(trained.work)
    assert constant_hazard < base_rate
    assert val_loss < constant_hazard - CONSTANT_HAZARD_MARGIN, (val_loss, constant_hazard)


def test_bundle_is_self_contained_strict_json_and_free_of_pickles(trained: Trained) -> None:
    bundle = trained.work / "model"
    for name in BUNDLE:
        assert (bundle / name).is_file(), name

    def refuse(constant: str) -> None:
        raise ValueError(f"config.json is not strict JSON: {constant}")

    config = json.loads((bundle / "config.json").read_text(), parse_constant=refuse)
    assert config["hidden_size"] == 64 and config["num_layers"] == 2  # the tiny preset
    assert config["num_tasks"] == MotorTask.load(bundle / "motor_task.json").tasks.height
    pickles = [p.name for p in bundle.rglob("*") if p.suffix in (".bin", ".pt", ".pkl", ".pth")]
    assert pickles == []


def test_bundle_loads_with_outputs_identical_to_the_trained_model(trained: Trained) -> None:
    loaded = MotorModel.from_pretrained(trained.work / "model").eval()
    batch = next(val_batches(trained.work))
    with torch.no_grad():
        expected, actual = trained.model(**batch), loaded(**batch)
    assert torch.equal(actual.log_hazards, expected.log_hazards)
    assert torch.equal(actual.representations, expected.representations)
    assert torch.equal(actual.loss, expected.loss)
    # The weights are trained ones: the per-(bin, task) bias has moved off the initial rates.
    initial = torch.tensor(loaded.config.initial_log_rates).expand_as(loaded.head.bias)
    assert not torch.allclose(loaded.head.bias, initial)


def test_pretraining_output_is_removed_without_keep_output(trained: Trained) -> None:
    assert not (trained.work / "pretraining_output").exists()


def test_pretrain_with_a_complete_bundle_is_a_no_op(trained: Trained) -> None:
    before = bundle_mtimes(trained.work)
    assert main(["pretrain", "--work", str(trained.work), "--preset", "tiny"]) == 0
    assert bundle_mtimes(trained.work) == before
    assert not (trained.work / "pretraining_output").exists()
