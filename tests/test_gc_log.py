"""benchmarks/diagnostics/gc_site: a collection over the limit is logged from any thread, one under it is not."""

import os
import subprocess
import sys
from pathlib import Path

SITE = Path(__file__).resolve().parents[1] / "benchmarks" / "diagnostics" / "gc_site"
PROGRAM = "import gc, threading; t = threading.Thread(target=gc.collect, name='worker'); t.start(); t.join()"


def run(limit_ms: str) -> str:
    env = {**os.environ, "PYTHONPATH": f"{SITE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "GC_LOG_MS": limit_ms}
    return subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, check=True).stderr


def test_a_collection_over_the_limit_is_logged_with_its_thread():
    logged = [line for line in run("0").splitlines() if line.startswith("gc: ")]
    assert any("generation 2" in line and "on thread worker" in line for line in logged)


def test_a_collection_under_the_limit_is_not():
    assert "gc: " not in run("60000")
