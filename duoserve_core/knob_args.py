"""The schedule's knobs as command-line flags: one spelling, one set of defaults, for every CLI.

``generate``, ``bench`` and ``sim`` take the same flags for the same ``PolicyKnobs`` fields; the
policy itself is each CLI's own flag (one name for ``generate``, a list for ``bench`` and ``sim``).
"""

from __future__ import annotations

import argparse

from .policy import DEFAULT_KNOBS, PolicyKnobs


def add_knob_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--predictor", default=None, help="predictor file for duoserve/uniform decode prefetch")
    parser.add_argument("--prefetch-depth", type=int, default=DEFAULT_KNOBS.prefetch_depth,
                        help="layers ahead to prefetch")
    parser.add_argument("--predictor-threshold", type=float, default=DEFAULT_KNOBS.predictor_threshold,
                        help="prefetch experts whose calibrated probability of use is at least this")
    parser.add_argument("--speculative-gate", action="store_true",
                        help="duoserve/uniform: take the next layer's experts from its router on this layer's input")
    parser.add_argument("--copy-slack", type=float, default=DEFAULT_KNOBS.copy_slack,
                        help="copies that fit in the copy stream's idle stretch between two decode layers' demand copies")


def knobs_from_args(args: argparse.Namespace, policy: str | None = None) -> PolicyKnobs:
    """The parsed flags as ``PolicyKnobs`` (checked: a bad value raises ``KnobError``)."""
    return PolicyKnobs(policy=policy or DEFAULT_KNOBS.policy, predictor=args.predictor,
                       prefetch_depth=args.prefetch_depth, predictor_threshold=args.predictor_threshold,
                       speculative_gate=args.speculative_gate, copy_slack=args.copy_slack)
