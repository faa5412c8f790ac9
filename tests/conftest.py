"""Tiny Mixtral checkpoints written by transformers' own save_pretrained, shared by the tests."""

from __future__ import annotations

import importlib.util
import inspect
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import MixtralConfig, MixtralForCausalLM

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2, max_position_embeddings=128,
            eos_token_id=None, bos_token_id=None, pad_token_id=None)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def benchmark_script(name: str):
    """``benchmarks/<name>.py`` imported as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_reference(seed: int = 0, **overrides) -> MixtralForCausalLM:
    """A randomly initialised fp32 MixtralForCausalLM with routers spread enough to route unevenly."""
    torch.manual_seed(seed)
    model = MixtralForCausalLM(MixtralConfig(**{**TINY, **overrides})).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, 0.5)
    return model


def save_checkpoint(model: MixtralForCausalLM, path: Path, shard: bool = False) -> Path:
    model.save_pretrained(path, max_shard_size="100KB" if shard else "1GB")
    return path


@pytest.fixture(scope="session")
def reference_model() -> MixtralForCausalLM:
    return make_reference()


@pytest.fixture(scope="session")
def windowed(tmp_path_factory):
    """A tiny Mixtral whose sliding window (5) is shorter than the prompts, with 4 query heads over 2 KV heads:
    ``(model, checkpoint folder)``."""
    model = make_reference(seed=3, sliding_window=5)
    return model, save_checkpoint(model, tmp_path_factory.mktemp("windowed"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, reference_model) -> Path:
    """Split expert layout (block_sparse_moe.experts.E.w1/w2/w3), sharded with an index."""
    return save_checkpoint(reference_model, tmp_path_factory.mktemp("tiny"), shard=True)


@pytest.fixture(scope="session")
def fused_checkpoint(tmp_path_factory, tiny_checkpoint) -> Path:
    """The same weights in transformers 5's fused layout (mlp.experts.gate_up_proj/down_proj), one file."""
    out = tmp_path_factory.mktemp("fused")
    index = json.loads((tiny_checkpoint / "model.safetensors.index.json").read_text())
    tensors = {}
    for file in set(index["weight_map"].values()):
        tensors.update(load_file(tiny_checkpoint / file))
    cfg = MixtralConfig(**TINY)
    fused = {}
    for layer in range(cfg.num_hidden_layers):
        old = f"model.layers.{layer}.block_sparse_moe."
        new = f"model.layers.{layer}.mlp."
        experts = range(cfg.num_local_experts)
        fused[new + "experts.gate_up_proj"] = torch.stack(
            [torch.cat([tensors[f"{old}experts.{e}.w1.weight"], tensors[f"{old}experts.{e}.w3.weight"]]) for e in experts])
        fused[new + "experts.down_proj"] = torch.stack([tensors[f"{old}experts.{e}.w2.weight"] for e in experts])
        fused[new + "gate.weight"] = tensors[old + "gate.weight"]
    fused.update({k: v for k, v in tensors.items() if "block_sparse_moe" not in k})
    save_file({k: v.contiguous() for k, v in fused.items()}, out / "model.safetensors")
    (out / "config.json").write_text((tiny_checkpoint / "config.json").read_text())
    return out


# transformers renamed ``past_key_values`` to ``cache`` within 5.x (later releases warn on the old name).
_CACHE = "cache" if "cache" in inspect.signature(MixtralForCausalLM.forward).parameters else "past_key_values"


def hf_greedy(model: MixtralForCausalLM, prompt: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding with transformers' own forward and KV cache: the reference."""
    tokens, logits_seen = [], []
    with torch.no_grad():
        out = model(torch.tensor([prompt]), use_cache=True)
        for _ in range(steps):
            logits = out.logits[0, -1].float()
            logits_seen.append(logits)
            tokens.append(int(logits.argmax()))
            out = model(torch.tensor([[tokens[-1]]]), **{_CACHE: getattr(out, _CACHE)}, use_cache=True)
    return tokens, logits_seen


@pytest.fixture(scope="session")
def checkpoint_with_tokenizer(tmp_path_factory, reference_model) -> Path:
    """The tiny checkpoint plus a word-level tokenizer trained here (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    path = save_checkpoint(reference_model, tmp_path_factory.mktemp("with_tokenizer"))
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    text = ["the quick brown fox jumps over the lazy dog", "experts live in host memory and move on demand"]
    tok.train_from_iterator(text, trainers.WordLevelTrainer(vocab_size=TINY["vocab_size"],
                                                            special_tokens=["<unk>", "<s>", "</s>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(path)
    return path
