"""Which part of timeline recording costs time on the GPU (decode, on-demand, Mixtral-8x7B width)."""

from __future__ import annotations

import torch

import duoserve_core
from duoserve_core.timeline import Timeline

real_start = Timeline.start


def only(streams):
    def start(self, stream, *a, **k):
        return real_start(self, stream, *a, **k) if stream in streams else None
    return start


def main() -> None:
    prompt = list(range(3, 131))
    for policy in ("on-demand", "resident"):
        rt = duoserve_core.load("synthetic:mixtral-8x7b", device="cuda", quant="nf4", memory_budget="12GiB",
                                policy=policy, num_layers=4, max_context=160)
        for label, enabled, streams in (("off", False, ()), ("all", True, ("copy", "compute")),
                                        ("copy only", True, ("copy",)), ("compute only", True, ("compute",)),
                                        ("off again", False, ()), ("all again", True, ("copy", "compute"))):
            Timeline.start = only(streams)
            rt.timeline.enabled = enabled
            rt.generate(prompt_ids=prompt[:8], max_new_tokens=2, stop_at_eos=False)
            r = rt.generate(prompt_ids=prompt, max_new_tokens=16, stop_at_eos=False)
            print(f"{policy:<10} timeline {label:<13} TTFT {r.ttft_s * 1e3:7.1f} ms  TPOT {r.tpot_s * 1e3:6.2f} ms")
        del rt
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
