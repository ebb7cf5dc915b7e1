"""Slow, obviously-correct references the model's fast paths are tested against.

- `naive_local_attention`: dense (T, T) scores and mask, the oracle for `local_attention`.
- `dense_labels`: per-bin targets from a window's sparse labels, through `bin_labels`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ehrmotor.model import bin_labels


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
