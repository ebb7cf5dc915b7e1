"""Slow, obviously-correct references the model's fast paths are tested against.

- `naive_local_attention`: dense (T, T) scores and mask, the oracle for `local_attention`.
- `bin_labels`, `piecewise_exponential_nll`, `dense_motor_loss`: the MOTOR loss written out over
  dense (P, bins, tasks) targets, the oracle for `ehrmotor.model.motor_loss` (sparse labels).
- `dense_labels`: per-bin targets from a window's sparse labels, through `bin_labels`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def naive_local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          segment_ids: torch.Tensor, width: int = 496) -> torch.Tensor:
    """Causal local attention within subjects, (T, H, D) -> (T, H, D): full (T, T) scores and
    mask, computed in fp32, returned in q's dtype. Token i sees j iff same segment and
    i - width < j <= i."""
    positions = torch.arange(q.shape[0], device=q.device)
    distance = positions[:, None] - positions[None, :]  # (T, T) query minus key
    allowed = (distance >= 0) & (distance < width)
    allowed &= segment_ids[:, None] == segment_ids[None, :]
    scores = torch.einsum("thd,shd->hts", q.float(), k.float()) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed, float("-inf"))  # (H, T, T)
    weights = torch.softmax(scores, dim=-1)
    return torch.einsum("hts,shd->thd", weights, v.float()).to(q.dtype)


def per_task_labels(label_point: torch.Tensor, label_task: torch.Tensor,
                    label_days: torch.Tensor, censor_days: torch.Tensor,
                    num_tasks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """event_days (P, tasks) float32 and is_event (P, tasks) bool from sparse labels.

    label_point, label_task, label_days: (L,) one entry per observed (point, task) event, with the
    days from the point to the event; censor_days: (P,) days from each point to censoring.
    """
    censor_days = torch.as_tensor(censor_days, dtype=torch.float32)
    label_point = torch.as_tensor(label_point, dtype=torch.long)
    label_task = torch.as_tensor(label_task, dtype=torch.long)
    points = censor_days.shape[0]
    event_days = censor_days[:, None].expand(points, num_tasks).clone()  # (P, tasks)
    event_days[label_point, label_task] = torch.as_tensor(label_days, dtype=torch.float32)
    is_event = torch.zeros(points, num_tasks, dtype=torch.bool)
    is_event[label_point, label_task] = True
    return event_days, is_event


def dense_labels(label_point: torch.Tensor, label_task: torch.Tensor, label_days: torch.Tensor,
                 censor_days: torch.Tensor, bin_edges_days: Sequence[float],
                 num_tasks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """time_at_risk (P, bins, tasks) float32 in days and event_in_bin (P, bins, tasks) bool from
    sparse labels (see `per_task_labels`)."""
    event_days, is_event = per_task_labels(label_point, label_task, label_days, censor_days,
                                           num_tasks)
    return bin_labels(event_days, is_event, bin_edges_days)


def bin_labels(event_days: torch.Tensor, is_event: torch.Tensor,
               bin_edges_days: Sequence[float] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-bin targets from per-task times.

    event_days (P, tasks): days to the event, or to censoring where `is_event` (P, tasks) is
    False. Returns time_at_risk (P, bins, tasks) float32 in days and event_in_bin (P, bins, tasks)
    bool.
    """
    days = torch.as_tensor(event_days, dtype=torch.float32)
    observed = torch.as_tensor(is_event, dtype=torch.bool, device=days.device)
    edges = torch.as_tensor(bin_edges_days, dtype=torch.float32, device=days.device)
    if edges.dim() != 1 or edges.numel() == 0 or edges[0] != 0:
        raise ValueError(f"bin_edges_days must be a non-empty list starting at 0; got {edges}")
    if days.dim() != 2 or days.shape != observed.shape:
        raise ValueError(f"event_days {tuple(days.shape)} and is_event {tuple(observed.shape)} "
                         "must share the shape (P, tasks)")

    bin_width = torch.cat([edges[1:] - edges[:-1], edges.new_tensor([float("inf")])])  # (bins,)
    since_start = days[:, None, :] - edges[None, :, None]  # (P, bins, tasks)
    time_at_risk = torch.minimum(since_start.clamp(min=0), bin_width[None, :, None])

    # bin b with e_b < t <= e_{b+1}; t = 0 lands in bin 0
    event_bin = (torch.searchsorted(edges, days.contiguous(), right=False) - 1).clamp(min=0)
    bins = torch.arange(edges.numel(), device=days.device)
    event_in_bin = (bins[None, :, None] == event_bin[:, None, :]) & observed[:, None, :]
    return time_at_risk, event_in_bin


def piecewise_exponential_nll(log_hazards: torch.Tensor, time_at_risk: torch.Tensor,
                              event_in_bin: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood per (point, task), in fp32 whatever the input dtype.

    log_hazards, time_at_risk, event_in_bin: (P, bins, tasks); log-hazards per day, time in days.
    Returns Σ exp(log_hazards)·time_at_risk − Σ log_hazards·event_in_bin over everything,
    divided by P · tasks.
    """
    if log_hazards.shape != time_at_risk.shape or log_hazards.shape != event_in_bin.shape:
        raise ValueError(f"log_hazards {tuple(log_hazards.shape)}, time_at_risk "
                         f"{tuple(time_at_risk.shape)} and event_in_bin "
                         f"{tuple(event_in_bin.shape)} must share the shape (P, bins, tasks)")
    pairs = log_hazards.shape[0] * log_hazards.shape[2]
    with torch.autocast(log_hazards.device.type, enabled=False):
        log_hazards = log_hazards.float()  # exp in bf16 loses too much
        survival = (torch.exp(log_hazards) * time_at_risk.float()).sum()
        events = (log_hazards * event_in_bin.float()).sum()
        return (survival - events) / max(pairs, 1)


def dense_motor_loss(log_hazards: torch.Tensor, event_days: torch.Tensor,
                     is_event: torch.Tensor,
                     bin_edges_days: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """`piecewise_exponential_nll` from per-task times (P, tasks); see `bin_labels`."""
    return piecewise_exponential_nll(log_hazards, *bin_labels(event_days, is_event,
                                                              bin_edges_days))
