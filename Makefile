# The two commands of the README:
#   make demo   installs the core package into .venv and runs the main job on built-in data
#   make test   installs everything into .venv (torch, test tools) and runs lint + all tests
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of torch (checkpoint import and the cross-framework tests). Installed first so
# that the 'torch' extra's range is already satisfied and pulls no multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install install-core demo test test-fast lint

install-core: $(VENV)/.core-installed
install: $(VENV)/.installed

# The core alone: what training, evaluation and prediction import (no torch, no TensorFlow).
$(VENV)/.core-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed: $(VENV)/.core-installed
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

# Train CheapNet-S on the built-in synthetic data (about 2 minutes on 2 CPU cores), then
# evaluate its best checkpoint on the synthetic test split, then calibrate its threshold and
# minimum defect area on the validation split (predict.py then uses them). Running it again
# resumes/reuses.
demo: install-core
	$(BIN)/python train.py --variant S --data synthetic --image-size 128 --batch-size 4 \
		--epochs 80 --milestones 60,70 --workdir runs/demo --no-progress
	$(BIN)/python evaluate.py --checkpoint runs/demo --data synthetic --no-progress \
		--json runs/demo/evaluation.json
	$(BIN)/python evaluate.py --checkpoint runs/demo --data synthetic --calibrate --no-progress \
		--json runs/demo/calibration-evaluation.json

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Two pytest workers (pytest-xdist): the suite is mostly single-threaded compilation, so two
# cores run it in about two thirds of the time. --dist worksteal: a worker that runs out of
# tests takes some of the other's instead of idling while the other works through a queue of
# long ones (a cold run 16:33 -> 15:13 on the same VM, together with one test's change).
PYTEST_WORKERS := -n 2 --dist worksteal
test: lint
	$(BIN)/python -m pytest $(PYTEST_WORKERS)

# The unit tests alone: no CLI, server or multi-process run, no training run, none of the slow
# reproductions.
test-fast: install
	$(BIN)/python -m pytest $(PYTEST_WORKERS) -m "not process and not training and not slow"
