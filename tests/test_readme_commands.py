"""The README's commands run as written after the quick start (issue 15, items 4 and 9).

Every fenced ```bash / ```console block of README.md is split into commands (a trailing ``\\``
continues a line). A command's trailing comment classifies it:

- ``# GPU ...``: needs CUDA; the test checks its flags exist (``--help`` of the same module);
- ``# slow ...``: takes minutes; flags checked the same way (``make`` targets: ``make -n``);
- anything else: a fast CPU command, run as written by bash in a scratch copy of the repository
  (each top-level entry symlinked, ``reports/`` a fresh folder, as after ``make run``) with the
  virtual environment off ``PATH``, so a bare ``python`` fails as it would for a newcomer.

Outputs must go under ``reports/`` (or ``/tmp``), never the repository root, and a command that is
run must not write anything outside ``reports/`` (checked on the scratch copy's top level).
The relative links of README.md and the docs it links resolve.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import runpy
import shlex
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARK = re.compile(r"#\s*(GPU|slow)\b")
OUTPUT_FLAGS = ("--out", "--timeline-out", "--record-trace", "--timelines", "--summary")


def readme_commands(text: str) -> list[tuple[str, str | None]]:
    """(command, mark) for each command in the fenced bash/console blocks; mark is GPU, slow or None.

    The command is the text bash would run, its lines joined, trailing comment included.
    """
    commands = []
    for block in re.findall(r"^```(?:bash|console|sh)\n(.*?)^```", text, flags=re.S | re.M):
        pending = ""
        for raw in block.splitlines():
            line = raw.strip()
            if line.startswith("$ "):
                line = line[2:]
            if not pending and (not line or line.startswith("#")):
                continue
            if line.endswith("\\"):
                pending += line[:-1].rstrip() + " "
                continue
            full, pending = pending + line, ""
            words = shlex.split(full)  # a comment is the first word that starts with '#', as bash reads it
            at = next((i for i, w in enumerate(words) if w.startswith("#")), len(words))
            mark = MARK.match(" ".join(words[at:]))
            commands.append((full, mark.group(1) if mark else None))
    return commands


COMMANDS = readme_commands(README.read_text())
FAST = [c for c, m in COMMANDS if m is None]
MARKED = [(c, m) for c, m in COMMANDS if m is not None]


def _argv(command: str) -> list[str]:
    return shlex.split(command, comments=True)


def _outputs(argv: list[str]) -> list[str]:
    out = []
    for i, word in enumerate(argv):
        for flag in OUTPUT_FLAGS:
            if word == flag and i + 1 < len(argv):
                out.append(argv[i + 1])
            elif word.startswith(flag + "="):
                out.append(word.split("=", 1)[1])
    return out


def _env() -> dict[str, str]:
    """A newcomer's shell: no virtual environment on PATH, no PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "CONDA_PREFIX",
                                                            "CONDA_DEFAULT_ENV")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if p and Path(p).resolve() != Path(sys.executable).parent.resolve()
                                  and ".venv" not in Path(p).parts)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["MPLBACKEND"] = "Agg"
    return env


def test_readme_has_commands_and_ci_test_command():
    assert len(COMMANDS) >= 10 and FAST, COMMANDS
    # the README's test command is what CI runs: the last command of .ci/run
    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()
          if ln.strip() and not ln.strip().startswith("#")]
    quick_start = README.read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = [" ".join(_argv(c)) for c, _ in readme_commands(quick_start)]
    assert " ".join(_argv(ci[-1])) in commands and "make run" in commands, (ci[-1], commands)


@pytest.mark.parametrize("command", [c for c, _ in COMMANDS])
def test_command_is_well_formed(command):
    argv = _argv(command)
    assert argv[0] in (".venv/bin/python", "make", "bash"), \
        f"use .venv/bin/python or a make target, not {argv[0]!r}: {command}"
    for out in _outputs(argv):
        assert out.startswith(("reports/", "/tmp/")), f"{out} is not under reports/ or /tmp: {command}"


