#!/usr/bin/env bash
# A virtual environment with femr 0.2.4 for reference runs (fixtures, --vs-femr benchmarks).
#   bash benchmarks/femr/make_venv.sh [VENV_DIR]     (default: .femr-venv, ignored by git)
# femr 0.2.4 asks for xformers (CUDA only) and pins meds 0.3.3; it is installed without its
# declared dependencies and with these pins, which are the ones found to import and run on CPU.
# xformers is not installed: the scripts that use this environment put a stand-in module first
# in sys.modules (benchmarks/femr/femr_stand_ins.py, used by tests/data/femr/make_fixture.py and
# bench_train.py --vs-femr).
set -euo pipefail
VENV="${1:-.femr-venv}"
PY="${PYTHON:-python3}"
test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install --quiet torch==2.13.0 "numpy<2" pyarrow==18.1.0 meds==0.3.3 \
    meds_reader==0.1.16 torch_hawk==0.0.8 datasets==3.1.0 transformers==4.46.3 "accelerate<1.2" \
    "huggingface-hub<0.27" scipy scikit-learn tqdm zstandard icecream==2.1.3 nptyping==2.4.1 \
    msgpack polars dill pandas
"$VENV/bin/pip" install --quiet --no-deps femr==0.2.4
"$VENV/bin/python" -c "import femr.models.tokenizer, femr.models.tasks; print('femr 0.2.4 ready')"
