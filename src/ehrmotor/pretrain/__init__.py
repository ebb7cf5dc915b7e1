"""Stage 2, `ehrmotor pretrain`: train the MOTOR model on the prepared datasets, write the bundle.

`run` (`pretrain`: train, then write `WORK/model/`), `setup` (the prepared inputs and settings,
checked before anything is written), `memory` (whether the model fits the device),
`model_card` (the bundle's README.md) and `export` (`--export-checkpoint`: a bundle from a
checkpoint while training goes on). Shared with fine-tuning: `ehrmotor.trainer.MotorTrainer` and
`ehrmotor.checkpoints` (resuming). Nothing is imported here, so the command line reads its options
without importing torch.
"""
