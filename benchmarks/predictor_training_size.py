"""Does the predictor generalize from little data? Held-out recall at equal bytes against training size.

    .venv/bin/python benchmarks/predictor_training_size.py --out benchmarks/results/predictor_training_size.json

For each size (200 to 20,000 decode tokens, 50 per request) a depth-2 predictor is trained on
mixtral-like synthetic routing (``traces synth --preset mixtral-like``, seed 0) and scored, with the
baselines fitted on the same tokens, on two held-out sets of 5,000 decode tokens:

    other seed     a mixtral-like trace of seed 1. The synthesizer draws each layer's popularity
                   order and expert-to-expert successors from the seed, so this is another model
                   with the same statistics: only temporal locality (the previous token's experts
                   come back) carries over, and the previous-token baseline is the bar to meet.
    same model     100 more requests of the seed-0 trace, not trained on: held-out prompts of the
                   model the predictor was trained for, as in serving.

Then once on the bundled model (data/traces/small-moe-train.parquet, scored on
small-moe-heldout.parquet). Every row: R@2 (recall of the 2 best-scored experts: equal bytes for
every method) of the predictor, the previous token and popularity, and the predictor's ECE
(``predict.evaluate``), per depth. CPU only; about 2 minutes on 2 cores with ``--jobs 2``.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from duoserve_core.atomic import atomic_write_json, check_writable  # noqa: E402
from duoserve_core.errors import DuoServeError  # noqa: E402
from duoserve_core.predict import train_predictor  # noqa: E402
from duoserve_core.predict.baselines import Popularity, PreviousToken  # noqa: E402
from duoserve_core.predict.data import load_arrays  # noqa: E402
from duoserve_core.predict.evaluate import evaluate  # noqa: E402
from duoserve_core.traces import read_trace, write_trace  # noqa: E402
from duoserve_core.traces.synth import preset_arguments, synthesize  # noqa: E402

SIZES = (200, 500, 1000, 2000, 5000, 20000)
TOKENS_PER_REQUEST = 50
TEST_REQUESTS = 100  # 5,000 held-out decode tokens per test set
BUNDLED_TRAIN = ROOT / "data" / "traces" / "small-moe-train.parquet"
BUNDLED_TEST = ROOT / "data" / "traces" / "small-moe-heldout.parquet"


def mixtral_like(path: Path, seed: int, requests: int) -> Path:
    df, meta = synthesize(**preset_arguments("mixtral-like", seed=seed, requests=requests, tokens=TOKENS_PER_REQUEST))
    write_trace(path, df, meta)
    return path


def split_requests(path: Path, first: int, train: Path, test: Path) -> None:
    """The trace's first ``first`` requests to ``train``, the rest to ``test``."""
    trace = read_trace(path)
    keep = trace.df["request_id"] < first
    write_trace(train, trace.df[keep].reset_index(drop=True), trace.meta)
    write_trace(test, trace.df[~keep].reset_index(drop=True), trace.meta)


def score(train: Path, tests: dict[str, Path], depth: int, jobs: int) -> dict:
    """Train on ``train``, evaluate on each test trace: R@k and ECE per depth."""
    t0 = time.perf_counter()
    predictor = train_predictor([train], depth=depth, jobs=jobs)
    seconds = time.perf_counter() - t0
    fits = predictor.training["fits"].values()
    train_data = load_arrays([train]).select(("decode",))
    baselines = [Popularity(train_data), PreviousToken()]
    out = {"train_tokens": predictor.training["samples"], "fit_seconds": round(seconds, 1),
           "corrections_kept": sum(f["correction"] for f in fits), "models": len(fits), "tests": {}}
    for name, path in tests.items():
        result = evaluate(load_arrays([path]), predictor, baselines)
        k = str(result["top_k"])
        out["tests"][name] = {
            d: {"predictor": r["overall"]["recall_at"][k], "ece": r["overall"]["calibration"]["ece"],
                **{b: result["methods"][b][d]["overall"]["recall_at"][k] for b in ("previous_token", "popularity")}}
            for d, r in result["methods"]["predictor"].items()}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--sizes", default=",".join(map(str, SIZES)), help="training sizes in decode tokens")
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--jobs", type=int, default=1, help="source layers fitted in parallel (-1: every core)")
    args = p.parse_args()
    try:
        check_writable(args.out, args.force, "--out")  # before minutes of training
        sizes = [int(s) for s in args.sizes.split(",")]
        if min(sizes) < 2 * TOKENS_PER_REQUEST:
            raise DuoServeError(f"--sizes must be at least {2 * TOKENS_PER_REQUEST} tokens (two requests), got {sizes}")
    except (DuoServeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        other_seed = mixtral_like(folder / "seed1.parquet", 1, TEST_REQUESTS)
        for size in sizes:
            first = size // TOKENS_PER_REQUEST
            drawn = mixtral_like(folder / f"seed0_{size}.parquet", 0, first + TEST_REQUESTS)
            train, same = folder / f"train_{size}.parquet", folder / f"same_{size}.parquet"
            split_requests(drawn, first, train, same)
            row = {"training": "mixtral-like seed 0", **score(train, {"other seed": other_seed, "same model": same},
                                                               args.depth, args.jobs)}
            rows.append(row)
            t = row["tests"]
            print(f"{size:>6} tokens  " + "  ".join(
                f"{name}: R@2 {t[name]['1']['predictor']:.4f} (previous token {t[name]['1']['previous_token']:.4f}, "
                f"popularity {t[name]['1']['popularity']:.4f}), ECE {t[name]['1']['ece']:.4f}" for name in t)
                + f"; {row['corrections_kept']}/{row['models']} corrections kept, {row['fit_seconds']:.0f} s",
                flush=True)
    bundled = {"training": "bundled small-moe-train", **score(BUNDLED_TRAIN, {"bundled held-out": BUNDLED_TEST},
                                                              args.depth, args.jobs)}
    b = bundled["tests"]["bundled held-out"]
    print(f"bundled: R@2 {b['1']['predictor']:.4f} at depth 1, {b['2']['predictor']:.4f} at depth 2 (previous token "
          f"{b['1']['previous_token']:.4f}), ECE {b['1']['ece']:.4f}")
    atomic_write_json(args.out, {
        "date": datetime.date.today().isoformat(), "device": "cpu", "command": "python " + " ".join(sys.argv),
        "metric": "R@2 over (token, target layer) pairs of the held-out decode tokens; ECE of the predictor over "
                  "(token, target layer, expert) events, 10 bins",
        "tests": {"other seed": f"mixtral-like seed 1, {TEST_REQUESTS} x {TOKENS_PER_REQUEST} decode tokens",
                  "same model": f"{TEST_REQUESTS} x {TOKENS_PER_REQUEST} more decode tokens of the seed-0 trace"},
        "depth": args.depth, "rows": rows, "bundled": bundled})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
