"""``python -m duoserve_core.traces record | expand | synth``: the trace commands (argv lives here only).

    python -m duoserve_core.traces record --model PATH --prompts FILE --max-new-tokens N --out T.parquet
        [--hidden-dims 32 | --hidden-basis TRAIN.parquet]
    python -m duoserve_core.traces expand --trace T.parquet --layers 32 --out T32.parquet
    python -m duoserve_core.traces synth --preset mixtral-like [--repeat 0.1,0.3,0.2 ...] --out T.parquet [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..atomic import check_writable
from ..errors import DuoServeError
from ..experts.formats import QUANT_CHOICES
from ..knob_args import Parser, device, number, seed, whole
from ..progress import interruptible
from ..runtime import load
from . import Trace, TraceError, expand_trace, read_prompts, read_trace, record, write_trace
from .synth import PRESETS, Profile, measure, preset_arguments, synthesize


def _profile(text: str | None, option: str) -> Profile | None:
    """``0.2`` or ``0.1,0.3,0.2`` (values at evenly spaced depths); None where the option is absent."""
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError as exc:
        raise TraceError(f"{option} takes a probability or comma-separated ones such as 0.1,0.3,0.2, "
                         f"got {text!r}") from exc
    return values[0] if len(values) == 1 else values


def synth_command(args: argparse.Namespace) -> dict:
    """Draw the trace, write it, and measure it: what ``--json`` prints."""
    out = check_writable(args.out, args.force, "--out")
    arguments = preset_arguments(
        args.preset, layers=args.layers, experts=args.experts, top_k=args.top_k, tokens=args.tokens,
        requests=args.requests, repeat=_profile(args.repeat, "--repeat"),
        affinity=_profile(args.affinity, "--affinity"), skew=args.skew, seed=args.seed, prompt_len=args.prompt_len,
        gate_precision=args.gate_precision)
    df, meta = synthesize(**arguments)
    write_trace(out, df, meta, overwrite=args.force)
    return {"out": str(out), "preset": args.preset, "arguments": arguments, "statistics": measure(Trace(df, meta))}


def _print_synth(result: dict) -> None:
    a, s = result["arguments"], result["statistics"]
    L, E, k = s["layers"], s["experts"], s["top_k"]
    middle = (L - 1) // 2
    repeat = s["first_expert_repeat"]
    affinity = "-" if s["layer_affinity_mean"] is None else f"{s['layer_affinity_mean']:.3f}"
    print(f"wrote {result['out']}: {a['requests']} requests x {a['tokens']} decode tokens x {L} layers "
          f"({E} experts, top-{k}; preset {result['preset']}, seed {a['seed']})")
    print(f"first-expert repeat   {repeat[0]:.3f} at layer 0, {repeat[middle]:.3f} at layer {middle}, "
          f"{repeat[-1]:.3f} at layer {L - 1} (random: {1 / E:.3f})")
    print(f"recall@{k}              previous token {s['previous_token_recall_at_k']:.3f}, "
          f"popularity {s['popularity_recall_at_k']:.3f}, layer affinity {affinity} (random: {k / E:.3f})")
    print(f"popularity skew       Gini {sum(s['popularity_skew']) / L:.3f} on average (uniform: 0)")
    if s["speculative_gate_precision"] is not None:
        print(f"speculative gate      precision {s['speculative_gate_precision']:.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m duoserve_core.traces", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("record", help="record the routing of prompts")
    r.add_argument("--model", required=True)
    r.add_argument("--prompts", required=True, help="text file (one prompt per line) or JSONL with 'prompt'")
    r.add_argument("--max-new-tokens", type=whole(1), default=32)
    r.add_argument("--out", required=True)
    r.add_argument("--device", type=device, default="auto")
    r.add_argument("--quant", choices=QUANT_CHOICES, default="none", help="expert storage; routing is recorded at this precision")
    r.add_argument("--probs", action="store_true", help="also store the full softmax over experts")
    r.add_argument("--force", action="store_true", help="replace --out if it exists")
    hidden = r.add_mutually_exclusive_group()
    hidden.add_argument("--hidden-dims", type=int, default=None,
                        help="also store each MoE layer's input hidden state, compressed by a per-layer PCA to this "
                             "many dimensions fitted on this recording (column hidden_pca; see traces.hidden)")
    hidden.add_argument("--hidden-basis", default=None,
                        help="like --hidden-dims, but project with the PCA basis of this trace (record a held-out "
                             "trace with its training trace's basis: a predictor reads one basis only)")
    x = sub.add_parser("expand", help="the routing a deeper model replays from this trace (--routing-trace)")
    x.add_argument("--trace", required=True)
    x.add_argument("--layers", type=whole(1), required=True, help="layers of the model that will replay it")
    x.add_argument("--seed", type=seed, default=0, help="the relabelling seed (RoutingReplay's; the runtime uses 0)")
    x.add_argument("--out", required=True)
    x.add_argument("--force", action="store_true", help="replace --out if it exists")
    s = sub.add_parser("synth", help="routing drawn with chosen statistics (duoserve_core.traces.synth)")
    s.add_argument("--preset", default="random", help=f"start from a preset ({', '.join(PRESETS)}; default random); "
                   "the options below override its values")
    s.add_argument("--layers", type=int)
    s.add_argument("--experts", type=int)
    s.add_argument("--top-k", type=int)
    s.add_argument("--tokens", type=int, help="decode tokens per request")
    s.add_argument("--requests", type=int)
    s.add_argument("--repeat", help="P(a rank copies one of the previous token's experts): a probability, or "
                   "comma-separated ones at evenly spaced depths (0.1,0.3,0.2)")
    s.add_argument("--affinity", help="P(a rank takes the successor of this token's expert at the layer before), "
                   "like --repeat")
    s.add_argument("--skew", type=number(0.0), help="Zipf exponent of each layer's expert popularity (0 = uniform)")
    s.add_argument("--seed", type=seed, help="default 0, the seed the presets were tuned at")
    s.add_argument("--prompt-len", type=int, default=0, help="prefill tokens per request, before the decode ones")
    s.add_argument("--gate-precision", type=float, default=None,
                   help="add spec_experts: a speculative gate that guesses each of the next layer's experts this often")
    s.add_argument("--out", required=True)
    s.add_argument("--force", action="store_true", help="replace --out if it exists")
    s.add_argument("--json", action="store_true", help="print one JSON object: the file written and its statistics")
    args = parser.parse_args(argv)
    return interruptible(lambda: run(args))


def run(args: argparse.Namespace) -> int:
    """The parsed command, run: its exit status."""
    out = Path(args.out)
    if args.command == "synth":
        try:
            result = synth_command(args)
        except DuoServeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if args.json:
            print(json.dumps(result))
        else:
            _print_synth(result)
        return 0
    if args.command == "expand":
        try:
            check_writable(out, args.force, "--out")
            df, meta = expand_trace(read_trace(args.trace), args.layers, seed=args.seed)
            write_trace(out, df, meta, overwrite=args.force)
        except DuoServeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"wrote {out}: {df.groupby(['request_id', 'token_index']).ngroups} tokens x {meta.num_layers} layers")
        return 0
    try:
        check_writable(out, args.force, "--out")  # before the model loads
        prompts = read_prompts(args.prompts)
        basis = None
        if args.hidden_basis is not None:
            basis = read_trace(args.hidden_basis).meta.hidden_basis
            if basis is None:
                raise TraceError(f"--hidden-basis {args.hidden_basis} holds no hidden-state basis; give a trace "
                                 "recorded with --hidden-dims")
        if args.hidden_dims is not None and args.hidden_dims < 1:
            raise TraceError(f"--hidden-dims takes a positive number of dimensions, got {args.hidden_dims}")
        runtime = load(args.model, device=args.device, quant=args.quant, policy="resident")
        df, meta = record(runtime, prompts, args.max_new_tokens, keep_probs=args.probs,
                          hidden_dims=args.hidden_dims, hidden_basis=basis)
        write_trace(out, df, meta, overwrite=args.force)
    except DuoServeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    tokens = df.groupby(["request_id", "token_index"]).ngroups
    print(f"wrote {out}: {len(prompts)} requests, {tokens} tokens x {meta.num_layers} layers "
          f"({meta.num_experts} experts, top-{meta.top_k})")
    if meta.hidden_basis is not None:
        b = meta.hidden_basis
        kept = ", ".join(f"{v:.2f}" for v in b.explained.sum(1))
        print(f"hidden states: {b.dims} of {b.hidden_size} dimensions per layer (basis {b.fingerprint()}), "
              f"variance kept per layer {kept}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
