#!/usr/bin/env bash
# Remakes the femr 0.2.4 fixture beside this script: model/ (a tiny femr MOTOR model as femr
# saves it), labels.parquet and features.parquet (femr's own compute_features at those labels).
#
# Made with femr 0.2.4 in its own virtual environment (benchmarks/femr/make_venv.sh: torch
# 2.13.0+cpu, meds 0.3.3, meds_reader 0.1.16, torch_hawk 0.0.8, numpy<2, pyarrow 18.1.0, datasets
# 3.1.0, transformers 4.46.3, accelerate<1.2, huggingface-hub<0.27, femr --no-deps) on CPU, with
# the xformers stand-in of benchmarks/femr/femr_stand_ins.py; data from
# `ehrmotor synth --subjects 120 --seed 5`.
#
# Run from the repository root with ehrmotor installed:
#     bash tests/data/femr/make_fixture.sh [FEMR_VENV]   (default .femr-venv, made when missing)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${1:-.femr-venv}"
test -x "$venv/bin/python" || bash benchmarks/femr/make_venv.sh "$venv"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

ehrmotor synth --subjects 120 --seed 5 --out "$work/meds"
"$venv/bin/meds_reader_convert" "$work/meds" "$work/database" --num_threads 4
rm -rf "$here/model" "$here/labels.parquet" "$here/features.parquet"
(cd "$work" && "$venv/bin/python" "$here/make_fixture.py" "$work/database" "$work/meds/athena" \
    "$here")
