#!/usr/bin/env bash
# Create/refresh the project venv: torch first (CPU build unless an NVIDIA GPU
# is present), then `pip install -e ".[lab,test]"` (lab: JupyterLab, ipywidgets,
# plotly, nbclient/nbconvert; test: pytest, nbval, and Playwright's Python package,
# which drives the system's Chromium in the browser test: no browser is downloaded).
#
# Idempotent: a stamp file in the venv holds a hash of pyproject.toml; when it
# matches, nothing is run at all.
#
# Environment knobs:
#   VENV=.venv               venv location (relative paths: repo root); an existing environment,
#                            e.g. a conda env (VENV=$CONDA_PREFIX), is installed into, not re-created
#   PYTHON=python3           interpreter used to create the venv (>= 3.10)
#   TORCH_CPU_VERSION=2.13.0 version of the CPU wheel (installed as <ver>+cpu)
#   TORCH_BUILD=cpu|cuda     force a build instead of probing `nvidia-smi -L`
#   FORCE=1                  ignore the stamp and re-run the pip steps
#   SETUP_VERBOSE=1          show pip's normal output instead of -q
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_CPU_VERSION="${TORCH_CPU_VERSION:-2.13.0}"
PY="$VENV/bin/python"
STAMP="$VENV/.duoserve-installed"
TORCH_CPU_INDEX=(--index-url https://download.pytorch.org/whl/cpu
                 --extra-index-url https://pypi.org/simple)

say() { echo "setup: $*"; }

hash_file() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | cut -d' ' -f1
    else
        shasum -a 256 "$1" | cut -d' ' -f1   # macOS
    fi
}

# pip, minus the "... is ignored: it is neither a file nor a directory" noise
# (stale find-links / file:// index entries). pipefail keeps pip's exit code.
pip_() {
    local quiet=(-q)
    [[ "${SETUP_VERBOSE:-0}" == 1 ]] && quiet=()
    "$PY" -m pip "$@" "${quiet[@]}" 2>&1 \
        | { grep -v -e 'is ignored: it is neither a file nor a directory' || true; }
}

torch_info() {  # prints e.g. "2.13.0+cpu cpu"
    "$PY" -c 'import torch; print(torch.__version__, "cuda" if torch.version.cuda else "cpu")' 2>/dev/null
}

want_hash="$(hash_file pyproject.toml)"

# ---- fast path: nothing changed since the last successful run --------------
if [[ "${FORCE:-0}" != 1 && -x "$PY" && -f "$STAMP" \
      && "$(head -n1 "$STAMP")" == "$want_hash" ]]; then
    say "up to date ($VENV, torch $(sed -n 2p "$STAMP"))"
    exit 0
fi

# ---- venv --------------------------------------------------------------------
if [[ ! -x "$PY" ]]; then
    if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
        echo "setup: need Python >= 3.10 (set PYTHON=...); got: $("$PYTHON" --version 2>&1 || true)" >&2
        exit 1
    fi
    say "creating venv at $VENV"
    if [[ -n "${CONDA_PREFIX:-}" ]]; then
        say "(conda env $CONDA_PREFIX is active; to install into it instead: make ... VENV=\$CONDA_PREFIX)"
    fi
    "$PYTHON" -m venv "$VENV"
fi

# ---- torch first (so the editable install never pulls a CUDA build) -----------
if info="$(torch_info)"; then
    torch_note="already installed"
else
    build="${TORCH_BUILD:-}"
    if [[ -z "$build" ]]; then
        if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
            build=cuda
        else
            build=cpu
        fi
    fi
    if [[ "$build" == cuda ]]; then
        say "NVIDIA GPU found: installing torch (CUDA build from PyPI)"
        pip_ install "torch>=2.4"
    elif [[ "$(uname -s)" == Darwin ]]; then
        # macOS wheels are CPU/MPS only and carry no +cpu tag.
        say "macOS: installing torch"
        pip_ install "torch>=2.4"
    else
        spec="torch==${TORCH_CPU_VERSION}+cpu"
        say "no NVIDIA GPU: installing $spec"
        if ! pip_ install "$spec"; then
            say "retrying $spec from download.pytorch.org/whl/cpu"
            pip_ install "$spec" "${TORCH_CPU_INDEX[@]}"
        fi
    fi
    info="$(torch_info)" || { echo "setup: torch does not import after install" >&2; exit 1; }
    torch_note="installed"
fi
torch_ver="${info% *}"
torch_build="${info##* }"

# ---- the project itself ---------------------------------------------------------
# Pin torch to what is installed so no dependency can swap it for another build.
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "torch==$torch_ver" > "$constraints"

say "installing duoserve-lab[lab,test] (editable)"
pip_ install -e ".[lab,test]" -c "$constraints"

if [[ "$torch_build" == cpu ]] && "$PY" -m pip list 2>/dev/null | grep -qi '^nvidia-'; then
    echo "setup: WARNING: nvidia-* packages are installed in $VENV on a CPU torch build" >&2
fi

printf '%s\n%s (%s build)\n' "$want_hash" "$torch_ver" "$torch_build" > "$STAMP"
say "torch $torch_ver ($torch_build build, $torch_note) in $VENV"
