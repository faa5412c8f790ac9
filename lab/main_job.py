"""The lab's main job: run the bundled default model under every policy and write a report.

    python -m lab.main_job            # or: make run
    python -m lab.main_job --model synthetic:mixtral-8x7b --num-layers 4 --device cuda

For each policy and budget (on-demand and, for the bundled model with its predictor, duoserve)
it generates the same prompt, checks that the tokens are the same
as with every expert resident (the lab's first invariant), and writes under ``reports/``:
``main_job.json`` (every figure), ``main_job.md`` (the table), and one Chrome trace per run
(open in https://ui.perfetto.dev) with the copy and compute streams.

Then it executes every numbered notebook (``notebooks/NN_*.ipynb``) headless with its knobs at
their defaults and writes each, outputs included, to ``reports/notebooks/NN_name.ipynb`` and
``NN_name.html`` (``lab.notebook_runner``); the job fails, naming the notebook and cell, if one
fails. ``--notebooks none`` skips them.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import duoserve_core
from duoserve_core.atomic import atomic_write_json, atomic_write_text
from duoserve_core.units import format_bytes
from lab.notebook_runner import NOTEBOOKS, failure_message, numbered_notebooks, run_all

DEFAULT_MODEL = "data/small-moe"
# What a CPU run's times mean: the counts are exact on any device, the times are not the schedule's.
CPU_NOTE = ("On the CPU the counts (hits, misses, experts copied, bytes) are exact and device-independent; "
            "the times are not a measure of the schedules: a CPU \"copy\" is a synchronous memcpy, nothing "
            "overlaps, and a policy that copies ahead (duoserve's prefill window) pays for it in line. Copy "
            "bandwidths measured on the CPU mean nothing. Overlap needs a GPU: see the README's H200 results.")
BUNDLED_PREDICTOR = "data/predictors/small-moe-depth2.safetensors"
PROMPT = "Return the file system representation for path. If the object is a str or bytes object, then"
PROMPT_IDS = [1, 415, 2936, 9060, 285, 1142, 28705, 28770, 28734, 28723]  # for models without a tokenizer


def runs_for(runtime: duoserve_core.Runtime, predictor: str | None) -> list[tuple[str, int | None, dict]]:
    """(policy, budget, knobs): all-resident first (the reference), then the tightest budget that
    works and a quarter of the experts, each under on-demand and, with a predictor, duoserve."""
    plan = runtime.plan
    tight = plan.fixed_bytes + runtime.config.num_experts_per_tok * plan.expert_bytes
    quarter = plan.fixed_bytes + max(runtime.config.num_local_experts, plan.total_experts // 4) * plan.expert_bytes
    everything = plan.fixed_bytes + plan.total_experts * plan.expert_bytes
    runs = [("resident", everything, {})]
    for budget in (tight, quarter):
        runs.append(("on-demand", budget, {}))
        if predictor is not None:
            runs.append(("duoserve", budget, dict(predictor=predictor, speculative_gate=True,
                                                  predictor_threshold=0.6)))
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quant", default="nf4")
    parser.add_argument("--num-layers", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--out", default="reports")
    parser.add_argument("--notebooks", default=str(NOTEBOOKS),
                        help="folder of numbered notebooks to execute into OUT/notebooks/ ('none': skip them)")
    parser.add_argument("--notebook-timeout", type=int, default=600, help="seconds one notebook cell may take")
    args = parser.parse_args(argv)
    out = Path(args.out)

    common = dict(device=args.device, quant=args.quant, num_layers=args.num_layers, max_context=256)
    probe = duoserve_core.load(args.model, **common)
    if probe.tokenizer is not None:
        prompt = probe.tokenizer(PROMPT)["input_ids"]
    else:
        prompt = [t % probe.config.vocab_size for t in PROMPT_IDS]
    predictor = BUNDLED_PREDICTOR if args.model == DEFAULT_MODEL and args.num_layers is None else None
    results, reference = [], None
    for policy, budget, knobs in runs_for(probe, predictor):
        runtime = duoserve_core.load(args.model, policy=policy, memory_budget=budget, **common, **knobs)
        result = runtime.generate(prompt_ids=prompt, max_new_tokens=args.max_new_tokens, stop_at_eos=False)
        reference = reference or result.tokens
        name = f"{policy}_{runtime.plan.num_slots}slots"
        runtime.timeline.write_chrome_trace(out / f"timeline_{name}.json")
        results.append({**result.as_dict(), "runtime": runtime.describe(), "budget_bytes": budget,
                        "tokens_match_resident": result.tokens == reference})

    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "model": args.model,
              "prompt_ids": prompt, "text": results[0]["text"], "runs": results}
    atomic_write_json(out / "main_job.json", report)
    on_cpu = results[0]["device"] == "cpu"
    lines = [f"# Main job: {args.model} on {results[0]['device']}", ""]
    if on_cpu:
        lines += [CPU_NOTE, ""]
    lines += ["| policy | budget | slots | tokens = resident | hits / misses | experts copied | H2D | TTFT ms | TPOT ms |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['policy']['policy']} | {format_bytes(r['budget_bytes'])} | "
                     f"{r['runtime']['memory_plan']['num_slots']} | {r['tokens_match_resident']} | "
                     f"{r['expert_hits']} / {r['expert_misses']} | {r['h2d_copies']} | {format_bytes(r['h2d_bytes'])} | "
                     f"{r['ttft_s'] * 1e3:.1f} | {(r['tpot_s'] or 0) * 1e3:.2f} |")
    if results[0]["text"] is not None:
        lines += ["", f"Generated (greedy): {results[0]['text']!r}"]
    table = "\n".join(lines) + "\n"
    atomic_write_text(out / "main_job.md", table)
    print(table)
    print(f"wrote {out / 'main_job.json'}, {out / 'main_job.md'} and {len(results)} Chrome traces in {out}/")
    tokens_ok = all(r["tokens_match_resident"] for r in results)

    notebooks_ok = True
    if args.notebooks != "none":
        runs = run_all(numbered_notebooks(args.notebooks), out / "notebooks", timeout=args.notebook_timeout)
        report["notebooks"] = [r.as_dict() for r in runs]
        atomic_write_json(out / "main_job.json", report)
        lines = ["", "## Notebooks, executed headless with their default knobs", "",
                 "| notebook | status | seconds | with outputs |", "|---|---|---|---|"]
        for r in runs:
            status = "ok" if r.ok else f"FAILED: {r.error}"
            lines.append(f"| {r.name} | {status} | {r.seconds:.1f} | [{r.html.name}](notebooks/{r.html.name}), "
                         f"[{r.ipynb.name}](notebooks/{r.ipynb.name}) |")
        atomic_write_text(out / "main_job.md", table + "\n".join(lines) + "\n")
        message = failure_message(runs)
        if message:
            print(f"error: {message}", file=sys.stderr)
            notebooks_ok = False
        else:
            print(f"wrote {len(runs)} executed notebooks (.ipynb and .html) in {out / 'notebooks'}/")
    return 0 if tokens_ok and notebooks_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
