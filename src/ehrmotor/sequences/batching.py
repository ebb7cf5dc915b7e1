"""Packing windows into token-budget batches, and collating them into model inputs.

- `TokenBudgetBatchSampler`: each epoch, windows are shuffled with a seed derived from
  (seed, epoch) and packed greedily, in that order, into batches of at most `tokens_per_batch`
  positions. With several distributed ranks, batch i goes to rank i mod world_size and every rank
  gets the same number of batches (the remainder is dropped), so ranks never share a window.
  Greedy packing of another order can give a few batches more or fewer; every epoch is cut or
  topped up (each rank from its own first batches) to the length of epoch 0, so `len()` is
  exact, as `Trainer` expects.
  Windows without prediction points never reach the sampler (prepare skips them).
- `collate_windows`: the one collate of training and embedding. It concatenates the windows of a
  batch into one packed sequence (segment ids keep subjects apart) with the points to read
  (`point_indices`). For training (`labels=True`) it derives the sparse MOTOR labels from each
  window's points and task occurrences (layout of `ehrmotor.sequences.shards`): `censor_days` (P,)
  per point, and one (label_point, label_task, label_days) triple per point and task that occurs
  after it, the days to that task's next occurrence. Occurrence j of a task (times sorted) is the
  next one for the window's points at or after occurrence j - 1 and before j, a run found by two
  binary searches over the points' times (batched over windows), so the work is proportional to
  the labels, with no loop per point or occurrence. Embedding batches carry no labels.
- `frame_rows` hands the rows of a polars window frame to it as a torch-format dataset does;
  `pad_batch` grows a batch to a fixed length (embedding on CUDA).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from torch.utils.data import Sampler

from ehrmotor.meds.read import US_PER_DAY
from ehrmotor.sequences.time_features import TIME_FEATURES, time_features
from ehrmotor.vocabulary.bags import BagTable

INT64_MAX = torch.iinfo(torch.int64).max
INT64_MIN = torch.iinfo(torch.int64).min


def length_column(names: Any) -> str:
    """The column with one value per position: age_days in rows built in memory, times in the
    prepared layout (which stores no age)."""
    return "age_days" if "age_days" in names else "times"


def window_lengths(dataset: Any) -> np.ndarray:
    """Positions per window, read from the Arrow column without decoding rows."""
    table = dataset.with_format("arrow").data.table
    return table.column(length_column(table.column_names)).combine_chunks().value_lengths() \
        .to_numpy()


def pack(lengths: np.ndarray, order: np.ndarray, budget: int) -> list[list[int]]:
    """Greedy packing of windows in `order` into batches of total length <= budget."""
    if len(lengths) and lengths.max() > budget:
        raise ValueError(f"a window has {int(lengths.max())} positions, more than the token "
                         f"budget of {budget}; raise tokens_per_batch or prepare with a smaller "
                         "max_window")
    batches: list[list[int]] = []
    current: list[int] = []
    used = 0
    for index in order.tolist():  # one step per window, not per event
        size = int(lengths[index])
        if current and used + size > budget:
            batches.append(current)
            current, used = [], 0
        current.append(index)
        used += size
    if current:
        batches.append(current)
    return batches


class TokenBudgetBatchSampler(Sampler[list[int]]):
    """Batches of window indices under a token budget, reshuffled every epoch (see module doc)."""

    def __init__(self, lengths: np.ndarray, tokens_per_batch: int, *, shuffle: bool = True,
                 seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.lengths = np.asarray(lengths)
        self.tokens_per_batch = tokens_per_batch
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self, epoch: int) -> list[list[int]]:
        """All ranks' batches of `epoch`, in order."""
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.lengths))
        else:
            order = np.arange(len(self.lengths))
        return pack(self.lengths, order, self.tokens_per_batch)

    def __len__(self) -> int:
        return len(self._batches(0)) // self.world_size

    def __iter__(self) -> Iterator[list[int]]:
        count = len(self)
        batches = self._batches(self.epoch)
        # This rank's share, topped up from its own first batches (never another rank's).
        mine = batches[self.rank::self.world_size] or batches
        while len(mine) < count:
            mine += mine[: count - len(mine)]
        yield from mine[:count]


def _cat(rows: Sequence[Mapping[str, torch.Tensor]], key: str) -> torch.Tensor:
    return torch.cat([row[key] for row in rows])


