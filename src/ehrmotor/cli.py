"""The `ehrmotor` command line: one subcommand per pipeline stage.

Errors in the user's input or environment (an `EhrmotorError`, a full disk, a file size limit, a
read-only or forbidden path) end the command with a one-line message on stderr and exit status 2;
`--debug` (or EHRMOTOR_DEBUG=1) shows their traceback. Any other exception is a bug in ehrmotor and
keeps its traceback.

SIGINT (Ctrl-C) and SIGTERM end every command with one line, "ehrmotor CMD: interrupted; ...",
and exit status 130 or 143, after the cleanup an error gets (workers stopped, lock released,
temporaries and partial checkpoints removed). An --out inside an input of the command is
refused before any work.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

from ehrmotor import __version__
from ehrmotor.arguments import at_least_two as _at_least_two
from ehrmotor.arguments import fraction as _fraction
from ehrmotor.arguments import non_negative as _non_negative
from ehrmotor.arguments import positive as _positive
from ehrmotor.convert.commands import add_convert_femr
from ehrmotor.errors import EhrmotorError, InputError, OutputError, environment_message
from ehrmotor.evaluate.commands import PlantedOutcomes, add_evaluate, add_label
from ehrmotor.finetune.commands import add_finetune, add_predict
from ehrmotor.pretrain.export import add_export_options, run_export
from ehrmotor.processes import Terminated, install_interrupt_handlers, restore_handlers

log = logging.getLogger("ehrmotor")
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM


def _add_synth(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "synth",
        help="write the embedded synthetic EHR (MEDS 0.4 + Athena vocabulary)",
        description=(
            "Generate a synthetic MEDS 0.4 dataset with a real code hierarchy and planted "
            "time-to-event structure, plus an Athena-format vocabulary in OUT/athena/. "
            "Same seed and subject count give byte-identical files, whatever --workers."
        ),
    )
    parser.add_argument("--subjects", type=_positive, required=True,
                        help="number of subjects to generate")
    parser.add_argument("--seed", type=_non_negative, default=0, help="random seed (default 0)")
    parser.add_argument("--out", type=Path, required=True,
                        help="output folder (MEDS root; the vocabulary goes to OUT/athena)")
    parser.add_argument("--shards", type=_positive, default=None,
                        help="number of shards (default: one per 10,000 subjects)")
    parser.add_argument("--workers", type=_positive, default=None,
                        help="worker processes (default: number of cores)")
    parser.add_argument("--force", action="store_true",
                        help="replace OUT if it is a dataset written by `ehrmotor synth` (any "
                             "other non-empty folder is never replaced)")
    parser.set_defaults(run=_run_synth)


def _run_synth(args: argparse.Namespace) -> int:
    from ehrmotor.synthetic import generate

    started = time.perf_counter()
    generate(args.out, args.subjects, seed=args.seed, num_shards=args.shards,
             workers=args.workers, force=args.force)
    log.info("synth: %d subjects written to %s in %.1f s", args.subjects, args.out,
             time.perf_counter() - started)
    return 0


def _planted_outcomes() -> PlantedOutcomes:
    """The generator's planted outcomes, which the command line hands `label` and `evaluate`."""
    from ehrmotor.synthetic import outcomes

    return PlantedOutcomes(defaults=outcomes.DEFAULT_OUTCOMES, codes=outcomes.outcome_codes,
                           written_by_synth=outcomes.written_by_synth,
                           oracle=outcomes.synthetic_oracle)


def _add_validate(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "validate",
        help="check a MEDS dataset (layout, schema, order, sharding, code metadata)",
        description=(
            "Check that DIR is a MEDS 0.4 (or 0.3-style) dataset that every ehrmotor step can "
            "read. Each problem is printed as one line naming the file, column and first "
            "offending row or subject. Exit status 2 when the dataset is invalid; nothing is "
            "written."
        ),
    )
    parser.add_argument("meds_dir", type=Path, metavar="DIR", help="MEDS root folder")
    parser.add_argument("--no-code-check", action="store_true",
                        help="skip the check that codes.parquet covers every code used")
    parser.set_defaults(run=_run_validate)


