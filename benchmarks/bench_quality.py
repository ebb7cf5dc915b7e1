"""Does MOTOR beat counting codes? Synthesize, prepare, pretrain for a fixed budget, evaluate.

    python benchmarks/bench_quality.py                       # 20,000 subjects, ~20 min training
    python benchmarks/bench_quality.py --device cuda --preset small --steps 20000
    python benchmarks/bench_quality.py --work /tmp/q --keep  # keep (and reuse) the work folder
    python benchmarks/bench_quality.py --age-effect 3        # the strong-age generator setting

Steps (each reused when its output exists in --work): `ehrmotor synth`, `ehrmotor prepare`,
`ehrmotor pretrain` for `--steps` optimizer steps (the default model and steps take about 20 minutes
on 2 CPU cores; the time is printed), then the evaluation protocol (`ehrmotor.evaluate`: k-shot
training sets of held-out subjects, MOTOR heads against count and age (+sex) baselines) on every
planted outcome, with landmark time-to-event labels. Prints the pretraining val loss against the
base-rate loss, the time of each stage and the evaluation table (results.md). The goal (issue 10,
not a test): MOTOR ahead of the best baseline (counts or demographics) by >= 0.03 C-index at k <=
128 on most outcomes.

Two generator settings: the default (`--age-effect 1`), and a strong age effect (`--age-effect 3`:
every outcome's log-hazard slope in age ×3, `ehrmotor.synthetic.hazards.monthly_hazards`), where
age dominates outcome risk and the age baseline is hard to beat: there every head should stay
within 0.01 C of the age baseline at k >= 64 (issue 21). A reused --work folder is synthesized
(and prepared, pretrained) again when its age effect differs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ehrmotor.config import PrepareConfig, PretrainConfig
from ehrmotor.evaluate import evaluate
from ehrmotor.evaluate.landmarks import LandmarkSettings
from ehrmotor.evaluate.run import ProtocolSettings
from ehrmotor.prepare import prepare
from ehrmotor.pretrain.run import pretrain
from ehrmotor.synthetic import generate
from ehrmotor.synthetic.outcomes import DEFAULT_OUTCOMES, outcome_codes, synthetic_oracle

T = TypeVar("T")

# The CPU default: a model between `tiny` and `small` (about 1.6M parameters with its head).
CPU_MODEL = {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "intermediate_size": 384,
             "final_layer_size": 64}


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subjects", type=int, default=20_000)
    parser.add_argument("--age-effect", type=float, default=1.0,
                        help="scale of every outcome's age slope (1: default; 3: age dominates)")
    parser.add_argument("--steps", type=int, default=2_500,
                        help="optimizer steps of pretraining (default: about 20 min on 2 cores)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--preset", default=None,
                        help="a model preset instead of the CPU default model (e.g. small on GPU)")
    parser.add_argument("--tokens-per-batch", type=int, default=4096)
    parser.add_argument("--max-window", type=int, default=4096)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--tasks", type=int, default=1024,
                        help="MOTOR tasks (the dense head loss dominates CPU steps beyond ~1k)")
    parser.add_argument("--k", default="16,32,64,128,256,512,all")
    parser.add_argument("--replicates", type=int, default=5)
    parser.add_argument("--landmarks", type=int, default=4)
    parser.add_argument("--max-count-features", type=int, default=500,
                        help="count features kept (the counts Cox fit grows fast with them)")
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: temporary)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--workers", type=int, default=2)
    return parser.parse_args()


def _pretrain_config(args: argparse.Namespace) -> PretrainConfig:
    model = {"preset": args.preset} if args.preset else {"preset": "tiny", **CPU_MODEL}
    return PretrainConfig(**model, tokens_per_batch=args.tokens_per_batch,
                          gradient_accumulation_steps=1, learning_rate=1e-3, warmup_steps=200,
                          max_steps=args.steps, eval_steps=500, save_steps=500,
                          logging_steps=100, early_stopping_patience=5, num_train_epochs=100)


def _timed(name: str, times: dict[str, float], run: Callable[..., T], *args: Any,
           **kwargs: Any) -> T:
    start = time.perf_counter()
    result = run(*args, **kwargs)
    times[name] = time.perf_counter() - start
    print(f"{name}: {times[name]:.0f} s", flush=True)
    return result


def _synthesized_age_effect(meds: Path) -> float | None:
    """The age effect `meds` was synthesized with (1 before the option), None when absent."""
    params = meds / "metadata" / "synthetic.json"
    return float(json.loads(params.read_text()).get("age_effect", 1.0)) if params.is_file() \
        else None


def main() -> None:
    args = _arguments()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.device == "cpu":
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_quality-"))
    meds, prepared, evaluation = work / "meds", work / "work", work / "evaluation"
    times: dict[str, float] = {}
    try:
        if _synthesized_age_effect(meds) != args.age_effect:
            shutil.rmtree(prepared, ignore_errors=True)  # prepared from other data
            _timed("synth", times, generate, meds, args.subjects, seed=0, workers=args.workers,
                   force=True, progress=False, age_effect=args.age_effect)
        _timed("prepare", times, prepare, meds, prepared, athena_dir=meds / "athena",
               config=PrepareConfig(max_window=args.max_window, vocab_size=args.vocab_size,
                                     candidate_tasks=args.tasks,
                                     exclude_splits=("held_out", "tuning")), workers=args.workers,
               progress=False)
        bundle = _timed("pretrain", times, pretrain, prepared, _pretrain_config(args))
        k_values = tuple(None if k == "all" else int(k) for k in args.k.split(","))
        settings = ProtocolSettings(k_values=k_values, replicates=args.replicates,
                                    max_count_features=args.max_count_features)
        _timed("evaluate", times, evaluate, meds, bundle, evaluation,
               outcomes=outcome_codes(DEFAULT_OUTCOMES), oracle=synthetic_oracle(meds),
               settings=settings,
               landmarks=LandmarkSettings(landmarks=args.landmarks, landmark_codes=("Visit/",)))
        summary = json.loads((bundle / "training_summary.json").read_text())
        print(f"\nsubjects {args.subjects:,} (age effect {args.age_effect:g}); model "
              f"{summary['parameters']:,} parameters, {summary['global_step']:,} steps of "
              f"{args.tokens_per_batch:,} tokens")
        print(f"pretraining val loss {summary.get('val_loss', float('nan')):.4f} "
              f"vs base-rate loss {summary.get('base_rate_val_loss', float('nan')):.4f}")
        print("seconds: " + ", ".join(f"{name} {seconds:.0f}" for name, seconds in times.items()))
        print()
        print((evaluation / "results.md").read_text())
    finally:
        if args.work is None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work folder: {work}")


if __name__ == "__main__":
    main()