def collate_windows(rows: Sequence[Mapping[str, torch.Tensor]], labels: bool = False,
                    task_map: torch.Tensor | None = None, bags: BagTable | None = None
                    ) -> dict[str, torch.Tensor]:
    """Pack windows (rows in torch format) into one model batch; the MOTOR labels ride along
    when `labels` is True, their tasks mapped through `task_map` (the datasets number the
    candidate tasks; `MotorTask.task_map` gives each one's model task, -1 to drop it).
    Rows of the prepared layout (`items`) have their bags expanded and their time features
    computed through the bag table `bags` (`ehrmotor.vocabulary.bags`); rows built in memory
    carry bag_sizes, entries, weights, age_days and the time features.

    Out: entries (N,), weights (N,), bag_offsets (T,), time_features (T, 3), age_days (T,),
    segment_ids (T,), point_indices (P,); with labels also censor_days (P,) and label_point,
    label_task, label_days (pairs,).
    """
    prepared = bool(rows) and "items" in rows[0]
    column = length_column(rows[0]) if rows else "times"
    lengths = torch.tensor([len(row[column]) for row in rows])
    token_start = torch.cumsum(lengths, 0) - lengths
    if prepared:
        if bags is None:
            raise ValueError("collate_windows: rows of the prepared layout need the bag table")
        entries, weights, bag_sizes = _expanded(rows, token_start, int(lengths.sum()), bags)
        times = _times(rows, lengths, bags.time_stats)
    else:
        entries, weights = _cat(rows, "entries").long(), _cat(rows, "weights").float()
        bag_sizes = _cat(rows, "bag_sizes").long()
        times = {name: _cat(rows, name).float() for name in ("age_days", *TIME_FEATURES)}
    batch = {
        "entries": entries,
        "weights": weights,
        "bag_offsets": torch.cumsum(bag_sizes, 0) - bag_sizes,
        "time_features": torch.stack([times[name] for name in TIME_FEATURES], dim=1),
        "age_days": times["age_days"],
        "segment_ids": torch.repeat_interleave(torch.arange(len(rows)), lengths),
        "point_indices": torch.cat([row["points"].long() + start
                                    for row, start in zip(rows, token_start, strict=True)]),
    }
    if labels:
        batch["censor_days"] = _cat(rows, "censor_days").float()
        batch.update(motor_labels(rows, task_map))
    return batch


def _times(rows: Sequence[Mapping[str, torch.Tensor]], lengths: torch.Tensor,
           stats: dict[str, float]) -> dict[str, torch.Tensor]:
    """age_days and the time features of prepared rows' positions, from their times: each row's
    position 0 is birth; its position 1 follows `previous_time`, each later one the one before."""
    time, sizes = _cat(rows, "times").numpy(), lengths.numpy()
    start = np.cumsum(sizes) - sizes
    previous = np.empty_like(time)
    previous[1:] = time[:-1]
    previous[start[sizes > 1] + 1] = [int(row["previous_time"])
                                      for row, size in zip(rows, sizes, strict=True) if size > 1]
    frame = pl.DataFrame({
        "time": time, "birth": np.repeat(time[start], sizes),
        "previous": pl.Series(previous).scatter(start, None)})
    features = time_features(frame, stats)
    return {name: torch.from_numpy(features[name].to_numpy(writable=True))
            for name in features.columns}


def _expanded(rows: Sequence[Mapping[str, torch.Tensor]], token_start: torch.Tensor,
              tokens: int, bags: BagTable) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """entries, weights, bag sizes of the rows' positions, expanded from their items: a row's
    first `first_events` events make its position 0, each later event one later position."""
    events = torch.tensor([len(row["event_items"]) for row in rows])
    first = torch.tensor([int(row["first_events"]) for row in rows])
    event_row = torch.repeat_interleave(torch.arange(len(rows)), events)
    local = torch.arange(len(event_row)) - (torch.cumsum(events, 0) - events)[event_row]
    position = token_start[event_row] + (local - first[event_row] + 1).clamp(min=0)
    return expand_items(_cat(rows, "items").long(), _cat(rows, "event_items").long(), position,
                        tokens, bags)


