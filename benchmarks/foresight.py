"""How far ahead a decode cache must see to come near Belady: copies per token against foresight.

    python benchmarks/foresight.py --out benchmarks/results/foresight_sim_h200 [--force]

For each routing source (the synth presets and the bundled trace, replayed at Mixtral-8x7B's 32 layers
as ``sim.decode_routing`` does) and budget, ``lab.routing_view.foresight`` (which notebook 05 draws): from the
request's expert uses (``sim.reference.workload``, as Belady's bound reads them) ``oracle.foresight_loads`` counts the
decode loads of a cache that sees the next W layer steps of it (W = 0: LRU or LFU alone; W = 32: the
same layer of the next token; W = inf: Belady), the better of the two fallbacks; beside them what
duoserve (on the bundled trace also with the gate's recorded guesses) and lru copy per token, and their
TPOT over Belady's bound. Why: duoserve misses the 1.25x-of-Belady target on the bundled routing; this
says whether any policy that sees as far as the gate and a predictor do (a layer or two) could meet it.

Deterministic (no policy decision time charged); about 3 minutes on a CPU. Writes JSON and Markdown.
"""

from __future__ import annotations

import argparse
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from duoserve_core.atomic import atomic_write_json, atomic_write_text, check_writable  # noqa: E402
from duoserve_core.errors import DuoServeError  # noqa: E402
from duoserve_core.sim.decode_routing import CALIBRATION  # noqa: E402
from lab import routing_view  # noqa: E402

def markdown(rows: list[dict]) -> str:
    windows = list(rows[0]["foresight_copies_per_token"])
    head = ("| source | slots | duoserve | duoserve + gate | lru | " + " | ".join(f"W={w}" for w in windows)
            + " | TPOT / Belady's bound: duoserve (+ gate) |")
    lines = [f"Decode copies per token against foresight (W: layer steps seen ahead; W=inf is Belady), calibration "
             f"`{CALIBRATION.name}`, prompt {rows[0]['prompt_len']}, {rows[0]['gen']} tokens.", "", head,
             "|---|---:|" + "---:|" * (len(windows) + 4)]
    for r in rows:
        c, ratio = r["copies_per_token"], r["tpot_over_belady"]
        gate = c.get("duoserve + gate")
        lines.append(f"| {r['source']} | {r['slots']} | {c['duoserve']:.1f} | {'-' if gate is None else f'{gate:.1f}'} "
                     f"| {c['lru']:.1f} | " + " | ".join(f"{v:.1f}" for v in r["foresight_copies_per_token"].values())
                     + f" | {ratio['duoserve']:.2f}x"
                     + ("" if gate is None else f" ({ratio['duoserve + gate']:.2f}x)") + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sources", default=",".join(routing_view.SOURCES))
    p.add_argument("--slots", default="8,16,21,32,64")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--gen", type=int, default=128)
    p.add_argument("--out", required=True, help="path stem: .json and .md are written")
    p.add_argument("--force", action="store_true", help="replace existing outputs")
    args = p.parse_args(argv)
    try:
        for suffix in (".json", ".md"):
            check_writable(f"{args.out}{suffix}", args.force, "--out")
        rows = []
        for source in args.sources.split(","):
            for slots in (int(s) for s in args.slots.split(",")):
                rows.append(routing_view.foresight(source, slots, args.prompt_len, args.gen))
                print(f"{source} {slots} slots: done", file=sys.stderr, flush=True)
    except (DuoServeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    atomic_write_json(f"{args.out}.json", {"device": "simulated H200 (its calibration)", "date": date.today().isoformat(),
                                           "command": "python benchmarks/foresight.py " + " ".join(argv or sys.argv[1:]),
                                           "calibration": str(CALIBRATION.relative_to(ROOT)), "windows": [str(w) for w in routing_view.WINDOWS],
                                           "rows": rows})
    text = markdown(rows)
    atomic_write_text(f"{args.out}.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
