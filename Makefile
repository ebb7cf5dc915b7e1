# `make demo` and `make test` install into .venv when needed, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO := demo
DEMO_SUBJECTS ?= 5000
# Outcomes with at least 40 test events (20 subjects with one) at 5,000 subjects; the others have
# too few at this size to say anything (see README, "What `make demo` does").
DEMO_OUTCOMES ?= hypertension,death,diabetes,copd,pneumonia
# A short protocol: the full one (k = 16 ... 512 and all, 5 replicates, 2,000 count features,
# 200 resamples) is `ehrmotor evaluate`'s default.
DEMO_PROTOCOL ?= --k 64,256,all --replicates 3 --bootstrap 100 --max-count-features 500

.PHONY: install demo test test-fast lint clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints/cpu.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints/cpu.txt -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ehrmotor synth --subjects $(DEMO_SUBJECTS) --seed 0 --out $(DEMO)/meds --force
	$(VENV)/bin/ehrmotor validate $(DEMO)/meds
	$(VENV)/bin/ehrmotor prepare --meds $(DEMO)/meds --athena $(DEMO)/meds/athena --out $(DEMO)/work --config configs/demo.toml
	$(VENV)/bin/ehrmotor pretrain --work $(DEMO)/work --config configs/demo.toml
	$(VENV)/bin/ehrmotor evaluate --model $(DEMO)/work/model --meds $(DEMO)/meds --out $(DEMO)/evaluation --outcomes $(DEMO_OUTCOMES) --landmark-codes Visit/ $(DEMO_PROTOCOL) > /dev/null
	$(VENV)/bin/ehrmotor embed --model $(DEMO)/work/model --meds $(DEMO)/meds --labels $(DEMO)/evaluation/labels/death.parquet --out $(DEMO)/embeddings.parquet
	@cat $(DEMO)/evaluation/results.md

# CI (.ci/run) runs `make test`: the lint gate first, then the suite.
test: lint
	$(PY) -m pytest -q

# The edit loop: the tests not marked `slow`, no lint.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy

clean:
	rm -rf $(DEMO) .pytest_cache .mypy_cache .ruff_cache
