"""benchmarks/diagnostics/gc_pause.py: a collection inside a generation walks only what the call made."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "diagnostics"))

import gc_pause  # noqa: E402


def test_inside_a_generation_the_long_lived_heap_is_not_walked(capsys):
    assert gc_pause.main(["--objects", "50000", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)  # --json prints JSON alone
    assert r["walked_outside"] > 50_000 > 10 * r["walked_inside"]  # the heap outside, almost nothing inside
    assert 0 < r["inside_ms"] <= r["gc_pause_ms"]  # the forced collection was counted by the result's meter


def test_a_negative_count_is_refused(capsys):
    assert gc_pause.main(["--objects", "-1"]) == 2
    assert capsys.readouterr().err.strip() == "error: --objects must be 0 or more"

