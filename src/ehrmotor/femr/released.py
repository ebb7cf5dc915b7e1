"""The layout of femr's released models (femr 0.2.0 / 0.2.1, Stanford's CLMBR-T-base) in PyTorch.

femr 0.2.0 and 0.2.1 (the releases before femr moved to meds_reader and, later, Hawk) save:

    transformer.embed.weight              a flat token table (no hierarchical bags)
    transformer.in_norm.scale, transformer.out_norm.scale, transformer.layers.N.norm.scale
    transformer.layers.N.input_proj.*     q, k, v first, then the feed-forward part (GELU)
    transformer.layers.N.output_proj.*
    task_model.final_layer.*              the CLMBR head (next-code logits), unused for features

Their RMSNorm is scale * x / (rms(x) + 1e-8) (eps outside the root). Attention is femr's
flash-attention call with window (attention_width, 0): a position sees itself and the
`attention_width` positions before it (one more than femr 0.2.4's local mask). Rotary angles and
frequencies are femr's (`model.rotary_tables`), over ages in days; there are no time
features.

The tokenizer (`released_positions`): each measurement gives at most one entry: a numeric_value
the first numeric entry of its code whose [val_start, val_end) holds it (none: no entry, even
if the code has a code entry), else a text_value its (code, text) entry, else the code's entry.
Every measurement with an entry is a position of its own, in time order (rows without a time are
put at the subject's first time, which is femr's birth), except an entry already seen the same
calendar day. A label reads the last position at or before its prediction time, over the
subject's whole history (femr 0.2.1's `convert_patient` path; it has no compute_features).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ehrmotor.femr.model import FemrHybridConfig, rotary_tables, rotate
from ehrmotor.femr.tokens import locate_labels
from ehrmotor.model.attention import local_attention

if TYPE_CHECKING:
    from pathlib import Path

LAYOUT = "released"
MICROSECONDS_PER_DAY = 86_400_000_000


class ScaleRMSNorm(nn.Module):
    """femr 0.2.1's RMSNorm: weight * x / (||x|| / sqrt(d) + eps)."""

    def __init__(self, width: int, eps: float = 1e-8) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rms = x.norm(2, dim=-1, keepdim=True) * x.shape[-1] ** -0.5
        return self.weight * (x / (rms + self.eps))


