"""`ehrmotor convert-femr`: the argparse builder and handler (registered in cli.py)."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def add_convert_femr(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "convert-femr",
        help="convert a femr model folder into an ehrmotor bundle",
        description=(
            "Convert a femr model folder (config.json, model.safetensors, dictionary.msgpack) "
            "of femr 0.2.4 or of femr's released layout (femr 0.2.0 / 0.2.1, e.g. Stanford's "
            "CLMBR-T-base as downloaded) into an ehrmotor bundle that `ehrmotor embed` and "
            "`ehrmotor.compute_features` take as they take their own. Runs on CPU without CUDA "
            "or xformers. Same inputs, same bytes."
        ),
    )
    parser.add_argument("model", metavar="FEMR_MODEL_DIR", help="the femr model folder")
    parser.add_argument("--out", required=True, help="bundle folder to write (replaced whole "
                        "only if it is a bundle written by convert-femr)")
    parser.add_argument("--athena", help="the OHDSI Athena vocabulary folder the femr "
                        "tokenizer was trained with (CONCEPT.csv, CONCEPT_RELATIONSHIP.csv, "
                        "CONCEPT_ANCESTOR.csv); required for femr 0.2.4's hierarchical tokenizer, "
                        "ignored for the released layout's flat one")
    parser.set_defaults(run=_run_convert_femr)


def _run_convert_femr(args: argparse.Namespace) -> int:
    from ehrmotor.convert.femr_folder import convert_femr

    out = convert_femr(args.model, args.out, athena=args.athena)
    log.info("convert-femr: wrote %s", out)
    return 0
