"""What each expert format costs: held-out perplexity, host bytes per expert, CPU time per expert.

    .venv/bin/python benchmarks/quant_quality.py --out benchmarks/results/quant_quality_small_moe.json

Quality: the bundled model (data/small-moe) scores every token of the held-out prompts
(data/prompts/prompts_heldout.txt, each prompt on its own, teacher-forced) with its experts stored
in bf16, NF4 and int4. transformers' ``MixtralForCausalLM`` runs in fp32 as the runtime does on
the CPU, and each layer's experts are computed by the format itself from its packed records
(``ExpertFormat.forward``: for int4 that is the CPU kernel, with bf16 activations), so the figure
is that of the arithmetic the runtime's CPU path uses, not of an idealised dequantization.

Speed: one expert's ``forward`` at 1, 4 and 16 tokens on this host's CPU with torch's default
threads, bf16 activations (what a CPU lane beside a bf16 GPU receives), on the bundled shape and
on one Mixtral-8x7B-sized expert (h 4096, i 14336, random weights). NF4 computes on the CPU by
dequantize + linear, int4 by torch's int4 kernel, bf16 by linear. The figures are this machine's:
the JSON names its CPU, thread count and load average (the fastest of the repeats is reported,
the median beside it, since a shared host's other work only ever adds time).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, MixtralForCausalLM
from transformers.utils import logging as hf_logging

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from duoserve_core.atomic import atomic_write_json, check_writable  # noqa: E402
from duoserve_core.checkpoint import ExpertTensors, open_source  # noqa: E402
from duoserve_core.errors import OutputError  # noqa: E402
from duoserve_core.experts import int4  # noqa: E402
from duoserve_core.experts.formats import ExpertFormat, make_format  # noqa: E402

MODEL, PROMPTS = ROOT / "data" / "small-moe", ROOT / "data" / "prompts" / "prompts_heldout.txt"
QUANTS = ("bf16", "nf4", "int4")
TOKENS = (1, 4, 16)
MIXTRAL = (4096, 14336)


class FormatExperts(nn.Module):
    """A drop-in for transformers' ``MixtralExperts``: each expert computed from its record by the format."""

    def __init__(self, fmt: ExpertFormat, records: list[torch.Tensor]):
        super().__init__()
        self.fmt, self.records = fmt, records

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden)
        for expert in top_k_index.unique().tolist():  # ascending, as the runtime combines
            token, slot = torch.where(top_k_index == expert)
            y = self.fmt.forward(self.records[expert], hidden[token]) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


def pack_model(quant: str, model: MixtralForCausalLM, source) -> ExpertFormat:
    """Replace every layer's experts by ``quant`` records packed from the checkpoint."""
    c = model.config
    fmt = make_format(quant, c.hidden_size, c.intermediate_size, torch.bfloat16)
    for layer_index, layer in enumerate(model.model.layers):
        records = []
        for e in range(c.num_local_experts):
            record = torch.empty(fmt.nbytes, dtype=torch.uint8)
            fmt.pack(source.expert(layer_index, e), record, torch.device("cpu"))
            records.append(record)
        layer.mlp.experts = FormatExperts(fmt, records)
    return fmt


@torch.inference_mode()
def perplexity(model: MixtralForCausalLM, prompts: list[list[int]]) -> tuple[float, int]:
    """Mean next-token negative log-likelihood over every prompt's tokens after the first, and their count."""
    nll, count = 0.0, 0
    for ids in prompts:
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
        nll += nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()
        count += len(ids) - 1
    return nll / count, count


def time_forward(fmt: ExpertFormat, record: torch.Tensor, tokens: int, repeats: int) -> list[float]:
    """Seconds of ``repeats`` calls of ``forward`` at ``tokens`` bf16 tokens (after one untimed call)."""
    x = torch.randn(tokens, fmt.hidden, generator=torch.Generator().manual_seed(tokens)).to(torch.bfloat16)
    fmt.forward(record, x)
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fmt.forward(record, x)
        samples.append(time.perf_counter() - t0)
    return samples


