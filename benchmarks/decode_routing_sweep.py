"""Decode on several routing sources, in the simulator: duoserve against the better of on-demand and lru.

    .venv/bin/python benchmarks/decode_routing_sweep.py --out benchmarks/results/decode_routing_sweep_sim_h200.json

Never judge decode on one routing source: this runs synthesized Mixtral-8x7B (NF4 experts and
attention, the H200 calibration) on the routing of each synthetic preset (``traces synth``: random,
mixtral-like, bundled-like) and of the bundled trace, at several budgets, with no predictor, with a
predictor trained on the same kind of routing (other requests) and with a wrong one (trained on
another preset), and reports duoserve's decode TPOT over the better baseline's. Traces and
predictors are made in a scratch folder (a minute or two on a CPU); ``--keep DIR`` keeps them.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from duoserve_core.atomic import atomic_write_json, check_writable  # noqa: E402
from duoserve_core.errors import DuoServeError  # noqa: E402
from duoserve_core.policy import PolicyKnobs  # noqa: E402
from duoserve_core.predict import train_predictor  # noqa: E402
from duoserve_core.sim import load_calibration  # noqa: E402
from duoserve_core.sim.decode_routing import (BUNDLED_TRACE, CALIBRATION, decode_result, mixtral_model,  # noqa: E402
                                              mixtral_replay, preset_routing)
from duoserve_core.traces import read_trace, write_trace  # noqa: E402

BUNDLED_PREDICTOR = ROOT / "data" / "predictors" / "small-moe-x32-depth2.safetensors"
PRESETS = ("random", "mixtral-like", "bundled-like")


def make_trace(folder: Path, preset: str, seed: int, requests: int, tokens: int, prompt_len: int) -> Path:
    path = folder / f"{preset}_seed{seed}.parquet"
    if not path.exists():
        # at the model's depth (bundled-like's own is 8), so that a 32-layer predictor can be trained on it
        df, meta = preset_routing(preset, seed=seed, requests=requests, tokens=tokens, prompt_len=prompt_len)
        write_trace(path, df, meta)
    return path


def make_predictor(folder: Path, trace: Path, name: str, hidden: int, epochs: int) -> Path:
    path = folder / f"predictor_{name}.safetensors"
    if not path.exists():
        train_predictor([trace], depth=2, hidden=(hidden,), max_iter=epochs).save(path)
    return path


def tpot(model, cal, replay, knobs: PolicyKnobs, prompt_len: int, gen: int) -> float:
    return decode_result(model, cal, replay, knobs, prompt_len, gen)["tpot_s"]


def sweep(folder: Path, budgets: list[int], prompt_len: int, gen: int, threshold: float, hidden: int, epochs: int,
          train_tokens: int, calibration: Path = CALIBRATION, progress=print) -> list[dict]:
    cal = load_calibration(calibration)
    evaluation = {p: make_trace(folder, p, 1, 2, gen, prompt_len) for p in PRESETS}
    evaluation["bundled trace"] = BUNDLED_TRACE
    training = {p: make_trace(folder, p, 11, max(1, train_tokens // 128), 128, 0) for p in PRESETS[1:]}
    predictors = {p: make_predictor(folder, t, p, hidden, epochs) for p, t in training.items()}
    predictors["bundled trace"] = BUNDLED_PREDICTOR
    right = {"random": None, "mixtral-like": predictors["mixtral-like"], "bundled-like": predictors["bundled-like"],
             "bundled trace": BUNDLED_PREDICTOR}
    wrong = {"random": predictors["bundled-like"], "mixtral-like": predictors["bundled-like"],
             "bundled-like": predictors["mixtral-like"], "bundled trace": predictors["mixtral-like"]}
    rows = []
    for routing, path in evaluation.items():
        replay = mixtral_replay(read_trace(path))
        for slots in budgets:
            model = mixtral_model(slots, prompt_len + gen)
            base = {p: tpot(model, cal, replay, PolicyKnobs(policy=p), prompt_len, gen) for p in ("on-demand", "lru")}
            best = min(base.values())
            variants = {"no predictor": None, "right predictor": right[routing], "wrong predictor": wrong[routing]}
            for label, predictor in variants.items():
                if predictor is None and label != "no predictor":
                    continue
                knobs = PolicyKnobs(policy="duoserve", predictor=str(predictor) if predictor else None,
                                    predictor_threshold=threshold)
                duo = tpot(model, cal, replay, knobs, prompt_len, gen)
                rows.append({"routing": routing, "slots": slots, "predictor": label, "duoserve_tpot_s": duo,
                             "on_demand_tpot_s": base["on-demand"], "lru_tpot_s": base["lru"],
                             "over_best_baseline": duo / best})
                r = rows[-1]
                progress(f"{routing:<14} {slots:>4} slots  {label:<16} duoserve {duo * 1e3:7.2f} ms  on-demand "
                         f"{base['on-demand'] * 1e3:7.2f}  lru {base['lru'] * 1e3:7.2f}  ratio {r['over_best_baseline']:.3f}")
    return rows


def _shown(path: Path) -> str:
    """``path`` relative to the repository where it lies inside it (results name committed files portably)."""
    return str(path.resolve().relative_to(ROOT)) if path.resolve().is_relative_to(ROOT) else str(path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--budgets", default="8,16,21,32,64,128")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--gen", type=int, default=64)
    p.add_argument("--threshold", type=float, default=PolicyKnobs().predictor_threshold)
    p.add_argument("--train-tokens", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--calibration", type=Path, default=CALIBRATION, help="timing model (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--keep", default=None, help="folder for the traces and predictors (default: a scratch folder)")
    args = p.parse_args()
    try:
        check_writable(args.out, args.force, "--out")  # before minutes of simulating, not after
    except DuoServeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(args.keep or scratch)
        folder.mkdir(parents=True, exist_ok=True)
        rows = sweep(folder, [int(b) for b in args.budgets.split(",")], args.prompt_len, args.gen, args.threshold,
                     args.hidden, args.epochs, args.train_tokens, args.calibration)
    worst = max(rows, key=lambda r: r["over_best_baseline"])
    atomic_write_json(args.out, {
        "device": f"simulated NVIDIA H200 ({_shown(args.calibration)})",
        "date": datetime.date.today().isoformat(), "command": "python " + " ".join(sys.argv),
        "model": "synthetic:mixtral-8x7b, NF4 experts and attention", "prompt_len": args.prompt_len,
        "gen": args.gen, "predictor_threshold": args.threshold, "rows": rows, "worst": worst})
    print(f"worst: {worst['over_best_baseline']:.3f}x the better baseline ({worst['routing']}, {worst['slots']} slots, "
          f"{worst['predictor']}); wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
