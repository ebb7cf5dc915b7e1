"""`MotorTrainer`: Hugging Face `Trainer` on token-budget batches of packed windows.

Pretraining (`ehrmotor.pretrain.run`) and fine-tuning (`ehrmotor.finetune.run`) both train with it:
each rank draws its own batches from `TokenBudgetBatchSampler`, the rows are collated by
`WindowCollator` (`ehrmotor.sequences.batching`), and a checkpoint is saved whole or not at all
(`ehrmotor.checkpoints.whole_checkpoint`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import Trainer

from ehrmotor.checkpoints import whole_checkpoint
from ehrmotor.sequences.batching import TokenBudgetBatchSampler, WindowCollator, window_lengths
from ehrmotor.vocabulary.bags import BagTable


class MotorTrainer(Trainer):
    """`Trainer` fed by token-budget batches of packed windows instead of fixed-size batches.
    `bags` expands the items of prepared rows; rows built in memory (fine-tuning) need none."""

    def __init__(self, *args: Any, tokens_per_batch: int, task_map: torch.Tensor,
                 bags: BagTable | None = None, **kwargs: Any):
        self.tokens_per_batch = tokens_per_batch
        self.collator = WindowCollator(labels=True, task_map=task_map, bags=bags)
        self._eval_loader: DataLoader | None = None
        super().__init__(*args, **kwargs)

    def _loader(self, dataset: Any, shuffle: bool) -> DataLoader:
        from accelerate.data_loader import prepare_data_loader

        sampler = TokenBudgetBatchSampler(
            window_lengths(dataset), self.tokens_per_batch, shuffle=shuffle, seed=self.args.seed,
            rank=self.args.process_index, world_size=self.args.world_size,
        )
        workers = self.args.dataloader_num_workers
        # Spawned, not forked: the collate runs polars, whose thread pool does not survive fork.
        # A spawned worker takes seconds to start, so workers persist across epochs.
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=self.collator,
                            num_workers=workers, persistent_workers=workers > 0,
                            multiprocessing_context="spawn" if workers else None)
        # The sampler already gives each rank its own batches, so the loader is wrapped as one
        # process's (no re-sharding); batches go to this rank's device, set_epoch to the sampler.
        return prepare_data_loader(loader, self.accelerator.device, num_processes=1,
                                   process_index=0, put_on_device=True,
                                   non_blocking=self.accelerator.non_blocking)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        # A failed or interrupted save leaves no partial checkpoint-N/ behind.
        folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
        with whole_checkpoint(folder, owner=self.args.should_save):
            super()._save_checkpoint(model, trial)

    def get_train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, shuffle=True)

    def get_eval_dataloader(self, eval_dataset: Any = None) -> DataLoader:
        if eval_dataset is not None:
            return self._loader(eval_dataset, shuffle=False)
        # The same loader at every evaluation, so that its persistent workers start once.
        if self._eval_loader is None:
            self._eval_loader = self._loader(self.eval_dataset, shuffle=False)
        return self._eval_loader
