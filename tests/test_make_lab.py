"""`make lab` and the environment the make targets use: what they would run, never running it.

As root jupyter refuses to start without --allow-root (most containers run as root), so the
launcher adds it; the uid is faked with an `id` on PATH that prints it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None or shutil.which("bash") is None,
                                reason="needs make and bash")


def _env(tmp_path: Path, uid: int | None = None, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("VENV", "CONDA_PREFIX", "CONDA_DEFAULT_ENV", "LAB_ARGS", "MAKEFLAGS", "MAKELEVEL")}
    if uid is not None:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir(exist_ok=True)
        fake = bin_dir / "id"
        fake.write_text(f"#!/bin/sh\necho {uid}\n")
        fake.chmod(0o755)
        env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return {**env, **extra}


def _make_n(tmp_path: Path, *args: str, **env: str) -> list[str]:
    out = subprocess.run(["make", "-n", *args], cwd=ROOT, env=_env(tmp_path, **env), capture_output=True,
                         text=True, check=True).stdout
    return out.splitlines()


def _lab_command(tmp_path: Path, uid: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "scripts/lab.sh", *args], cwd=ROOT, env=_env(tmp_path, uid, DRY_RUN="1"),
                          capture_output=True, text=True, check=True)


def test_make_lab_runs_the_launcher_with_its_arguments(tmp_path):
    lines = _make_n(tmp_path, "lab", 'LAB_ARGS=--no-browser --port 8888')
    assert lines[-1] == 'VENV=".venv" bash scripts/lab.sh --no-browser --port 8888'


def test_as_root_the_launcher_passes_allow_root(tmp_path):
    root = _lab_command(tmp_path, 0, "--no-browser", "--port", "8888")
    assert root.stdout.split() == [".venv/bin/python", "-m", "jupyter", "lab", "--notebook-dir=.", "--allow-root",
                                   "--no-browser", "--port", "8888"]
    assert "--allow-root" in root.stderr                  # and says why
    user = _lab_command(tmp_path, 1000)
    assert "--allow-root" not in user.stdout and user.stderr == ""


def test_the_readme_starts_jupyterlab_through_make_lab():
    readme = (ROOT / "README.md").read_text()
    assert 'make lab LAB_ARGS="--no-browser --port 8888"' in readme   # the remote-box command
    assert "bin/jupyter lab" not in readme                             # nothing bypasses the launcher


def test_the_environment_is_venv_unless_told_or_the_projects_conda_env_is_active(tmp_path):
    assert _make_n(tmp_path, "run")[-1] == ".venv/bin/python -m lab.main_job"
    assert _make_n(tmp_path, "run", "VENV=/opt/env")[-1] == "/opt/env/bin/python -m lab.main_job"
    assert _make_n(tmp_path, "run", VENV="/opt/env")[-1] == "/opt/env/bin/python -m lab.main_job"
    conda = _make_n(tmp_path, "run", CONDA_DEFAULT_ENV="duoserve-lab", CONDA_PREFIX="/c/envs/duoserve-lab")
    assert conda == ['VENV="/c/envs/duoserve-lab" bash scripts/setup.sh',
                     "/c/envs/duoserve-lab/bin/python -m lab.main_job"]
    other = _make_n(tmp_path, "run", CONDA_DEFAULT_ENV="base", CONDA_PREFIX="/c")   # not ours: left alone
    assert other[-1] == ".venv/bin/python -m lab.main_job"
