"""The schedule's knobs as command-line flags: one spelling, one set of defaults, for every CLI.

``generate``, ``bench`` and ``sim`` take the same flags for the same ``PolicyKnobs`` fields; the
policy itself is each CLI's own flag (one name for ``generate``, a list for ``bench`` and ``sim``).

The devices' flags (``--device``, ``--devices``, ``--gpus``) are one spelling for ``generate``, ``serve``
and ``bench``; ``sim`` takes ``--gpus N`` alone (a count: it simulates GPUs, it looks for none).

Also the argument types every CLI shares, so a bad value is refused while the arguments are
parsed (before a trace is read or a model loads) with one line that names the flag: the project's
rule is one line on stderr and exit 2 for every error, and ``Parser`` keeps argparse's own errors
(unknown flags, bad choices) to that line as well, where argparse would print the usage first.
"""

from __future__ import annotations

import argparse
import math
from typing import Callable

from .batching import DEFAULT_SCHEDULE, SCHEDULES
from .policy import DEFAULT_KNOBS, PolicyKnobs
from .policy.host_lane import HOST_LANE_MODES
from .units import check_budget


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line (no usage block): ``PROG: error: MESSAGE``."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}; see --help\n")


def whole(least: int, what: str = "a whole number") -> Callable[[str], int]:
    """An argparse type: an integer of at least ``least``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"takes {what} of at least {least}, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"takes {what} of at least {least}, got {value}")
        return value
    parse.__name__ = "whole number"
    return parse


def seed(text: str) -> int:
    """An argparse type: a seed torch and numpy accept (0 .. 2**63 - 1)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes a whole number from 0 to 2**63-1, got {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"takes a whole number from 0 to 2**63-1, got {value}")
    return value


