"""Token-budget packing, the per-epoch / per-rank batch sampler, cutting windows (training and
embedding) and collating them."""

from __future__ import annotations

import datasets
import numpy as np
import polars as pl
import pytest
import torch
from prepare_builders import positions_frame

from ehrmotor.model import LABELS
from ehrmotor.sequences.batching import (
    US_PER_DAY,
    TokenBudgetBatchSampler,
    collate_windows,
    frame_rows,
    pack,
    pad_batch,
)
from ehrmotor.sequences.windows import embedding_windows, training_windows, window_sequences

BUDGET = 100


def varied_lengths(count: int = 97, seed: int = 5) -> np.ndarray:
    """Window lengths from 1 to the full budget, so batches hold one to many windows."""
    lengths = np.random.default_rng(seed).integers(1, BUDGET + 1, size=count)
    lengths[:3] = [BUDGET, 1, BUDGET]  # a window exactly at the budget fits alone
    return lengths


def epoch_batches(sampler: TokenBudgetBatchSampler, epoch: int) -> list[list[int]]:
    sampler.set_epoch(epoch)
    return [list(batch) for batch in sampler]


def flat(batches: list[list[int]]) -> list[int]:
    return [index for batch in batches for index in batch]


def test_pack_keeps_every_batch_within_the_budget_and_every_window_once_in_order() -> None:
    lengths = varied_lengths()
    for seed in range(5):
        order = np.random.default_rng(seed).permutation(len(lengths))
        batches = pack(lengths, order, BUDGET)
        assert all(lengths[batch].sum() <= BUDGET for batch in batches)
        assert flat(batches) == order.tolist()
        # Greedy: a batch is closed only when the next window would not fit.
        for batch, following in zip(batches, batches[1:], strict=False):
            assert lengths[batch].sum() + lengths[following[0]] > BUDGET


def test_sampler_batches_stay_within_the_token_budget_on_every_epoch_and_rank() -> None:
    lengths = varied_lengths()
    for world_size in (1, 2, 3):
        for rank in range(world_size):
            sampler = TokenBudgetBatchSampler(lengths, BUDGET, seed=3, rank=rank,
                                              world_size=world_size)
            for epoch in range(6):
                batches = epoch_batches(sampler, epoch)
                assert batches, (world_size, rank, epoch)
                assert max(lengths[batch].sum() for batch in batches) <= BUDGET
                assert len(batches) == len(sampler)  # what Trainer counts steps with


def test_every_window_appears_exactly_once_per_epoch_on_a_single_rank() -> None:
    lengths = varied_lengths()
    sampler = TokenBudgetBatchSampler(lengths, BUDGET, seed=11)
    assert sorted(flat(epoch_batches(sampler, 0))) == list(range(len(lengths)))
    # Windows of one length pack into the same number of batches whatever the order, so every
    # epoch is a full pass over the data.
    equal = np.full(60, 30)
    sampler = TokenBudgetBatchSampler(equal, BUDGET, seed=11)
    for epoch in range(5):
        assert sorted(flat(epoch_batches(sampler, epoch))) == list(range(len(equal))), epoch


def test_a_window_longer_than_the_budget_is_a_clear_value_error() -> None:
    lengths = np.array([10, BUDGET + 1, 20])
    with pytest.raises(ValueError, match=r"101 positions, more than the token budget of 100"):
        pack(lengths, np.arange(3), BUDGET)
    with pytest.raises(ValueError, match="raise tokens_per_batch"):
        list(TokenBudgetBatchSampler(lengths, BUDGET))


def test_epochs_reshuffle_while_the_same_seed_and_epoch_repeat_the_same_batches() -> None:
    lengths = varied_lengths()
    sampler = TokenBudgetBatchSampler(lengths, BUDGET, seed=7)
    first, second = epoch_batches(sampler, 0), epoch_batches(sampler, 1)
    assert first != second
    assert epoch_batches(sampler, 0) == first  # going back to an epoch replays it
    again = TokenBudgetBatchSampler(lengths, BUDGET, seed=7)
    assert epoch_batches(again, 1) == second
    assert epoch_batches(again, 0) == first
    other_seed = TokenBudgetBatchSampler(lengths, BUDGET, seed=8)
    assert epoch_batches(other_seed, 0) != first


