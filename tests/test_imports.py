"""Every module imports on its own, and the core's modules import one another without a circle.

A circle (``a`` imports ``b``, which imports ``a``, even inside a function) makes the import order
matter and hides which module owns what; ``duoserve_core`` must stay a tree that reads bottom-up.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def modules(package: str) -> list[str]:
    out = []
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append(".".join(parts))
    return out


def imports_of(module: str, known: set[str]) -> set[str]:
    """The ``known`` modules ``module`` names in any import statement (module level or in a function)."""
    path = ROOT / Path(*module.split("."))
    is_package = (path / "__init__.py").is_file()
    tree = ast.parse((path / "__init__.py" if is_package else path.with_suffix(".py")).read_text())
    package = module.split(".") if is_package else module.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1]) if node.level else ""
            stem = ".".join(p for p in (base, node.module or "") if p)
            names = [f"{stem}.{alias.name}" for alias in node.names] + [stem]
        else:
            continue
        for name in names:
            while name and name not in known:  # ``from a.b import c``: c may be a module or a name in a.b
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def test_the_core_has_no_import_circle():
    core = modules("duoserve_core")
    graph = {m: imports_of(m, set(core)) for m in core}
    state: dict[str, str] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for n in sorted(graph[m]):
            if n.startswith(m + ".") or m.startswith(n + ".") and n == m.rsplit(".", 1)[0]:
                continue  # a package and its own parts: Python initialises the package first
            assert state.get(n) != "open", "import circle: " + " -> ".join(path + [m, n])
            if n not in state:
                visit(n, path + [m])
        state[m] = "done"

    for m in core:
        if m not in state:
            visit(m, [])


def test_every_module_imports_on_its_own():
    names = modules("duoserve_core") + modules("lab")
    script = (
        "import importlib, sys\n"
        f"names = {names!r}\n"
        "failed = []\n"
        "for name in names:\n"
        "    for loaded in [m for m in sys.modules if m.split('.')[0] in ('duoserve_core', 'lab')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except BaseException as exc:\n"
        "        failed.append(f'{name}: {type(exc).__name__}: {exc}')\n"
        "print('\\n'.join(failed))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == ""
