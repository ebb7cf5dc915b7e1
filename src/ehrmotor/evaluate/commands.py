"""The `ehrmotor label` and `ehrmotor evaluate` commands: their options and what they run.

`ehrmotor.cli` registers them (`add_label`, `add_evaluate`); the work is done by
`landmarks.write_landmark_labels` and `run.evaluate`, imported when a command runs so that the
command line starts without torch. The planted outcomes' codes and true hazards come from the
generator: the command line hands them in (`PlantedOutcomes`, loaded when a command runs), so
that evaluation knows nothing of the generator.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from ehrmotor.arguments import days as _days
from ehrmotor.arguments import fraction as _fraction
from ehrmotor.arguments import k_values as _k_values
from ehrmotor.arguments import names as _names
from ehrmotor.arguments import non_negative as _non_negative
from ehrmotor.arguments import positive as _positive
from ehrmotor.arguments import positive_days as _positive_days

if TYPE_CHECKING:
    from ehrmotor.evaluate.landmarks import LandmarkSettings
    from ehrmotor.evaluate.run import Oracle

log = logging.getLogger("ehrmotor")
T = TypeVar("T")


@dataclass(frozen=True)
class PlantedOutcomes:
    """The outcomes `ehrmotor synth` plants, as `label` and `evaluate` take them."""

    defaults: tuple[str, ...]  # the outcomes evaluated without --outcomes
    codes: Callable[[Sequence[str]], dict[str, list[str]]]  # name -> codes (else the name)
    written_by_synth: Callable[[Path], bool]  # whether `ehrmotor synth` wrote a MEDS folder
    oracle: Callable[[Path], Oracle | None]  # the true hazards of the data synth wrote


Planted = Callable[[], PlantedOutcomes]  # called when a command runs


def _flatten(groups: Sequence[Sequence[T]] | None) -> list[T] | None:
    """Values given as `--opt a,b c` (nargs="+" of comma lists), in order."""
    return None if groups is None else [item for group in groups for item in group]


def _add_landmark_options(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--outcomes", nargs="+", type=_names, default=None, metavar="OUTCOME",
                        help=f"{what}: planted outcomes of `ehrmotor synth` (default: "
                             "heart_failure,ckd,diabetes,copd,death) or any code of the data, "
                             "such as ICD10CM/I50 (that code and the codes under it), "
                             "MEDS_DEATH or HOSPITAL_ADMISSION//ICU; comma- or space-separated")
    parser.add_argument("--landmarks", type=_positive, default=4,
                        help="prediction times drawn per subject among its landmark days "
                             "(default 4)")
    parser.add_argument("--landmark-codes", type=_names, default=None, metavar="PREFIXES",
                        help="landmark days are days with an event whose code starts with one "
                             "of these, comma-separated, e.g. HOSPITAL_ADMISSION// or Visit/ "
                             "(default: every day with an event); the prediction time is that "
                             "day's last such event")
    parser.add_argument("--min-gap-days", type=_days, default=180.0,
                        help="least days between two prediction times of a subject "
                             "(default 180)")
    parser.add_argument("--subjects", type=_names, default=None, metavar="SPLITS",
                        help="evaluation splits of metadata/subject_splits.parquet, "
                             "comma-separated (default held_out,tuning; never train)")
    parser.add_argument("--splits-file", type=Path, default=None, metavar="PATH",
                        help="MEDS subject_splits.parquet naming the evaluation subjects "
                             "(default: MEDS/metadata/subject_splits.parquet; for evaluate, "
                             "first the model bundle's, when prepare wrote one)")
    parser.add_argument("--seed", type=_non_negative, default=0, help="random seed (default 0)")


def _landmark_settings(args: argparse.Namespace) -> tuple[LandmarkSettings, tuple[str, ...]]:
    from ehrmotor.evaluate.landmarks import LandmarkSettings
    from ehrmotor.evaluate.tasks import DEFAULT_SPLITS

    settings = LandmarkSettings(landmarks=args.landmarks, min_gap_days=args.min_gap_days,
                                seed=args.seed,
                                landmark_codes=tuple(args.landmark_codes or ()))
    return settings, tuple(args.subjects or DEFAULT_SPLITS)


def _outcome_names(args: argparse.Namespace, default: Sequence[str],
                   written_by_synth: Callable[[Path], bool]) -> list[str]:
    """--outcomes, else `default` (the planted outcomes), which only data `ehrmotor synth` wrote
    has: other data without --outcomes is an InputError saying what to give."""
    names: list[str] = _flatten(args.outcomes) or []
    if names or not default:
        return names
    if not written_by_synth(args.meds):
        from ehrmotor.errors import InputError

        also = " or --labels FILE" if args.command == "evaluate" else ""
        raise InputError(f"{args.meds}: not written by `ehrmotor synth`, so it has no planted "
                         "outcomes to default to; give --outcomes with codes of the data (e.g. "
                         f"MEDS_DEATH, HOSPITAL_ADMISSION//){also}")
    return list(default)


def add_label(commands: argparse._SubParsersAction, planted: Planted) -> None:
    parser = commands.add_parser(
        "label",
        help="write time-to-event labels of outcomes at landmark times (MEDS label files)",
        description=(
            "For each evaluation subject, draw up to --landmarks prediction times among its "
            "landmark days (days with an event of --landmark-codes, default any event; at the "
            "day's last such event; at least --min-gap-days apart, after its birth day, before "
            "its last event); for each outcome, drop those where the outcome already happened "
            "and label the others with the outcome's next occurrence (event_time) or the "
            "subject's last event (censor_time). Writes OUT/<outcome>.parquet and "
            "OUT/labels.json; OUT is replaced only when `ehrmotor label` wrote it. An outcome "
            "without labels stops the command (exit 2) with the reason."
        ),
    )
    parser.add_argument("--meds", type=Path, required=True, help="MEDS root folder")
    parser.add_argument("--out", type=Path, required=True, help="folder for the label files")
    _add_landmark_options(parser, "outcomes to label")
    parser.set_defaults(run=partial(_run_label, planted=planted))


def _run_label(args: argparse.Namespace, planted: Planted) -> int:
    from ehrmotor.evaluate.landmarks import write_landmark_labels

    known = planted()
    outcomes = known.codes(_outcome_names(args, known.defaults, known.written_by_synth))
    settings, splits = _landmark_settings(args)
    files = write_landmark_labels(args.meds, args.out, outcomes, settings, splits=splits,
                                  splits_file=args.splits_file)
    log.info("label: %d label files written to %s", len(files), args.out)
    return 0


def add_evaluate(commands: argparse._SubParsersAction, planted: Planted) -> None:
    parser = commands.add_parser(
        "evaluate",
        help="few-shot protocol: MOTOR embeddings against count features on downstream tasks",
        description=(
            "Evaluate on the held_out and tuning subjects (never train): landmark time-to-event "
            "labels of outcomes (the planted outcomes of `ehrmotor synth`, or codes), and/or "
            "MEDS label files (--labels; boolean or time-to-event). A fixed test set of "
            "subjects; training sets of k subjects (replicates each); Cox, piecewise-exponential "
            "MOTOR-head and logistic heads on the embeddings, Cox, logistic and LightGBM on "
            "count features, Cox or logistic on age (+sex); Harrell's and Uno's C, integrated "
            "Brier score (these two up to tau: the last day with 10% and 10 test labels at "
            "risk), AUROC, AUPRC with subject-bootstrap intervals, and MOTOR minus the best "
            "baseline (counts or age (+sex)) with a paired "
            "interval (and, on data `ehrmotor synth` wrote, the generator's oracle). Writes "
            "results.csv, results.md, kshot_<task>.png, predictions/ and labels/ in OUT."
        ),
    )
    parser.add_argument("--model", type=Path, required=True, help="model bundle (WORK/model)")
    parser.add_argument("--meds", type=Path, required=True, help="MEDS root folder")
    parser.add_argument("--out", type=Path, required=True, help="folder for the results")
    parser.add_argument("--labels", type=Path, action="append", default=None, metavar="PATH",
                        help="a MEDS label file or folder: a folder of shards (ACES output) "
                             "is one task, a folder of several label files (what `ehrmotor "
                             "label` writes) is one task per file; repeatable. Without "
                             "--outcomes only these are evaluated")
    parser.add_argument("--task-name", default=None,
                        help="name of the one task of the one --labels path (default: the "
                             "file's stem or the folder's name)")
    _add_landmark_options(parser, "outcomes to evaluate with landmark labels")
    parser.add_argument("--horizon-days", type=_positive_days, default=365.0,
                        help="the latest tau of Uno's C and the Brier grid in days (default 365)")
    parser.add_argument("--k", "--train-sizes", dest="k", nargs="+", type=_k_values,
                        default=None, metavar="K",
                        help="training-set sizes in subjects, comma- or space-separated; 'all' "
                             "= the whole pool (default 16,32,64,128,256,512,all)")
    parser.add_argument("--replicates", "--repeats", dest="replicates", type=_positive,
                        default=5, help="draws per k (default 5)")
    parser.add_argument("--test-fraction", type=_fraction, default=0.5,
                        help="share of evaluation subjects in the test set (default 0.5)")
    parser.add_argument("--bootstrap", type=_positive, default=200,
                        help="subject-bootstrap resamples for the intervals (default 200)")
    parser.add_argument("--max-count-features", type=_positive, default=2000,
                        help="count features kept, the most frequent in the training pool "
                             "(default 2000)")
    parser.set_defaults(run=partial(_run_evaluate, planted=planted))


def _run_evaluate(args: argparse.Namespace, planted: Planted) -> int:
    from ehrmotor.artifacts import check_output
    from ehrmotor.evaluate.protocol import K_VALUES
    from ehrmotor.evaluate.run import ProtocolSettings, evaluate
    from ehrmotor.lock import work_lock

    known = planted()
    defaults = () if args.labels else known.defaults
    outcomes = known.codes(_outcome_names(args, defaults, known.written_by_synth))
    landmarks, splits = _landmark_settings(args)
    k_values: Sequence[int | None] = _flatten(args.k) or K_VALUES
    settings = ProtocolSettings(
        k_values=tuple(k_values), replicates=args.replicates, test_fraction=args.test_fraction,
        horizon_days=args.horizon_days, bootstrap=args.bootstrap, seed=args.seed,
        splits=splits, max_count_features=args.max_count_features)
    check_output(args.out, "folder")
    with work_lock(args.out, "evaluate"):
        result = evaluate(args.meds, args.model, args.out, outcomes=outcomes,
                          labels=args.labels or (), task_name=args.task_name,
                          oracle=known.oracle(args.meds), settings=settings,
                          landmarks=landmarks, splits_file=args.splits_file)
    print(result.table_markdown)
    log.info("evaluate: results in %s", args.out)
    return 0
