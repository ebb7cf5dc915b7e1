"""The MOTOR head, its piecewise-exponential loss, and the pretraining model that joins them to
the encoder.

Time is in days. Bins are given by finite edges [e_0 = 0, e_1, ..., e_{B-1}] (config.bin_edges_days,
from `motor_task.json`); bin b covers (e_b, e_{b+1}] and the last bin (e_{B-1}, +inf). At a
prediction point, each task has a time t: days to the task's next occurrence (an observed event)
or, without one, days to the subject's censoring. With a constant hazard λ_b = exp(log_hazard_b)
inside bin b:

    time_at_risk_b = clamp(t - e_b, 0, e_{b+1} - e_b)     days spent in bin b before t
    event_in_bin_b = 1 if the event is observed and t falls in bin b, else 0

    -log L = Σ_b λ_b · time_at_risk_b - Σ_b log λ_b · event_in_bin_b

(the survival term plus, for an observed event, the log-density at t). An event at t = 0 counts in
the first bin. `motor_loss` takes the labels in their sparse form (most pairs are censored).

Data flow of `MotorModel`: encoder hidden states (T, hidden) -> the P prediction points
(`point_indices`) -> `MotorHead` -> log-hazard per (point, bin, task) -> with the labels
(`LABELS`, from `ehrmotor.sequences.batching.collate_windows`) -> `motor_loss`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils import ModelOutput

from ehrmotor.model.config import MotorConfig
from ehrmotor.model.encoder import MotorEncoder, MotorPreTrainedModel


class MotorHead(nn.Module):
    """Representation -> log-hazard per day for each (bin, task)."""

    def __init__(self, config: MotorConfig) -> None:
        super().__init__()
        self.num_bins = config.num_bins
        self.final_layer_size = config.final_layer_size
        self.bins = nn.Linear(config.hidden_size, config.num_bins * config.final_layer_size,
                              bias=False)
        self.norm = nn.RMSNorm(config.final_layer_size, eps=config.rms_norm_eps)
        self.tasks = nn.Linear(config.final_layer_size, config.num_tasks, bias=False)
        # Filled from config.initial_log_rates in MotorModel._init_weights.
        self.bias = nn.Parameter(torch.zeros(config.num_bins, config.num_tasks))

    def forward(self, representations: torch.Tensor,
                factorized: bool | None = None) -> torch.Tensor:
        """(P, hidden) -> log-hazards (P, bins, tasks), fp32. `factorized` (default: where it
        takes fewer multiplications, `factorized_pays`) folds the bins and tasks layers into
        one (hidden, bins · tasks) product first: the same values in another order."""
        points = representations.shape[0]
        if factorized if factorized is not None else self.factorized_pays(points):
            return self._factorized(representations)
        # (P, hidden) -> (P, bins · final) -> (P, bins, final)
        per_bin = self.bins(representations).view(points, self.num_bins, self.final_layer_size)
        normed = self.norm(per_bin.to(self.norm.weight.dtype))  # norm in the weights' precision
        # fp32 sum: the bias (about log 1e-4) would lose its digits in bf16; in place, as the
        # product is needed by nothing else
        return self.tasks(normed).float().add_(self.bias)  # (P, bins, tasks)

    def factorized_pays(self, points: int) -> bool:
        """Whether `_factorized` multiplies less for `points` points: hidden · (final + points)
        against points · final, per bin and task (3× each with the backward pass)."""
        hidden = self.bins.in_features
        return hidden * (self.final_layer_size + points) < points * self.final_layer_size

    def _factorized(self, representations: torch.Tensor) -> torch.Tensor:
        """RMSNorm(x) · W^T with x = bins_b · r is (r · M_b) / rms(x) with M_b = bins_b^T
        diag(γ) W^T: the (P, bins, final) features are needed only for their rms."""
        points, hidden = representations.shape
        per_bin = self.bins(representations).view(points, self.num_bins, self.final_layer_size)
        mean_square = per_bin.float().pow(2).mean(-1, keepdim=True)  # (P, bins, 1)
        inverse_rms = torch.rsqrt(mean_square + self.norm.eps)
        scaled_tasks = self.tasks.weight * self.norm.weight  # (tasks, final)
        bins = self.bins.weight.view(self.num_bins, self.final_layer_size, hidden)
        folded = bins.transpose(1, 2) @ scaled_tasks.T  # (bins, hidden, tasks)
        # the 1 / rms of each (point, bin) scales the small (bins, P, hidden) operand
        scaled = (representations[None] * inverse_rms.transpose(0, 1)).to(folded.dtype)
        logits = torch.bmm(scaled, folded).float()  # (bins, P, tasks)
        # bias in place before the transpose: in place on the transposed view, autograd would
        # copy the whole tensor through as_strided
        return logits.add_(self.bias[:, None, :]).transpose(0, 1)  # (P, bins, tasks), strided


LABELS = ("censor_days", "label_point", "label_task", "label_days")


def time_at_risk(days: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """(..., bins) days spent in each bin before `days` (...,): clamp(t - e_b, 0, width_b)."""
    width = torch.cat([edges[1:] - edges[:-1], edges.new_tensor([float("inf")])])
    return torch.minimum((days[..., None] - edges).clamp(min=0), width)


def event_bin(days: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """The bin b with e_b < t <= e_{b+1} of each time t (t = 0 lands in bin 0)."""
    return (torch.searchsorted(edges, days.contiguous(), right=False) - 1).clamp(min=0)


def motor_loss(log_hazards: torch.Tensor, censor_days: torch.Tensor, label_point: torch.Tensor,
               label_task: torch.Tensor, label_days: torch.Tensor,
               bin_edges_days: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood per (point, task), in fp32 whatever the input dtype.

    log_hazards (P, bins, tasks) per day; censor_days (P,) days from each point to censoring;
    label_point, label_task, label_days (L,): the (point, task) pairs whose task occurs before
    censoring, with the days to it (each pair at most once). The sum runs over every (point,
    task); a censored pair's time at risk depends on its point alone, so the survival term is
    Σ_{p,b} risk(c_p)_b · Σ_k λ_pbk over all pairs, corrected on the L observed ones by
    (risk(t) - risk(c_p))_b · λ_pbk: no (P, bins, tasks) label tensor is ever built.
    """
    edges = torch.as_tensor(bin_edges_days, dtype=torch.float32, device=log_hazards.device)
    if edges.dim() != 1 or edges.numel() == 0 or edges[0] != 0:
        raise ValueError(f"bin_edges_days must be a non-empty list starting at 0; got {edges}")
    points, bins, tasks = log_hazards.shape
    if censor_days.shape != (points,) or bins != edges.numel():
        raise ValueError(f"log_hazards {tuple(log_hazards.shape)} needs censor_days of shape "
                         f"({points},) and {bins} bin edges; got {tuple(censor_days.shape)} and "
                         f"{edges.numel()}")
    with torch.autocast(log_hazards.device.type, enabled=False):
        censored = time_at_risk(censor_days.float(), edges)  # (P, bins)
        days = label_days.float()
        points_of_labels = label_point.long()
        correction = time_at_risk(days, edges) - censored[points_of_labels]  # (L, bins)
        total = _NegativeLogLikelihood.apply(
            log_hazards.float(),  # exp in bf16 loses too much
            censored, points_of_labels, label_task.long(), correction, event_bin(days, edges))
        return total / max(points * tasks, 1)


