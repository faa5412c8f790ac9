"""Train the lab's small Mixtral-architecture model, so that its routing is learned, not random.

    python -m lab.smallmoe.train --corpus data/corpus --out data/small-moe            # the H100 run
    python -m lab.smallmoe.train --corpus data/corpus --out /tmp/m --steps 3 --device cpu

The model is transformers' own ``MixtralForCausalLM`` (8 experts, top-2, GQA), trained with a
per-layer load-balancing loss on the corpus that ``lab.smallmoe.corpus`` builds from Debian's
Python documentation. Hyper-parameters and the seed live in ``small_moe.json`` beside this file,
so a re-run reproduces the checkpoint. The result is a normal Hugging Face folder (config,
bf16 safetensors, tokenizer) plus ``training_log.json``, small enough to ship in ``data/``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from transformers import MixtralConfig, MixtralForCausalLM

from duoserve_core.atomic import atomic_write_json

HERE = Path(__file__).parent
SETTINGS = HERE / "small_moe.json"


def load_settings(path: Path = SETTINGS, **overrides) -> dict:
    settings = json.loads(path.read_text())
    for key, value in overrides.items():
        if value is not None:
            section = "model" if key in settings["model"] else "train"
            settings[section][key] = value
    return settings


class TokenWindows:
    """Random fixed-length windows from a flat uint16 token file (documents joined by ``</s>``)."""

    def __init__(self, path: Path, seq_len: int, seed: int):
        self.tokens = np.fromfile(path, dtype=np.uint16)
        if len(self.tokens) <= seq_len + 1:
            raise ValueError(f"{path} holds {len(self.tokens)} tokens, fewer than one window of {seq_len + 1}")
        self.seq_len = seq_len
        self.rng = np.random.default_rng(seed)

    def batch(self, size: int, device: torch.device) -> torch.Tensor:
        starts = self.rng.integers(0, len(self.tokens) - self.seq_len - 1, size=size)
        rows = np.stack([self.tokens[s:s + self.seq_len + 1] for s in starts]).astype(np.int64)
        return torch.from_numpy(rows).to(device)

    def sequential(self, size: int, device: torch.device, limit: int):
        """Non-overlapping windows from the start, for a deterministic held-out loss."""
        n = min(limit, (len(self.tokens) - 1) // self.seq_len)
        for first in range(0, n, size):
            idx = range(first, min(first + size, n))
            rows = np.stack([self.tokens[i * self.seq_len:(i + 1) * self.seq_len + 1] for i in idx]).astype(np.int64)
            yield torch.from_numpy(rows).to(device)


@torch.no_grad()
def heldout_loss(model: MixtralForCausalLM, data: TokenWindows, batch: int, device: torch.device,
                 limit: int, autocast: bool) -> float:
    model.eval()
    total, count = 0.0, 0
    for rows in data.sequential(batch, device, limit):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out = model(input_ids=rows, labels=rows, output_router_logits=False)  # language-model loss only
        # transformers shifts labels internally: seq_len predictions per row of seq_len + 1 tokens
        n = rows.shape[0] * (rows.shape[1] - 1)
        total += out.loss.float().item() * n
        count += n
    model.train()
    return total / count


def lm_loss(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), rows[:, 1:].flatten())


def per_layer_balance_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Switch-style load balancing, E * sum_e(share_e * mean_prob_e), averaged over layers (1.0 = balanced).

    Written here rather than taken from transformers because its Mixtral loss pools all layers
    before balancing: layer 0 sending every token to experts {0, 1} and layer 1 to {2, 3} looks
    balanced in the pool. The first runs of this script collapsed exactly that way (the busiest
    expert of layer 0 took half of all assignments, so every token used it).
    """
    losses = []
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        num_experts = probs.shape[-1]
        chosen = torch.nn.functional.one_hot(probs.topk(top_k, dim=-1).indices, num_experts).sum(dim=1).float()
        share = chosen.mean(dim=0) / top_k
        losses.append(num_experts * (share * probs.mean(dim=0)).sum())
    return torch.stack(losses).mean()


