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
from conftest import hf_greedy
from duoserve_core.errors import PromptError

PROMPT = [5, 17, 33, 2, 71, 40, 12, 90, 3, 64, 8, 19]


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


@pytest.mark.parametrize("rows,window", [([0, 1, 2], None), ([2, 0, 1], None), ([1, 2], 5)])
def test_grouped_attention_equals_repeated_heads(rows, window):
    """The GPU's attention (``mixtral.grouped_attention``: each key/value head's query heads folded into the
    query axis, masked by ``Placement.grouped_mask``) gives SDPA's grouped-query result, on rows read as a
    slice (consecutive, in order) or gathered, with and without a sliding window."""
    from duoserve_core.checkpoint import PRESETS
    from duoserve_core.kv_cache import RowKVCache
    from duoserve_core.mixtral import grouped_attention
    from transformers import MixtralConfig

    config = MixtralConfig(**{k: v for k, v in PRESETS["tiny"].items() if k != "dtype"})
    kv = RowKVCache(config, rows=3, max_context=40, dtype=torch.float32, device=torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    kv.keys.normal_(generator=gen)
    kv.values.normal_(generator=gen)
    kv.lengths[:] = [7, 19, 12]
    at = kv.place(rows, 1, sliding_window=window)
    assert (at.row_span is None) == (rows == [2, 0, 1])  # consecutive in order: a slice
    heads, kv_heads, dim = config.num_attention_heads, config.num_key_value_heads, 32
    q = torch.randn(len(rows), heads, 1, dim, generator=gen)
    new = torch.randn(len(rows), kv_heads, 1, dim, generator=gen)
    keys, values = kv.write_and_read(0, at, new, new)
    want = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=at.mask, enable_gqa=True)
    got = grouped_attention(q, keys, values, at.grouped_mask(heads // kv_heads), scale=dim ** -0.5)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    gathered = kv.keys[0].index_select(0, torch.tensor(rows))[:, :, :at.width]
    assert torch.equal(keys, gathered)
    assert at.grouped_mask(2).stride(-2) % 16 == 0 and at.grouped_mask(2) is at.grouped_mask(2)


def test_grouped_attention_over_a_prompt_chunk():
    """A prompt's S queries: the folded queries (group-major) each keep their own causal row of the mask."""
    from duoserve_core.checkpoint import PRESETS
    from duoserve_core.kv_cache import RowKVCache
    from duoserve_core.mixtral import grouped_attention
    from transformers import MixtralConfig

    config = MixtralConfig(**{k: v for k, v in PRESETS["tiny"].items() if k != "dtype"})
    kv = RowKVCache(config, rows=1, max_context=40, dtype=torch.float32, device=torch.device("cpu"))
    gen = torch.Generator().manual_seed(1)
    kv.lengths[0] = 5
    at = kv.place([0], 9, sliding_window=None)
    k = torch.randn(1, 2, 9, 32, generator=gen)
    keys, values = kv.write_and_read(0, at, k, k * 2)
    q = torch.randn(1, 4, 9, 32, generator=gen)
    want = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=at.mask, enable_gqa=True)
    torch.testing.assert_close(grouped_attention(q, keys, values, at.grouped_mask(2), 32 ** -0.5), want,
                               atol=1e-6, rtol=0)
