"""The GPU measurements committed under ``benchmarks/results/``, as tables and figures labelled with
the device and date they were measured on.

On a CPU the notebooks' own runs give exact counts but meaningless times (copies cannot overlap
computation there), so notebooks 04 and 05 show these beside them. Two formats are read:

- ``foundation_*.json`` (``benchmarks/foundation_gpu.py``): ``runs``, each a ``GenerationResult``
  with its runtime, plus the file's raw pinned H2D bandwidth;
- ``bench_*.json`` (``python -m duoserve_core.bench``): ``results`` per policy, each with the run's
  own ``bounds`` (transfer floor, compute floor, Belady's oracle), its timeline when recorded
  (inline, or ``timelines/<file stem>_<policy>.parquet`` beside it), and the accelerate peer.

Files of other shapes, and results measured on a CPU, are skipped.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

from .figures import KIND_COLOURS, stream_timeline

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def _on_gpu(device: str | None) -> bool:
    return bool(device) and not str(device).lower().startswith("cpu")


def load_results(results_dir: str | Path = RESULTS) -> list[dict]:
    """Every GPU result file: ``{"file", "device", "date", "command", "kind", "runs": [...]}``, where
    each run is a flat dict of policy, budget and the measured figures (times in seconds)."""
    out = []
    for path in sorted(Path(results_dir).glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(record, dict) or not _on_gpu(record.get("device")):
            continue
        if isinstance(record.get("runs"), list):
            runs, kind = [_foundation_run(r, record) for r in record["runs"]], "foundation"
        elif isinstance(record.get("results"), dict):
            runs = [_bench_run(name, r, path.parent / "timelines" / f"{path.stem}_{name}.parquet")
                    for name, r in record["results"].items()]
            kind = "bench"
        else:
            continue
        runs = [r for r in runs if r is not None]
        if runs:
            out.append({"file": path.name, "device": record["device"], "date": record.get("date", "?"),
                        "command": record.get("command", ""), "kind": kind, "runs": runs,
                        "peer": record.get("peer") if isinstance(record.get("peer"), dict) else None})
    return out


def _foundation_run(r: dict, record: dict) -> dict | None:
    try:
        plan = r["runtime"]["memory_plan"]
        prefill = r["phases"]["prefill"]
        raw_gbps = record.get("raw_pinned_h2d_gbps_one_expert") or r.get("h2d_bandwidth_gbps")
        floor = prefill["h2d_copies"] * plan["expert_bytes"] / (raw_gbps * 1e9) if raw_gbps and prefill["h2d_copies"] else None
        return {"policy": r["policy"]["policy"], "budget": r.get("budget"), "slots": plan["num_slots"],
                "total_experts": plan["total_experts"], "model": r["runtime"].get("model"),
                "prompt_tokens": r.get("prompt_tokens"), "decode_tokens": len(r.get("tokens", [])) - 1,
                "ttft_s": r["ttft_s"], "tpot_s": r.get("tpot_s"), "transfer_floor_s": floor,
                "oracle_tpot_s": None, "peak_gpu_bytes": r.get("peak_gpu_bytes"), "h2d_bytes": r.get("h2d_bytes"),
                "h2d_bandwidth_gbps": r.get("h2d_bandwidth_gbps"), "hits": r.get("expert_hits"),
                "misses": r.get("expert_misses"), "phases": r.get("phases", {}),
                "by_kind": r.get("timeline_ms_by_kind_last_run"), "timeline": None}
    except (KeyError, TypeError):
        return None


def _bench_run(name: str, r: dict, timeline_file: Path) -> dict | None:
    try:
        b = r.get("bounds", {})
        plan = r["runtime"]["memory_plan"]
        bandwidth = b.get("h2d_bandwidth_Bps")
        return {"policy": name, "budget": plan.get("budget_bytes"), "slots": plan["num_slots"],
                "total_experts": plan["total_experts"], "model": r["runtime"].get("model"),
                "prompt_tokens": r.get("prompt_tokens"), "decode_tokens": len(r.get("tokens", [])) - 1,
                "ttft_s": r["ttft_s"], "tpot_s": r.get("tpot_s"), "transfer_floor_s": b.get("transfer_floor_s"),
                "ttft_floor_s": b.get("ttft_floor_s"), "oracle_tpot_s": b.get("oracle_tpot_s"),
                "oracle_decode_loads": b.get("oracle_decode_loads"), "peak_gpu_bytes": r.get("peak_gpu_bytes"),
                "h2d_bytes": r.get("h2d_bytes"), "h2d_bandwidth_gbps": bandwidth / 1e9 if bandwidth else None,
                "hits": r.get("expert_hits"), "misses": r.get("expert_misses"), "phases": r.get("phases", {}),
                "expert_bytes": plan.get("expert_bytes"), "by_kind": None,
                "timeline": r.get("timeline") or (timeline_file if timeline_file.is_file() else None)}
    except (KeyError, TypeError):
        return None


def _ms(v):
    return None if v is None else round(v * 1e3, 1)


def _ratio(a, b):
    return None if a is None or not b else round(a / b, 2)


def prefill_table(results: list[dict]) -> pd.DataFrame:
    """TTFT against the transfer floor of the experts the prefill copied, per GPU run."""
    rows = []
    for f in results:
        for r in f["runs"]:
            floor = r.get("ttft_floor_s") or r["transfer_floor_s"]
            rows.append({"device": f["device"], "date": f["date"], "file": f["file"], "model": r["model"],
                         "policy": r["policy"], "slots": f"{r['slots']} of {r['total_experts']}",
                         "prompt tokens": r["prompt_tokens"], "TTFT (ms)": _ms(r["ttft_s"]),
                         "floor (ms)": _ms(floor), "TTFT / floor": _ratio(r["ttft_s"], floor),
                         "peak GPU (GiB)": None if r["peak_gpu_bytes"] is None else round(r["peak_gpu_bytes"] / 2**30, 2),
                         "H2D (GB/s)": None if r["h2d_bandwidth_gbps"] is None else round(r["h2d_bandwidth_gbps"], 1)})
    return pd.DataFrame(rows)


def decode_table(results: list[dict]) -> pd.DataFrame:
    """TPOT against Belady's oracle bound (where the file has it), per GPU run."""
    rows = []
    for f in results:
        for r in f["runs"]:
            decode = r["phases"].get("decode", {})
            rows.append({"device": f["device"], "date": f["date"], "file": f["file"], "model": r["model"],
                         "policy": r["policy"], "slots": f"{r['slots']} of {r['total_experts']}",
                         "TPOT (ms)": _ms(r["tpot_s"]), "oracle TPOT (ms)": _ms(r["oracle_tpot_s"]),
                         "TPOT / oracle": _ratio(r["tpot_s"], r["oracle_tpot_s"]),
                         "decode misses": decode.get("misses"), "decode copies": decode.get("h2d_copies"),
                         "oracle loads": r.get("oracle_decode_loads")})
    return pd.DataFrame(rows)


