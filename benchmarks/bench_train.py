"""Training throughput, collate cost and peak memory of the MOTOR model on synthetic windows.

    python benchmarks/bench_train.py                    # CPU: 4 shapes × 2,048/16,384 × fp32/bf16
    python benchmarks/bench_train.py --shapes small --tokens 16384 --precision fp32 \\
        --checkpointing off on                          # activation checkpointing's memory
    python benchmarks/bench_train.py --device cuda --shapes base --tokens 16384 --precision bf16
    python benchmarks/bench_train.py --vs-femr          # femr 0.2.4 side by side (train_vs_femr)

Each configuration runs in a fresh subprocess so its peak memory is its own (CPU: peak RSS of
the process; CUDA: torch.cuda.max_memory_allocated). The rows mimic prepared windows (layout of
`ehrmotor.sequences.shards`): subjects of heavy-tailed length packed to the token budget, 1-2
stored items per event (expanded at collate through a bag table of ancestor chains of 1-5
entries), max(5, positions / 10) points per window, and per window the task occurrences that
label its points (about 150 distinct tasks of 8,192, Zipf-distributed), so
`collate_windows` derives a realistic number of labels; vocabulary 16,384, 8 bins, final layer
512. Shapes: the presets `tiny` (2 layers × 64), `small` (6 × 768), `base` (12 × 768), and femr's
`femr-6x256` (6 layers × 256, FFN 512; femr's 2 × 64 is `tiny`). `collate %` is the time of
`collate_windows` (one batch, main process) over the time of one training step plus collate;
`1st s` the first step (with `--compile`: the compilation).
On CUDA the script also reports model FLOPs utilisation (`flops_per_token`: 6 per encoder
parameter, 6 per head parameter at the points only, plus attention) over the GPU's dense bf16
peak (`--peak-tflops`, default 989 for an H100 SXM).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ehrmotor.model import MotorConfig, MotorModel
from ehrmotor.precision import auto_uses_bf16
from ehrmotor.sequences.batching import US_PER_DAY, collate_windows
from ehrmotor.vocabulary.bags import BagTable

VOCAB, TASKS, BINS = 16_384, 8_192, 8
EDGES = [0, 30, 90, 180, 365, 730, 1460, 2920]
MAX_WINDOW = 496
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {"preset": "tiny"},
    "small": {"preset": "small"},
    "base": {"preset": "base"},
    "femr-6x256": {"preset": "tiny", "num_layers": 6, "hidden_size": 256, "num_heads": 4,
                   "intermediate_size": 512},
}


def model_config(shape: str) -> MotorConfig:
    """The benchmark's model of `shape` (see SHAPES)."""
    settings = {"final_layer_size": 512, **SHAPES[shape]}
    return MotorConfig.preset(settings.pop("preset"), vocab_size=VOCAB, num_tasks=TASKS,
                              num_bins=BINS, bin_edges_days=EDGES,
                              initial_log_rates=[-7.0] * TASKS, **settings)


