"""Train, evaluate and time the decode-phase expert predictor.

    python -m duoserve_core.predict train --trace T.parquet [--trace ...] --depth 2 --out P.safetensors
    python -m duoserve_core.predict eval  --trace TEST.parquet --predictor P.safetensors [--json]
    python -m duoserve_core.predict bench --predictor P.safetensors --device cuda [--batch 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from ..knob_args import Parser
from ..errors import DeviceError, DuoServeError
from ..progress import interruptible, shows_progress
from ..traces import read_trace
from ..units import format_bytes, parse_bytes
from .baselines import fit_baselines
from .latency import bench
from .data import PHASES, from_trace, load_arrays
from .errors import PredictorError, describe_shape
from .evaluate import MIXTRAL_NF4_EXPERT_BYTES, evaluate, format_report
from .layer_predictor import load_predictor, train_predictor


def _hidden(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--hidden takes sizes such as 64 or 128,64; got {text!r}") from exc
    if sizes == (0,):
        return ()  # no hidden layer: per-expert logistic regression
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"--hidden needs positive sizes (or 0 for none), got {text!r}")
    return sizes


def _positive(parse, what: str):
    """An argparse type: ``parse(text)`` must give a number of at least 1."""
    def convert(text: str) -> int:
        try:
            n = parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{what}: {exc}") from exc
        if n < 1:
            raise argparse.ArgumentTypeError(f"{what} must be positive, got {text!r}")
        return n
    return convert


_bytes = _positive(parse_bytes, "--expert-bytes")
_count = _positive(int, "this option")


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--alpha takes a number, got {text!r}") from exc
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"--alpha must be at least 0, got {text!r}")
    return value


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--holdout takes a share such as 0.2, got {text!r}") from exc
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"--holdout must be between 0 and 1 (exclusive), got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m duoserve_core.predict", description=__doc__,  # one-line errors
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fit a predictor on one or more traces")
    t.add_argument("--trace", action="append", required=True, help="training trace (repeat for several)")
    t.add_argument("--depth", type=_count, default=2, help="how many layers ahead to predict")
    t.add_argument("--out", required=True, help="predictor file to write (safetensors)")
    t.add_argument("--window", type=_count, default=4, help="current-token layers in the features")
    t.add_argument("--hidden", type=_hidden, default=(64,),
                   help="hidden sizes of the MLP correction, e.g. 64 or 128,64; 0: no hidden layer (linear)")
    t.add_argument("--alpha", type=_non_negative, default=1.0,
                   help="L2 strength on the correction's weights (penalty alpha / (2 tokens) x |W|^2)")
    t.add_argument("--holdout", type=_share, default=0.2,
                   help="share of the training tokens held out to stop, choose and calibrate (the last ones)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--max-iter", type=_count, default=200,
                   help="training epochs per MLP at most (training stops earlier when held-out loss stalls)")
    t.add_argument("--jobs", type=int, default=1, help="MLPs fitted in parallel (-1: one per CPU core)")
    t.add_argument("--include-prefill", action="store_true",
                   help="also train on prefill tokens (default: decode tokens only)")
    t.add_argument("--no-prev-token", action="store_true", help="leave the previous token out of the features")
    t.add_argument("--force", action="store_true", help="replace --out if it exists")

    e = sub.add_parser("eval", help="compare the predictor with the baselines on a held-out trace")
    e.add_argument("--trace", required=True, help="held-out test trace")
    e.add_argument("--predictor", required=True)
    e.add_argument("--train-trace", action="append", default=None,
                   help="trace(s) to fit the baselines on (default: the predictor's own training traces)")
    e.add_argument("--threshold", type=float, default=0.5, help="score from which an expert is prefetched")
    e.add_argument("--expert-bytes", type=_bytes, default=MIXTRAL_NF4_EXPERT_BYTES,
                   help="bytes moved per prefetched expert (default: one Mixtral-8x7B NF4 expert); "
                        "accepts sizes such as 94.5MiB")
    e.add_argument("--phase", choices=PHASES, default="decode", help="which tokens to score")
    e.add_argument("--json", action="store_true", help="print one JSON object")

    b = sub.add_parser("bench", help="time one layer's prediction on a device")
    b.add_argument("--predictor", required=True)
    b.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    b.add_argument("--batch", type=_count, default=1, help="tokens per call")
    b.add_argument("--iters", type=_count, default=1000, help="timed calls per layer")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def train(args: argparse.Namespace) -> None:
    out = Path(args.out)
    if out.exists() and not args.force:
        raise PredictorError(f"{out} exists; choose another --out or pass --force to replace it")
    if args.jobs == 0 or args.jobs < -1:
        raise PredictorError(f"--jobs takes a positive number or -1 (every core), got {args.jobs}")
    phases = ("decode", "prefill") if args.include_prefill else ("decode",)
    t0 = time.perf_counter()
    predictor = train_predictor(args.trace, depth=args.depth, window=args.window, hidden=args.hidden,
                                alpha=args.alpha, holdout=args.holdout, seed=args.seed, max_iter=args.max_iter,
                                use_prev_token=not args.no_prev_token, phases=phases, jobs=args.jobs,
                                # a terminal gets a bar over the layers, a log a line per fitted layer
                                log=None if shows_progress() else lambda msg: print(msg, file=sys.stderr))
    predictor.save(out)
    tr = predictor.training
    kept = sum(f["correction"] for f in tr["fits"].values())
    print(f"wrote {out} ({format_bytes(out.stat().st_size)}): {describe_shape(predictor.meta)}, depth {args.depth}, "
          f"window {args.window}, hidden {','.join(map(str, args.hidden)) or 'none'}; trained on {tr['samples']} "
          f"{'+'.join(phases)} tokens of {tr['requests']} requests in {time.perf_counter() - t0:.1f} s; "
          f"MLP correction kept in {kept} of {len(tr['fits'])} (layer, depth) models")


def evaluate_cmd(args: argparse.Namespace) -> dict:
    test = from_trace(read_trace(args.trace))
    predictor = load_predictor(args.predictor, expect=test.meta)
    train_traces = args.train_trace or predictor.training["traces"]
    missing = [p for p in train_traces if not Path(p).is_file()]
    if missing:
        raise PredictorError(f"training trace(s) {missing} recorded in {args.predictor} are not here; "
                             "pass --train-trace to fit the baselines on the same data")
    train_data = load_arrays(train_traces).select(tuple(predictor.training["phases"]))
    baselines = fit_baselines(train_data, predictor.depth)
    result = evaluate(test, predictor, baselines, threshold=args.threshold, expert_bytes=args.expert_bytes,
                      phase=args.phase)
    result.update(test_trace=str(args.trace), predictor=str(args.predictor), baseline_traces=list(train_traces))
    return result


def bench_cmd(args: argparse.Namespace) -> dict:
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        raise DeviceError(f"--device {args.device!r} is not a device; use cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda, but this machine has no CUDA GPU (or torch was built without CUDA)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise DeviceError(f"--device {device}, but this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    predictor = load_predictor(args.predictor, device=device)
    result = bench(predictor, batch=args.batch, iters=args.iters)
    result["device_name"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return result


def _print_bench(r: dict) -> None:
    names = list(r["layers"][0])
    labels = {"features_and_predict_us": "features+predict µs", "predict_us": "predict µs",
              "cuda_graph_us": "cuda graph µs"}
    print(f"{r['device_name']} ({r['device']}), batch {r['batch']}, depth {r['depth']}, torch threads {r['threads']}: "
          f"median of {r['iters']} calls per layer")
    print(f"{'layer':>5}" + "".join(f"{labels[n]:>22}" for n in names))
    for layer, v in r["layers"].items():
        print(f"{layer:>5}" + "".join(f"{v[n]:>22.1f}" for n in names))
    print("per layer, median (max): " + ", ".join(
        f"{labels[n]} {r['median_' + n]:.1f} ({r['max_' + n]:.1f})" for n in names))
    best = "cuda_graph_us" if "cuda_graph_us" in names else "features_and_predict_us"
    target = 50.0 if r["device"].startswith("cuda") else 500.0
    verdict = "meets" if r[f"median_{best}"] < target else "misses"
    print(f"{labels[best]}: {r['median_' + best]:.1f} µs per layer {verdict} the target of < {target:.0f} µs "
          f"({'an H100' if target == 50 else 'a CPU'})")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return interruptible(lambda: _run(args))  # Ctrl-C 130, SIGTERM 143; the predictor is saved only once complete


def _run(args: argparse.Namespace) -> int:
    try:
        if args.command == "train":
            train(args)
        elif args.command == "eval":
            result = evaluate_cmd(args)
            print(json.dumps(result) if args.json else format_report(result))
        else:
            result = bench_cmd(args)
            if args.json:
                print(json.dumps(result))
            else:
                _print_bench(result)
    except DuoServeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
