"""The peer users would pick instead: transformers + accelerate offloading at the same budget.

    python benchmarks/accelerate_peer.py --preset mixtral-8x7b --num-layers 4 --budget 4GiB \\
        --prompt-len 512 --gen 8 --out benchmarks/results/accelerate_peer_h100.json

Builds ``MixtralForCausalLM`` from a preset config with random bf16 weights (timing does not
depend on weight values), lets accelerate place it with ``infer_auto_device_map`` under
``max_memory={0: budget, "cpu": ...}`` and ``dispatch_model`` (its hooks move CPU-placed weights to
the GPU for every forward, from pageable memory), and times prefill and decode with
transformers' own forward and KV cache. Nothing of the lab's runtime is used. A full 8x7B in
bf16 needs about 93 GB of host memory, so the usual run times a few full-width layers and scales
the per-layer time to the full depth; the result says so.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import shlex
import sys
import time

import torch
from accelerate import dispatch_model, infer_auto_device_map
from transformers import MixtralConfig, MixtralForCausalLM

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from duoserve_core.checkpoint import PRESETS  # noqa: E402  (the shapes only)
from duoserve_core.atomic import atomic_write_json  # noqa: E402
from duoserve_core.units import parse_bytes  # noqa: E402


def build(preset: str, num_layers: int, seed: int = 0) -> MixtralForCausalLM:
    shape = {k: v for k, v in PRESETS[preset].items() if k != "dtype"}
    config = MixtralConfig(**{**shape, "num_hidden_layers": num_layers}, eos_token_id=None, bos_token_id=None)
    with torch.device("meta"):
        model = MixtralForCausalLM(config).to(torch.bfloat16)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a cheap fill: random init of billions of parameters on the CPU takes minutes
        for param in model.parameters():
            param.copy_((torch.rand(param.shape[-1], generator=generator) - 0.5) * 0.04)
    model.model.rotary_emb = type(model.model.rotary_emb)(config)
    return model.eval()


# transformers renamed ``past_key_values`` to ``cache`` within 5.x (later releases warn on the old name).
_CACHE = "cache" if "cache" in inspect.signature(MixtralForCausalLM.forward).parameters else "past_key_values"


@torch.inference_mode()
def time_generation(model, prompt: torch.Tensor, gen: int, device: torch.device) -> tuple[float, float]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = model(prompt.to(device), use_cache=True)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    sync()
    ttft = time.perf_counter() - t0
    cache = getattr(out, _CACHE)
    for _ in range(gen - 1):
        out = model(token, **{_CACHE: cache}, use_cache=True)
        cache, token = getattr(out, _CACHE), out.logits[:, -1].argmax(-1, keepdim=True)
    sync()
    return ttft, (time.perf_counter() - t0 - ttft) / max(1, gen - 1)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mixtral-8x7b", choices=sorted(PRESETS))
    p.add_argument("--num-layers", type=int, default=4, help="layers actually built; times are scaled to full depth")
    p.add_argument("--budget", default="4GiB", help="GPU memory accelerate may use")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--gen", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    model = build(args.preset, args.num_layers)
    if device.type == "cuda":
        budget = parse_bytes(args.budget)
        device_map = infer_auto_device_map(model, max_memory={0: budget, "cpu": "512GiB"},
                                           no_split_module_classes=model._no_split_modules)
        model = dispatch_model(model, device_map=device_map)
        placed_on_gpu = sum(1 for v in device_map.values() if v == 0)
    else:
        budget, placed_on_gpu = None, 0
    vocab = model.config.vocab_size
    prompt = torch.randint(3, min(1000, vocab), (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    time_generation(model, prompt[:, :8], 2, device)  # warm-up
    ttft, tpot = time_generation(model, prompt, args.gen, device)
    full_layers = PRESETS[args.preset]["num_hidden_layers"]
    scale = full_layers / args.num_layers
    result = {
        "peer": "transformers + accelerate dispatch_model (infer_auto_device_map, max_memory)",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/accelerate_peer.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "preset": args.preset, "layers_built": args.num_layers, "budget_bytes": budget,
        "modules_on_gpu": placed_on_gpu, "prompt_len": args.prompt_len, "gen": args.gen,
        "ttft_s_measured": ttft, "tpot_s_measured": tpot,
        "ttft_s_scaled_to_full_depth": ttft * scale, "tpot_s_scaled_to_full_depth": tpot * scale,
        "scaling_note": f"times of {args.num_layers} full-width layers x {scale:.1f} for {full_layers} layers",
    }
    if args.out:
        atomic_write_json(args.out, result)
    print(f"{result['device']}: TTFT {ttft:.2f} s, TPOT {tpot:.2f} s for {args.num_layers} layers; "
          f"scaled to {full_layers} layers: TTFT {ttft * scale:.1f} s, TPOT {tpot * scale:.1f} s")
    return result


if __name__ == "__main__":
    main()