def _run_validate(args: argparse.Namespace) -> int:
    from ehrmotor.meds import validate_dataset

    report = validate_dataset(args.meds_dir, check_codes=not args.no_code_check)
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for error in report.errors:
        print(f"error: {error}", file=sys.stderr)
    print(report.summary())
    return 0 if report.ok else EXIT_BAD_INPUT


def _add_prepare(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "prepare",
        help="build ontology, split, tokenizer, MOTOR task and tokenised datasets",
        description=(
            "Read a MEDS dataset (and an Athena vocabulary) and build, idempotently, "
            "WORK/pretraining_files/: ontology/, split.csv, tokenizer/dictionary.msgpack, "
            "motor_task.json, train_batches/ and val_batches/. A finished step is loaded, not "
            "rebuilt; a step whose inputs or settings changed stops with a message."
        ),
    )
    parser.add_argument("--meds", type=Path, required=True, help="MEDS root folder")
    parser.add_argument("--athena", type=Path, default=None,
                        help="Athena vocabulary folder (CONCEPT.csv, CONCEPT_RELATIONSHIP.csv, "
                             "CONCEPT_ANCESTOR.csv); without it the ontology comes from "
                             "metadata/codes.parquet alone")
    parser.add_argument("--out", type=Path, required=True, help="work folder (WORK)")
    parser.add_argument("--config", type=Path, default=None,
                        help="TOML file whose [prepare] table overrides the defaults")
    parser.add_argument("--workers", type=_positive, default=None,
                        help="worker processes across shards (default: number of cores); "
                             "with --executor ray, the CPUs of a local Ray it starts")
    parser.add_argument("--executor", choices=["local", "ray"], default="local",
                        help="where the per-shard work runs: local worker processes (default) "
                             "or Ray tasks (pip install ehrmotor[ray]) on a running cluster, "
                             "else on a local Ray started for the run; same artifacts")
    parser.add_argument("--ray-address", default=None, metavar="ADDR",
                        help="Ray cluster to run on with --executor ray (default: the one "
                             "RAY_ADDRESS names or `ray start` runs here, else a local Ray); "
                             "every node must see --meds, --athena and --out at the same paths")
    parser.add_argument("--force", action="store_true",
                        help="rebuild every step even when its artifact is current")
    parser.add_argument("--exclude-splits", nargs="*", default=None, metavar="SPLIT",
                        help="MEDS splits never used for pretraining (default: held_out)")
    held_out = parser.add_mutually_exclusive_group()
    held_out.add_argument("--held-out-fraction", type=_fraction, default=None, metavar="F",
                          help="for data without metadata/subject_splits.parquet: hold out a "
                               "hashed share F of the subjects (written to "
                               "WORK/subject_splits.parquet, which evaluation then uses)")
    held_out.add_argument("--no-held-out", action="store_true", default=None,
                          help="for data without metadata/subject_splits.parquet: pretrain on "
                               "every subject (evaluate then has none to evaluate on)")
    parser.add_argument("--vocab-size", type=_positive, default=None,
                        help="vocabulary entries to keep (default 16384)")
    parser.add_argument("--candidate-tasks", type=_positive, default=None,
                        help="candidate MOTOR tasks: the first codes of the vocabulary, of which "
                             "those with enough train events are kept (default 8192)")
    parser.add_argument("--max-window", type=_positive, default=None,
                        help="positions per training window (default 16384)")
    parser.set_defaults(run=_run_prepare)


def _run_prepare(args: argparse.Namespace) -> int:
    from ehrmotor.config import PrepareConfig, load_config
    from ehrmotor.prepare import prepare

    if args.exclude_splits == []:  # argparse takes a bare --exclude-splits as "exclude none"
        raise InputError("--exclude-splits needs split names (e.g. held_out); to pretrain on "
                         "every subject give --no-held-out")
    if args.exclude_splits and args.no_held_out:
        raise InputError("--exclude-splits and --no-held-out exclude each other")
    overrides = {
        "vocab_size": args.vocab_size, "candidate_tasks": args.candidate_tasks,
        "max_window": args.max_window,
        "exclude_splits": tuple(args.exclude_splits) if args.exclude_splits is not None else None,
        "held_out_fraction": args.held_out_fraction, "no_held_out": args.no_held_out,
    }
    config = load_config(PrepareConfig, args.config, "prepare", overrides)
    if args.ray_address is not None and args.executor != "ray":
        raise InputError("--ray-address needs --executor ray")
    summary = prepare(args.meds, args.out, athena_dir=args.athena, config=config,
                      workers=args.workers, force=args.force, executor=args.executor,
                      ray_address=args.ray_address)
    for line in summary.lines():
        log.info("prepare: %s", line)
    return 0


