"""The synthetic data the end-to-end tests share, and the helpers that build it.

conftest builds it once per session: `synthetic_meds` (SUBJECTS subjects, seed 0, with its
Athena vocabulary in meds/athena) and `tiny_bundle` (that data prepared with PREPARE_CONFIG and
the tiny preset pretrained two steps). A test that needs other data (test_evaluate: more
held-out subjects) builds it with the same helpers.
"""

from __future__ import annotations

from pathlib import Path

from ehrmotor.config import PrepareConfig, PretrainConfig
from ehrmotor.prepare import prepare
from ehrmotor.pretrain.run import pretrain
from ehrmotor.synthetic import generate

SUBJECTS = 300
SEED = 0
PREPARE_CONFIG = PrepareConfig(vocab_size=2000, candidate_tasks=300, max_window=1024)


def synthetic_meds(out: Path, subjects: int = SUBJECTS) -> Path:
    """`subjects` synthetic subjects (seed SEED) written to `out`."""
    return generate(out, subjects, seed=SEED, progress=False)


def prepare_work(meds: Path, work: Path) -> Path:
    """`work`, with `pretraining_files/` of `meds` prepared with PREPARE_CONFIG."""
    prepare(meds, work, athena_dir=meds / "athena", workers=2, progress=False,
            config=PREPARE_CONFIG)
    return work


def pretrain_tiny(work: Path, steps: int, keep_output: bool = False) -> Path:
    """The bundle of the tiny preset pretrained `steps` steps on `work` (weights only need to
    be fixed, not good); `keep_output` keeps its one checkpoint (step `steps`)."""
    return pretrain(work, PretrainConfig(
        preset="tiny", tokens_per_batch=2048, gradient_accumulation_steps=1, max_steps=steps,
        eval_steps=steps, save_steps=steps, warmup_steps=max(1, steps // 10), logging_steps=1),
        keep_output=keep_output)


def train_bundle(meds: Path, root: Path) -> Path:
    """The bundle of the tiny preset pretrained two steps on `meds` (work folder: root/work,
    whose pretraining_output/ keeps checkpoint-2, the bundle's weights)."""
    return pretrain_tiny(prepare_work(meds, root / "work"), 2, keep_output=True)
