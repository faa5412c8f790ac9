"""``python -m duoserve_core.traces record | expand``: the trace commands (argv lives here only).

    python -m duoserve_core.traces record --model PATH --prompts FILE --max-new-tokens N --out T.parquet
    python -m duoserve_core.traces expand --trace T.parquet --layers 32 --out T32.parquet
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import DuoServeError
from ..runtime import load
from . import TraceError, expand_trace, read_prompts, read_trace, record, write_trace


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m duoserve_core.traces", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("record", help="record the routing of prompts")
    r.add_argument("--model", required=True)
    r.add_argument("--prompts", required=True, help="text file (one prompt per line) or JSONL with 'prompt'")
    r.add_argument("--max-new-tokens", type=int, default=32)
    r.add_argument("--out", required=True)
    r.add_argument("--device", default="auto")
    r.add_argument("--quant", default="none", help="expert storage; routing is recorded at this precision")
    r.add_argument("--probs", action="store_true", help="also store the full softmax over experts")
    r.add_argument("--force", action="store_true", help="replace --out if it exists")
    x = sub.add_parser("expand", help="the routing a deeper model replays from this trace (--routing-trace)")
    x.add_argument("--trace", required=True)
    x.add_argument("--layers", type=int, required=True, help="layers of the model that will replay it")
    x.add_argument("--seed", type=int, default=0, help="the relabelling seed (RoutingReplay's; the runtime uses 0)")
    x.add_argument("--out", required=True)
    x.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.command == "expand":
        try:
            df, meta = expand_trace(read_trace(args.trace), args.layers, seed=args.seed)
            write_trace(out, df, meta, overwrite=args.force)
        except DuoServeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"wrote {out}: {df.groupby(['request_id', 'token_index']).ngroups} tokens x {meta.num_layers} layers")
        return 0
    try:
        if out.exists() and not args.force:
            raise TraceError(f"{out} exists; choose another --out or pass --force to replace it")
        prompts = read_prompts(args.prompts)
        runtime = load(args.model, device=args.device, quant=args.quant, policy="resident")
        df, meta = record(runtime, prompts, args.max_new_tokens, keep_probs=args.probs)
        write_trace(out, df, meta, overwrite=args.force)
    except DuoServeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    tokens = df.groupby(["request_id", "token_index"]).ngroups
    print(f"wrote {out}: {len(prompts)} requests, {tokens} tokens x {meta.num_layers} layers "
          f"({meta.num_experts} experts, top-{meta.top_k})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