def expand_items(items: torch.Tensor, event_items: torch.Tensor, event_position: torch.Tensor,
                 positions: int, table: BagTable
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """entries (int64), weights (float32) and bag sizes (int64, per position) of `positions`
    positions whose events (`event_position`: each event's position, ascending) have
    `event_items` items each, `items` concatenated in event order."""
    offsets, members = torch.from_numpy(table.offsets), torch.from_numpy(table.members)
    is_value = torch.from_numpy(table.value)
    events = len(event_items)
    item_event = torch.repeat_interleave(torch.arange(events), event_items)
    starts, sizes = offsets[items], offsets[items + 1] - offsets[items]
    owner = torch.repeat_interleave(torch.arange(len(items)), sizes)
    first = torch.cumsum(sizes, 0) - sizes
    rows = starts[owner] + torch.arange(len(owner)) - first[owner]
    width = table.size
    # Each event's bag: its members, once each, sorted by (event, entry).
    pairs = torch.unique(item_event[owner] * width + members[rows])
    event, entry = pairs // width, pairs % width
    value = is_value[entry]
    code_size = torch.bincount(event[~value], minlength=events)
    weight = torch.where(value, 1.0, 1.0 / code_size[event].double()).float()
    # Each position's bag: the union of its events' bags, the largest weight of each entry.
    keys, inverse = torch.unique(event_position[event] * width + entry, return_inverse=True)
    weights = torch.zeros(len(keys), dtype=torch.float32).scatter_reduce(
        0, inverse, weight, "amax")
    return keys % width, weights, torch.bincount(keys // width, minlength=positions)


def _padded(tensors: Sequence[torch.Tensor], value: int) -> torch.Tensor:
    """(len(tensors), longest) int64, row i = tensors[i] then `value` (exact, unlike
    pad_sequence's float padding value)."""
    lengths = torch.tensor([len(t) for t in tensors], dtype=torch.long)
    out = torch.full((len(tensors), int(lengths.max()) if len(tensors) else 0), value,
                     dtype=torch.long)
    out[torch.arange(out.shape[1]) < lengths[:, None]] = torch.cat([t.long() for t in tensors])
    return out


def motor_labels(rows: Sequence[Mapping[str, torch.Tensor]],
                 task_map: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """label_point (index among the batch's points), label_task, label_days (float32 days from
    the point to the task's next occurrence) of every (point, task) with a later occurrence;
    tasks mapped through `task_map` when given (see `collate_windows`)."""
    point_times = _padded([row["times"][row["points"].long()] for row in rows], INT64_MAX)
    num_points = torch.tensor([len(row["points"]) for row in rows])
    tasks = _padded([row["task_ids"] for row in rows], -1)  # (windows, most occurrences)
    times = _padded([row["task_times"] for row in rows], INT64_MIN)  # padding: empty runs
    same_task = torch.zeros_like(tasks, dtype=torch.bool)
    same_task[:, 1:] = tasks[:, 1:] == tasks[:, :-1]
    previous = torch.full_like(times, INT64_MIN)
    previous[:, 1:] = times[:, :-1]
    previous = torch.where(same_task, previous, INT64_MIN)
    # Points at or after the previous occurrence of the task and before this one.
    start = torch.searchsorted(point_times, previous, side="left")
    stop = torch.searchsorted(point_times, times, side="left")
    counts = (stop - start).clamp(min=0).flatten()
    occurrence = torch.repeat_interleave(torch.arange(len(counts)), counts)
    run_start = torch.cumsum(counts, 0) - counts
    local = start.flatten()[occurrence] + torch.arange(len(occurrence)) - run_start[occurrence]
    window = occurrence // tasks.shape[1]
    days = times.flatten()[occurrence] - point_times[window, local]
    labels = {"label_point": (torch.cumsum(num_points, 0) - num_points)[window] + local,
              "label_task": tasks.flatten()[occurrence],
              "label_days": (days.double() / US_PER_DAY).float()}
    if task_map is None:
        return labels
    mapped = task_map[labels["label_task"]]
    kept = mapped >= 0
    return {"label_point": labels["label_point"][kept], "label_task": mapped[kept],
            "label_days": labels["label_days"][kept]}


def pad_batch(batch: Mapping[str, torch.Tensor], tokens: int) -> dict[str, torch.Tensor]:
    """`batch` grown to `tokens` positions by empty positions in a segment of their own (one
    tensor shape for compiled attention kernels); real positions and points are unchanged."""
    fill = tokens - len(batch["segment_ids"])
    if fill < 0:
        raise ValueError(f"a batch of {len(batch['segment_ids'])} positions cannot be padded to "
                         f"{tokens}")
    padded = dict(batch)
    padded["bag_offsets"] = F.pad(batch["bag_offsets"], (0, fill), value=len(batch["entries"]))
    padded["time_features"] = F.pad(batch["time_features"], (0, 0, 0, fill))
    padded["age_days"] = F.pad(batch["age_days"], (0, fill))
    segments = batch["segment_ids"]
    padded["segment_ids"] = F.pad(segments, (0, fill),
                                  value=int(segments[-1]) + 1 if len(segments) else 0)
    return padded


def frame_rows(frame: pl.DataFrame) -> list[dict[str, torch.Tensor]]:
    """The rows of a window frame (layout of `ehrmotor.sequences.shards`) as a torch-format
    dataset hands them to `collate_windows`: one tensor per list column and row."""
    columns = {}
    for name, dtype in frame.schema.items():
        if isinstance(dtype, pl.List):
            values = frame[name].list.explode(keep_nulls=False, empty_as_null=False)
            if values.dtype.is_unsigned_integer():  # torch has few unsigned operations
                values = values.cast(pl.Int64)
            columns[name] = torch.from_numpy(values.to_numpy(writable=True)).split(
                frame[name].list.len().to_list())
        elif name in ("first_events", "previous_time"):
            columns[name] = torch.from_numpy(
                frame[name].cast(pl.Int64).to_numpy(writable=True)).unbind()
    return [{name: values[i] for name, values in columns.items()} for i in range(frame.height)]


class WindowCollator:
    """Picklable collate function for DataLoader workers."""

    def __init__(self, labels: bool = False, task_map: torch.Tensor | None = None,
                 bags: BagTable | None = None) -> None:
        self.labels = labels
        self.task_map = task_map
        self.bags = bags

    def __call__(self, rows: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return collate_windows(rows, self.labels, self.task_map, self.bags)
