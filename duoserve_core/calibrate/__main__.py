"""``python -m duoserve_core.calibrate``: the command line of ``duoserve_core.calibrate``."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from ..atomic import atomic_write_json, check_writable
from ..errors import DuoServeError
from ..experts.formats import QUANT_CHOICES
from ..knob_args import Parser, add_graph_argument, device, listed, number, whole
from ..mixtral import ATTENTION_QUANT_CHOICES
from ..progress import interruptible
from ..runtime import device_name, resolve_device
from . import DEFAULT_CONTEXTS, DEFAULT_SIZES_MIB, MIB, CalibrationSpec, calibrate, default_out
from . import __doc__ as calibrate_doc


def _format(text: str) -> str:
    if text not in QUANT_CHOICES:
        raise argparse.ArgumentTypeError(f"unknown expert format {text!r}; choose from {', '.join(QUANT_CHOICES)}")
    return text


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(prog="python -m duoserve_core.calibrate", description=calibrate_doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="synthetic:mixtral-8x7b", help="synthetic:<preset> or a checkpoint folder")
    p.add_argument("--quant", choices=QUANT_CHOICES, default="nf4", help="expert format the runtime parts use (none, bf16, nf4)")
    p.add_argument("--quant-attention", choices=ATTENTION_QUANT_CHOICES, default="none", help="attention projections: none or nf4")
    p.add_argument("--device", type=device, default="auto")
    p.add_argument("--formats", type=listed(_format), default="bf16,nf4", help="expert formats to time (the --quant one is added)")
    p.add_argument("--max-tokens", type=whole(1), default=2048, help="expert compute: 1, 2, 4, .. up to this")
    p.add_argument("--sizes-mib", type=listed(number(0.0, above=True)), default=",".join(map(str, DEFAULT_SIZES_MIB)),
                   help="H2D copy sizes in MiB (one expert record is always added)")
    p.add_argument("--contexts", type=listed(whole(1)), default=",".join(map(str, DEFAULT_CONTEXTS)),
                   help="prefill lengths and decode contexts (capped by the model's context)")
    p.add_argument("--routing-trace", default="auto",
                   help="trace replayed while the runtime is timed, as the bench does (auto: the bundled one "
                        "where experts and top-k fit; none: the model's own router)")
    p.add_argument("--num-layers", type=whole(1), default=2, help="layers of the runtime used for per-layer figures")
    p.add_argument("--repeats", type=whole(1), default=3)
    p.add_argument("--cpu-threads", type=listed(whole(1)), default=None,
                   help="also time the CPU lane (one expert on the host) at these thread counts, e.g. 4,8,16")
    p.add_argument("--gpus", type=whole(1), default=1,
                   help="on a machine with several GPUs: also time all their links at once and peer copies "
                        "(for sim --gpus N)")
    add_graph_argument(p, routing=False)  # the runtime's runs (host terms) with the decode graphs, as a --cuda-graphs run has them
    p.add_argument("--out", default=None, help="default: data/calibration/<device>_<model>_<quant>.json")
    p.add_argument("--json", action="store_true", help="also print the calibration as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress lines (nor bars) on stderr")
    p.add_argument("--force", action="store_true", help="replace --out (or the default file) if it exists")
    return p.parse_args(argv)


def output_path(args: argparse.Namespace) -> Path:
    """``--out``, or ``default_out`` of what the record will hold (device, model name, quant), known before timing."""
    if args.out:
        return Path(args.out)
    return default_out({"device": device_name(resolve_device(args.device)), "model": {"name": args.model},
                        "quant": args.quant})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return interruptible(lambda: run(args, argv))


def run(args: argparse.Namespace, argv: list[str] | None) -> int:
    """Calibrate as ``args`` say and write the file: the exit status."""
    try:
        out = check_writable(output_path(args), args.force, "--out")  # before minutes of timing
        spec = CalibrationSpec(model=args.model, quant=args.quant, quant_attention=args.quant_attention,
                               device=args.device, formats=tuple(args.formats.split(",")), max_tokens=args.max_tokens,
                               sizes_mib=tuple(float(s) for s in args.sizes_mib.split(",")),
                               contexts=tuple(int(c) for c in args.contexts.split(",")),
                               routing_trace=args.routing_trace, num_layers=args.num_layers, repeats=args.repeats,
                               quiet=args.quiet, bars=not args.json,
                               cpu_threads=tuple(int(t) for t in args.cpu_threads.split(",")) if args.cpu_threads else (),
                               gpus=args.gpus, cuda_graphs=args.cuda_graphs)
        record = calibrate(spec, "python -m duoserve_core.calibrate "
                           + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])))
    except DuoServeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    atomic_write_json(out, record)
    if args.json:
        print(json.dumps(record))
    h2d = dict((int(b), s) for b, s in record["h2d"]["pinned"])
    one = max(h2d)
    print(f"wrote {out} in {record['seconds_taken']:.1f} s: pinned H2D {one / h2d[one] / 1e9:.1f} GB/s at "
          f"{one // MIB} MiB", file=sys.stderr if args.json else sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
