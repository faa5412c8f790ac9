"""The command line, the JSON it prints, and metrics that agree with the timeline."""

from __future__ import annotations

import json

import pytest
import torch

import duoserve_core
from duoserve_core.cli import main

REQUIRED = {"tokens", "text", "ttft_s", "tpot_s", "e2e_s", "peak_gpu_bytes", "h2d_bytes", "expert_hits",
            "expert_misses", "device"}


def test_generate_json(tiny_checkpoint, capsys, tmp_path):
    trace = tmp_path / "trace.json"
    code = main(["generate", "--model", str(tiny_checkpoint), "--prompt-ids", "1,2,3", "--max-new-tokens", "5",
                 "--device", "cpu", "--quant", "nf4", "--policy", "on-demand", "--json", "--timeline-out", str(trace)])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert REQUIRED <= set(out)
    assert len(out["tokens"]) == 5 and out["device"] == "cpu" and out["peak_gpu_bytes"] is None
    assert out["h2d_bytes"] == out["expert_misses"] * out["runtime"]["memory_plan"]["expert_bytes"]
    events = json.loads(trace.read_text())["traceEvents"]
    assert {e["name"].split()[0] for e in events if e["ph"] == "X"} >= {"attention", "router", "expert", "h2d"}


def test_generate_table_and_errors(capsys):
    assert main(["generate", "--model", "synthetic:tiny", "--num-layers", "2", "--prompt-ids", "4,5",
                 "--max-new-tokens", "3", "--device", "cpu"]) == 0
    assert "TTFT" in capsys.readouterr().out
    assert main(["generate", "--model", "/no/such/folder", "--prompt-ids", "1", "--device", "cpu"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bad_prompt_ids_rejected_by_parser():
    with pytest.raises(SystemExit):
        main(["generate", "--model", "synthetic:tiny", "--prompt-ids", "1,x"])


def test_counts_agree_with_the_timeline(tiny_checkpoint):
    rt = duoserve_core.load(tiny_checkpoint, device="cpu", quant="nf4")
    budget = rt.plan.fixed_bytes + 3 * rt.format.nbytes
    rt = duoserve_core.load(tiny_checkpoint, device="cpu", quant="nf4", memory_budget=budget)
    r = rt.generate(prompt_ids=[3, 1, 4, 1, 5, 9, 2, 6], max_new_tokens=6)
    df = rt.timeline.to_dataframe()
    uses = int((df["kind"] == "expert").sum())
    assert r.expert_hits + r.expert_misses == uses
    assert r.h2d_copies == int((df["kind"] == "h2d").sum()) == r.expert_misses  # on-demand never prefetches
    assert int((df["kind"] == "attention").sum()) == 6 * rt.config.num_hidden_layers
    assert r.phases["prefill"]["misses"] + r.phases["decode"]["misses"] == r.expert_misses
    # decode touches k experts per layer per token: at most k uses, at least one
    decode = df[(df["kind"] == "expert") & (df["phase"] == "decode")]
    per_layer = decode.groupby(["step", "layer"]).size()
    assert per_layer.max() <= rt.config.num_experts_per_tok and per_layer.min() >= 1


def test_resident_moves_each_expert_once(tiny_checkpoint):
    rt = duoserve_core.load(tiny_checkpoint, device="cpu", quant="bf16", policy="resident")
    r = rt.generate(prompt_ids=[1, 2, 3, 4], max_new_tokens=4)
    assert r.expert_misses == 0 and r.h2d_copies == 18 and r.h2d_bytes == 18 * rt.format.nbytes
    again = rt.generate(prompt_ids=[1, 2, 3, 4], max_new_tokens=4)
    assert again.h2d_copies == 0 and again.tokens == r.tokens


def test_text_prompt_through_the_checkpoints_tokenizer(checkpoint_with_tokenizer, capsys):
    code = main(["generate", "--model", str(checkpoint_with_tokenizer), "--prompt", "the quick brown fox",
                 "--max-new-tokens", "4", "--device", "cpu", "--quant", "none", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    rt = duoserve_core.load(checkpoint_with_tokenizer, device="cpu", quant="none")
    ids = rt.tokenizer("the quick brown fox")["input_ids"]
    assert out["tokens"] == rt.generate(prompt_ids=ids, max_new_tokens=4).tokens
    assert out["text"] == rt.tokenizer.decode(out["tokens"])


def _one_line_exit_2(capsys, argv) -> str:
    """``main(argv)`` fails with exit 2 (a parser error or a runtime one) and one line on stderr."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    return err[0]


def test_several_devices_give_the_same_tokens(tiny_checkpoint, capsys):
    common = ["generate", "--model", str(tiny_checkpoint), "--prompt-ids", "1,2,3", "--max-new-tokens", "5",
              "--quant", "nf4", "--memory-budget", "4slots"]
    assert main(common + ["--device", "cpu", "--json"]) == 0
    one = json.loads(capsys.readouterr().out)
    assert main(common + ["--devices", "cpu,cpu", "--json"]) == 0
    two = json.loads(capsys.readouterr().out)
    assert two["tokens"] == one["tokens"] and two["device"] == "cpu, cpu" and one["device"] == "cpu"
    assert two["runtime"]["devices"] == ["cpu", "cpu"] and one["runtime"]["devices"] == ["cpu"]
    slots = [d["slots"] for d in two["runtime"]["memory_plan_by_device"]]
    assert len(slots) == 2 and slots[0] == 4 and sum(slots) == two["runtime"]["memory_plan"]["num_slots"]
    assert two["peak_gpu_bytes_by_device"] is None  # the CPU has no peak to report
    assert main(common + ["--devices", "cpu,cpu"]) == 0
    table = capsys.readouterr().out
    assert "devices" in table and f"(4 on cpu, {slots[1]} on cpu)" in table


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() >= 2, reason="this machine has 2 GPUs")
def test_gpus_beyond_the_machine_is_one_line_naming_the_fix(capsys):
    err = _one_line_exit_2(capsys, ["generate", "--model", "synthetic:tiny", "--prompt-ids", "1", "--gpus", "2"])
    assert "--gpus 2" in err and ("--device cpu" in err or "--gpus 1" in err)


@pytest.mark.parametrize("flags, words", [
    (["--devices", "cpu,cuda:0"], ""),                 # the CPU and a GPU (or no GPU here): the runtime refuses
    (["--devices", "cuda:0,,cuda:1"], "--devices"), (["--devices", "tpu:0"], "tpu"), (["--devices", "cuda:x"], "cuda:x"),
    (["--gpus", "0"], "--gpus"), (["--gpus", "two"], "--gpus"),
    (["--device", "cpu", "--gpus", "1"], "not allowed"), (["--devices", "cpu", "--gpus", "1"], "not allowed"),
])
def test_bad_device_flags_exit_2_with_one_line(capsys, flags, words):
    err = _one_line_exit_2(capsys, ["generate", "--model", "synthetic:tiny", "--prompt-ids", "1"] + flags)
    assert words in err
