"""benchmarks/foresight.py on a short request: the table's figures hang together."""

import json
from pathlib import Path

import pytest

from conftest import benchmark_script


def test_foresight_rows_and_outputs(tmp_path, capsys):
    script = benchmark_script("foresight")
    out = tmp_path / "fs"
    assert script.main(["--sources", "random,bundled trace", "--slots", "8", "--prompt-len", "16", "--gen", "8",
                        "--out", str(out)]) == 0
    rows = json.loads(Path(f"{out}.json").read_text())["rows"]
    assert [(r["source"], r["slots"]) for r in rows] == [("random", 8), ("bundled trace", 8)]
    for r in rows:
        curve = r["foresight_copies_per_token"]
        assert list(curve) == ["0", "1", "2", "4", "8", "16", "24", "32", "64", "inf"]
        assert curve["inf"] == pytest.approx(r["belady_copies_per_token"]) and curve["inf"] <= min(curve.values())
        assert r["belady_copies_per_token"] <= r["copies_per_token"]["lru"] <= 2 * 32  # k experts a layer
    assert "duoserve + gate" in rows[1]["copies_per_token"] and "duoserve + gate" not in rows[0]["copies_per_token"]
    assert "| bundled trace | 8 |" in Path(f"{out}.md").read_text()
    assert script.main(["--slots", "8", "--out", str(out)]) == 2  # exists: needs --force
    assert "--force" in capsys.readouterr().err
