# Two commands for a new user on a fresh machine:
#   make demo   creates .venv if absent, installs, generates the embedded EMT dataset (and imports the oxides
#               DFT set), pretrains on both sources, reports per-source errors beside their baselines
#   make test   creates .venv if absent, installs, runs the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.13.0 first, so that the range in setup.py is met by it and pip pulls no other build.
TORCH_SPEC ?= torch==2.13.0
# The demo trains two sources: the embedded EMT metals and the small real-DFT oxides database at
# OXIDES_DB (imported into data/oxides.zarr first); without that file, a second embedded source.
OXIDES_DB ?= ../shared/data/oxides.db
DEMO_CONFIG ?= $(if $(wildcard $(OXIDES_DB)),gnnmegatron/configs/demo_sources.yaml,gnnmegatron/configs/demo_sources_embedded.yaml)
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
	@if [ "$(DEMO_CONFIG)" = "gnnmegatron/configs/demo_sources.yaml" ] && [ ! -d data/oxides.zarr ]; then \
		echo "importing $(OXIDES_DB) into data/oxides.zarr"; mkdir -p data; \
		$(PY) -m gnnmegatron.cli data import "$(OXIDES_DB)" --out data/oxides.zarr --source-name oxides \
			--no-progress > data/oxides-import.json; fi
	$(VENV)/bin/torchrun --standalone --nproc_per_node=1 -m gnnmegatron.cli pretrain --config $(DEMO_CONFIG)

test: $(VENV)/.installed
	$(PY) -m pytest tests -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) *.egg-info
