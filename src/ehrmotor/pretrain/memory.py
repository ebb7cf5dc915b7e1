"""Whether a model of given sizes fits in memory: checked before it is built, and allocation
failures turned into one line.

Training holds, per parameter, the fp32 weight, its gradient and Adam's two moments: 16 bytes
(TRAINING_BYTES_PER_PARAMETER), before any activation. `check_model_fits` refuses settings whose
parameters alone exceed the memory available now (MemAvailable of /proc/meminfo, else the
physical pages of `os.sysconf`; on CUDA the free device memory). `allocation_errors` turns the
allocator failures that still happen (activations, other processes) into the same message.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from ehrmotor.errors import PretrainError
from ehrmotor.model import MotorConfig, MotorModel

TRAINING_BYTES_PER_PARAMETER = 16  # fp32 weight + gradient + Adam's exp_avg and exp_avg_sq
GIB = 2**30
# What torch and Python say when an allocation fails.
ALLOCATION_FAILURES = ("can't allocate memory", "DefaultCPUAllocator", "out of memory")


def parameter_count(config: MotorConfig) -> int:
    """Parameters of `MotorModel(config)`, counted on the meta device (nothing is allocated)."""
    with torch.device("meta"):
        return sum(p.numel() for p in MotorModel(config).parameters())


def available_bytes(device: str) -> tuple[int | None, str]:
    """(bytes available now or None when unknown, what they are) on "cpu" or "cuda"."""
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return int(free), "the GPU has"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "this machine has"
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "this machine has"
    except (OSError, ValueError):
        return None, "this machine has"


def _sizes(config: MotorConfig) -> str:
    return ", ".join(f"{name} {getattr(config, name)}" for name in (
        "hidden_size", "num_layers", "intermediate_size", "vocab_size", "num_tasks"))


def too_large(config: MotorConfig, parameters: int, available: int | None, where: str) -> str:
    """The one-line message for a model that does not fit."""
    needed = parameters * TRAINING_BYTES_PER_PARAMETER / GIB
    have = f"{where} {available / GIB:.1f} GiB available" if available is not None else \
        "the allocation failed"
    return (f"pretrain: the model of these settings ({_sizes(config)}) has {parameters:,} "
            f"parameters and training needs about {needed:,.1f} GiB for them (weights, "
            f"gradients, Adam state) but {have}; choose a smaller preset (--preset small or "
            "tiny) or a smaller hidden_size, num_layers or intermediate_size")


def check_model_fits(config: MotorConfig, device: str, shards: int = 1) -> int:
    """The parameter count of `config`'s model; PretrainError when training it cannot fit
    (`shards`: processes the parameters are split over, FSDP's ranks)."""
    parameters = parameter_count(config)
    available, where = available_bytes(device)
    if available is not None and parameters * TRAINING_BYTES_PER_PARAMETER > available * shards:
        raise PretrainError(too_large(config, parameters, available, where))
    return parameters


def is_allocation_failure(error: BaseException) -> bool:
    if isinstance(error, MemoryError | torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and any(
        text in str(error) for text in ALLOCATION_FAILURES)


@contextlib.contextmanager
def allocation_errors(config: MotorConfig, parameters: int, device: str) -> Iterator[None]:
    """Run the block; an allocation failure in it becomes a PretrainError naming the sizes."""
    try:
        yield
    except Exception as error:
        if not is_allocation_failure(error):
            raise
        available, where = available_bytes(device)
        raise PretrainError(too_large(config, parameters, available, where) + "; or a smaller "
                            "tokens_per_batch if the model itself fits") from error
