# duoserve-lab: `make setup | run | test | lab | clean`
VENV ?= .venv
PY := $(VENV)/bin/python
NOTEBOOKS := $(wildcard notebooks/*.ipynb)
SRC_DIRS := $(wildcard duoserve_core lab tests notebooks benchmarks scripts)

.PHONY: setup run test lab clean

# Fast no-op when the venv is already up to date (stamp in $(VENV)).
setup:
	@VENV="$(VENV)" bash scripts/setup.sh

run: setup
	$(PY) -m lab.main_job

test: setup
	$(PY) -m pytest -q tests
ifneq ($(NOTEBOOKS),)
	$(PY) -m pytest -q --nbval-lax notebooks
endif

lab: setup
	$(VENV)/bin/jupyter lab --notebook-dir=.

# Removes outputs, never the venv.
clean:
	rm -rf reports/ build/ dist/ *.egg-info .pytest_cache
ifneq ($(SRC_DIRS),)
	find $(SRC_DIRS) -depth -type d \( -name __pycache__ -o -name .ipynb_checkpoints \) -exec rm -rf {} +
endif
