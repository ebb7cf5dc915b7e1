"""The `finetune` and `predict` commands: argparse builders and handlers (`ehrmotor.cli`
registers them)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ehrmotor.arguments import fraction as _fraction
from ehrmotor.arguments import names as _names
from ehrmotor.arguments import positive as _positive
from ehrmotor.arguments import positive_days as _positive_days

log = logging.getLogger("ehrmotor")


def _freeze(value: str) -> str:
    if value in ("encoder", "none") or value.isdigit():
        return value
    raise argparse.ArgumentTypeError(f"must be encoder, none or a number of blocks, got "
                                     f"{value!r}")


def add_finetune(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "finetune", help="adapt a pretrained model to one task (time-to-event or binary labels)",
        description=(
            "Fine-tune a pretrained bundle on LABELS (a MEDS label file or folder of one task: "
            "boolean_value or time-to-event labels) with Hugging Face Trainer, early-stopping on "
            "a validation part of the label subjects. Writes the fine-tuned bundle to OUT/model; "
            "rerunning resumes from OUT/finetune_output."))
    parser.add_argument("--model", type=Path, required=True, help="pretrained bundle")
    parser.add_argument("--meds", type=Path, required=True, help="MEDS root folder")
    parser.add_argument("--labels", type=Path, required=True, help="label file or folder")
    parser.add_argument("--out", type=Path, required=True, help="output folder (OUT)")
    parser.add_argument("--freeze", type=_freeze, default="none",
                        help="encoder (train the head only), none (everything; default) or N "
                             "(the embedding and the first N blocks stay as pretrained)")
    parser.add_argument("--learning-rate", type=float, default=None,
                        help="default 1e-3 with --freeze encoder, else 1e-4")
    parser.add_argument("--max-steps", type=int, default=-1,
                        help="stop after this many optimizer steps (default: epochs decide)")
    parser.add_argument("--epochs", type=_positive, default=10, help="epochs (default 10)")
    parser.add_argument("--eval-steps", type=_positive, default=50,
                        help="steps between validations and checkpoints (default 50)")
    parser.add_argument("--tokens-per-batch", type=_positive, default=None,
                        help="positions per packed batch (default: max(context, 8192))")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                        help="auto: bf16 autocast where pretrain's rule picks it")
    parser.add_argument("--seed", type=int, default=42, help="seed (default 42)")
    parser.add_argument("--val-fraction", type=_fraction, default=0.1,
                        help="share of label subjects for early stopping (default 0.1)")
    parser.add_argument("--outcome-codes", type=_names, default=None, metavar="CODES",
                        help="comma-separated codes of a time-to-event outcome: its "
                             "pretraining task, if any, starts the head (default: the codes "
                             "`ehrmotor label` recorded in labels.json beside LABELS)")
    parser.add_argument("--restart", action="store_true",
                        help="discard OUT/finetune_output and train from step 0")
    parser.set_defaults(run=_run_finetune)


def _run_finetune(args: argparse.Namespace) -> int:
    from ehrmotor.finetune import FinetuneConfig, finetune

    config = FinetuneConfig(freeze=args.freeze, learning_rate=args.learning_rate,
                            max_steps=args.max_steps, num_train_epochs=float(args.epochs),
                            tokens_per_batch=args.tokens_per_batch, precision=args.precision,
                            seed=args.seed, val_fraction=args.val_fraction,
                            eval_steps=args.eval_steps)
    bundle = finetune(args.model, args.meds, args.labels, args.out, config,
                      outcome_codes=tuple(args.outcome_codes or ()), restart=args.restart)
    log.info("finetune: fine-tuned bundle in %s", bundle)
    return 0


def add_predict(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "predict", help="predictions of a fine-tuned model at label times (parquet)",
        description=("Write one prediction per label of LABELS in the meds-evaluation schema "
                     "(subject_id, prediction_time, boolean_value, predicted_boolean_value, "
                     "predicted_boolean_probability; time-to-event models add survival_<H>d "
                     "per horizon and risk)."))
    parser.add_argument("--model", type=Path, required=True, help="fine-tuned bundle")
    parser.add_argument("--meds", type=Path, required=True, help="MEDS root folder")
    parser.add_argument("--labels", type=Path, required=True, help="label file or folder")
    parser.add_argument("--out", type=Path, required=True, help="parquet file to write")
    parser.add_argument("--horizon-days", type=_positive_days, nargs="+", default=[365.0],
                        help="time-to-event horizons in days (default 365; the first one "
                             "gives the probability)")
    parser.add_argument("--tokens-per-batch", type=_positive, default=None,
                        help="positions per forward pass (default: the context)")
    parser.set_defaults(run=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    from ehrmotor.finetune import predict

    out = predict(args.model, args.meds, args.labels, args.out, args.horizon_days,
                  tokens_per_batch=args.tokens_per_batch)
    log.info("predict: predictions in %s", out)
    return 0
