# duoserve-lab: `make setup | run | notebooks | test | lab | clean`
VENV ?= .venv
PY := $(VENV)/bin/python
NOTEBOOKS := $(wildcard notebooks/*.ipynb)
SRC_DIRS := $(wildcard duoserve_core lab tests notebooks benchmarks scripts)

.PHONY: setup run notebooks test lab clean

# Fast no-op when the venv is already up to date (stamp in $(VENV)).
setup:
	@VENV="$(VENV)" bash scripts/setup.sh

# The main job: every policy on the bundled model, then every notebook executed headless
# (reports/main_job.md, reports/notebooks/NN_name.ipynb and .html).
run: setup
	$(PY) -m lab.main_job

# Only the notebooks, executed headless into reports/notebooks/.
notebooks: setup
	$(PY) -m lab.notebook_runner

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
