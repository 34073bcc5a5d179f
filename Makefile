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

.PHONY: setup test demo bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# One pip call resolves torch and torchvision together (see ENV notes in README: never split them).
	$(PIP) install --quiet -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

demo: setup
	@echo "make demo arrives with the embedded-world issue (#4): it will distil the shipped world teacher."
	@echo "Until then: 'make test' exercises everything that exists; see README.md for status."

bench: setup
	$(PY) -m eval.bench_cache --flavor debug --chunks 64 --out docs/figures

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