def busy_time_figure(result_file: dict) -> go.Figure | None:
    """Per phase, how long each kind of work kept its stream busy (foundation files record this)."""
    fig = go.Figure()
    for r in result_file["runs"]:
        if not r.get("by_kind"):
            continue
        df = pd.DataFrame(r["by_kind"])
        for kind, part in df.groupby("kind", sort=False):
            fig.add_trace(go.Bar(x=[f"{r['policy']} {p}" for p in part["phase"]], y=part["duration_ms"], name=kind,
                                 marker_color=KIND_COLOURS.get(kind), legendgroup=kind,
                                 showlegend=kind not in {t.name for t in fig.data},
                                 hovertemplate="%{x}: " + kind + " %{y:.1f} ms<extra></extra>"))
    if not fig.data:
        return None
    fig.update_layout(barmode="stack", height=340, yaxis_title="stream busy time (ms)", legend_title="work",
                      title=f"Measured on {result_file['device']}, {result_file['date']} ({result_file['file']})")
    return fig


def _timeline(r: dict) -> pd.DataFrame | None:
    source = r.get("timeline")
    if source is None:
        return None
    if isinstance(source, Path):
        try:
            return pd.read_parquet(source)
        except (OSError, ValueError):
            return None
    return pd.DataFrame(source)


def files_with_timelines(results: list[dict]) -> list[str]:
    """Result files with at least one recorded timeline, oldest first (by date, then name)."""
    files = [f for f in results if any(r.get("timeline") is not None for r in f["runs"])]
    return [f["file"] for f in sorted(files, key=lambda f: (f["date"], f["file"]))]


def measured_timelines(results: list[dict], phase: str = "prefill", policies: tuple[str, ...] | None = None,
                       steps: tuple[int, int] | None = None, file: str | None = None) -> list[go.Figure]:
    """The stream timeline of each GPU run that recorded one (``bench --timelines``), of one result
    ``file`` or all: its prefill with the transfer and compute floors, or decode ``steps`` (first, last)."""
    figs = []
    for f in results:
        if file is not None and f["file"] != file:
            continue
        for r in f["runs"]:
            if policies is not None and r["policy"] not in policies:
                continue
            df = _timeline(r)
            if df is None or df.empty:
                continue
            df = df[df["phase"] == phase]
            if steps is not None:
                df = df[df["step"].between(*steps)]
            floors = {}
            if phase == "prefill" and r.get("transfer_floor_s"):
                floors["transfer floor"] = r["transfer_floor_s"] * 1e3
                if r.get("ttft_floor_s") and r["ttft_floor_s"] != r["transfer_floor_s"]:
                    floors["TTFT floor"] = r["ttft_floor_s"] * 1e3
            what = "prefill" if steps is None else f"decode steps {steps[0]}-{steps[1]}"
            figs.append(stream_timeline(df, floors_ms=floors, title=f"{r['policy']}, {what}, {r['slots']} of "
                                        f"{r['total_experts']} slots: measured on {f['device']}, {f['date']} ({f['file']})"))
    return figs


def peer_table(results: list[dict]) -> pd.DataFrame:
    """What a user would run instead (transformers + accelerate offloading), where a file has it."""
    rows = []
    for f in results:
        peer = f.get("peer")
        if not peer:
            continue
        rows.append({"device": peer.get("device", f["device"]), "date": peer.get("date", f["date"]),
                     "file": f["file"], "prompt tokens": peer.get("prompt_len"), "TTFT (s)": peer.get("ttft_s"),
                     "TPOT (s)": peer.get("tpot_s"), "duoserve speed-up (E2E)": peer.get("duoserve_speedup_e2e"),
                     "note": peer.get("note")})
    return pd.DataFrame(rows).round(2)
