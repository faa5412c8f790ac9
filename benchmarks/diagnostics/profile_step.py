"""Where a forward's time goes on the GPU: torch.profiler over prefill and a few decode steps.

    python benchmarks/diagnostics/profile_step.py --num-layers 4 --policy on-demand --out $OUT
    python benchmarks/diagnostics/profile_step.py --policy resident --quant-attention nf4 --no-cuda-graphs
(CUDA graphs are on by default on one GPU: ``--no-cuda-graphs`` profiles the eager decode)
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

import duoserve_core
from duoserve_core.knob_args import add_graph_argument


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="synthetic:mixtral-8x7b")
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--policy", default="on-demand")
    p.add_argument("--quant", default="nf4")
    p.add_argument("--quant-attention", default="none")
    p.add_argument("--cpu-experts", default="off")
    p.add_argument("--budget", default="12GiB")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen", type=int, default=8)
    add_graph_argument(p)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    prompt = list(range(3, 3 + a.prompt_len))
    for timeline in (True, False):
        rt = duoserve_core.load(a.model, device="cuda", quant=a.quant, memory_budget=a.budget, policy=a.policy,
                                num_layers=a.num_layers, max_context=a.prompt_len + a.gen, record_timeline=timeline,
                                attention_quant=a.quant_attention, cpu_experts=a.cpu_experts,
                                cuda_graphs=a.cuda_graphs, device_routing=a.device_routing)
        rt.generate(prompt_ids=prompt[:8], max_new_tokens=2, stop_at_eos=False)
        r = rt.generate(prompt_ids=prompt, max_new_tokens=a.gen, stop_at_eos=False)
        print(f"timeline={timeline}: TTFT {r.ttft_s * 1e3:.1f} ms  TPOT {r.tpot_s * 1e3:.2f} ms "
              f"({r.tpot_s * 1e3 / a.num_layers:.2f} ms/layer)  host computes {r.host_computes}")
        if timeline:
            rows = [x for x in rt.timeline.rows() if x["phase"] == "decode"]
            tokens = a.gen - 1
            for stream in ("compute", "copy", "cpu"):
                for kind in sorted({x["kind"] for x in rows if x["stream"] == stream}):
                    ms = sum(x["duration_ms"] for x in rows if x["stream"] == stream and x["kind"] == kind)
                    print(f"  decode {stream}/{kind}: {ms / tokens / a.num_layers:.3f} ms per layer (span, incl. waits)")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        rt.generate(prompt_ids=prompt, max_new_tokens=a.gen, stop_at_eos=False)
        torch.cuda.synchronize()
        print("profiled generate", time.perf_counter() - t0)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=60))
    if a.out:
        prof.export_chrome_trace(f"{a.out}/profile_{a.policy}.json")


if __name__ == "__main__":
    main()
