# Two commands for a new user on a fresh machine:
#   make demo   creates .venv if absent, installs, generates the embedded EMT dataset, pretrains, reports
#   make test   creates .venv if absent, installs, runs the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.13.0 first, so that the range in setup.py is met by it and pip pulls no other build.
TORCH_SPEC ?= torch==2.13.0
DEMO_CONFIG ?= gnnmegatron/configs/demo.yaml
PYTEST_ARGS ?=

.PHONY: demo test install clean

$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/torchrun --standalone --nproc_per_node=1 -m gnnmegatron.cli pretrain --config $(DEMO_CONFIG)

test: $(VENV)/.installed
	$(PY) -m pytest tests -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) *.egg-info
