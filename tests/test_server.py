"""The OpenAI-compatible server (``duoserve_core.server``, ``python -m duoserve_core serve``).

In-process: uvicorn serves the app in a thread on a free port, so a test can look at the engine
(its cancelled counter, its active batch). The model is the tiny checkpoint with a word-level
tokenizer that names every id (``w0`` .. ``w92``), so text is predictable and stop strings easy to
place; the CLI tests start the real command on the bundled model in a subprocess.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn

import duoserve_core
from conftest import TINY, save_checkpoint
from duoserve_core.server import bind, create_app

ROOT = Path(__file__).resolve().parents[1]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} says {{ m['content'] }} . {% endfor %}"
                 "{% if add_generation_prompt %}assistant says {% endif %}")
PROMPTS = [[5, 9, 12], [40, 41], [7, 7, 7, 7, 30], [88]]


def _save_tokenizer(path: Path, chat_template: str | None = None) -> None:
    """A word-level tokenizer over the whole vocabulary: id i is the word ``w{i}`` (ids 0-2 special)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, TINY["vocab_size"])}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(path)


@pytest.fixture(scope="module")
def runtime(tmp_path_factory, reference_model):
    path = save_checkpoint(reference_model, tmp_path_factory.mktemp("served"))
    _save_tokenizer(path)
    return duoserve_core.load(path, device="cpu", quant="none", max_batch=4, record_timeline=False)


@pytest.fixture(scope="module")
def alone(runtime):
    """Each prompt's greedy tokens generated alone, before any server runs on the runtime."""
    return [runtime.generate(prompt_ids=p, max_new_tokens=12).tokens for p in PROMPTS]


@contextmanager
def serving(runtime, max_batch: int = 4, **kwargs):
    """The app on a free port in a background thread: (base URL, engine); stopped on the way out."""
    app = create_app(runtime, max_batch=max_batch, **kwargs)
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
            time.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", app.state.engine
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def server(runtime, alone):
    with serving(runtime) as (url, engine):
        yield url, engine


def _words(tokens: list[int]) -> str:
    return " ".join(f"w{t}" for t in tokens if t > 2)


def _post(url: str, path: str, **body) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=30)


def _events(response: httpx.Response) -> list[dict | str]:
    """A streamed response's events: parsed JSON, or the text ``[DONE]``."""
    data = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    return [d if d == "[DONE]" else json.loads(d) for d in data]


def _wait(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_models_lists_the_served_model(server, runtime):
    url, _ = server
    body = httpx.get(url + "/v1/models").json()
    assert body["object"] == "list"
    assert [(m["id"], m["object"], m["owned_by"]) for m in body["data"]] == [(runtime.source.name, "model", "duoserve-lab")]


def test_concurrent_greedy_completions_equal_generation_alone(server, alone, runtime):
    url, _ = server

    def complete(ids):
        return _post(url, "/v1/completions", model=runtime.source.name, prompt=ids, max_tokens=12, temperature=0)

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        responses = list(pool.map(complete, PROMPTS * 2))
    for ids, want, r in zip(PROMPTS * 2, alone * 2, responses):
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
        assert body["choices"] == [{"index": 0, "text": _words(want), "finish_reason": "length", "logprobs": None}]
        assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 12, "total_tokens": len(ids) + 12}


def test_a_list_of_prompts_gives_one_choice_each_in_order(server, alone):
    url, _ = server
    texts = [" ".join(f"w{i}" for i in p) for p in PROMPTS]
    body = _post(url, "/v1/completions", prompt=texts, max_tokens=12, temperature=0).json()
    assert [c["index"] for c in body["choices"]] == list(range(len(PROMPTS)))
    assert [c["text"] for c in body["choices"]] == [_words(t) for t in alone]
    assert body["usage"]["completion_tokens"] == 12 * len(PROMPTS)


