"""MOTOR labels and loss: dense piecewise-exponential targets and their negative log-likelihood.

Time is in days. Bins are given by finite edges [e_0 = 0, e_1, ..., e_{B-1}] (`motor_task.json`);
bin b covers (e_b, e_{b+1}] and the last bin (e_{B-1}, +inf). At a prediction point, each task has
a time t: days to the task's next occurrence (an observed event) or, without one, days to the
subject's censoring. With a constant hazard λ_b = exp(log_hazard_b) inside bin b:

    time_at_risk_b = clamp(t - e_b, 0, e_{b+1} - e_b)     days spent in bin b before t
    event_in_bin_b = 1 if the event is observed and t falls in bin b, else 0

    -log L = Σ_b λ_b · time_at_risk_b - Σ_b log λ_b · event_in_bin_b

(the survival term plus, for an observed event, the log-density at t). An event at t = 0 counts in
the first bin.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


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


def dense_labels(label_point: torch.Tensor, label_task: torch.Tensor, label_days: torch.Tensor,
                 censor_days: torch.Tensor, bin_edges_days: Sequence[float] | torch.Tensor,
                 num_tasks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense targets from the sparse labels of a window (layout of `ehrmotor.examples`).

    label_point, label_task, label_days: (L,) one entry per observed (point, task) event, with the
    days from the point to the event; censor_days: (P,) days from each point to censoring.
    Returns time_at_risk (P, bins, tasks) float32 in days and event_in_bin (P, bins, tasks) bool.
    """
    censor_days = torch.as_tensor(censor_days, dtype=torch.float32)
    label_point = torch.as_tensor(label_point, dtype=torch.long, device=censor_days.device)
    label_task = torch.as_tensor(label_task, dtype=torch.long, device=censor_days.device)
    label_days = torch.as_tensor(label_days, dtype=torch.float32, device=censor_days.device)
    if label_task.numel() and (int(label_task.min()) < 0 or int(label_task.max()) >= num_tasks):
        raise ValueError(f"label_task outside [0, {num_tasks}): "
                         f"{int(label_task.min())}..{int(label_task.max())}")
    points = censor_days.shape[0]
    days = censor_days[:, None].expand(points, num_tasks).clone()  # (P, tasks)
    days[label_point, label_task] = label_days
    observed = torch.zeros(points, num_tasks, dtype=torch.bool, device=censor_days.device)
    observed[label_point, label_task] = True
    return bin_labels(days, observed, bin_edges_days)


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


def motor_loss(log_hazards: torch.Tensor, event_days: torch.Tensor, is_event: torch.Tensor,
               bin_edges_days: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """`piecewise_exponential_nll` from per-task times (P, tasks); see `bin_labels`."""
    return piecewise_exponential_nll(log_hazards, *bin_labels(event_days, is_event,
                                                              bin_edges_days))
