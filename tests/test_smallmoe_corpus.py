"""lab.smallmoe.corpus without apt or network: fake Sphinx sources through clean/split/tokenizer/encode/prompts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lab.smallmoe import corpus as C

TOPICS = ["apple", "bridge", "castle", "desert", "engine", "forest", "garden", "harbor", "island", "jungle",
          "kettle", "lantern", "meadow", "needle", "orchard", "pillow", "quarry", "river", "saddle", "tunnel",
          "violin", "window", "yacht", "zebra"]


def _fake_rst(topic: str) -> str:
    """A Sphinx-like source whose every prose word is tagged with the topic, so a prompt can be traced
    back to exactly one document."""
    return f"""\
:mod:`{topic}` --- The {topic} module
{'=' * 40}

.. module:: {topic}
   :synopsis: Tools for the {topic}.

.. index:: single: {topic}; hidden index entry

**Source code:** :source:`Lib/{topic}.py`

The :mod:`{topic}` module describes how a {topic} keeper feeds the {topic} every single morning before the
long walk, using the ``{topic}.feed()`` call and the :ref:`{topic} guide <{topic}-guide>` for details.

.. function:: feed_{topic}(amount, *args, **kwargs)

   Feed the {topic} with *amount* units of food; see :func:`~{topic}.core.measure` and
   :pep:`8` for the style rules. Every {topic} keeper knows that the {topic} likes sunshine.

   For example::

      >>> feed_{topic}(3, 2**8, *extra)
      'fed'

   .. versionadded:: 3.11

.. note::
   A {topic} that is fed twice each day grows faster than a {topic} that is fed only once each day.

..
   This comment about the {topic} must not survive cleaning.

.. _{topic}-guide:

