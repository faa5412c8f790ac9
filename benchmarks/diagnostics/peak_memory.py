"""What a run's GPU peak holds beyond its plan: the tensors alive at the end, with where they were made.

    python benchmarks/diagnostics/peak_memory.py [--graphs-first] [--budget 4slots]

Loads the tests' tiny checkpoint (``tests/conftest.py``), optionally runs a runtime with decode CUDA
graphs first (as ``tests/test_decode_graph.py`` does before ``tests/test_gpu.py``), then the batched
run of ``test_gpu_batched_requests_equal_alone``, and prints the plan's budget, the run's peak, what
was allocated before it, and every live block of 1 MiB or more with the innermost frames that made it
(torch's memory history).
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
import duoserve_core  # noqa: E402
from conftest import make_reference, save_checkpoint  # noqa: E402

MIB = 1 << 20


def live_blocks(min_bytes: int = MIB) -> list[tuple[int, list[str]]]:
    out = []
    for segment in torch.cuda.memory._snapshot()["segments"]:
        for block in segment["blocks"]:
            if block["state"] == "active_allocated" and block["size"] >= min_bytes:
                frames = [f"{f['filename'].split('site-packages/')[-1]}:{f['line']} {f['name']}"
                          for f in block.get("frames", []) if "duoserve" in f["filename"] or "torch/" in f["filename"]]
                out.append((block["size"], frames[:6]))
    return sorted(out, reverse=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--graphs-first", action="store_true")
    p.add_argument("--budget", default="4slots")
    a = p.parse_args()
    torch.cuda.memory._record_memory_history(max_entries=200_000)
    path = save_checkpoint(make_reference(), Path(tempfile.mkdtemp()), shard=True)
    if a.graphs_first:
        rt = duoserve_core.load(path, device="cuda", quant="nf4", attention_quant="nf4", dtype=torch.float32,
                                policy="resident", cuda_graphs=True, max_context=64)
        rt.generate(prompt_ids=[5, 17, 33, 2], max_new_tokens=6, stop_at_eos=False)
        del rt
    gc.collect()
    before = torch.cuda.memory_allocated()
    print(f"allocated before the run's runtime: {before / MIB:.1f} MiB")
    rt = duoserve_core.load(path, device="cuda", quant="nf4", dtype=torch.float32, policy="duoserve",
                            memory_budget=a.budget, max_context=64, max_batch=4)
    prompts = [[3 + (7 * i + j) % 120 for j in range(5 + 2 * i)] for i in range(6)]
    run = rt.generate_many(prompts, max_batch=4, max_new_tokens=8, stop_at_eos=False)
    print(f"plan budget {rt.plan.budget_bytes / MIB:.1f} MiB ({rt.plan}), run peak {run.peak_gpu_bytes / MIB:.1f} MiB, "
          f"allocated now {torch.cuda.memory_allocated() / MIB:.1f} MiB")
    for size, frames in live_blocks():
        print(f"{size / MIB:8.1f} MiB  " + " <- ".join(frames))


if __name__ == "__main__":
    main()
