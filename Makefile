# `make demo` and `make test` do all set-up on a fresh machine (a local virtual environment in .venv).
VENV   ?= .venv
PY     := $(VENV)/bin/python
# PyTorch goes in first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build on
# a CPU-only Linux box. On a CUDA machine: make demo TORCH="torch --index-url https://download.pytorch.org/whl/cu128"
TORCH  ?= torch==2.13.0
EXTRAS ?= test,bench,plots,registry,tensorboard,wandb,mlflow,tune
PIP    := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: install demo test test-fast bench clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) $(TORCH)
	$(PIP) -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) scripts/train.py demo

test: install
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not slow"

bench: install
	$(PY) bench/bench_train.py

clean:
	rm -rf $(VENV) .pytest_cache