def _help_text(argv: list[str]) -> str:
    """--help of the module or script the command runs (subcommands included), in this process:
    one import of torch for every command instead of one each."""
    first_flag = next((i for i, w in enumerate(argv) if w.startswith("-") and i > 2), len(argv))
    head = argv[:first_flag] if argv[1] == "-m" else argv[:2]  # a script: then its arguments and flags
    out = io.StringIO()
    saved = sys.argv[:], sys.path[:], os.getcwd()
    try:
        os.chdir(ROOT)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()), \
                warnings.catch_warnings(), pytest.raises(SystemExit) as exit_:
            warnings.simplefilter("ignore")
            if argv[1] == "-m":
                sys.argv = [head[2], *head[3:], "--help"]
                runpy.run_module(head[2], run_name="__main__", alter_sys=True)
            else:
                sys.argv = [head[1], "--help"]
                sys.path.insert(0, str(ROOT / Path(head[1]).parent))
                runpy.run_path(str(ROOT / head[1]), run_name="__main__")
    finally:
        sys.argv, sys.path[:], _ = saved[0], saved[1], os.chdir(saved[2])
    assert exit_.value.code in (0, None), f"{argv}: --help exited {exit_.value.code}"
    return out.getvalue()


@pytest.mark.parametrize("command,mark", MARKED)
def test_marked_command_parses(command, mark):
    argv = _argv(command)
    if argv[0] == "make":
        proc = subprocess.run(["make", "-n", *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return
    if argv[0] == "bash":
        script = ROOT / argv[1]
        assert script.is_file(), command
        assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
        for stage in argv[2:]:
            assert re.search(rf"^\s*{re.escape(stage)}\)", script.read_text(), re.M), f"no stage {stage}: {command}"
        return
    help_text = _help_text(argv)
    flags = {w.split("=", 1)[0] for w in argv if w.startswith("--")}
    missing = sorted(f for f in flags if not re.search(rf"{re.escape(f)}(?![\w-])", help_text))
    assert not missing, f"{command}: flags not in --help: {missing}"


@pytest.fixture(scope="module")
def fast_runs(tmp_path_factory):
    """Every fast CPU command run once in its own scratch copy of the repository, two at a time."""
    # this interpreter's environment stands in for .venv where the suite runs from another one (conda)
    venv = ROOT / ".venv" if (ROOT / ".venv" / "bin" / "python").exists() else Path(sys.prefix)

    def scratch(i):
        work = tmp_path_factory.mktemp(f"readme{i}")
        for entry in ROOT.iterdir():
            if entry.name not in ("reports", ".git", ".pytest_cache", ".venv"):
                (work / entry.name).symlink_to(entry)
        (work / ".venv").symlink_to(venv)
        (work / "reports").mkdir()
        return work

    def run(command, work):
        before = {p.name for p in work.iterdir()}
        proc = subprocess.run(["bash", "-c", command], cwd=work, env=_env(), capture_output=True,
                              text=True, timeout=300)
        return proc, work, before

    works = [scratch(i) for i in range(len(FAST))]
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(FAST, pool.map(run, FAST, works)))


@pytest.mark.slow  # the six CPU commands: about 40 s on 2 free cores, 60 s on a loaded one
@pytest.mark.parametrize("command", FAST)
def test_fast_command_runs_as_written(command, fast_runs):
    proc, work, before = fast_runs[command]
    assert proc.returncode == 0, f"{command}\nexit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert {p.name for p in work.iterdir()} == before, "wrote outside reports/"
    for out in _outputs(_argv(command)):
        assert (work / out).exists() or Path(out).exists(), f"{command} did not write {out}"


def _links(md: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", md.read_text(), flags=re.S | re.M)
    text = re.sub(r"`[^`\n]*`", "", text)  # code spans: `attention[phase](x)` is no link
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+://|#|mailto:", t)]


def test_relative_links_resolve():
    pages = [README] + [README.parent / t.split("#")[0] for t in _links(README) if t.endswith(".md")]
    broken = [f"{page.relative_to(ROOT)} -> {t}" for page in pages for t in _links(page)
              if not (page.parent / t.split("#")[0]).exists()]
    assert not broken, broken


@pytest.mark.slow  # one short generation on the bundled model
def test_python_blocks_run_as_written(tmp_path):
    """The README's Python snippets run on a CPU as written (in a scratch copy: they may write reports/)."""
    blocks = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)
    assert blocks, "the README shows the Python API"
    venv = ROOT / ".venv" if (ROOT / ".venv" / "bin" / "python").exists() else Path(sys.prefix)
    for entry in ROOT.iterdir():
        if entry.name not in ("reports", ".git", ".pytest_cache", ".venv"):
            (tmp_path / entry.name).symlink_to(entry)
    (tmp_path / "reports").mkdir()
    for block in blocks:
        proc = subprocess.run([str(venv / "bin" / "python"), "-c", block], cwd=tmp_path, env=_env(),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{block}\n{proc.stderr[-3000:]}"
