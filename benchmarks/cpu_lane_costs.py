"""One Mixtral-size expert on the CPU lane: by format, thread count and token count, idle and under copies.

    python benchmarks/cpu_lane_costs.py --out F.json [--formats int4,nf4] [--threads 4,8,16] [--force]

The issue-13 figures the cost model and the simulator rest on, measured by
``duoserve_core.calibrate.host_lane`` (the runtime's own CPU-lane worker), beside one record's
pinned copy to the GPU (where there is one). Random weights: the time does not depend on values.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys

import torch

from duoserve_core.atomic import atomic_write_json, check_writable
from duoserve_core.calibrate.host_lane import measure_host_lane
from duoserve_core.checkpoint import ExpertTensors
from duoserve_core.experts.formats import make_format
from duoserve_core.experts.host_lane import measure_copy_s
from duoserve_core.experts.host_store import HostExpertStore
from duoserve_core.experts.transfer import TransferEngine
from duoserve_core.events import EventBus


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--formats", default="int4")
    p.add_argument("--threads", default="4,8,16")
    p.add_argument("--tokens", default="1,2,4,8,16,32")
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true")
    a = p.parse_args(argv)
    check_writable(a.out, a.force, "--out")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(0)
    h, i = a.hidden, a.intermediate
    tensors = ExpertTensors(*(torch.randn(shape, generator=g, dtype=torch.float32).mul_(0.02).to(dtype)
                              for shape in ((i, h), (i, h), (h, i))))  # w1, w3, w2
    threads = [int(t) for t in a.threads.split(",")]
    tokens = tuple(int(t) for t in a.tokens.split(","))
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "cpu": cpu_model(),
           "cpu_count": os.cpu_count(), "torch": torch.__version__, "date": datetime.date.today().isoformat(),
           "command": "python benchmarks/cpu_lane_costs.py " + " ".join(argv or sys.argv[1:]),
           "shape": {"hidden": h, "intermediate": i}, "formats": {}}
    for name in a.formats.split(","):
        fmt = make_format(name, h, i, dtype)
        store = HostExpertStore(1, 1, fmt.nbytes, pin=device.type == "cuda")
        fmt.pack(tensors, store.record(0, 0), torch.device("cpu"))
        engine = TransferEngine(store, 1, device, EventBus())
        lane = measure_host_lane(fmt, store.record(0, 0), threads, dtype, device, tokens)
        out["formats"][name] = {"record_bytes": fmt.nbytes, "copy_s": measure_copy_s(engine), **lane}
        for n in threads:
            idle = dict((int(t), s) for t, s in lane["idle"][fmt.name][str(n)])
            busy = dict((int(t), s) for t, s in lane["expert"][fmt.name][str(n)])
            print(f"{name} {n:>2} threads: " + "  ".join(f"{t} tok {idle[t] * 1e3:.2f}/{busy[t] * 1e3:.2f} ms"
                                                         for t in tokens) + "   (idle/under copies)", flush=True)
        print(f"{name}: one copy {out['formats'][name]['copy_s'] * 1e3:.2f} ms", flush=True)
    atomic_write_json(a.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