def test_two_ranks_get_disjoint_equally_many_batches_covering_all_but_the_remainder() -> None:
    for lengths in (varied_lengths(), varied_lengths(40, seed=1), np.full(61, 30)):
        samplers = [TokenBudgetBatchSampler(lengths, BUDGET, seed=2, rank=rank, world_size=2)
                    for rank in (0, 1)]
        single = TokenBudgetBatchSampler(lengths, BUDGET, seed=2)
        for epoch in range(8):
            rank0, rank1 = (epoch_batches(sampler, epoch) for sampler in samplers)
            assert len(rank0) == len(rank1) == len(single) // 2
            seen0, seen1 = set(flat(rank0)), set(flat(rank1))
            assert not seen0 & seen1, f"epoch {epoch}: ranks share windows {seen0 & seen1}"
            missing = sorted(set(range(len(lengths))) - seen0 - seen1)
            if epoch == 0 or len(set(lengths)) == 1:
                # Only the last packed batch is left over, when the batch count is odd.
                assert lengths[missing].sum() <= BUDGET, (epoch, missing)
                assert bool(missing) == (len(single) % 2 == 1)
                assert len(seen0) == len(flat(rank0)) and len(seen1) == len(flat(rank1))


def test_unshuffled_batches_follow_the_window_order_on_every_epoch() -> None:
    lengths = varied_lengths()
    sampler = TokenBudgetBatchSampler(lengths, BUDGET, shuffle=False, seed=1)
    expected = pack(lengths, np.arange(len(lengths)), BUDGET)
    for epoch in range(3):
        assert epoch_batches(sampler, epoch) == expected
    assert epoch_batches(TokenBudgetBatchSampler(lengths, BUDGET, shuffle=False, seed=9),
                         0) == expected


def window(bag_sizes: list[int], entries: list[int], age_days: list[float], points: list[int],
           censor_days: list[float], occurrences: list[tuple[int, float]]
           ) -> dict[str, torch.Tensor]:
    """A prepared row in torch format (layout of `ehrmotor.sequences.shards`); occurrences: (task,
    age in days), sorted by task and time. Position 0 is at age 0."""
    length = len(bag_sizes)
    ages = torch.tensor(age_days)
    tasks, task_ages = zip(*occurrences, strict=True) if occurrences else ((), ())
    return {
        "subject_id": torch.tensor(1), "window": torch.tensor(0),
        "bag_sizes": torch.tensor(bag_sizes, dtype=torch.int32),
        "entries": torch.tensor(entries, dtype=torch.int64),
        "weights": torch.linspace(0.1, 1.0, len(entries)),
        "times": torch.tensor([round(a * US_PER_DAY) for a in age_days], dtype=torch.int64),
        "age_days": ages, "age": ages / 1000, "log_age": torch.log1p(ages),
        "log_delta": torch.arange(length, dtype=torch.float32) / 10,
        "points": torch.tensor(points, dtype=torch.int32),
        "censor_days": torch.tensor(censor_days),
        "task_ids": torch.tensor(tasks, dtype=torch.int32),
        "task_times": torch.tensor([round(a * US_PER_DAY) for a in task_ages], dtype=torch.int64),
    }


@pytest.fixture
def two_windows() -> list[dict[str, torch.Tensor]]:
    # Points at ages 10 and 20; task 1 at 12 and 25, task 2 at 20 (a point's own time: not after
    # it), task 3 at 15 and 100.
    first = window(bag_sizes=[0, 2, 1], entries=[5, 6, 7], age_days=[0.0, 10.0, 20.0],
                   points=[1, 2], censor_days=[100.0, 90.0],
                   occurrences=[(1, 12.0), (1, 25.0), (2, 20.0), (3, 15.0), (3, 100.0)])
    second = window(bag_sizes=[1, 3], entries=[8, 9, 10, 11], age_days=[0.0, 400.0],
                    points=[1], censor_days=[50.0], occurrences=[(1, 403.0)])
    return [first, second]


