# Two commands: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# PyTorch is installed first and explicitly (a CPU run needs nothing more).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test reliability bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.torch: $(BIN)/python
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	touch $@

$(VENV)/.installed: $(VENV)/.torch pyproject.toml
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/milkit demo --out runs/demo

test: $(VENV)/.installed-test
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest

# the bad-input corpus, resume after SIGKILL, umask (tests/reliability; about a minute)
reliability: $(VENV)/.installed-test
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest tests/reliability -q

clean:
	rm -rf $(VENV) runs
