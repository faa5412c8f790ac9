# duoserve-lab: `make setup | run | notebooks | test | lab | clean`
# The project's Python environment: .venv, made by scripts/setup.sh, or one you have, e.g. a conda env
# (`make run VENV=$$CONDA_PREFIX`; with environment.yml's env active, `conda activate duoserve-lab`,
# that env is the default).
ifeq ($(CONDA_DEFAULT_ENV),duoserve-lab)
VENV ?= $(CONDA_PREFIX)
endif
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

# JupyterLab at the repository root (--allow-root when run as root); more flags:
# make lab LAB_ARGS="--no-browser --port 8888"
lab: setup
	@VENV="$(VENV)" bash scripts/lab.sh $(LAB_ARGS)

# Removes outputs, never the venv.
clean:
	rm -rf reports/ build/ dist/ *.egg-info .pytest_cache
ifneq ($(SRC_DIRS),)
	find $(SRC_DIRS) -depth -type d \( -name __pycache__ -o -name .ipynb_checkpoints \) -exec rm -rf {} +
endif