def label_triples(batch: dict[str, torch.Tensor]) -> list[tuple[int, int, float]]:
    """The batch's (point, task, days) labels, sorted (their order is free)."""
    return sorted(zip(batch["label_point"].tolist(), batch["label_task"].tolist(),
                      batch["label_days"].tolist(), strict=True))


def test_collate_packs_bags_segments_and_points_with_each_windows_offset(
        two_windows: list[dict[str, torch.Tensor]]) -> None:
    batch = collate_windows(two_windows, labels=True)
    assert batch["entries"].tolist() == [5, 6, 7, 8, 9, 10, 11]
    assert batch["entries"].dtype == torch.long
    torch.testing.assert_close(batch["weights"],
                               torch.cat([two_windows[0]["weights"], two_windows[1]["weights"]]))
    # Position 0 of the first window has an empty bag: it starts where position 1 starts.
    assert batch["bag_offsets"].tolist() == [0, 0, 2, 3, 4]
    assert batch["segment_ids"].tolist() == [0, 0, 0, 1, 1]
    assert batch["point_indices"].tolist() == [1, 2, 3 + 1]
    assert batch["age_days"].tolist() == [0.0, 10.0, 20.0, 0.0, 400.0]
    expected_features = torch.stack([
        torch.cat([row[name] for row in two_windows]) for name in ("age", "log_age", "log_delta")
    ], dim=1)
    torch.testing.assert_close(batch["time_features"], expected_features)
    assert batch["time_features"].shape == (5, 3)


def test_collate_derives_each_points_next_occurrence_per_task(
        two_windows: list[dict[str, torch.Tensor]]) -> None:
    batch = collate_windows(two_windows, labels=True)
    assert batch["censor_days"].tolist() == [100.0, 90.0, 50.0]
    assert label_triples(batch) == [
        (0, 1, 2.0), (0, 2, 10.0), (0, 3, 5.0),
        (1, 1, 5.0), (1, 3, 80.0),
        (2, 1, 3.0),  # the second window's point 0 is the batch's point 2
    ]
    assert batch["label_point"].dtype == batch["label_task"].dtype == torch.long
    assert batch["label_days"].dtype == torch.float32


def test_collate_of_a_window_without_occurrences_censors_every_task(
        two_windows: list[dict[str, torch.Tensor]]) -> None:
    row = window(bag_sizes=[0, 1], entries=[3], age_days=[0.0, 2.0], points=[1],
                 censor_days=[12.5], occurrences=[])
    alone = collate_windows([row], labels=True)
    assert alone["bag_offsets"].tolist() == [0, 0]
    assert alone["censor_days"].tolist() == [12.5] and label_triples(alone) == []
    beside = collate_windows([row, *two_windows], labels=True)
    assert [(p - 1, t, d) for p, t, d in label_triples(beside)] == label_triples(
        collate_windows(two_windows, labels=True))


def test_collate_maps_candidate_tasks_to_model_tasks_and_drops_the_others(
        two_windows: list[dict[str, torch.Tensor]]) -> None:
    # Candidates 0..3: 1 dropped, 2 -> 0, 3 -> 1 (0 never occurs).
    batch = collate_windows(two_windows, labels=True, task_map=torch.tensor([-1, -1, 0, 1]))
    assert label_triples(batch) == [(0, 0, 10.0), (0, 1, 5.0), (1, 1, 80.0)]


@pytest.mark.parametrize("seed", range(5))
def test_collated_labels_equal_a_brute_force_next_occurrence(seed: int) -> None:
    """Random windows, each with every occurrence of its tasks (also before the points and at a
    point's own time): each point's label of a task is its first occurrence strictly after the
    point, in exact days."""
    rng = np.random.default_rng(seed)
    rows, expected, first_point = [], [], 0
    for _ in range(rng.integers(1, 6)):
        length = int(rng.integers(2, 30))
        ages = np.sort(rng.choice(np.arange(1, 5000), length - 1, replace=False)) / 7
        ages = [0.0, *ages.tolist()]
        points = sorted(rng.choice(np.arange(1, length), rng.integers(1, length),
                                   replace=False).tolist())
        occurrences = sorted({(int(rng.integers(0, 4)), float(rng.choice(ages[1:]) + shift))
                              for shift in (0.0, 0.5, -0.25) for _ in range(rng.integers(0, 8))})
        censor = [900.0] * len(points)
        rows.append(window([1] * length, list(range(length)), ages, points, censor, occurrences))
        for i, position in enumerate(points):
            at = round(ages[position] * US_PER_DAY)
            for task in range(4):
                later = [round(a * US_PER_DAY) for k, a in occurrences
                         if k == task and round(a * US_PER_DAY) > at]
                if later:
                    days = np.float32((min(later) - at) / US_PER_DAY)
                    expected.append((first_point + i, task, float(days)))
        first_point += len(points)
    assert label_triples(collate_windows(rows, labels=True)) == sorted(expected)