class ReleasedLayer(nn.Module):
    def __init__(self, config: FemrHybridConfig) -> None:
        super().__init__()
        self.config = config
        hidden, inner = config.hidden_size, config.intermediate_size
        self.norm = ScaleRMSNorm(hidden)
        self.input_proj = nn.Linear(hidden, 3 * hidden + inner)
        self.output_proj = nn.Linear(hidden + inner, hidden)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, ...],
                segment_ids: torch.Tensor) -> torch.Tensor:
        hidden, heads = self.config.hidden_size, self.config.num_heads
        projected = self.input_proj(self.norm(x))
        qkv = projected[:, :3 * hidden].reshape(x.shape[0], 3, heads, hidden // heads)
        q, k = rotate(qkv[:, 0], *rotary), rotate(qkv[:, 1], *rotary)
        mixed = local_attention(q, k, qkv[:, 2], segment_ids, self.config.attention_width + 1,
                                backend="blockwise").reshape(x.shape)
        ff = F.gelu(projected[:, 3 * hidden:])
        return self.output_proj(torch.cat((mixed, ff), dim=-1))


class FemrReleasedEncoder(nn.Module):
    """(T,) tokens, ages in days and segment ids -> (T, hidden), out_norm applied."""

    def __init__(self, config: FemrHybridConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.in_norm = ScaleRMSNorm(config.hidden_size)
        self.layers = nn.ModuleList(ReleasedLayer(config) for _ in range(config.num_layers))
        self.out_norm = ScaleRMSNorm(config.hidden_size)

    def forward(self, tokens: torch.Tensor, ages_days: torch.Tensor,
                segment_ids: torch.Tensor) -> torch.Tensor:
        x = self.in_norm(self.embed(tokens))
        rotary = rotary_tables(ages_days, self.config.hidden_size // self.config.num_heads)
        for layer in self.layers:
            x = x + layer(x, rotary, segment_ids)
        return self.out_norm(x)


def flat_vocabulary(path: Path) -> dict[str, pl.DataFrame]:
    """femr 0.2.1's dictionary.msgpack as three lookup tables (entry = index in the vocab)."""
    vocab = msgpack.unpackb(path.read_bytes(), strict_map_key=False)["vocab"]
    rows = list(enumerate(vocab))
    codes = [(e["code_string"], i) for i, e in rows if e["type"] == "code"]
    texts = [(e["code_string"], e["text_string"], i) for i, e in rows if e["type"] == "text"]
    ranges = [(e["code_string"], float(e["val_start"]), float(e["val_end"]), i)
              for i, e in rows if e["type"] == "numeric"]
    return {
        "codes": pl.DataFrame(codes, schema={"code": pl.String, "entry": pl.Int64}, orient="row")
        .unique("code", keep="last"),
        "texts": pl.DataFrame(texts, schema={"code": pl.String, "text_value": pl.String,
                                             "entry": pl.Int64}, orient="row")
        .unique(["code", "text_value"], keep="last"),
        "ranges": pl.DataFrame(ranges, schema={"code": pl.String, "start": pl.Float64,
                                               "end": pl.Float64, "entry": pl.Int64},
                               orient="row"),
    }


def _entries(events: pl.DataFrame, vocabulary: dict[str, pl.DataFrame]) -> pl.DataFrame:
    """event, entry: the one entry of each measurement that has one."""
    number = events.filter(pl.col("numeric_value").is_not_null()) \
        .select("event", "code", value=pl.col("numeric_value").cast(pl.Float64))
    numeric = (number.join(vocabulary["ranges"], on="code", how="inner")
               .filter((pl.col("start") <= pl.col("value")) & (pl.col("value") < pl.col("end")))
               .group_by("event").agg(pl.col("entry").min()))
    rest = events.filter(pl.col("numeric_value").is_null())
    text = rest.filter(pl.col("text_value").is_not_null()) \
        .join(vocabulary["texts"], on=["code", "text_value"], how="inner")
    code = rest.filter(pl.col("text_value").is_null()).join(vocabulary["codes"], on="code",
                                                             how="inner")
    return pl.concat([numeric, text.select("event", "entry"), code.select("event", "entry")])


def released_positions(events: pl.DataFrame, vocabulary: dict[str, pl.DataFrame]
                       ) -> pl.DataFrame:
    """subject_id, time, entry, age_days of every position, sorted by (subject_id, position)."""
    timed = events.with_columns(pl.col("time").fill_null(pl.col("time").min().over("subject_id")))
    timed = timed.sort("subject_id", "time", maintain_order=True).with_row_index("event")
    birth = timed.group_by("subject_id").agg(birth=pl.col("time").min())
    kept = (timed.join(_entries(timed, vocabulary), on="event", how="inner").sort("event")
            .with_columns(day=pl.col("time").dt.date())
            .unique(["subject_id", "day", "entry"], keep="first", maintain_order=True)
            .join(birth, on="subject_id", how="left"))
    age = (pl.col("time") - pl.col("birth")).dt.total_microseconds().cast(pl.Float64)
    return kept.select("subject_id", "time", "entry",
                       age_days=(age / MICROSECONDS_PER_DAY).cast(pl.Float32))


def _located(labels: pl.DataFrame, positions: pl.DataFrame) -> pl.DataFrame:
    """labels plus `row`: the index in `positions` of the last position at or before each."""
    rows = positions.with_row_index("row").select("subject_id", "time",
                                                  pl.col("row").cast(pl.Int64))
    return locate_labels(labels, rows, "row", missing="have no femr positions in the data",
                         before="the subject's first position")


def released_features(model: FemrReleasedEncoder, vocabulary: dict[str, pl.DataFrame],
                      events: pl.DataFrame, table: pl.DataFrame, budget: int,
                      features: np.ndarray) -> None:
    """Fill `features` (rows = table's `label`) with the representation each label reads."""
    positions = released_positions(events, vocabulary)
    located = _located(table.select("label", "subject_id", "prediction_time"), positions)
    subjects = positions["subject_id"].to_numpy()
    starts = np.flatnonzero(np.r_[True, subjects[1:] != subjects[:-1]])
    ends = np.r_[starts[1:], len(subjects)]
    wanted = np.isin(subjects[starts], located["subject_id"].unique().to_numpy())
    spans = list(zip(starts[wanted].tolist(), ends[wanted].tolist(), strict=True))
    tokens = torch.from_numpy(positions["entry"].to_numpy().astype(np.int64))
    ages = torch.from_numpy(positions["age_days"].to_numpy().copy())
    label_rows, label_ids = located["row"].to_numpy(), located["label"].to_numpy()
    groups: list[list[tuple[int, int]]] = [[]]
    for span in spans:  # whole subjects, packed up to `budget` positions a batch
        if groups[-1] and sum(e - s for s, e in groups[-1]) + span[1] - span[0] > budget:
            groups.append([])
        groups[-1].append(span)
    batch_of, local = np.full(len(subjects), -1), np.zeros(len(subjects), dtype=np.int64)
    for number, group in enumerate(groups):
        where = np.concatenate([np.arange(s, e) for s, e in group])
        batch_of[where], local[where] = number, np.arange(len(where))
    with torch.no_grad():
        for number, group in enumerate(tqdm(groups, desc="femr features", unit="batch",
                                            disable=None)):
            index = torch.from_numpy(np.concatenate([np.arange(s, e) for s, e in group]))
            segments = torch.repeat_interleave(torch.arange(len(group)),
                                               torch.tensor([e - s for s, e in group]))
            hidden = model(tokens[index], ages[index], segments).numpy()
            inside = batch_of[label_rows] == number
            features[label_ids[inside]] = hidden[local[label_rows[inside]]]


def released_config(values: dict[str, Any], task: dict[str, Any]) -> FemrHybridConfig:
    """Our config for a released-layout femr model (femr 0.2.1's transformer_config)."""
    return FemrHybridConfig(
        vocab_size=int(values["vocab_size"]), hidden_size=int(values["hidden_size"]),
        intermediate_size=int(values["intermediate_size"]), num_heads=int(values["n_heads"]),
        num_layers=int(values["n_layers"]), attention_width=int(values["attention_width"]),
        use_normed_ages=False, hidden_act="gelu", use_bias=True, femr_version="0.2.1",
        layout=LAYOUT, task_type=str(task.get("task_type") or ""))
