"""The row KV cache and its attention (``kv_cache.RowKVCache``, ``mixtral.attend``) against transformers.

transformers' attention is the reference: with a sliding window shorter than the prompt and
grouped-query heads, prefill and decode through the row cache give transformers' logits; requests
at different positions decoded in one forward give each request's own logits; a released row is
reused by the next request without its stale keys leaking in.
"""

from __future__ import annotations

import pytest
import torch

import duoserve_core
from conftest import hf_greedy, make_reference, save_checkpoint
from duoserve_core.errors import PromptError

PROMPT = [5, 17, 33, 2, 71, 40, 12, 90, 3, 64, 8, 19]


@pytest.fixture(scope="module")
def windowed(tmp_path_factory):
    """A tiny Mixtral whose sliding window (5) is shorter than the prompt, with 4 query heads over 2 KV heads."""
    model = make_reference(seed=3, sliding_window=5)
    return model, save_checkpoint(model, tmp_path_factory.mktemp("windowed"))


def test_sliding_window_and_grouped_heads_match_transformers(windowed):
    model, path = windowed
    ref_tokens, ref_logits = hf_greedy(model, PROMPT, 10)
    rt = duoserve_core.load(path, device="cpu", quant="none")
    got = rt.generate(prompt_ids=PROMPT, max_new_tokens=10, stop_at_eos=False, return_logits=True)
    assert got.tokens == ref_tokens
    for ours, theirs in zip(got.logits, ref_logits):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_rows_at_different_positions_decode_as_if_alone(windowed):
    model, path = windowed
    rt = duoserve_core.load(path, device="cpu", quant="none", max_batch=3, max_context=64)
    prompts = [PROMPT, PROMPT[:3], PROMPT[4:11]]
    alone = [hf_greedy(model, p, 6) for p in prompts]
    kv = rt.model.kv
    rows = [2, 0, 1]  # not in order: a row is wherever the request was placed
    last = [int(rt.model.prefill(p, row).argmax()) for p, row in zip(prompts, rows)]
    assert [kv.lengths[r] for r in rows] == [len(p) for p in prompts]
    for step in range(1, 6):
        logits = rt.model.decode(last, rows)
        for i, (_, ref_logits) in enumerate(alone):
            torch.testing.assert_close(logits[i], ref_logits[step], atol=1e-5, rtol=0)
        last = [int(row.argmax()) for row in logits]


def test_a_released_row_serves_the_next_request_cleanly(windowed):
    model, path = windowed
    rt = duoserve_core.load(path, device="cpu", quant="none", max_context=64)
    rt.generate(prompt_ids=PROMPT * 3, max_new_tokens=8, stop_at_eos=False)  # fills row 0 far beyond the next prompt
    assert rt.model.kv.lengths[0] == 0
    ref_tokens, ref_logits = hf_greedy(model, PROMPT[:4], 6)
    got = rt.generate(prompt_ids=PROMPT[:4], max_new_tokens=6, stop_at_eos=False, return_logits=True)
    assert got.tokens == ref_tokens
    torch.testing.assert_close(got.logits[-1], ref_logits[-1], atol=1e-5, rtol=0)


def test_the_cache_is_the_memory_plan(windowed):
    _, path = windowed
    rt = duoserve_core.load(path, device="cpu", quant="none", max_batch=4, max_context=48)
    assert rt.model.kv.nbytes == rt.plan.kv_cache_bytes
    rt.configure(max_batch=2)
    assert rt.model.kv.rows == 2 and rt.model.kv.nbytes == rt.plan.kv_cache_bytes


def test_a_row_never_grows_past_max_context(windowed):
    _, path = windowed
    rt = duoserve_core.load(path, device="cpu", quant="none", max_context=16)
    rt.model.prefill(PROMPT, 0)
    with pytest.raises(PromptError, match="max_context of 16"):
        rt.model.prefill(PROMPT, 0)  # 24 tokens in a row of 16


def test_the_mask_is_additive_and_its_rows_sixteen_aligned():
    """Where a key is visible the mask adds 0, elsewhere -inf; each row starts on a 16-key boundary in
    memory (torch's memory-efficient attention would otherwise pad a copy at every layer)."""
    from duoserve_core.kv_cache import RowKVCache
    from duoserve_core.checkpoint import PRESETS
    from transformers import MixtralConfig

    config = MixtralConfig(**{k: v for k, v in PRESETS["tiny"].items() if k != "dtype"})
    kv = RowKVCache(config, rows=2, max_context=40, dtype=torch.float32, device=torch.device("cpu"))
    kv.lengths[:] = [3, 20]
    at = kv.place([0, 1], 1, sliding_window=None)
    assert at.mask.shape == (2, 1, 1, 21) and at.mask.stride(-2) % 16 == 0
    visible = at.mask[:, 0, 0] == 0
    assert visible[0].tolist() == [True] * 4 + [False] * 17 and visible[1].all()
    assert torch.isneginf(at.mask[:, 0, 0][~visible]).all()