def test_collate_without_labels_carries_the_points_and_no_labels(
        two_windows: list[dict[str, torch.Tensor]]) -> None:
    with_labels = collate_windows(two_windows, labels=True)
    embedding = collate_windows(two_windows)
    assert set(with_labels) - set(embedding) == set(LABELS)
    for key, value in embedding.items():
        torch.testing.assert_close(value, with_labels[key])


def test_pad_batch_adds_empty_positions_in_a_segment_of_their_own(
        two_windows: list[dict[str, torch.Tensor]]) -> None:
    batch = collate_windows(two_windows)
    padded = pad_batch(batch, 8)
    assert padded["segment_ids"].tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    assert padded["bag_offsets"].tolist() == [0, 0, 2, 3, 4, 7, 7, 7]  # empty bags at the end
    assert padded["time_features"].shape == (8, 3) and padded["age_days"].shape == (8,)
    assert padded["point_indices"].tolist() == batch["point_indices"].tolist()
    assert padded["entries"].tolist() == batch["entries"].tolist()
    with pytest.raises(ValueError, match="5 positions cannot be padded to 4"):
        pad_batch(batch, 4)


def test_training_windows_are_consecutive_and_keep_every_later_position_once() -> None:
    positions = positions_frame({1: 8, 2: 1, 3: 4})  # subject 2 has position 0 only
    windows = training_windows(positions, max_window=4)
    assert windows.rows() == [(1, 0, 1, 3), (1, 1, 4, 6), (1, 2, 7, 7), (3, 0, 1, 3)]
    sequences = window_sequences(positions, windows)
    assert sequences["entries"].to_list() == [[0, 1, 2, 3], [0, 4, 5, 6], [0, 7], [0, 1, 2, 3]]
    assert sequences["bag_sizes"].to_list()[2] == [1, 1]


def test_embedding_window_ends_at_the_read_position_with_at_most_context_positions() -> None:
    positions = positions_frame({1: 12})
    reads = pl.DataFrame({"subject_id": [1, 1, 1, 1, 1], "position": [0, 2, 3, 9, 9],
                          "label": [0, 1, 2, 3, 4]})
    windows = embedding_windows(reads, context=4)
    # Positions 0..3 share the window starting at 1 (ending at the latest read); 9 reads 7..9.
    assert windows.rows() == [(1, 0, 1, 3, [0, 2, 3], [0, 1, 2]), (1, 1, 7, 9, [3, 3], [3, 4])]
    sequences = window_sequences(positions, windows)
    assert sequences["entries"].to_list() == [[0, 1, 2, 3], [0, 7, 8, 9]]
    # A point of a subject's first training window reads the same positions either way.
    training = window_sequences(positions, training_windows(positions, max_window=4))
    assert sequences.row(0) == training.row(0)


def test_frame_rows_collate_as_the_rows_of_a_torch_format_dataset() -> None:
    positions = positions_frame({1: 8, 3: 4})
    rows = window_sequences(positions, training_windows(positions, max_window=4)).with_columns(
        points=pl.Series([[1, 3], [2], [1], [0, 3]], dtype=pl.List(pl.Int32)))
    dataset = datasets.Dataset(rows.to_arrow()).with_format("torch")
    from_dataset = collate_windows([dataset[i] for i in range(len(dataset))])
    from_frame = collate_windows(frame_rows(rows))
    assert from_frame.keys() == from_dataset.keys()
    for key, value in from_frame.items():
        assert value.dtype == from_dataset[key].dtype, key
        torch.testing.assert_close(value, from_dataset[key])
