#!/usr/bin/env bash
# Start JupyterLab from the project environment at the repository root (`make lab`).
#
#   scripts/lab.sh                                  # what `make lab` runs
#   scripts/lab.sh --no-browser --port 8888         # on a remote box (`make lab LAB_ARGS="..."`)
#
# As root (most containers) jupyter refuses to start ("Running as root is not recommended. Use
# --allow-root to bypass."), so there --allow-root is passed, with a note on stderr.
#
# Environment knobs:
#   VENV=.venv     the environment whose jupyter runs (a conda env: VENV=$CONDA_PREFIX)
#   DRY_RUN=1      print the command instead of running it (tests/test_make_lab.py)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV="${VENV:-.venv}"
cmd=("$VENV/bin/python" -m jupyter lab --notebook-dir=.)
if [[ "$(id -u)" == 0 ]]; then
    echo "lab: running as root: passing --allow-root to jupyter" >&2
    cmd+=(--allow-root)
fi
cmd+=("$@")

if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi
exec "${cmd[@]}"
