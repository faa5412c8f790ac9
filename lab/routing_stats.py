"""Routing statistics of a trace: how balanced the experts are and how often tokens repeat them.

These are the figures that make a predictor possible (or not): the Mixtral paper's Table 5
reports how often consecutive tokens keep their first-choice expert (about 14% / 26% / 22% at
layers 0 / 15 / 31 against 12.5% for random routing over 8 experts) and their first-or-second
choice (46-67%, random 46%).
"""

from __future__ import annotations

from math import comb

import numpy as np
import pandas as pd

from duoserve_core.traces import Trace

# Mixtral-8x7B on The Pile, Table 5 of "Mixtral of Experts" (first-choice repeats).
MIXTRAL_TABLE5_FIRST_CHOICE = {0: 0.14, 15: 0.26, 31: 0.22}


def random_repeat_rates(num_experts: int, top_k: int) -> tuple[float, float]:
    """(first choice repeats, sets share an expert) under uniform independent routing."""
    share = 1.0 - comb(num_experts - top_k, top_k) / comb(num_experts, top_k)
    return 1.0 / num_experts, share


def consecutive_pairs(trace: Trace, phase: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Expert arrays ``[pairs, layers, k]`` of each token and the next token of the same request."""
    tokens = trace.tokens()
    experts = trace.expert_array()
    same_request = tokens["request_id"].to_numpy()[1:] == tokens["request_id"].to_numpy()[:-1]
    keep = same_request
    if phase is not None:
        keep = keep & (tokens["phase"].to_numpy()[1:] == phase)
    return experts[:-1][keep], experts[1:][keep]


def repeat_rates(trace: Trace, phase: str | None = None) -> pd.DataFrame:
    """Per layer: P(next token's first choice == this token's first choice) and P(sets intersect)."""
    now, nxt = consecutive_pairs(trace, phase)
    first = (now[:, :, 0] == nxt[:, :, 0]).mean(axis=0)
    shared = (now[:, :, :, None] == nxt[:, :, None, :]).any(axis=(2, 3)).mean(axis=0)
    return pd.DataFrame({"layer": np.arange(trace.meta.num_layers), "first_choice_repeat": first,
                         "any_shared": shared})


def load_balance(trace: Trace) -> pd.DataFrame:
    """Per layer and expert: the share of routing assignments (uniform is 1/E for each)."""
    experts = trace.expert_array()
    E = trace.meta.num_experts
    shares = np.stack([np.bincount(experts[:, l].ravel(), minlength=E) for l in range(trace.meta.num_layers)])
    shares = shares / shares.sum(axis=1, keepdims=True)
    return pd.DataFrame(shares, columns=[f"e{e}" for e in range(E)]).rename_axis("layer")


def summary(trace: Trace) -> dict:
    """Everything the data README reports, as plain numbers."""
    balance = load_balance(trace)
    rates_all, rates_decode = repeat_rates(trace), repeat_rates(trace, "decode")
    rand_first, rand_any = random_repeat_rates(trace.meta.num_experts, trace.meta.top_k)
    return {
        "tokens": len(trace.tokens()), "requests": int(trace.df["request_id"].nunique()),
        "random_first_choice": rand_first, "random_any_shared": rand_any,
        "balance_max_share": balance.max(axis=1).tolist(), "balance_min_share": balance.min(axis=1).tolist(),
        "first_choice_repeat": rates_all["first_choice_repeat"].tolist(), "any_shared": rates_all["any_shared"].tolist(),
        "decode_first_choice_repeat": rates_decode["first_choice_repeat"].tolist(),
        "decode_any_shared": rates_decode["any_shared"].tolist(),
    }


def layer_affinity(trace: Trace, layer: int, phase: str | None = None) -> np.ndarray:
    """``[E, E]``: P(expert j is among layer+1's top-k | expert i is among layer's top-k), same token."""
    experts = trace.expert_array()
    if phase is not None:
        experts = experts[trace.tokens()["phase"].to_numpy() == phase]
    E = trace.meta.num_experts
    here, there = experts[:, layer], experts[:, layer + 1]
    counts = np.zeros((E, E))
    for i_col in range(here.shape[1]):
        for j_col in range(there.shape[1]):
            np.add.at(counts, (here[:, i_col], there[:, j_col]), 1)
    chosen = np.bincount(here.ravel(), minlength=E)[:, None]
    return counts / np.maximum(chosen, 1)