def param_groups(model: MixtralForCausalLM, weight_decay: float) -> list[dict]:
    """Weight decay on the projection matrices only.

    Not on routers: decay shrinks router logits until the softmax is nearly flat, and then the
    load-balancing loss (which multiplies assignment shares by mean probabilities) loses its grip.
    Not on norms and embeddings, as usual.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        skip = param.ndim < 2 or ".mlp.gate." in name or "embed_tokens" in name
        (no_decay if skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def router_max_share(model: MixtralForCausalLM, rows: torch.Tensor, autocast: bool) -> list[float]:
    """Per layer, the share of top-k assignments that the busiest expert gets (uniform: 1/E)."""
    model.eval()
    with torch.autocast(rows.device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=rows, output_router_logits=True).router_logits
    model.train()
    k, E = model.config.num_experts_per_tok, model.config.num_local_experts
    shares = []
    for layer_logits in logits:
        top = layer_logits.float().topk(k, dim=-1).indices.flatten()
        shares.append(float(torch.bincount(top, minlength=E).max()) / top.numel())
    return shares


def unigram_perplexity(train: np.ndarray, val: np.ndarray, vocab: int) -> float:
    """Perplexity of an add-one-smoothed unigram model fitted on train: the floor to beat."""
    counts = np.bincount(train, minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(math.exp(-logp[val].mean()))


def lr_at(step: int, settings: dict) -> float:
    t = settings["train"]
    if step < t["warmup_steps"]:
        return t["lr"] * (step + 1) / t["warmup_steps"]
    progress = (step - t["warmup_steps"]) / max(1, t["steps"] - t["warmup_steps"])
    return t["min_lr"] + 0.5 * (t["lr"] - t["min_lr"]) * (1 + math.cos(math.pi * progress))


def train(corpus: Path, out: Path, settings: dict, device: torch.device) -> dict:
    t, m = settings["train"], settings["model"]
    torch.manual_seed(t["seed"])
    tokenizer_dir = corpus / "tokenizer"
    config = MixtralConfig(**m)
    model = MixtralForCausalLM(config).to(device)
    train_data = TokenWindows(corpus / "train.bin", t["seq_len"], t["seed"])
    val_data = TokenWindows(corpus / "val.bin", t["seq_len"], t["seed"] + 1)
    opt = torch.optim.AdamW(param_groups(model, t["weight_decay"]), lr=t["lr"], betas=(0.9, 0.95),
                            fused=device.type == "cuda")
    autocast = device.type == "cuda"
    log = {"settings": settings, "device": torch.cuda.get_device_name(device) if autocast else "cpu",
           "params": sum(p.numel() for p in model.parameters()), "curve": []}
    start = time.perf_counter()
    best = (float("inf"), None, -1)  # held-out loss, weights, step: keep the best, the corpus is small
    model.train()
    for step in range(t["steps"]):
        if time.perf_counter() - start > t["max_seconds"]:
            log["stopped_early_at_step"] = step
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, settings)
        rows = train_data.batch(t["batch_size"], device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            outputs = model(input_ids=rows, output_router_logits=True)
            lm = lm_loss(outputs.logits, rows)
            balance = per_layer_balance_loss(outputs.router_logits, m["num_experts_per_tok"])
            loss = lm + t["balance_loss_coef"] * balance
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % t["eval_every"] == 0 or step == t["steps"] - 1:
            val = heldout_loss(model, val_data, t["batch_size"], device, t["eval_windows"], autocast)
            point = {"step": step, "train_loss": lm.item(), "balance_loss": balance.item(),
                     "val_loss": val, "elapsed_s": time.perf_counter() - start,
                     "router_max_share": [round(x, 3) for x in router_max_share(model, rows, autocast)]}
            log["curve"].append(point)
            print(json.dumps(point), flush=True)
            if val < best[0]:
                best = (val, {k: v.detach().clone() for k, v in model.state_dict().items()}, step)
    model.load_state_dict(best[1])
    log["best_step"] = best[2]
    final = heldout_loss(model, val_data, t["batch_size"], device, 10**9, autocast)
    log.update({
        "train_seconds": time.perf_counter() - start, "val_loss": final, "val_perplexity": math.exp(final),
        "unigram_val_perplexity": unigram_perplexity(train_data.tokens, val_data.tokens, m["vocab_size"]),
        "train_tokens_seen": t["steps"] * t["batch_size"] * t["seq_len"], "corpus_meta": _corpus_meta(corpus),
    })
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    atomic_write_json(out / "training_log.json", log)
    return log


def _corpus_meta(corpus: Path) -> dict:
    meta = corpus / "meta.json"
    if not meta.is_file():
        return {}
    raw = json.loads(meta.read_text())
    return {k: v for k, v in raw.items() if not isinstance(v, list)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", type=Path, default=Path("data/corpus"))
    p.add_argument("--out", type=Path, default=Path("data/small-moe"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=None, help="override small_moe.json (e.g. a few steps on the CPU)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--eval-windows", type=int, default=None)
    args = p.parse_args(argv)
    settings = load_settings(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                             eval_windows=args.eval_windows)
    log = train(args.corpus, args.out, settings, torch.device(args.device))
    print(f"held-out perplexity {log['val_perplexity']:.2f} (unigram {log['unigram_val_perplexity']:.2f}), "
          f"{log['params'] / 1e6:.1f}M parameters, {log['train_seconds']:.0f} s on {log['device']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
