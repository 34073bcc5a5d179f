# The two commands of the README: `make demo` and `make test`. Both set up `.venv` first when it is missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# Run the test suite on both cores; multi-process tests start their own workers.
PYTEST_ARGS ?=

export DS_ACCELERATOR ?= cpu
export PYTHONWARNINGS ?= ignore::FutureWarning
export WANDB_SILENT ?= true
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup test test-fast demo assets bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# One pip call resolves torch and torchvision together (see ENV notes in README: never split them).
	$(PIP) install --quiet -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# The unit tier (in-process tests, under two minutes): the inner loop. `make test` is the whole suite.
test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# Self-forcing distillation of the world teacher (sf/assets/world; built first by `make assets` when missing),
# then evaluation: outputs/demo/<time>/report.{json,md}, plots/, samples/. E.g. make demo DEMO_ARGS="--steps 40".
DEMO_ARGS ?=
demo: setup
	$(PY) -m eval.demo $(DEMO_ARGS)

# Build the world's weights from scratch with the project's recipes (about two hours on 2 CPU cores; they are shipped).
assets: setup
	$(PY) -m eval.assets --out build/assets --install sf/assets/world

bench: setup
	$(PY) -m eval.bench_cache --flavor debug --chunks 64 --out docs/figures

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