def _add_pretrain(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "pretrain",
        help="train the MOTOR transformer and write the model bundle to WORK/model",
        description=(
            "Train a MOTOR model from WORK/pretraining_files (see `ehrmotor prepare`) with "
            "Hugging Face Trainer: checkpoints and TensorBoard logs in WORK/pretraining_output, "
            "early stopping on val loss, best model reloaded at the end. Writes WORK/model/ "
            "(config.json, model.safetensors, dictionary.msgpack, motor_task.json, ontology/). "
            "Works unchanged under torchrun and accelerate launch."
        ),
    )
    parser.add_argument("--work", type=Path, required=True, help="work folder of `prepare`")
    parser.add_argument("--config", type=Path, default=None,
                        help="TOML file whose [pretrain] table overrides the defaults")
    parser.add_argument("--preset", choices=["base", "small", "tiny"], default=None,
                        help="model size (default base: 12 layers, 768 hidden)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="stop after this many optimizer steps (default: epochs decide)")
    parser.add_argument("--tokens-per-batch", type=_positive, default=None,
                        help="positions per packed batch (default 16384)")
    parser.add_argument("--restart", action="store_true",
                        help="discard WORK/pretraining_output (checkpoints, logs) and train from "
                             "step 0 (default: continue from its last complete checkpoint when "
                             "its settings match)")
    parser.add_argument("--force", action="store_true",
                        help="train again even when WORK/model is complete (implies --restart)")
    parser.add_argument("--keep-output", action="store_true",
                        help="keep WORK/pretraining_output (checkpoints, logs) after the bundle")
    add_export_options(parser)  # --export-checkpoint, --out
    parser.set_defaults(run=_run_pretrain)


def _run_pretrain(args: argparse.Namespace) -> int:
    from ehrmotor.config import PretrainConfig, load_config
    from ehrmotor.pretrain.run import pretrain

    if args.export_checkpoint is not None or args.out is not None:
        return run_export(args)
    overrides = {"preset": args.preset, "max_steps": args.max_steps,
                 "tokens_per_batch": args.tokens_per_batch}
    config = load_config(PretrainConfig, args.config, "pretrain", overrides)
    bundle = pretrain(args.work, config, restart=args.restart, force=args.force,
                      keep_output=args.keep_output)
    log.info("pretrain: model bundle in %s", bundle)
    return 0


def _add_embed(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "embed",
        help="write MOTOR embeddings of subjects at label times to a parquet file",
        description=(
            "Compute the representation of each label (subject_id, prediction_time) from the "
            "data at or before its prediction_time, with a model bundle from `pretrain`. Writes "
            "subject_id, prediction_time and embedding (fixed-size list of float32)."
        ),
    )
    parser.add_argument("--model", type=Path, required=True, help="model bundle (WORK/model)")
    parser.add_argument("--meds", type=Path, required=True,
                        help="MEDS root folder or meds_reader database")
    parser.add_argument("--labels", type=Path, required=True,
                        help="MEDS label parquet file or folder (subject_id, prediction_time)")
    parser.add_argument("--out", type=Path, required=True,
                        help="output parquet file; an existing parquet file there is replaced, "
                             "anything else is refused")
    parser.add_argument("--tokens-per-batch", type=_at_least_two, default=None,
                        help="positions per forward pass (default: the model's training "
                             "context; must be at least that)")
    parser.add_argument("--workers", type=_positive, default=1,
                        help="processes reading MEDS shards (default 1)")
    parser.add_argument("--device", default=None,
                        help="torch device (default: cuda when available, else cpu)")
    parser.set_defaults(run=_run_embed)


def _run_embed(args: argparse.Namespace) -> int:
    from ehrmotor.artifacts import check_parquet_output
    from ehrmotor.embed import compute_features, write_embeddings

    check_parquet_output(args.out)
    result = compute_features(args.meds, args.model, args.labels, num_proc=args.workers,
                              tokens_per_batch=args.tokens_per_batch, device=args.device)
    check_parquet_output(args.out)  # again: it may have appeared while we computed
    write_embeddings(result, args.out)
    log.info("embed: %d embeddings written to %s", len(result["subject_ids"]), args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ehrmotor",
        description=(
            "Pretrain MOTOR time-to-event foundation models on MEDS EHR data and extract "
            "patient embeddings. Run `ehrmotor COMMAND --help` for each command's options."
        ),
    )
    parser.add_argument("--version", action="version", version=f"ehrmotor {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of errors (also: EHRMOTOR_DEBUG=1)")
    commands = parser.add_subparsers(title="commands", dest="command", required=True)
    for add in ADD_COMMANDS:
        add(commands)
    for subparser in commands.choices.values():
        subparser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                               help="show the traceback of errors (also: EHRMOTOR_DEBUG=1)")
    return parser


