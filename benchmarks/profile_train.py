"""Where one CPU training step's time goes, part by part (each forward + backward timed alone).

    python benchmarks/profile_train.py                      # femr shapes, tiny, bench_quality model
    python benchmarks/profile_train.py --shapes tiny --tokens 2048 --precision fp32 bf16 \\
        --threads 1 2 --top 12                              # plus torch.profiler's top operators

Parts: collate (`collate_windows`, labels on); embedding bag (+ time features); attention core
(mask + `local_attention`, all layers); the rest of the encoder (linears, norms, rotary,
SwiGLU: encoder minus the two before); MOTOR head at the points; the sparse loss; AdamW.
`step` is one whole training step; `sum` the parts without collate (they overlap nothing, so
sum ≈ step). Milliseconds, median of --repeats; the same synthetic windows as bench_train.py.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality import CPU_MODEL  # noqa: E402
from bench_train import BAGS, SHAPES, model_config, random_rows  # noqa: E402
from train_vs_femr import cpu_description  # noqa: E402

from ehrmotor.model import MotorModel, local_attention, motor_loss  # noqa: E402
from ehrmotor.model.encoder import rotary_tables  # noqa: E402
from ehrmotor.sequences.batching import collate_windows  # noqa: E402

SHAPES.setdefault("quality", {"preset": "tiny", **CPU_MODEL})
PARTS = ("collate", "embedding", "attention", "encoder rest", "head", "loss", "optimizer")


def median_ms(call: Callable[[], object], repeats: int) -> float:
    call()
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - started)
    return 1000 * statistics.median(seconds)


def part_timings(shape: str, tokens: int, bf16: bool, repeats: int) -> dict[str, float]:
    """Milliseconds of each part of one training step (see the module docstring)."""
    torch.manual_seed(0)
    config = model_config(shape)
    model = MotorModel(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    rows = random_rows(tokens)
    batch = collate_windows(rows, labels=True, bags=BAGS)
    inputs = {k: batch[k] for k in ("entries", "weights", "bag_offsets", "time_features",
                                    "age_days", "segment_ids")}
    labels = [batch[k] for k in ("censor_days", "label_point", "label_task", "label_days")]
    head_dim = config.hidden_size // config.num_heads
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    qkv_dtype = torch.bfloat16 if bf16 else torch.float32
    qkv = torch.randn(3, len(batch["segment_ids"]), config.num_heads, head_dim,
                      dtype=qkv_dtype, requires_grad=True)
    points = len(batch["point_indices"])
    representations = torch.randn(points, config.hidden_size, requires_grad=True)
    log_hazards = torch.randn(points, config.num_bins, config.num_tasks).sub_(7).requires_grad_()

    def embedding() -> None:
        with autocast:
            x = model.motor.embedding(batch["entries"], batch["weights"], batch["bag_offsets"],
                                      batch["time_features"])
        x.sum().backward()

    def attention() -> None:
        for _ in range(config.num_layers):
            rotary_tables(batch["age_days"], head_dim, config.rope_theta)
            out = local_attention(*qkv, batch["segment_ids"], config.attention_width)
            out.sum().backward()

    def encoder() -> None:
        with autocast:
            hidden = model.encode(**inputs)
        hidden.float().sum().backward()

    def head() -> None:
        with autocast:
            out = model.head(representations)
        out.sum().backward()

    def loss() -> None:
        motor_loss(log_hazards, *labels, config.bin_edges_days).backward()

    def step() -> None:
        with autocast:
            value = model(**batch).loss
        value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # gradients and optimizer state exist from here on
    times = {"collate": median_ms(lambda: collate_windows(rows, labels=True, bags=BAGS), repeats)}
    times["embedding"] = median_ms(embedding, repeats)
    times["attention"] = median_ms(attention, repeats)
    times["encoder rest"] = median_ms(encoder, repeats) - times["embedding"] - times["attention"]
    times["head"] = median_ms(head, repeats)
    times["loss"] = median_ms(loss, repeats)
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    times["optimizer"] = median_ms(optimizer.step, repeats)
    times["step"] = median_ms(step, repeats)
    times["tokens"] = float(len(batch["segment_ids"]))
    return times


def top_operators(shape: str, tokens: int, bf16: bool, count: int) -> str:
    """torch.profiler's table of the `count` operators of most self CPU time in one step."""
    torch.manual_seed(0)
    model = MotorModel(model_config(shape)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    batch = collate_windows(random_rows(tokens), labels=True, bags=BAGS)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            value = model(**batch).loss
        value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        step()
    return str(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=count))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["tiny", "femr-6x256", "quality"],
                        choices=sorted(SHAPES))
    parser.add_argument("--tokens", nargs="+", type=int, default=[2048, 16384])
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"],
                        choices=["fp32", "bf16"])
    parser.add_argument("--threads", nargs="+", type=int, default=[torch.get_num_threads()])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top", type=int, default=0, help="also print the top operators")
    args = parser.parse_args()
    print(f"{cpu_description()}; torch {torch.__version__}; load {os.getloadavg()[0]:.2f}")
    print("| shape | tokens | prec | threads | " + " | ".join(PARTS)
          + " | sum | step | tokens/s |")
    print("|---|---:|---|---:|" + "---:|" * (len(PARTS) + 3))
    for shape in args.shapes:
        for tokens in args.tokens:
            for precision in args.precision:
                for threads in args.threads:
                    torch.set_num_threads(threads)
                    t: dict[str, Any] = part_timings(shape, tokens, precision == "bf16",
                                                     args.repeats)
                    total = sum(t[p] for p in PARTS[1:])
                    print(f"| {shape} | {tokens:,} | {precision} | {threads} | "
                          + " | ".join(f"{t[p]:.0f}" for p in PARTS)
                          + f" | {total:.0f} | {t['step']:.0f} | "
                          f"{t['tokens'] / t['step'] * 1000:,.0f} |", flush=True)
                    if args.top:
                        print(top_operators(shape, tokens, precision == "bf16", args.top))
    print(f"(load at the end {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