def number(least: float | None = None, most: float | None = None, *, above: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite float in [least, most] (``above``: strictly greater than ``least``)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        low_ok = least is None or (value > least if above else value >= least)
        if not math.isfinite(value) or not low_ok or (most is not None and value > most):
            bounds = ("a finite number" + (f" {'above' if above else 'of at least'} {least:g}" if least is not None else "")
                      + (f" and at most {most:g}" if most is not None else ""))
            raise argparse.ArgumentTypeError(f"takes {bounds}, got {text!r}")
        return value
    parse.__name__ = "number"
    return parse


def listed(item: Callable[[str], object]) -> Callable[[str], str]:
    """An argparse type: comma-separated values each ``item`` accepts; the text is kept as given."""
    def parse(text: str) -> str:
        parts = text.split(",")
        if not all(p.strip() for p in parts):
            raise argparse.ArgumentTypeError(f"takes comma-separated values, got {text!r}")
        for p in parts:
            try:
                item(p.strip())
            except argparse.ArgumentTypeError as exc:
                raise argparse.ArgumentTypeError(f"{p.strip()!r} in {text!r}: {exc}") from None
        return text
    parse.__name__ = "list"
    return parse


def schedule(text: str) -> str:
    """A prefill schedule of continuous batching (``batching.SCHEDULES``)."""
    if text not in SCHEDULES:
        raise argparse.ArgumentTypeError(f"{text!r} is not a prefill schedule; choose one of {', '.join(SCHEDULES)}")
    return text


def add_schedule_arguments(parser: argparse.ArgumentParser, many: bool = False, default: str | None = DEFAULT_SCHEDULE,
                           default_note: str = "") -> None:
    """``--prefill-schedule`` (several, comma-separated, where ``many``) and ``--prefill-chunk``, one spelling for
    generate, serve and the bench."""
    parser.add_argument("--prefill-schedule", type=listed(schedule) if many else schedule, default=default,
                        help="how a newcomer's prompt meets the others' decode: mixed (in the same forward as their "
                             "decode tokens) or prefill-first (alone, the others wait one step)"
                             + ("; comma-separated to compare" if many else "") + (default_note or
                             f"; default {DEFAULT_SCHEDULE}"))
    parser.add_argument("--prefill-chunk", type=whole(1), default=None,
                        help="with --prefill-schedule mixed: prompt tokens per step (default: the whole prompt)")


def budget(text: str) -> str:
    """An argparse type: a memory budget ``memory.resolve_budget`` reads (bytes, %, Nslots or all)."""
    try:
        return check_budget(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _device_name(text: str) -> str | None:
    """``text`` if torch reads it as the CPU or a CUDA device (cpu, cuda, cuda:N), else None."""
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        return None
    return text if dev.type in ("cpu", "cuda") else None


def device(text: str) -> str:
    """An argparse type: auto, cpu, cuda or cuda:N (whether that GPU exists is the runtime's check)."""
    if text != "auto" and _device_name(text) is None:
        raise argparse.ArgumentTypeError(f"device {text!r} is not supported; use auto, cpu, cuda or cuda:N")
    return text


def devices(text: str) -> str:
    """An argparse type: comma-separated devices, each cpu, cuda or cuda:N; the text is kept as given (whether
    those GPUs exist, or a GPU is named twice, is the runtime's check: ``runtime.resolve_devices``)."""
    parts = [p.strip() for p in text.split(",")]
    if not all(parts):
        raise argparse.ArgumentTypeError(f"takes comma-separated devices, e.g. cuda:0,cuda:1, got {text!r}")
    for p in parts:
        if _device_name(p) is None:
            raise argparse.ArgumentTypeError(f"device {p!r} in {text!r} is not supported; name each device "
                                             "cpu, cuda or cuda:N, e.g. cuda:0,cuda:1")
    return text


def gpus(auto: bool = True) -> Callable[[str], int | str]:
    """An argparse type: a number of GPUs, a whole number of at least 1, or (where ``auto``) ``auto``:
    every visible GPU (whether there are that many is the runtime's check)."""
    def parse(text: str) -> int | str:
        if auto and text == "auto":
            return text
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            takes = "a whole number of at least 1 or auto" if auto else "a whole number of at least 1"
            why = " (not auto here: give the number of GPUs)" if text == "auto" and not auto else ""
            raise argparse.ArgumentTypeError(f"takes {takes}{why}, got {text!r}")
        return value
    parse.__name__ = "number of GPUs"
    return parse


def add_device_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--device`` (one device), ``--devices`` (several, by name) and ``--gpus`` (several, by count): one
    spelling for generate, serve and the bench, at most one of them given; ``devices_from_args`` reads them.
    Without ``--devices`` or ``--gpus`` the runtime has one device, as before."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--device", type=device, default="auto",
                       help="one device: auto, cpu, cuda or cuda:N (auto: cuda:0 where there is a GPU)")
    group.add_argument("--devices", type=devices, default=None,
                       help="several devices, comma-separated, e.g. cuda:0,cuda:1: expert slots and a copy link "
                            "on each, the dense part on the first; --memory-budget applies to each")
    group.add_argument("--gpus", type=gpus(), default=None,
                       help="N GPUs from cuda:0, or auto: every visible GPU (the CPU where there is none); "
                            "default: one device (--device)")


def devices_from_args(args: argparse.Namespace) -> dict:
    """``add_device_arguments``' flags as ``load``'s keywords (``device``, ``devices``, ``gpus``)."""
    return {"device": args.device, "devices": args.devices, "gpus": args.gpus}


def add_knob_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The knobs' flags, typed int/float only: ``PolicyKnobs`` checks their values (``KnobError``), the
    same check for the CLIs and the API."""
    parser.add_argument("--predictor", default=None, help="predictor file for duoserve/uniform decode prefetch")
    parser.add_argument("--prefetch-depth", type=int, default=DEFAULT_KNOBS.prefetch_depth,
                        help="layers ahead to prefetch")
    parser.add_argument("--predictor-threshold", type=float, default=DEFAULT_KNOBS.predictor_threshold,
                        help="prefetch experts whose calibrated probability of use is at least this")
    parser.add_argument("--speculative-gate", action="store_true",
                        help="duoserve/uniform: take the next layer's experts from its router on this layer's input")
    parser.add_argument("--copy-slack", type=float, default=DEFAULT_KNOBS.copy_slack,
                        help="copies that fit in the copy stream's idle stretch between two decode layers' demand copies")
    parser.add_argument("--cpu-experts", choices=HOST_LANE_MODES, default=DEFAULT_KNOBS.cpu_experts,
                        help="compute missed experts on the host while others are copied: off, auto (by cost), "
                             "or forced (all, half; for tests and studies)")
    parser.add_argument("--cpu-threads", type=int, default=DEFAULT_KNOBS.cpu_threads,
                        help="threads of the CPU lane (default: torch's)")
    parser.add_argument("--cpu-split", type=float, default=DEFAULT_KNOBS.cpu_split,
                        help="--quant int4: records laid out so that the CPU lane may compute this share of one "
                             "expert while the copy path moves the rest (0: never share an expert)")


def knobs_from_args(args: argparse.Namespace, policy: str | None = None) -> PolicyKnobs:
    """The parsed flags as ``PolicyKnobs`` (checked: a bad value raises ``KnobError``)."""
    return PolicyKnobs(policy=policy or DEFAULT_KNOBS.policy, predictor=args.predictor,
                       prefetch_depth=args.prefetch_depth, predictor_threshold=args.predictor_threshold,
                       speculative_gate=args.speculative_gate, copy_slack=args.copy_slack,
                       cpu_experts=args.cpu_experts, cpu_threads=args.cpu_threads,
                       cpu_split=args.cpu_split)


def add_graph_argument(parser: argparse.ArgumentParser, routing: bool = True) -> None:
    """``--cuda-graphs`` / ``--no-cuda-graphs`` (``load(cuda_graphs=...)``), for every command that loads a
    runtime; neither leaves ``None``, the runtime's default (``runtime.resolve_cuda_graphs``). With
    ``routing``, also ``--no-device-routing`` (``load(device_routing=...)``)."""
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                        help="replay each decode step's norms and attention (one launch a layer) and each "
                             "one-token expert call (one launch an expert) from CUDA graphs (default: on with "
                             "one GPU, off on the CPU and on several GPUs; --no-cuda-graphs runs decode eagerly)")
    if routing:
        add_routing_argument(parser)


def add_routing_argument(parser: argparse.ArgumentParser) -> None:
    """``--device-routing`` / ``--no-device-routing`` (``load(device_routing=...)``, ``Simulator(device_routing=...)``)."""
    parser.add_argument("--device-routing", action=argparse.BooleanOptionalAction, default=True,
                        help="with the decode graphs, the resident policy and one request decoding: route each "
                             "layer on the device, no host sync inside a step (default); "
                             "--no-device-routing: the host hears every layer's routing first")
