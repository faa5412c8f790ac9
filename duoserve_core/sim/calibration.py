"""The calibration file: what one device measured, and the timing model's terms read from it.

``python -m duoserve_core.calibrate`` writes it; the simulator reads it. Every figure is a
measurement at one model shape on one device, stored as ``[x, seconds]`` points (x = bytes,
tokens or context length); between points the simulator interpolates in log-log space (costs
are close to power laws in size), outside them it follows the nearest segment's slope, clamped
to [0, 1] (a cost never falls with size, and never grows faster than linearly).

Format ``duoserve-calibration/1``::

    format, device, device_type ("cuda" | "cpu"), synchronous (bool: the CPU runs every op inline),
    date, torch, cuda, command,
    model: {name, hidden_size, intermediate_size, num_attention_heads, num_key_value_heads,
            num_local_experts, num_experts_per_tok, vocab_size, layers_measured},
    quant, attention_quant, compute_dtype,
    expert_bytes: {format: bytes of one expert record}
    h2d: {pinned: [[bytes, s]...], pageable: [[bytes, s]...]}       back-to-back copies, per copy
         runtime (optional): [[record bytes, s]]          mean of the runtime's own copies of a record
         relayout_s (optional): s   mean of the runtime's relayout spans (a format whose device kernel reads
                                    another layout, int4 on CUDA): a landed record is usable that much later
         relayout_by_phase_s (optional): {prefill, decode}: the same spans' mean per phase, read before
                                    relayout_s where present (a prompt's relayouts wait beside its large
                                    matmuls: 1.93 ms on the H200 against 0.26 ms in decode, 2026-12-02)
         links (optional): {count: n, pinned: [[bytes, s]...]}   per copy on each of n GPUs' links when
                                                           all n copy at once (a machine with n GPUs)
    peer (optional): [[bytes, s]...]    one device-to-device hand-over (hidden states to another GPU and back)
    peer_overhead_s (optional): {in_s, out_s}   what another GPU's experts add in the runtime beyond the
         hand-over: its expert's delay after its copy landed, and the outputs' way back to the next layer
    expert_compute: {format: [[tokens, s]...]}                      one expert, incl. gather/scatter
    attention: {prefill: [[tokens, s]...], decode: [[context, s]...]}        compute-stream span
    attention_launch: {prefill: [[tokens, s]...], decode: [[context, s]...]} host time to queue it
    router: {prefill: [[tokens, s]...], decode: [[context, s]...]}           span, incl. the D2H sync
    host: {layer_base_s: {resident, offloaded}, per_expert_s (seconds, or {prefill, decode}), per_copy_s,
           step_pre_s: {prefill, decode}, step_post_s: {prefill, decode},
           reference_s (optional): ``host_reference_s()`` on that host, to scale policy time}
    host_fit (optional, not read here): {layers: {resident, offloaded: [{phase, step, layer, experts, copies,
           post_s}...]}, pre_copy_s, per_expert_s}: what ``calibrate.host_terms`` fitted the host terms to
    device_time (optional): {attention: {phase: [[x, s]...]}, router: {phase: [[x, s]...]},
                             expert: {phase: {format: [[tokens, s]...]}},
                             attention_rows (optional): {width: keys, decode: [[rows, s]...]},
                             gather_Bps (optional): bytes/s,
                             routed_layer (optional): {router_s, experts_s, top_k}, source: str}
        device time alone: kernels queued before the compute stream reached them. attention and
        router: layers >= 1 of an on-demand run, where the stream waits on each layer's copies
        (decode, by context). expert: one expert per token count (1, 2, 4, ..) and format, its
        calls queued behind a ``torch.cuda._sleep`` that holds the stream (``calibrate.measure_experts``),
        the same curve for both phases (an expert's kernels do not depend on the phase, only on
        its token count: batched decode routes several tokens to one expert). The spans above
        (``attention``, ``router``, ``expert_compute``) were timed with the stream idle when the
        host is slower than the kernels, so at decode sizes they are the host's launch time, not
        the device's; where a phase is given here the simulator puts this on the compute clock.
        Older files (and ``calibrate.device_terms`` on a bench timeline) hold one 1-token decode
        point per format, constant as a curve; ``with_device_time`` keeps a longer curve over it.
        attention_rows: one decode layer's attention for B rows of one token each, every row read to
        ``width`` keys (``calibrate.measure_batched_attention``): what a batched step's attention adds
        over one row's (the projections of B tokens take another kernel than one token's, and the
        keys and values are gathered where their rows are not consecutive). Without it a step of B rows is
        timed as one row reading B x width keys. gather_Bps: device routing's gather of the top-k expert
        records from their slots (``calibrate.measure_gather``), charged on every layer of a resident decode
        routed on the device; files before 2026-12-01 lack it, and such layers are charged no gather.
        routed_layer: one such layer's router graph and experts graph (gather and ``top_k`` one-token experts),
        timed in the runtime's own device-routed decode (``calibrate.measure_routed_layer``); where present
        the simulator charges these instead of the host-routed router span (which holds the sync) and
        ``gather_Bps`` plus ``top_k`` experts.
    routing_trace: the trace the runtime replayed while timed (the bench's router span includes it)
    host_lane (optional): {default_threads: n, expert: {format: {threads: [[tokens, s]...]}}}
        one expert computed by the CPU lane (``experts.host_lane``) from its host record, per thread
        count; what the simulator's ``--cpu-experts`` charges the CPU lane
    overhead_summary: {resident|offloaded: {wall_per_token_s, compute_busy_per_token_s,
                                            residual_per_layer_s}}                 (reported only)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import DuoServeError
from ..host_reference import local_host_reference_s

FORMAT = "duoserve-calibration/1"
SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
              "num_local_experts", "num_experts_per_tok")
PHASES = ("prefill", "decode")
MODES = ("resident", "offloaded")


class CalibrationError(DuoServeError, ValueError):
    """A calibration file is missing, malformed, or was measured for another model or quantization."""


def _points(raw, where: str) -> list[tuple[float, float]]:
    try:
        pts = sorted((float(x), float(y)) for x, y in raw)
    except (TypeError, ValueError) as exc:
        raise CalibrationError(f"{where} must be a list of [x, seconds] pairs") from exc
    if not pts:
        raise CalibrationError(f"{where} holds no measurements")
    if any(x <= 0 or not math.isfinite(y) or y < 0 for x, y in pts):
        raise CalibrationError(f"{where} has a non-positive x or a negative/non-finite time")
    return pts


@dataclass
class Curve:
    """Measured ``(x, seconds)`` points; ``at(x)`` interpolates in log-log space."""

    points: list[tuple[float, float]]

    def at(self, x: float) -> float:
        pts = self.points
        x = max(float(x), 1e-12)
        if len(pts) == 1:
            return pts[0][1]
        if x <= pts[0][0]:
            return pts[0][1]
        i = next((j for j in range(1, len(pts)) if pts[j][0] >= x), len(pts) - 1)
        (x0, y0), (x1, y1) = pts[i - 1], pts[i]
        if y0 <= 0 or y1 <= 0 or x1 == x0:
            return y1 if x >= x1 else y0 + (y1 - y0) * (x - x0) / max(x1 - x0, 1e-30)
        slope = math.log(y1 / y0) / math.log(x1 / x0)
        if x > x1:  # beyond the last point: the last segment's slope, kept physical
            slope = min(max(slope, 0.0), 1.0)
        return y0 * (x / x0) ** slope


class Calibration:
    """A validated calibration; the simulator asks it for each term of the timing model."""

    def __init__(self, raw: dict, where: str = "calibration"):
        self.raw, self.where = raw, where
        try:
            if raw.get("format") != FORMAT:
                raise CalibrationError(f"{where} is not a {FORMAT} file (format {raw.get('format')!r}); "
                                       "write one with python -m duoserve_core.calibrate")
            self.device = str(raw["device"])
            self.synchronous = bool(raw["synchronous"])
            self.model = dict(raw["model"])
            missing = [k for k in SHAPE_KEYS if k not in self.model]
            if missing:
                raise CalibrationError(f"{where}: model lacks {missing}")
            self.quant, self.attention_quant = str(raw["quant"]), str(raw["attention_quant"])
            self.expert_bytes = {k: int(v) for k, v in raw["expert_bytes"].items()}
            self.h2d = {k: Curve(_points(raw["h2d"][k], f"{where}: h2d.{k}")) for k in ("pinned", "pageable")}
            runtime = raw["h2d"].get("runtime")
            self.runtime_copy_s = {int(b): s for b, s in _points(runtime, f"{where}: h2d.runtime")} if runtime else {}
            self.relayout_s = float(raw["h2d"].get("relayout_s", 0.0))
            self.relayout_by_phase_s = {p: float(v) for p, v in (raw["h2d"].get("relayout_by_phase_s") or {}).items()}
            links = raw["h2d"].get("links")
            self.links = (int(links["count"]), Curve(_points(links["pinned"], f"{where}: h2d.links.pinned"))) \
                if links else None
            self.peer = Curve(_points(raw["peer"], f"{where}: peer")) if raw.get("peer") else None
            overhead = raw.get("peer_overhead_s") or {}
            self.peer_in_s, self.peer_out_s = float(overhead.get("in_s", 0.0)), float(overhead.get("out_s", 0.0))
            self.expert = {k: Curve(_points(v, f"{where}: expert_compute.{k}"))
                           for k, v in raw["expert_compute"].items()}
            self.attention = self._phased(raw, "attention")
            self.attention_launch = self._phased(raw, "attention_launch")
            self.router = self._phased(raw, "router")
            host = raw["host"]
            self.layer_base_s = {m: float(host["layer_base_s"][m]) for m in MODES}
            per_expert = host["per_expert_s"]
            self.per_expert_phase_s = ({p: float(per_expert[p]) for p in PHASES} if isinstance(per_expert, dict)
                                       else {p: float(per_expert) for p in PHASES})
            self.per_expert_s = self.per_expert_phase_s["prefill"]
            self.per_copy_s = float(host["per_copy_s"])
            self.device_time = self._device_time(raw.get("device_time"))
            self.attention_rows = self._attention_rows((raw.get("device_time") or {}).get("attention_rows"))
            gather = (raw.get("device_time") or {}).get("gather_Bps")
            self.gather_Bps = None if gather is None else float(gather)
            routed = (raw.get("device_time") or {}).get("routed_layer")
            self.routed_layer = None if routed is None else \
                {"router_s": float(routed["router_s"]), "experts_s": float(routed["experts_s"]), "top_k": int(routed["top_k"])}
            if self.gather_Bps is not None and not (self.gather_Bps > 0 and math.isfinite(self.gather_Bps)):
                raise CalibrationError(f"{where}: device_time.gather_Bps must be a positive number of bytes a second")
            self.step_pre_s = {p: float(host["step_pre_s"][p]) for p in PHASES}
            self.step_post_s = {p: float(host["step_post_s"][p]) for p in PHASES}
            self.host_reference_s = float(host["reference_s"]) if "reference_s" in host else None
            self.host_lane, self.host_lane_default_threads = self._host_lane(raw.get("host_lane"))
        except CalibrationError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CalibrationError(f"{where} is malformed ({type(exc).__name__}: {exc}); "
                                   "write it again with python -m duoserve_core.calibrate") from exc
        host_terms = [*self.layer_base_s.values(), *self.per_expert_phase_s.values(), self.per_copy_s,
                      *self.step_pre_s.values(), *self.step_post_s.values()]
        if any(v < 0 or not math.isfinite(v) for v in host_terms):
            raise CalibrationError(f"{where}: host terms must be finite and non-negative")

    def _phased(self, raw: dict, key: str) -> dict[str, Curve]:
        return {p: Curve(_points(raw[key][p], f"{self.where}: {key}.{p}")) for p in PHASES}

    def _host_lane(self, raw: dict | None) -> tuple[dict[tuple[str, int], Curve], int | None]:
        """``{(format, threads): Curve}`` of the optional ``host_lane`` section, and its default threads."""
        if not raw:
            return {}, None
        curves = {(fmt, int(threads)): Curve(_points(pts, f"{self.where}: host_lane.expert.{fmt}.{threads}"))
                  for fmt, by_threads in raw["expert"].items() for threads, pts in by_threads.items()}
        return curves, int(raw["default_threads"])

    def host_lane_curve(self, fmt: str, threads: int | None) -> tuple[Curve, int]:
        """One expert on the CPU lane at ``threads`` (None: the calibrated default), and the threads."""
        if not self.host_lane:
            raise CalibrationError(f"{self.where} has no CPU-lane measurements (host_lane); measure them on that "
                                   "machine with python -m duoserve_core.calibrate --cpu-threads 4,8,16")
        threads = self.host_lane_default_threads if threads is None else threads
        curve = self.host_lane.get((fmt, threads))
        if curve is None:
            have = sorted(f"{f} at {t} threads" for f, t in self.host_lane)
            raise CalibrationError(f"{self.where} has no CPU-lane timing for {fmt} at {threads} threads (it has "
                                   f"{', '.join(have)}); pick one of those or calibrate with --cpu-threads {threads}")
        return curve, threads

    def _device_time(self, raw: dict | None) -> dict:
        """``{(kind, phase[, format]): Curve}`` of the optional ``device_time`` section."""
        out: dict[tuple, Curve] = {}
        if not raw:
            return out
        for kind in ("attention", "router"):
            for phase, pts in (raw.get(kind) or {}).items():
                if phase not in PHASES:
                    raise CalibrationError(f"{self.where}: device_time.{kind} has unknown phase {phase!r}")
                out[(kind, phase)] = Curve(_points(pts, f"{self.where}: device_time.{kind}.{phase}"))
        for phase, by_format in (raw.get("expert") or {}).items():
            if phase not in PHASES:
                raise CalibrationError(f"{self.where}: device_time.expert has unknown phase {phase!r}")
            for fmt, pts in by_format.items():
                out[("expert", phase, fmt)] = Curve(_points(pts, f"{self.where}: device_time.expert.{phase}.{fmt}"))
        return out

    def _attention_rows(self, raw: dict | None) -> Curve | None:
        if not raw:
            return None
        where = f"{self.where}: device_time.attention_rows"
        if not isinstance(raw, dict) or "decode" not in raw or not isinstance(raw.get("width"), (int, float)):
            raise CalibrationError(f"{where} must be {{width: keys, decode: [[rows, s]...]}}; calibrate again")
        curve = Curve(_points(raw["decode"], where + ".decode"))
        if curve.points[0][0] != 1:
            raise CalibrationError(f"{where}.decode must start at 1 row (the step's extra is counted from it); "
                                   "calibrate again")
        return curve

    def with_device_time(self, device_time: dict, per_expert_decode_s: float | None = None,
                         where: str | None = None) -> "Calibration":
        """A copy with a ``device_time`` section (and optionally the decode host time per expert)
        merged in, e.g. derived from a measured run's timeline (``calibrate.device_terms``).

        attention and router: the new curve replaces the old one per phase. expert: per phase and
        format, the curve with more points wins (ties: the new one). A bench timeline yields one
        1-token decode point, constant as a curve; over a calibration's per-token-count curve it
        would charge a 16-token expert of batched decode its 1-token time, and the calibration's
        curve holds a 1-token point of its own. Kept curves are named in ``source``."""
        raw = json.loads(json.dumps(self.raw))
        merged = raw.setdefault("device_time", {})
        kept = []
        for key, value in device_time.items():
            if key == "expert" and isinstance(value, dict) and isinstance(merged.get(key), dict):
                for phase, by_format in value.items():
                    old = merged[key].setdefault(phase, {})
                    for fmt, pts in by_format.items():
                        if len(old.get(fmt) or []) > len(pts):
                            kept.append(f"{phase}.{fmt}")
                        else:
                            old[fmt] = pts
            elif isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
        if kept:
            merged["source"] = (f"{merged.get('source', '')}; expert {', '.join(kept)}: the calibration's "
                                "longer curve kept").lstrip("; ")
        if per_expert_decode_s is not None:
            raw["host"]["per_expert_s"] = {"prefill": self.per_expert_phase_s["prefill"],
                                           "decode": float(per_expert_decode_s)}
        return Calibration(raw, where or self.where)

    # -- checks ------------------------------------------------------------------------------
    def check(self, config, quant: str, attention_quant: str) -> None:
        """Refuse to time ``config`` at ``quant`` with figures measured for something else."""
        want = {k: getattr(config, k) for k in SHAPE_KEYS}
        got = {k: self.model[k] for k in SHAPE_KEYS}
        if want != got:
            diff = {k: (got[k], want[k]) for k in SHAPE_KEYS if got[k] != want[k]}
            raise CalibrationError(
                f"{self.where} was measured for {self.model.get('name')} and differs from the simulated model in "
                + ", ".join(f"{k} (calibrated {a}, model {b})" for k, (a, b) in diff.items())
                + "; calibrate this model with python -m duoserve_core.calibrate --model ...")
        fmt = _format_name(quant, self.model)
        if fmt not in self.expert:
            raise CalibrationError(f"{self.where} has expert timings for {sorted(self.expert)}, not {fmt!r} "
                                   f"(--quant {quant}); calibrate with --quant {quant}")
        if attention_quant != self.attention_quant:
            raise CalibrationError(f"{self.where} timed attention with --quant-attention {self.attention_quant}, "
                                   f"not {attention_quant}; calibrate with --quant-attention {attention_quant}")

    # -- terms -------------------------------------------------------------------------------
    def copy_s(self, nbytes: int, pinned: bool = True) -> float:
        """One copy of ``nbytes``: the runtime's own mean where it was measured at that size (pinned)."""
        if pinned and nbytes in self.runtime_copy_s:
            return self.runtime_copy_s[nbytes]
        return self.h2d["pinned" if pinned else "pageable"].at(nbytes)

    def link_copy_s(self, nbytes: int, links: int) -> float:
        """One copy on one of ``links`` GPUs' links while all of them copy: measured with that many
        links where the calibration has it, else the one-link figure (identical, independent links)."""
        if links > 1 and self.links is not None and self.links[0] == links:
            return self.links[1].at(nbytes)
        return self.copy_s(nbytes)

    def peer_s(self, nbytes: int) -> float:
        """One device-to-device copy of ``nbytes``; without a measurement, a host-to-device copy of that
        size (an upper bound: NVLink outruns PCIe); on a synchronous device (CPU "devices"), nothing."""
        if self.synchronous:
            return 0.0
        return self.peer.at(nbytes) if self.peer is not None else self.copy_s(nbytes)

    def assumptions(self, links: int) -> list[str]:
        """What the simulator assumes for ``links`` GPUs that this calibration did not measure."""
        if links <= 1:
            return []
        notes = []
        if self.links is None or self.links[0] != links:
            notes.append(f"{self.where} measured {self.links[0] if self.links else 1} link(s) at once, not {links}: "
                         f"{links} identical, independent links assumed (calibrate on a {links}-GPU machine)")
        if self.peer is None and not self.synchronous:
            notes.append(f"{self.where} has no device-to-device copies: each is timed as a host-to-device copy of "
                         "its size (an upper bound)")
        return notes

    def expert_s(self, fmt: str, tokens: int) -> float:
        """One expert, timed back to back (``expert_compute``): max(device time, host launch time)."""
        return self.expert[fmt].at(tokens)

    def attention_device_s(self, phase: str, x: float) -> float:
        """Attention's device time: ``device_time`` where measured for the phase, else the span."""
        curve = self.device_time.get(("attention", phase))
        return curve.at(x) if curve is not None else self.attention[phase].at(x)

    def decode_attention_device_s(self, rows: int, width: int) -> float:
        """A decode step's attention over ``rows`` KV rows, each read to ``width`` keys: one row's curve at
        that width, plus what ``attention_rows`` measured B rows to add over one; without it, one row
        reading ``rows x width`` keys (the projections of B tokens priced as one token's)."""
        if self.attention_rows is None:
            return self.attention_device_s("decode", rows * width)
        extra = self.attention_rows.at(rows) - self.attention_rows.at(1)
        return self.attention_device_s("decode", width) + max(0.0, extra)

    def router_device_s(self, phase: str, x: float) -> float:
        curve = self.device_time.get(("router", phase))
        return curve.at(x) if curve is not None else self.router[phase].at(x)

    def expert_device_s(self, fmt: str, phase: str, tokens: int) -> float:
        """One expert's device time at ``tokens``: ``device_time.expert`` where measured for the phase
        and format (by token count, interpolated), else the back-to-back span ``expert_compute``."""
        curve = self.device_time.get(("expert", phase, fmt))
        return curve.at(tokens) if curve is not None else self.expert_s(fmt, tokens)

    def routed_layer_s(self, fmt: str, context: float, top_k: int, record_bytes: int) -> tuple[float, float]:
        """A resident decode layer routed on the device: (router, gather and experts) device seconds, as
        measured in such a layer where the calibration has it, else composed from the host-routed router's
        span, ``gather_s`` and ``top_k`` one-token experts."""
        if self.routed_layer is not None and self.routed_layer["top_k"] == top_k:
            return self.routed_layer["router_s"], self.routed_layer["experts_s"]
        return (self.router_device_s("decode", context),
                self.gather_s(top_k * record_bytes) + top_k * self.expert_device_s(fmt, "decode", 1))

    def gather_s(self, nbytes: int) -> float:
        """Device routing's gather of ``nbytes`` of expert records; 0 where the calibration did not measure it."""
        return nbytes / self.gather_Bps if self.gather_Bps else 0.0

    def per_expert(self, phase: str) -> float:
        """Host time per expert the executor computes (queueing its kernels included)."""
        return self.per_expert_phase_s[phase]

    def relayout(self, phase: str) -> float:
        """How much later than its copy a landed record is usable in ``phase`` (0 for a format read as
        copied): the phase's mean relayout span where measured, else the mean of all."""
        return self.relayout_by_phase_s.get(phase, self.relayout_s)

    def bandwidth_Bps(self, nbytes: int) -> float:
        return nbytes / self.copy_s(nbytes)

    def host_scale(self) -> float:
        """How much slower the calibrated host runs Python and small CPU ops than this one (1 if unknown)."""
        if not self.host_reference_s:
            return 1.0
        return self.host_reference_s / local_host_reference_s()


def _format_name(quant: str, model: dict) -> str:
    """The expert format a ``--quant`` value stores experts in (``none`` keeps the checkpoint's dtype)."""
    if quant != "none":
        return quant
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(model.get("dtype", "bfloat16"), "bf16")


def format_name(quant: str, calibration: Calibration) -> str:
    return _format_name(quant, calibration.model)


def load_calibration(path: str | Path) -> Calibration:
    """Read and validate a calibration file; errors name the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"calibration file {path} does not exist; measure one on the device with "
                               "python -m duoserve_core.calibrate --json, or use one from data/calibration/")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CalibrationError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise CalibrationError(f"{path} holds no calibration object")
    return Calibration(raw, str(path))