class _NegativeLogLikelihood(torch.autograd.Function):
    """Σ over (point, bin, task) of λ · risk(censoring), corrected on the L observed pairs, minus
    their log-hazards in the event bins (`motor_loss`), with its gradient written out: one
    (P, bins, tasks) tensor each way (the hazards forward, the gradient backward), where autograd
    kept the exp, the broadcast product and a dense scatter of the sparse terms."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, log_hazards: torch.Tensor,
                censored: torch.Tensor, label_point: torch.Tensor, label_task: torch.Tensor,
                correction: torch.Tensor, event_bins: torch.Tensor) -> torch.Tensor:
        hazards = torch.exp(log_hazards)  # (P, bins, tasks)
        observed = log_hazards[label_point, :, label_task]  # (L, bins)
        observed_hazards = torch.exp(observed)
        survival = (hazards.sum(-1) * censored).sum() + (correction * observed_hazards).sum()
        events = observed.gather(1, event_bins[:, None]).sum()
        ctx.save_for_backward(hazards, censored, label_point, label_task, correction,
                              event_bins, observed_hazards)
        return survival - events

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx,
                 grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (hazards, censored, label_point, label_task, correction, event_bins,
         observed_hazards) = ctx.saved_tensors  # type: ignore[attr-defined]
        grad_log_hazards = hazards * (censored * grad)[:, :, None]
        sparse = correction * observed_hazards  # d(corrected survival) / d(observed)
        sparse.scatter_add_(1, event_bins[:, None], -torch.ones_like(sparse[:, :1]))
        bins = torch.arange(hazards.shape[1], device=hazards.device)
        grad_log_hazards.index_put_((label_point[:, None], bins[None, :], label_task[:, None]),
                                    sparse * grad, accumulate=True)
        return grad_log_hazards, None, None, None, None, None


@dataclass
class MotorOutput(ModelOutput):
    """loss: mean NLL per (point, task) when labels are given; log_hazards (P, bins, tasks) fp32,
    per day; representations (P, hidden): the final-norm hidden state at each point."""

    loss: torch.Tensor | None = None
    log_hazards: torch.Tensor | None = None
    representations: torch.Tensor | None = None


class MotorModel(MotorPreTrainedModel):
    """Pretraining model: `MotorEncoder` (weights under `motor.`) + `MotorHead` (`head.`) + loss."""

    def __init__(self, config: MotorConfig) -> None:
        super().__init__(config)
        self.motor = MotorEncoder(config)
        self.head = MotorHead(config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, MotorHead):
            if getattr(module.bias, "_is_hf_initialized", False):
                return  # loaded from a checkpoint (transformers >= 5 marks loaded tensors)
            rates = torch.tensor(self.config.initial_log_rates or [0.0] * self.config.num_tasks)
            with torch.no_grad():
                module.bias.copy_(rates.to(module.bias.dtype).expand_as(module.bias))

    def encode(self, entries: torch.Tensor, weights: torch.Tensor, bag_offsets: torch.Tensor,
               time_features: torch.Tensor, age_days: torch.Tensor,
               segment_ids: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden state of every position: (T, hidden); see `MotorEncoder`."""
        return self.motor(entries, weights, bag_offsets, time_features, age_days, segment_ids)

    def forward(self, entries: torch.Tensor, weights: torch.Tensor, bag_offsets: torch.Tensor,
                time_features: torch.Tensor, age_days: torch.Tensor, segment_ids: torch.Tensor,
                point_indices: torch.Tensor, censor_days: torch.Tensor | None = None,
                label_point: torch.Tensor | None = None, label_task: torch.Tensor | None = None,
                label_days: torch.Tensor | None = None,
                return_dict: bool | None = None) -> MotorOutput | tuple[torch.Tensor, ...]:
        """Log-hazards at the points (P,) of the packed batch; the loss when the sparse labels
        (`LABELS`: censor_days (P,), label_point, label_task, label_days (L,); see `motor_loss`)
        are given."""
        hidden = self.encode(entries, weights, bag_offsets, time_features, age_days, segment_ids)
        representations = hidden[point_indices.long()]  # (P, hidden)
        log_hazards = self.head(representations)  # (P, bins, tasks)
        loss = None
        labels = (censor_days, label_point, label_task, label_days)
        if any(label is not None for label in labels):
            if any(label is None for label in labels):
                raise ValueError(f"labels need all of {', '.join(LABELS)}")
            if not self.config.bin_edges_days:
                raise ValueError("labels need config.bin_edges_days; it is empty")
            loss = motor_loss(log_hazards, *labels,  # type: ignore[arg-type]
                              self.config.bin_edges_days)
        output = MotorOutput(loss=loss, log_hazards=log_hazards, representations=representations)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return output if return_dict else output.to_tuple()


def current_weight_name(name: str) -> str:
    """The name a checkpoint tensor has in today's MotorModel.

    Bundles written before the encoder/head split hold the encoder's tensors at the top level
    (`embedding.entries.weight`, `layers.0...`, `norm.weight`); they now live under the encoder's
    prefix (`motor.embedding.entries.weight`). `from_pretrained` already maps them so (transformers
    adds a missing base_model_prefix key by key); a check of a file's tensor names against the
    model's should map them the same way first. Other names come back unchanged.
    """
    top = name.split(".", 1)[0]
    if top in ("embedding", "layers", "norm"):
        return f"{MotorModel.base_model_prefix}.{name}"
    return name
