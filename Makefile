# The targets create .venv when it is missing and (re)install when pyproject.toml changed.
# Two stamps: the run targets (train, eval) install the package alone, with the fast COCO
# metric; the others (test, lint, bench) add the dev extra (the test suite's tools and
# references: transformers, timm, onnx, the launchers). `make train` then `make test`
# adds the dev extra to the same .venv; `make test` then `make train` installs nothing more.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
PY_SOURCES := src tests bench train.py eval.py predict.py export.py

.PHONY: install install-dev train eval test test-fast lint format bench bench-gpu clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[fast-eval]'
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[dev]'
	# the PQ reference of the panoptic tests (COCO's panopticapi as packaged on PyPI); its
	# metadata pins numpy below 2, which its evaluation code does not need
	$(PY) -m pip install -q --no-deps 'panopticapi-lite==0.2.0'
	touch $(DEV_STAMP)

# the package and its commands (detr-train, detr-predict, ...) in .venv
install: $(STAMP)

# + the dev extra: what make test, make lint and make bench use
install-dev: $(DEV_STAMP)

# The CPU demo; the base config (python train.py data.root=...) is the paper's COCO recipe.
train: $(STAMP)
	$(PY) train.py experiment=synthetic_cpu $(ARGS)

eval: $(STAMP)
	$(PY) eval.py $(ARGS)

test: $(DEV_STAMP)
	$(PY) -m pytest -q -n 2 --durations=15 $(ARGS)

test-fast: $(DEV_STAMP)
	$(PY) -m pytest -q -m "not slow" $(ARGS)

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check $(PY_SOURCES)
	$(VENV)/bin/ruff format --check $(PY_SOURCES)
	$(VENV)/bin/lint-imports

format: $(DEV_STAMP)
	$(VENV)/bin/ruff check --fix $(PY_SOURCES)
	$(VENV)/bin/ruff format $(PY_SOURCES)

# Every benchmark against the official code (a facebookresearch/detr checkout: OFFICIAL=path
# or REF_DETR_DIR) and transformers; run it on an otherwise idle machine.
bench: $(DEV_STAMP)
	PYTHONPATH=src $(PY) bench/run_all.py $(if $(OFFICIAL),--official $(OFFICIAL)) $(ARGS)

# The GPU rows (training step variants, loss curves, inference) on a CUDA machine.
bench-gpu: $(DEV_STAMP)
	PYTHON=$(PY) bash bench/gpu.sh bench/results/$$(hostname)-gpu

clean:
	rm -rf outputs multirun .pytest_cache
