# Two commands do everything on a fresh machine:
#   make serve   - set up, then run the scoring service on the shipped checkpoint (http://127.0.0.1:8000)
#   make test    - set up, then run the test suite (what .ci/run calls)
#   make test-fast - the suite without the tests that start processes, servers or browsers
# Everyday ones (see docs/cli.md):
#   make score IMAGES="photos/ more.jpg" OUT=scores.csv   - score images (OUT: .csv or .json; none: CSV on stdout;
#                                                          PROFILE=general|lnsim|cdm picks a score profile)
#   make bench                                           - the quick benchmarks (a few minutes on 2 cores)
VENV ?= .venv
PY := $(VENV)/bin/python
# The one Python version this project states and tests (pyproject, Dockerfile, CI).
PYTHON ?= $(shell command -v python3.11 2>/dev/null || echo python3)
# Loopback by default: the page and API are for this machine. `make serve HOST=0.0.0.0` opens it to the network
# (with API keys in RESMEMNET_API_KEYS, or it refuses to start: docs/api.md).
HOST ?= 127.0.0.1
PORT ?= 8000
BENCH_IMAGES ?= ../shared/data/pool
BENCH_N ?= 32
# Debian packages some tests drive: Chromium and its WebDriver (the web page test), haproxy (load balancing),
# docker.io (the Docker engine the container tests build and run the images on; they start it themselves
# when none runs) and debootstrap (they make stand-ins of the public base images from Debian's packages).
SYSTEM_PACKAGES := chromium chromium-driver haproxy docker.io debootstrap

.PHONY: setup system-deps serve test test-fast score bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[torch,train,trunks,dev,engines]"
	touch $@

# Installs SYSTEM_PACKAGES that are missing, where apt-get is available (as root, or through sudo).
system-deps:
	@missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if ! command -v apt-get >/dev/null 2>&1; then \
	  echo "make: no apt-get here; install$$missing yourself (some tests need them)"; exit 0; fi; \
	sudo=""; [ "$$(id -u)" = 0 ] || sudo="sudo -n"; \
	echo "make: apt-get install$$missing"; \
	{ $$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq$$missing; } || \
	  echo "make: could not install$$missing; the tests that need them skip here (and fail in CI)"

serve: setup
	$(VENV)/bin/resmemnet serve --host $(HOST) --port $(PORT)

test: setup system-deps
	$(PY) -m pytest -q

# The fast loop: every test but those that start a process, server, browser, torchrun or HAProxy
# (marker `process`); `make test` runs them all.
test-fast: setup
	$(PY) -m pytest -q -m "not process"

score: setup
	@if [ -z "$(IMAGES)" ]; then echo 'usage: make score IMAGES="photos/ more.jpg" [OUT=scores.csv|scores.json]'; exit 2; fi
	@$(VENV)/bin/resmemnet score $(IMAGES)$(if $(OUT), --out $(OUT))$(if $(PROFILE), --profile $(PROFILE))

bench: setup
	@if [ ! -d "$(BENCH_IMAGES)" ]; then echo "make bench: no folder $(BENCH_IMAGES); give BENCH_IMAGES=a folder of photos"; exit 2; fi
	$(PY) bench/bench_scorer.py --only shipped --n $(BENCH_N) --images $(BENCH_IMAGES)
	$(PY) bench/bench_heatmap.py --weights weights/resmemnet-default.json --repeats 2 --layers layer4 layer3,layer4

clean:
	rm -rf $(VENV) .pytest_cache
