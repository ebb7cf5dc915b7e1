#!/usr/bin/env bash
# Remakes the femr 0.2.1 fixture beside this script (the layout of the released CLMBR-T-base
# models: parallel attention + feed-forward blocks, RMSNorm `scale`, a CLMBR head): model/ (a tiny
# femr CLMBR model as femr saves it), labels.parquet and features.parquet (femr's own features at
# those labels).
#
# femr 0.2.1 goes in its own virtual environment, installed without its declared dependencies
# (it pins esds-spec 0.1.0 and imports flash_attn, CUDA only): torch 2.13.0+cpu, numpy<2,
# pyarrow 18.1.0, datasets 3.1.0, transformers 4.46.3, accelerate<1.2, huggingface-hub<0.27,
# einops, icecream 2.1.3, nptyping 2.4.1, msgpack, polars, dill; flash_attn and esds_spec are the
# stand-ins of benchmarks/femr/femr021_stand_ins.py. Data: `ehrmotor synth --subjects 60 --seed 5`.
#
# Run from the repository root with ehrmotor installed:
#     bash tests/data/femr_released/make_fixture.sh [FEMR021_VENV]  (default .femr021-venv)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${1:-.femr021-venv}"
if ! test -x "$venv/bin/python"; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip
    "$venv/bin/pip" install --quiet torch==2.13.0 "numpy<2" pyarrow==18.1.0 datasets==3.1.0 \
        transformers==4.46.3 "accelerate<1.2" "huggingface-hub<0.27" scipy scikit-learn tqdm \
        zstandard icecream==2.1.3 nptyping==2.4.1 msgpack polars dill pandas einops
    "$venv/bin/pip" install --quiet --no-deps femr==0.2.1
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

ehrmotor synth --subjects 60 --seed 5 --out "$work/meds"
rm -rf "$here/model" "$here/labels.parquet" "$here/features.parquet"
(cd "$work" && "$venv/bin/python" "$here/make_fixture.py" "$work/meds" "$here")
