"""Bad input gets an error that names the problem and the fix, before anything heavy happens."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import duoserve_core
from duoserve_core import BudgetError, CheckpointError, DeviceError, PromptError


def _copy(src, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def _edit_tensor(ckpt, name, change):
    """Rewrite the shard holding ``name`` with ``change(tensors)`` applied."""
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shard = ckpt / index["weight_map"][name]
    tensors = load_file(shard)
    change(tensors)
    save_file(tensors, shard)


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        duoserve_core.load(tmp_path / "nope", device="cpu")


def test_folder_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        duoserve_core.load(tmp_path, device="cpu")


def test_malformed_config(tiny_checkpoint, tmp_path):
    ckpt = _copy(tiny_checkpoint, tmp_path)
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        duoserve_core.load(ckpt, device="cpu")


def test_config_that_is_not_mixtral(tiny_checkpoint, tmp_path):
    ckpt = _copy(tiny_checkpoint, tmp_path)
    raw = json.loads((ckpt / "config.json").read_text())
    raw["model_type"] = "llama"
    (ckpt / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="model_type is 'llama', not 'mixtral'"):
        duoserve_core.load(ckpt, device="cpu")


def test_config_that_is_not_sparse(tiny_checkpoint, tmp_path):
    ckpt = _copy(tiny_checkpoint, tmp_path)
    raw = json.loads((ckpt / "config.json").read_text())
    raw["num_experts_per_tok"] = 9
    (ckpt / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="do not describe a sparse MoE"):
        duoserve_core.load(ckpt, device="cpu")


def test_no_safetensors(tiny_checkpoint, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copy(tiny_checkpoint / "config.json", ckpt)
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        duoserve_core.load(ckpt, device="cpu")


def test_missing_expert_tensor(tiny_checkpoint, tmp_path):
    ckpt = _copy(tiny_checkpoint, tmp_path)
    name = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    _edit_tensor(ckpt, name, lambda t: t.pop(name))
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    del index["weight_map"][name]
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="experts.3.w2.weight' is missing"):
        duoserve_core.load(ckpt, device="cpu")


def test_misshapen_tensor(tiny_checkpoint, tmp_path):
    ckpt = _copy(tiny_checkpoint, tmp_path)
    name = "model.layers.0.self_attn.q_proj.weight"
    _edit_tensor(ckpt, name, lambda t: t.__setitem__(name, torch.zeros(3, 3)))
    with pytest.raises(CheckpointError, match=r"q_proj.weight' .* has shape \[3, 3\], but config.json implies \[64, 64\]"):
        duoserve_core.load(ckpt, device="cpu")


def test_index_naming_absent_shard(tiny_checkpoint, tmp_path):
    ckpt = _copy(tiny_checkpoint, tmp_path)
    next(ckpt.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="which is not in"):
        duoserve_core.load(ckpt, device="cpu")


def test_budget_too_small_says_what_is_needed(tiny_checkpoint):
    with pytest.raises(BudgetError, match=r"too small: .*need .*Raise --memory-budget to at least"):
        duoserve_core.load(tiny_checkpoint, device="cpu", memory_budget="100KiB")


def test_resident_policy_refuses_a_budget_that_cannot_hold_every_expert(tiny_checkpoint):
    rt = duoserve_core.load(tiny_checkpoint, device="cpu", quant="none")
    budget = rt.plan.fixed_bytes + 4 * rt.format.nbytes
    with pytest.raises(BudgetError, match="resident' needs all 18 experts"):
        duoserve_core.load(tiny_checkpoint, device="cpu", quant="none", policy="resident", memory_budget=budget)


def test_unreadable_budget(tiny_checkpoint):
    with pytest.raises(ValueError, match="cannot read size"):
        duoserve_core.load(tiny_checkpoint, device="cpu", memory_budget="twelve gigs")


@pytest.fixture(scope="module")
def runtime(tiny_checkpoint):
    return duoserve_core.load(tiny_checkpoint, device="cpu", quant="none", max_context=64)


def test_empty_prompt(runtime):
    with pytest.raises(PromptError, match="empty"):
        runtime.generate("   ")
    with pytest.raises(PromptError, match="empty"):
        runtime.generate(prompt_ids=[])


def test_text_prompt_without_tokenizer(runtime):
    with pytest.raises(PromptError, match="has no tokenizer; pass token ids"):
        runtime.generate("hello")


def test_prompt_longer_than_context(runtime):
    with pytest.raises(PromptError, match="exceed the context of 64 tokens"):
        runtime.generate(prompt_ids=[1] * 60, max_new_tokens=8)
    with pytest.raises(PromptError, match="exceed the context"):
        runtime.generate(prompt_ids=[1] * 65, max_new_tokens=1)


def test_token_outside_vocabulary(runtime):
    with pytest.raises(PromptError, match="outside the vocabulary"):
        runtime.generate(prompt_ids=[1, 96])


def test_context_beyond_the_model(tiny_checkpoint):
    with pytest.raises(PromptError, match="exceeds the model's context of 128"):
        duoserve_core.load(tiny_checkpoint, device="cpu", max_context=4096)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_requested_without_a_gpu(tiny_checkpoint):
    with pytest.raises(DeviceError, match="no CUDA GPU is visible.*use --device cpu"):
        duoserve_core.load(tiny_checkpoint, device="cuda")


def test_unknown_device_and_preset(tiny_checkpoint):
    with pytest.raises(DeviceError, match="not supported"):
        duoserve_core.load(tiny_checkpoint, device="mps")
    with pytest.raises(CheckpointError, match="unknown synthetic preset"):
        duoserve_core.load("synthetic:mixtral-1x1b", device="cpu")
    with pytest.raises(CheckpointError, match="--num-layers 9 is outside 1..4"):
        duoserve_core.load("synthetic:tiny", device="cpu", num_layers=9)


def test_budget_in_slots_and_all(tiny_checkpoint):
    """``Nslots`` and ``all`` mean the fixed memory plus that many experts, in the runtime as in the bench."""
    rt = duoserve_core.load(tiny_checkpoint, device="cpu", quant="none", memory_budget="3slots")
    assert rt.plan.num_slots == 3 and rt.plan.budget_bytes == rt.plan.fixed_bytes + 3 * rt.format.nbytes
    assert rt.configure(memory_budget="all").plan.num_slots == rt.plan.total_experts