def timings(hidden: int, intermediate: int, repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    weights = ExpertTensors(*(torch.randn(shape, generator=g).mul_(0.02).to(torch.bfloat16)
                              for shape in [(intermediate, hidden), (intermediate, hidden), (hidden, intermediate)]))
    out = {}
    for quant in QUANTS:
        fmt = make_format(quant, hidden, intermediate, torch.bfloat16)
        record = torch.empty(fmt.nbytes, dtype=torch.uint8)
        fmt.pack(weights, record, torch.device("cpu"))
        samples = {str(t): time_forward(fmt, record, t, repeats) for t in TOKENS}
        out[quant] = {"record_bytes": fmt.nbytes, "bytes_per_param": fmt.nbytes / fmt.params,
                      "cpu_forward_ms": {t: round(min(s) * 1e3, 3) for t, s in samples.items()},
                      "cpu_forward_ms_median": {t: round(statistics.median(s) * 1e3, 3) for t, s in samples.items()}}
        print(f"  {hidden}x{intermediate} {quant:5s} " + "  ".join(
            f"{t:>2} tok {ms:9.3f} ms" for t, ms in out[quant]["cpu_forward_ms"].items()), flush=True)
    return out


def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    model_name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                      platform.processor())
    return {"cpu": model_name, "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "int4_cpu_layout": (int4.host_layout() or int4.FALLBACK_LAYOUT).name, "python": platform.python_version()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--repeats", type=int, default=7,
                   help="timed calls per point (the fastest is reported, and the median)")
    p.add_argument("--no-mixtral", action="store_true", help="skip the Mixtral-8x7B-sized timing (about a minute)")
    args = p.parse_args()
    try:
        out = check_writable(args.out, args.force, "--out")  # before minutes of work
    except OutputError as exc:
        p.error(str(exc))
    hf_logging.disable_progress_bar()

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    lines = [line for line in PROMPTS.read_text().splitlines() if line.strip()]
    prompts = [ids for ids in (tokenizer(line)["input_ids"] for line in lines) if len(ids) > 1]
    source = open_source(MODEL)

    quality = {}
    print(f"held-out perplexity: {len(prompts)} prompts from {PROMPTS.relative_to(ROOT)}", flush=True)
    for quant in QUANTS:
        model = MixtralForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
        fmt = pack_model(quant, model, source)
        t0 = time.perf_counter()
        nll, count = perplexity(model, prompts)
        quality[quant] = {"format": fmt.describe(), "nll": nll, "perplexity": math.exp(nll), "tokens_scored": count,
                          "seconds": round(time.perf_counter() - t0, 1)}
        print(f"  {quant:5s} perplexity {math.exp(nll):7.3f}  record {fmt.nbytes:7d} B  "
              f"({fmt.nbytes / fmt.params:.4f} B/param)", flush=True)
    for q in quality.values():
        q["perplexity_vs_bf16"] = q["perplexity"] / quality["bf16"]["perplexity"] - 1

    print(f"CPU forward per expert, bf16 activations, {torch.get_num_threads()} threads, "
          f"fastest of {args.repeats} calls", flush=True)
    load_before = os.getloadavg()
    speed = {"bundled": timings(source.config.hidden_size, source.config.intermediate_size, args.repeats)}
    if not args.no_mixtral:
        speed["mixtral-8x7b"] = timings(*MIXTRAL, args.repeats)

    print("\n| format | bytes / expert (bundled) | bytes / expert (Mixtral) | B/param | perplexity | vs bf16 | "
          + " | ".join(f"Mixtral expert, {t} tok (ms)" for t in TOKENS) + " |")
    print("|---|---|---|---|---|---|" + "---|" * len(TOKENS))
    for quant, q in quality.items():
        m = speed.get("mixtral-8x7b", {}).get(quant)
        cells = [f"{m['cpu_forward_ms'][str(t)]:.1f}" if m else "-" for t in TOKENS]
        print(f"| {q['format']['name']} | {q['format']['record_bytes']} | {m['record_bytes'] if m else '-'} | "
              f"{q['format']['bytes_per_param']:.4f} | "
              f"{q['perplexity']:.3f} | {q['perplexity_vs_bf16']:+.2%} | " + " | ".join(cells) + " |")

    atomic_write_json(out, {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python benchmarks/quant_quality.py " + " ".join(sys.argv[1:]),
        "machine": {**machine(), "load_average_1m_before_timing": round(load_before[0], 2),
                    "load_average_1m_after_timing": round(os.getloadavg()[0], 2)},
        "model": str(MODEL.relative_to(ROOT)), "prompts": str(PROMPTS.relative_to(ROOT)),
        "quality": quality,
        "cpu_forward": {"activations": "bfloat16", "tokens": list(TOKENS), "repeats": args.repeats,
                        "note": "cpu_forward_ms is the fastest of the repeats (a shared host's other work only "
                                "adds time); cpu_forward_ms_median is beside it",
                        "shapes": {"bundled": [source.config.hidden_size, source.config.intermediate_size],
                                   "mixtral-8x7b": list(MIXTRAL)},
                        "by_shape": speed},
    })
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
