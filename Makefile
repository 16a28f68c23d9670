# Two commands do everything on a fresh machine:
#   make serve   - set up, then run the scoring service on the shipped checkpoint
#   make test    - set up, then run the test suite (what .ci/run calls)
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 0.0.0.0
PORT ?= 8000

.PHONY: setup serve test score bench clean

setup: $(VENV)/.installed

# torch/torchvision are pinned to the CUDA builds this project is tested with (they run on CPUs too).
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[train,trunks,dev]"
	touch $@

serve: setup
	$(VENV)/bin/resmemnet serve --host $(HOST) --port $(PORT)

test: setup
	$(PY) -m pytest -q

score: setup
	$(VENV)/bin/resmemnet score $(IMAGES) --out scores.csv

clean:
	rm -rf $(VENV) .pytest_cache