The {topic} guide explains in many words why the {topic} keeper should write down every feeding of the {topic}.
"""


@pytest.fixture()
def fake_sources(tmp_path):
    src = tmp_path / "html" / "_sources"
    for k, topic in enumerate(TOPICS):
        sub = src / ("library" if k % 2 else "howto")
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{topic}.rst.txt").write_text(_fake_rst(topic), encoding="utf-8")
    (src / "library" / "ignored.html").write_text("<p>not a source</p>", encoding="utf-8")
    return src


def _topic(path: str) -> str:
    return path.rsplit("/", 1)[-1].split(".")[0]


def test_load_and_clean(fake_sources):
    assert C.find_sources_dir(fake_sources.parent.parent) == fake_sources
    docs = C.load_documents(fake_sources)
    assert [p for p, _ in docs] == sorted(p for p, _ in docs) and len(docs) == len(TOPICS)
    text = C.clean_rst(dict(docs)["library/bridge.rst.txt"])
    assert "The bridge module describes how a bridge keeper" in text
    assert "bridge.feed() call and the bridge guide for details." in text
    assert "feed_bridge(amount, *args, **kwargs)" in text          # signature kept, *args untouched
    assert "Feed the bridge with amount units" in text and "see measure and" in text and "PEP 8" in text
    assert "For example:\n" in text and ">>> feed_bridge(3, 2**8, *extra)" in text  # code kept verbatim
    assert "New in version 3.11." in text and "Note:" in text
    assert "Source code: Lib/bridge.py" in text
    for noise in ("..", ":mod:", ":func:", "``", "synopsis", "hidden index entry", "must not survive", "====",
                  "bridge-guide", "::"):
        assert noise not in text, noise
    assert "\n\n\n" not in text and text == text.strip()
    assert C.clean_rst(dict(docs)["library/bridge.rst.txt"]) == text  # deterministic


def test_split_deterministic_disjoint_and_order_independent():
    paths = [f"library/{t}.rst.txt" for t in TOPICS] + [f"howto/{t}.rst.txt" for t in TOPICS]
    train, held = C.split_documents(paths, 0.2, seed=0)
    assert set(train).isdisjoint(held) and sorted(train + held) == sorted(paths)
    assert 0 < len(held) < len(paths)
    assert C.split_documents(list(reversed(paths)), 0.2, seed=0) == (train, held)
    # membership depends on the path alone: dropping other documents never moves one
    sub = paths[::3]
    expected = sorted(p for p in sub if p in held)
    if expected:
        assert C.split_documents(sub, 0.2, seed=0)[1] == expected
    assert all(C.is_heldout(p, 0.2, 0) == (p in held) for p in paths)
    assert C.split_documents(paths, 0.2, seed=1) != (train, held)  # the seed salts the hash


@pytest.fixture()
def built(fake_sources):
    docs = {p: C.clean_rst(t) for p, t in C.load_documents(fake_sources)}
    train, held = C.split_documents(docs, 0.25, seed=0)
    tok = C.train_tokenizer([docs[p] for p in train], vocab_size=300)
    return docs, train, held, tok


def test_tokenizer_specials_bos_and_roundtrip(built, tmp_path):
    from transformers import AutoTokenizer

    docs, train, held, tok = built
    assert [tok.convert_tokens_to_ids(t) for t in ("<unk>", "<s>", "</s>")] == [0, 1, 2]
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert len(tok) <= 300
    s = "Unseen text: Überraschung 😀\n    def f(*a, **k): return 2**8\n"
    ids = tok(s)["input_ids"]
    assert ids[0] == 1 and ids.count(1) == 1 and 2 not in ids
    assert tok.decode(ids, skip_special_tokens=True) == s
    names = C.save_tokenizer(tok, tmp_path / "tok")
    assert "tokenizer.json" in names and not list(tmp_path.glob(".tok.*"))
    again = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert again(s)["input_ids"] == ids and again.decode(ids, skip_special_tokens=True) == s


def test_encode_bins_decode_back_and_heldout_unseen(built, tmp_path):
    docs, train, held, tok = built
    for name, paths in (("train", train), ("val", held)):
        texts = [docs[p] for p in paths]
        ids = C.encode_documents(tok, texts)
        C.atomic_write_array(tmp_path / f"{name}.bin", ids)
        back = np.fromfile(tmp_path / f"{name}.bin", dtype=np.uint16)
        assert back.dtype == np.uint16 and np.array_equal(back, ids)
        assert int((back == tok.eos_token_id).sum()) == len(texts) - 1 and back[0] != 1 and back[-1] != 2
        assert C.decode_stream(tok, back) == texts
        assert tok.decode(back.tolist()) == "</s>".join(texts)
        joined = tok.decode(back.tolist())
        # held-out documents never appear in train.bin and vice versa
        other = held if name == "train" else train
        assert not any(f"{_topic(p)} keeper" in joined for p in other)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_prompts_from_given_docs_only(built, tmp_path):
    docs, train, held, _ = built
    prompts = C.make_prompts([(p, docs[p]) for p in held], n=200, seed=0)
    assert prompts and len(prompts) == len(set(prompts))
    held_topics = {_topic(p) for p in held}
    flat_held = [" ".join(docs[p].split()) for p in held]
    for line in prompts:
        words = line.split()
        assert "\n" not in line and C.PROMPT_MIN_WORDS <= len(words) <= C.PROMPT_CUT_MAX
        assert any(line in f for f in flat_held)  # a paragraph beginning of a held-out doc
        assert {w for w in TOPICS if w in line} <= held_topics  # never a train topic
        assert words[0][0].isupper() and ">>>" not in line
    assert C.make_prompts([(p, docs[p]) for p in reversed(held)], n=200, seed=0) == prompts
    assert len(C.make_prompts([(p, docs[p]) for p in train], n=5, seed=0)) == 5
    C.atomic_write_text(tmp_path / "prompts_heldout.txt", "\n".join(prompts) + "\n")
    assert (tmp_path / "prompts_heldout.txt").read_text().splitlines() == prompts


def test_licence_description():
    copyright_text = "Intro\n\nLicense:\n\nPython License\n\nPYTHON SOFTWARE FOUNDATION LICENSE VERSION 2\n------\n"
    doc = ("Python software and documentation are licensed under the\nPSF License Agreement.\n\n"
           "Starting with Python 3.8.6, examples, recipes, and other code in\nthe documentation are dual "
           "licensed under the PSF License Agreement\nand the Zero-Clause BSD license.\n")
    lic = C.describe_licence(copyright_text, doc)
    assert lic["name"] == "Python Software Foundation License Version 2"
    assert lic["spdx"].startswith("PSF-2.0") and "0BSD" in lic["spdx"]
    assert "Zero-Clause BSD" in lic["documentation_statement"]
    assert json.dumps(lic)
