"""The schedulers issue's targets, read off committed bench results: met or missed, and by how much.

    python benchmarks/targets.py benchmarks/results/bench_h200_8x7b_*.json --out benchmarks/results/targets_h200.json

New bench runs carry the same block (``record["targets"]``, ``duoserve_core.bench.targets``); this
derives it for files written before it existed, from each file's own figures only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from duoserve_core.bench import targets  # noqa: E402
from duoserve_core.atomic import atomic_write_json  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    derived = {}
    for path in args.files:
        record = json.loads(Path(path).read_text())
        if "duoserve" not in record.get("results", {}):
            print(f"{path}: no duoserve run, skipped")
            continue
        t = derived[Path(path).name] = {"device": record["device"], "date": record["date"], **targets(record)}
        flags = ", ".join(f"{k} {'met' if v['met'] else 'MISSED'}" for k, v in t.items() if isinstance(v, dict) and "met" in v)
        print(f"{Path(path).name}: {flags}")
    atomic_write_json(args.out, {"derived_by": "python benchmarks/targets.py " + " ".join(args.files), "files": derived})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
