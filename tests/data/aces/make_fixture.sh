#!/usr/bin/env bash
# Remakes the ACES fixture beside this script: heart_failure_1y/ holds the MEDS labels that ACES
# (es-aces) extracted for the task heart_failure_1y.yaml from a synthetic MEDS dataset, in the
# layout ACES writes with data=sharded (one file per data shard, its hydra logs in .logs/).
#
# Made with: es-aces 0.7.3 (meds 0.4.1, polars 1.44.2, pyarrow 26.0.1, hydra-core 1.3.8) on
# Python 3.11.7, in a virtual environment of its own (its polars 1.x pin clashes with ours); the
# data from this repository's `ehrmotor synth --subjects 150 --seed 3` (same seed, same bytes).
# Result: 2,395 labels of 136 subjects (train 1,874 / tuning 186 / held_out 335; 52 positive).
#
# Run from the repository root with ehrmotor installed (make install; source .venv/bin/activate):
#     bash tests/data/aces/make_fixture.sh
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

python3 -m venv "$work/aces-venv"
"$work/aces-venv/bin/pip" install --quiet "es-aces==0.7.3" "meds==0.4.1" "polars==1.44.2" \
    "pyarrow==26.0.1" "hydra-core==1.3.8"
ehrmotor synth --subjects 150 --seed 3 --out "$work/meds"

rm -rf "$here/heart_failure_1y"
shards="$("$work/aces-venv/bin/expand_shards" "$work/meds/data")"  # tuning/0,held_out/0,train/0
# From $work: hydra resolves nothing against the current folder, but keep the repo out of reach.
(cd "$work" && "$work/aces-venv/bin/aces-cli" -m data=sharded data.standard=meds \
    data.root="$work/meds/data" "data.shard=$shards" \
    cohort_dir="$here" cohort_name=heart_failure_1y)
