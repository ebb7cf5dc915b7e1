# `make demo` and `make test` install into .venv when needed, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO := demo
DEMO_SUBJECTS ?= 3000

.PHONY: install demo test lint clean

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
	$(VENV)/bin/ehrmotor evaluate --model $(DEMO)/work/model --meds $(DEMO)/meds --out $(DEMO)/evaluation > /dev/null
	$(VENV)/bin/ehrmotor embed --model $(DEMO)/work/model --meds $(DEMO)/meds --labels $(DEMO)/evaluation/labels.parquet --out $(DEMO)/embeddings.parquet
	@cat $(DEMO)/evaluation/results.md

# CI (.ci/run) runs `make test`: the lint gate first, then the suite.
test: lint
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy

clean:
	rm -rf $(DEMO) .pytest_cache .mypy_cache .ruff_cache
