"""The accelerate peer script runs (on the CPU here; on a GPU it dispatches under the budget)."""

from __future__ import annotations

import json

from conftest import benchmark_script


def test_peer_script_times_a_small_model(tmp_path):
    peer = benchmark_script("accelerate_peer")
    out = tmp_path / "peer.json"
    result = peer.main(["--preset", "tiny", "--num-layers", "2", "--prompt-len", "16", "--gen", "3",
                        "--device", "cpu", "--out", str(out)])
    assert json.loads(out.read_text())["ttft_s_measured"] == result["ttft_s_measured"] > 0
    assert result["tpot_s_scaled_to_full_depth"] == result["tpot_s_measured"] * 2  # tiny has 4 layers
