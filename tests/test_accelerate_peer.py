"""The accelerate peer script runs (on the CPU here; on a GPU it dispatches under the budget)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "accelerate_peer.py"


def test_peer_script_times_a_small_model(tmp_path):
    spec = importlib.util.spec_from_file_location("accelerate_peer", SCRIPT)
    peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer)
    out = tmp_path / "peer.json"
    result = peer.main(["--preset", "tiny", "--num-layers", "2", "--prompt-len", "16", "--gen", "3",
                        "--device", "cpu", "--out", str(out)])
    assert json.loads(out.read_text())["ttft_s_measured"] == result["ttft_s_measured"] > 0
    assert result["tpot_s_scaled_to_full_depth"] == result["tpot_s_measured"] * 2  # tiny has 4 layers