ADD_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_synth, _add_validate, _add_prepare, _add_pretrain, _add_embed,
    partial(add_label, planted=_planted_outcomes), partial(add_evaluate, planted=_planted_outcomes),
    add_finetune, add_predict, add_convert_femr]


RESUMING = ("prepare", "pretrain", "finetune")  # commands that continue from finished steps
# (input options, the output option): an --out inside an input is refused.
INPUTS = {"prepare": ("meds", "athena"), "label": ("meds",), "evaluate": ("meds", "labels"),
          "embed": ("meds", "labels"), "finetune": ("meds", "labels", "model"),
          "predict": ("meds", "labels", "model"), "convert-femr": ("model", "athena")}
REPLACES_OUT = ("label",)  # writes OUT whole: an input inside it is refused too


def _check_outside_inputs(args: argparse.Namespace) -> None:
    """OutputError when --out is (inside) an input of the command: the rerun would read what the
    first run wrote, or the command would replace its own input."""
    from ehrmotor.artifacts import inside

    out = getattr(args, "out", None)
    if out is None or args.command not in INPUTS:
        return
    for option in INPUTS[args.command]:
        value = getattr(args, option, None)
        for path in value if isinstance(value, list) else [value]:
            if path is None:
                continue
            where = "is" if Path(out).resolve() == Path(path).resolve() else "is inside"
            if inside(out, path):
                raise OutputError(f"--out {out}: {where} --{option} {path}; ehrmotor never "
                                  "writes into its input (choose an --out outside it)")
            if args.command in REPLACES_OUT and inside(path, out):
                raise OutputError(f"--{option} {path}: is inside --out {out}, which this "
                                  "command replaces whole (choose an --out outside it)")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        # accelerate's per-evaluation notes (e.g. "The used dataset had no length") are noise here
        logging.getLogger("accelerate").setLevel(logging.WARNING)
    debug = args.debug or os.environ.get("EHRMOTOR_DEBUG", "") not in ("", "0")
    previous = install_interrupt_handlers()
    try:
        _check_outside_inputs(args)
        return int(args.run(args))
    except EhrmotorError as error:
        if debug:
            raise
        return _fail(args.command, str(error))
    except KeyboardInterrupt as interrupt:
        then = "resumes" if args.command in RESUMING else "starts it again"
        print(f"ehrmotor {args.command}: interrupted; rerunning the same command {then}",
              file=sys.stderr)
        return EXIT_TERMINATED if isinstance(interrupt, Terminated) else EXIT_INTERRUPTED
    except Exception as error:
        message = environment_message(error)  # full disk, size limit, read-only path
        if message is None or debug:
            raise
        return _fail(args.command, message)
    finally:
        restore_handlers(previous)


def _fail(command: str, message: str) -> int:
    lines = message.strip().splitlines() or ["unknown error"]
    more = f" (and {len(lines) - 1} more problems)" if len(lines) > 1 else ""
    print(f"ehrmotor {command}: error: {lines[0]}{more}", file=sys.stderr)
    return EXIT_BAD_INPUT