def test_stream_adds_up_to_the_whole_text(server, alone):
    url, _ = server
    with httpx.stream("POST", url + "/v1/completions", timeout=30,
                      json={"prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0, "stream": True,
                            "stream_options": {"include_usage": True}}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = _events(r)
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    assert "".join(c["choices"][0]["text"] for c in chunks) == _words(alone[0])
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 12


def test_stop_string_ends_the_text_before_it(server, alone):
    url, engine = server
    text = _words(alone[0])
    words = text.split()
    stop = f"{words[2]} {words[3][:2]}"  # across two tokens: its first word is held back until it is complete
    want = text[:text.index(stop)]
    body = _post(url, "/v1/completions", prompt=PROMPTS[0], max_tokens=12, temperature=0,
                 stop=["nowhere", stop]).json()
    assert body["choices"][0]["text"] == want and body["choices"][0]["finish_reason"] == "stop"
    with httpx.stream("POST", url + "/v1/completions", timeout=30,
                      json={"prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0, "stop": stop,
                            "stream": True}) as r:
        chunks = _events(r)[:-1]
    assert "".join(c["choices"][0]["text"] for c in chunks) == want
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    _wait(lambda: engine.pending == 0)  # the stopped requests left the batcher


def test_max_tokens_gives_length(server, alone):
    url, _ = server
    body = _post(url, "/v1/completions", prompt=PROMPTS[1], max_tokens=3, temperature=0).json()
    assert body["choices"][0]["text"] == _words(alone[1][:3]) and body["choices"][0]["finish_reason"] == "length"


def test_a_tokenizer_without_chat_template_refuses_chat(server):
    url, _ = server
    r = _post(url, "/v1/chat/completions", messages=[{"role": "user", "content": "w5"}])
    assert r.status_code == 400
    assert "no chat template" in r.json()["error"]["message"] and "/v1/completions" in r.json()["error"]["message"]


def test_chat_through_the_template(tmp_path, reference_model):
    path = save_checkpoint(reference_model, tmp_path)
    _save_tokenizer(path, CHAT_TEMPLATE)
    rt = duoserve_core.load(path, device="cpu", quant="none", max_batch=2, max_context=40, record_timeline=False)
    ids = rt.tokenizer("user says w5 w6 . assistant says", add_special_tokens=False)["input_ids"]
    want = rt.generate(prompt_ids=ids, max_new_tokens=40 - len(ids)).tokens
    with serving(rt, max_batch=2, model_name="tiny-chat") as (url, _):
        body = _post(url, "/v1/chat/completions", model="tiny-chat", temperature=0,
                     messages=[{"role": "user", "content": "w5 w6"}]).json()
        with httpx.stream("POST", url + "/v1/chat/completions", timeout=30,
                          json={"messages": [{"role": "user", "content": [{"type": "text", "text": "w5 w6"}]}],
                                "temperature": 0, "max_completion_tokens": 5, "stream": True}) as r:
            events = _events(r)
    assert body["object"] == "chat.completion" and body["model"] == "tiny-chat"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": _words(want)}
    assert body["choices"][0]["finish_reason"] == "length"  # no max_tokens: the rest of the context
    assert body["usage"]["prompt_tokens"] == len(ids) and body["usage"]["completion_tokens"] == len(want)
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == _words(want[:5])
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


@pytest.fixture
def slow_decode(runtime, monkeypatch):
    """Every decode step takes 20 ms more, so a long request is still running when its client leaves."""
    decode = runtime.model.decode

    def slow(*args, **kwargs):
        time.sleep(0.02)
        return decode(*args, **kwargs)
    monkeypatch.setattr(runtime.model, "decode", slow)


def test_a_client_that_leaves_is_cancelled_and_the_others_continue(server, alone, slow_decode):
    url, engine = server
    before = engine.cancelled
    with ThreadPoolExecutor(1) as pool:
        with httpx.stream("POST", url + "/v1/completions", timeout=30,
                          json={"prompt": PROMPTS[2], "max_tokens": 100, "temperature": 0, "stream": True}) as r:
            lines = r.iter_lines()  # one iterator: a dropped one closes the connection
            next(lines)  # the first chunk: the request is in the batch
            other = pool.submit(_post, url, "/v1/completions", prompt=PROMPTS[3], max_tokens=12, temperature=0)
            _wait(lambda: engine.active == 2)
            assert engine.cancelled == before
        _wait(lambda: engine.cancelled == before + 1)
        assert other.result().json()["choices"][0]["text"] == _words(alone[3])
    _wait(lambda: engine.active == 0 and engine.pending == 0)
    with pytest.raises(httpx.ReadTimeout):  # a whole response's client leaving cancels it too
        httpx.post(url + "/v1/completions", json={"prompt": PROMPTS[2], "max_tokens": 100}, timeout=0.3)
    _wait(lambda: engine.cancelled == before + 2 and engine.active == 0)


BAD = [
    ("bad json", b'{"prompt": [1, 2', 400, None),
    ("missing prompt", {"max_tokens": 4}, 400, "prompt"),
    ("empty prompt", {"prompt": ""}, 400, "prompt"),
    ("no token ids", {"prompt": []}, 400, "prompt"),
    ("too long", {"prompt": [5] * 100, "max_tokens": 40}, 400, "max_tokens"),
    ("n=2", {"prompt": "w5", "n": 2}, 400, "n"),
    ("logprobs", {"prompt": "w5", "logprobs": 2}, 400, "logprobs"),
    ("wrong type", {"prompt": "w5", "max_tokens": "many"}, 400, "max_tokens"),
    ("unknown model", {"prompt": "w5", "model": "gpt-9"}, 404, "model"),
]


@pytest.mark.parametrize("name,body,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_openai_errors(server, alone, name, body, status, param):
    url, engine = server
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body}
    r = httpx.post(url + "/v1/completions", timeout=30, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param and error["message"]
    assert error["type"] == "invalid_request_error"
    if name == "too long":
        assert "140" in error["message"] and "128" in error["message"]  # prompt + max_tokens, the context
    if name == "unknown model":
        assert error["code"] == "model_not_found"
    assert engine.pending == 0
    ok = _post(url, "/v1/completions", prompt=PROMPTS[1], max_tokens=3, temperature=0).json()
    assert ok["choices"][0]["text"] == _words(alone[1][:3])


def test_a_failed_step_fails_its_requests_and_the_engine_keeps_serving(server, runtime, alone, monkeypatch):
    url, engine = server
    decode = runtime.model.decode
    calls = iter(range(1000))

    def fails_once(*args, **kwargs):
        if next(calls) == 0:
            raise RuntimeError("out of memory (simulated)")
        return decode(*args, **kwargs)
    monkeypatch.setattr(runtime.model, "decode", fails_once)
    r = _post(url, "/v1/completions", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert r.status_code == 500 and "out of memory (simulated)" in r.json()["error"]["message"]
    assert engine.failed_steps == 1 and engine.pending == 0
    ok = _post(url, "/v1/completions", prompt=PROMPTS[0], max_tokens=12, temperature=0).json()
    assert ok["choices"][0]["text"] == _words(alone[0])


def _serve_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "duoserve_core", "serve", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_cli_serves_until_ctrl_c():
    proc = _serve_cli("--model", "data/small-moe", "--device", "cpu", "--port", "0", "--max-context", "128")
    try:
        line = proc.stdout.readline()  # printed once the model is loaded and the port bound
        assert line.startswith("serving small-moe on http://127.0.0.1:"), (line, proc.stderr.read())
        url = line.split()[3].removesuffix("/v1")
        _wait(lambda: httpx.get(url + "/v1/models").status_code == 200, timeout=30)
        assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "small-moe"
        proc.send_signal(signal.SIGINT)
        # uvicorn shuts down gracefully (the engine stops), then re-raises SIGINT: the project's 130
        assert proc.wait(timeout=30) == 130
        assert proc.stderr.read().strip().splitlines() == ["interrupted; nothing written"]
    finally:
        proc.kill()


def test_cli_port_in_use_is_one_line_and_exit_2():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _serve_cli("--model", "data/small-moe", "--device", "cpu", "--port", str(port))
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"error: cannot listen on 127.0.0.1:{port}"), err


class _Bytes:
    """A tokenizer whose tokens are UTF-8 bytes: a character may take several tokens."""

    @staticmethod
    def decode(tokens: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(tokens).decode("utf-8", errors="replace")


def test_text_stream_holds_back_half_characters_and_stop_prefixes():
    from duoserve_core.serving.text import TextStream

    stream = TextStream(_Bytes(), stop=["END"])
    sent = [stream.add(t) for t in "aé E".encode()]  # é is two bytes; "E" may begin "END"
    assert sent == [("a", False), ("", False), ("é", False), (" ", False), ("", False)]
    assert stream.add(ord("x")) == ("Ex", False)
    assert [stream.add(t) for t in b" EN"] == [(" ", False), ("", False), ("", False)]
    assert stream.add(ord("D")) == ("", True) and stream.text == "aé Ex "
    held = TextStream(_Bytes(), stop=[])
    assert held.add(0xC3) == ("", False) and held.flush() == "\ufffd"  # the last token: nothing held back
