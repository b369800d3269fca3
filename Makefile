# The two commands of the README:
#   make demo   set up .venv and run the whole BLISS pipeline on the bundled corpus (embedded local Ray), then the
#               random baseline on the same schedule (round 0 is shared); the second report compares both
#   make test   set up .venv and run the test suite (what .ci/run calls; `make test-extended`: the long
#               reliability scenarios that do not fit CI's 30 minutes)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.bliss-installed
# CPU hosts get the CPU build of torch. Here pip finds 2.13.0+cpu in the local wheel cache; elsewhere set
# TORCH_INDEX=https://download.pytorch.org/whl/cpu so pip cannot fall back to a multi-GB CUDA build.
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=
# The project's own packages go in with uv (the same versions, resolved far faster than by pip); uv reads no
# pip.conf, so where only a pip-configured mirror is reachable the install falls back to pip. uv compiles no
# bytecode unless told to, and where PYTHONDONTWRITEBYTECODE is set (these machines, CI) no import writes any:
# every Python process, each Ray worker included, would then compile Ray, transformers & co. from source at every
# start (docs/design.md, "Where a Train stage's fixed cost goes").
UV_VERSION ?= 0.13.9
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: setup demo test test-extended test-fast bench lint clean-runs

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
ifneq ($(HAS_GPU),1)
	$(BIN)/pip install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -c "import torch, sys; sys.exit('CUDA torch on a CPU host: set TORCH_INDEX' if torch.version.cuda else 0)"
endif
	$(BIN)/pip install -q uv==$(UV_VERSION)
	$(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python -e '.[dev]' || $(BIN)/pip install -q -e '.[dev]'
	$(BIN)/python -m bliss_ray.evaluation.eval_data fetch
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/bliss-ray run experiments/demo.yaml
	$(BIN)/bliss-ray run experiments/demo.yaml --set selection.method=random

test: setup
	$(BIN)/python -m pytest -q -m "not extended" --durations=15 tests  # the slowest tests: where CI's 30 minutes go

test-extended: setup
	$(BIN)/python -m pytest -q -m extended tests

test-fast: setup
	$(BIN)/python -m pytest -q -m "not ray and not slow" tests

bench: setup
	$(BIN)/python bench/run_all.py

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean-runs:
	rm -rf runs