def random_row(rng: np.random.Generator, length: int) -> dict[str, torch.Tensor]:
    """One prepared window of `length` positions, in torch format: position 0 of 1-7 events,
    then one event per position, each with 1 item (80 %) or 2."""
    first_events = int(rng.integers(1, 8))
    event_items = 1 + (rng.random(first_events + length - 1) < 0.2)
    gaps = rng.exponential(20.0, length)
    gaps[0] = 0.0
    age_days = 20 * 365 + np.cumsum(gaps)
    age_days[0] = 0.0
    times = (age_days * US_PER_DAY).astype(np.int64)
    points = np.sort(rng.choice(np.arange(1, length), min(length - 1, max(5, length // 10)),
                                replace=False))
    last = times[-1] + int(rng.exponential(2000.0) * US_PER_DAY)
    tasks = np.unique(np.minimum(rng.zipf(1.3, 150), TASKS) - 1)
    per_task = rng.geometric(0.6, len(tasks))
    task_ids = np.repeat(tasks, per_task)
    task_times = rng.integers(times[points[0]] + 1, last, len(task_ids))
    order = np.lexsort((task_times, task_ids))
    return {
        "first_events": torch.tensor(first_events, dtype=torch.int32),
        "previous_time": torch.tensor(times[0]),
        "event_items": torch.tensor(event_items, dtype=torch.int32),
        "items": torch.tensor(rng.integers(0, VOCAB, int(event_items.sum())), dtype=torch.int32),
        "times": torch.tensor(times),
        "points": torch.tensor(points, dtype=torch.int32),
        "censor_days": torch.tensor((last - times[points]) / US_PER_DAY, dtype=torch.float32),
        "task_ids": torch.tensor(task_ids[order], dtype=torch.int32),
        "task_times": torch.tensor(task_times[order]),
    }


def bag_table() -> BagTable:
    """A synthetic bag table: entry e's ancestors are e // 8, e // 64, ... (rows of 1-5)."""
    rows = []
    for entry in range(VOCAB):  # once per vocabulary entry, at import
        chain = {entry}
        while entry:
            entry //= 8
            chain.add(entry)
        rows.append(sorted(chain))
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
    stats = {"age_mean": 15_000.0, "age_std": 8_000.0, "log_age_mean": 9.0, "log_age_std": 1.0,
             "log_delta_mean": 2.0, "log_delta_std": 1.5}
    return BagTable(offsets.astype(np.int64), np.array([m for r in rows for m in r]),
                    np.zeros(VOCAB, dtype=bool), stats)


BAGS = bag_table()


def random_rows(tokens: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Windows of heavy-tailed length (at most MAX_WINDOW) filling `tokens` positions."""
    rng = np.random.default_rng(seed)
    rows, used = [], 0
    while used < tokens:
        length = int(min(tokens - used, MAX_WINDOW, max(2, rng.lognormal(5.0, 1.0))))
        if length < 2:
            break
        rows.append(random_row(rng, length))
        used += length
    return rows


def random_batch(tokens: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A collated training batch of about `tokens` positions (`collate_windows`, labels on)."""
    return collate_windows(random_rows(tokens, seed), labels=True, bags=BAGS)


def flops_per_token(model: MotorModel, config: MotorConfig, points_per_token: float) -> float:
    """Training FLOPs per position: 6 per encoder parameter (embedding bag excluded) and per head
    parameter at the prediction points only, plus 12 · layers · hidden · attention width."""
    embedding = sum(p.numel() for p in model.motor.embedding.parameters())
    head = sum(p.numel() for p in model.head.parameters())
    encoder = model.count_parameters() - embedding - head
    attention = 12 * config.num_layers * config.hidden_size * config.attention_width
    return 6.0 * (encoder + head * points_per_token) + attention


def seconds_per_call(call: Callable[[], object], repeats: int, device: str) -> float:
    started = time.perf_counter()
    for _ in range(repeats):
        call()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats


def run_one(shape: str, tokens: int, device: str, steps: int, precision: str,
            checkpointing: bool, compiled: bool) -> dict[str, float]:
    torch.manual_seed(0)
    config = model_config(shape)
    model = MotorModel(config).to(device).train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    forward = torch.compile(model, dynamic=True) if compiled else model
    rows = random_rows(tokens)
    batch = {k: v.to(device) for k, v in collate_windows(rows, labels=True, bags=BAGS).items()}
    # fused, as ehrmotor pretrain's Trainer (transformers >= 5: adamw_torch_fused) steps it
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    bf16 = precision == "bf16" or (precision == "auto" and auto_uses_bf16(
        device, config.hidden_size, training=True))

    def step() -> None:
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
            loss = forward(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    first = seconds_per_call(step, 1, device)  # warm-up (and compilation)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    seconds = seconds_per_call(step, steps, device)
    collate = seconds_per_call(lambda: collate_windows(rows, labels=True, bags=BAGS), 5, "cpu")
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    real_tokens = len(batch["segment_ids"])
    return {"tokens_per_s": real_tokens / seconds, "seconds_per_step": seconds,
            "first_step_s": first,
            "collate_fraction": collate / (collate + seconds), "peak_gib": peak,
            "labels_per_point": len(batch["label_days"]) / len(batch["censor_days"]),
            "parameters": model.count_parameters(),
            "flops_per_token": flops_per_token(model, config, len(batch["censor_days"])
                                               / real_tokens)}


def vs_femr(args: argparse.Namespace) -> None:
    from train_vs_femr import report

    argv = sys.argv[1:]
    shapes = args.shapes if "--shapes" in argv else ["tiny", "femr-6x256"]
    tokens = args.tokens if "--tokens" in argv else [2048]
    precisions = args.precision if "--precision" in argv else ["fp32", "bf16", "auto"]
    report({shape: model_config(shape) for shape in shapes}, tokens, precisions, args.rounds,
           args.steps, args.femr_venv, args.femr_attention, random_batch, args.compile)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["tiny", "femr-6x256", "small"],
                        choices=sorted(SHAPES))
    parser.add_argument("--tokens", nargs="+", type=int, default=[2048, 16384])
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"],
                        choices=["fp32", "bf16", "auto"])
    parser.add_argument("--checkpointing", nargs="+", default=["off"], choices=["off", "on"])
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--vs-femr", action="store_true",
                        help="femr 0.2.4 side by side (defaults: femr's shapes, 2,048 tokens, "
                             "fp32 bf16 auto); see benchmarks/train_vs_femr.py")
    parser.add_argument("--femr-venv", type=Path, default=Path(os.environ.get(
        "FEMR_VENV", ".femr-venv")), help="femr's environment (benchmarks/femr/make_venv.sh)")
    parser.add_argument("--femr-attention", choices=["sdpa", "reference"], default="sdpa")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.vs_femr:
        vs_femr(args)
        return
    if args.one:
        shape, tokens, precision, checkpointing = args.one
        print(json.dumps(run_one(shape, int(tokens), args.device, args.steps, precision,
                                 checkpointing == "on", args.compile)))
        return
    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads"
          f"{', compiled' if args.compile else ''}; {TASKS:,} tasks, {BINS} bins")
    print(f"{'shape':<11}{'tokens':>7}{'prec':>6}{'ckpt':>5}{'params':>13}{'tokens/s':>10}"
          f"{'s/step':>8}{'1st s':>7}{'collate':>8}{'labels/pt':>10}{'peak GiB':>9}"
          + ("{:>7}".format("MFU") if args.device == "cuda" else ""))
    for shape in args.shapes:
        for tokens in args.tokens:
            for precision in args.precision:
                for checkpointing in args.checkpointing:
                    command = [sys.executable, __file__, "--one", shape, str(tokens), precision,
                               checkpointing, "--device", args.device, "--steps",
                               str(args.steps)] + (["--compile"] if args.compile else [])
                    out = subprocess.run(command, capture_output=True, text=True, check=True)
                    r = json.loads(out.stdout.strip().splitlines()[-1])
                    line = (f"{shape:<11}{tokens:>7}{precision:>6}{checkpointing:>5}"
                            f"{r['parameters']:>13,}{r['tokens_per_s']:>10,.0f}"
                            f"{r['seconds_per_step']:>8.2f}{r['first_step_s']:>7.1f}"
                            f"{r['collate_fraction']:>8.1%}"
                            f"{r['labels_per_point']:>10.0f}{r['peak_gib']:>9.2f}")
                    if args.device == "cuda":
                        mfu = r["tokens_per_s"] * r["flops_per_token"] / (args.peak_tflops * 1e12)
                        line += f"{mfu:>7.1%}"
                    print(line, flush=True)


if __name__ == "__main__":
    main()
