"""The small-MoE training script runs a few steps on the CPU and writes a checkpoint the runtime loads."""

from __future__ import annotations

import json

import numpy as np

import duoserve_core
from lab.smallmoe.train import load_settings, train, unigram_perplexity


def _fake_corpus(path, vocab):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = np.random.default_rng(0)
    rng.integers(3, vocab, 5000).astype(np.uint16).tofile(path / "train.bin")
    rng.integers(3, vocab, 1000).astype(np.uint16).tofile(path / "val.bin")
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["a b c d e f g"], trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(path / "tokenizer")
    (path / "meta.json").write_text(json.dumps({"package": "fake", "documents": ["x"]}))


def test_a_few_cpu_steps_make_a_loadable_checkpoint(tmp_path):
    corpus, out = tmp_path / "corpus", tmp_path / "model"
    corpus.mkdir()
    settings = load_settings(steps=3, batch_size=2, seq_len=16, eval_windows=2, eval_every=1)
    settings["model"].update(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2)
    _fake_corpus(corpus, 64)
    log = train(corpus, out, settings, __import__("torch").device("cpu"))
    assert len(log["curve"]) == 3 and np.isfinite(log["val_loss"])
    assert log["unigram_val_perplexity"] > 1 and log["corpus_meta"] == {"package": "fake"}
    assert (out / "tokenizer.json").is_file() and (out / "training_log.json").is_file()
    rt = duoserve_core.load(out, device="cpu", quant="nf4")
    assert rt.tokenizer is not None and rt.config.num_local_experts == 8
    assert len(rt.generate(prompt_ids=[1, 5, 9], max_new_tokens=3, stop_at_eos=False).tokens) == 3


def test_unigram_perplexity_of_uniform_tokens_is_the_vocabulary():
    tokens = np.arange(10).repeat(100)
    assert abs(unigram_perplexity(tokens, tokens, 10) - 10) < 1e-6
