"""Tables for data/README.md: how well the small MoE models text, and how it routes.

    python -m lab.smallmoe.report --model data/small-moe --trace data/traces/small-moe-heldout.parquet

Prints Markdown: held-out perplexity against the unigram baseline, expert load balance per
layer, and consecutive-token repeat rates per layer beside Mixtral's published figures.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from duoserve_core.traces import read_trace
from lab.routing_stats import MIXTRAL_TABLE5_FIRST_CHOICE, load_balance, random_repeat_rates, repeat_rates


def markdown(model_dir: Path, trace_path: Path) -> str:
    log = json.loads((model_dir / "training_log.json").read_text())
    trace = read_trace(trace_path)
    E, k = trace.meta.num_experts, trace.meta.top_k
    rand_first, rand_any = random_repeat_rates(E, k)
    lines = [
        "| held-out perplexity | unigram baseline | parameters | tokens seen in training | trained on | time |",
        "|---|---|---|---|---|---|",
        f"| {log['val_perplexity']:.2f} | {log['unigram_val_perplexity']:.1f} | {log['params'] / 1e6:.1f} M | "
        f"{log['train_tokens_seen'] / 1e6:.0f} M | {log['device']} | {log['train_seconds']:.0f} s |",
        "",
        f"Routing on the held-out trace ({len(trace.tokens())} tokens, {trace.df['request_id'].nunique()} prompts). "
        f"Load balance: the share of top-{k} assignments of the busiest and the idlest expert (uniform: {1 / E:.3f}). "
        f"Repeats: how often the next token keeps this token's first-choice expert (random: {rand_first:.3f}) "
        f"and how often the two tokens share at least one expert (random: {rand_any:.3f}).",
        "",
        "| layer | busiest expert | idlest expert | first-choice repeat | any expert shared | decode: first / any |",
        "|---|---|---|---|---|---|",
    ]
    balance = load_balance(trace)
    rates, decode = repeat_rates(trace), repeat_rates(trace, "decode")
    for layer in range(trace.meta.num_layers):
        lines.append(f"| {layer} | {balance.loc[layer].max():.3f} | {balance.loc[layer].min():.3f} | "
                     f"{rates['first_choice_repeat'][layer]:.3f} | {rates['any_shared'][layer]:.3f} | "
                     f"{decode['first_choice_repeat'][layer]:.3f} / {decode['any_shared'][layer]:.3f} |")
    mixtral = ", ".join(f"layer {l}: {v:.0%}" for l, v in MIXTRAL_TABLE5_FIRST_CHOICE.items())
    lines += ["", f"Mixtral-8x7B (paper, Table 5, first-choice repeats): {mixtral}; random 12.5%."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("data/small-moe"))
    p.add_argument("--trace", type=Path, default=Path("data/traces/small-moe-heldout.parquet"))
    args = p.parse_args(argv)
    print(markdown(args.model, args.trace))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
