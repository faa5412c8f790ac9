"""The server as a user meets it: ``python -m duoserve_core serve`` started as a command, hit by a real
HTTP client with concurrent requests (completions, one streamed, one bad), then Ctrl-C.

    python benchmarks/serve_smoke.py --device cuda --out reports/serve_smoke.json

Starts the server on the bundled small MoE (it has a tokenizer, no chat template: chat requests are
``tests/test_server.py``'s, on a checkpoint that has one), waits for ``/v1/models``, sends
``--requests`` greedy completions at once plus a streamed one, and one empty prompt (which must fail alone, with an OpenAI-shaped 400), checks each answer
against the same prompt generated alone by ``duoserve_core.load`` in this process (the same tokens:
batching never changes them), and stops the server with SIGINT (exit 130). Prints a table; the JSON
holds every request's status, finish reason, usage, latency, and whether its text matched.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from duoserve_core.atomic import atomic_write_json  # noqa: E402

PROMPTS = ["The expert cache", "Once upon a time", "Mixture of experts models", "A GPU copies", "In the morning",
           "The router picks", "Host memory holds", "Prefetching pays when"]


def wait_for(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise SystemExit(f"error: the server exited with {proc.returncode}: {proc.stderr.read().strip()}")
        try:
            if httpx.get(url + "/v1/models", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"error: the server did not answer within {timeout:.0f} s")


def complete(url: str, body: dict, path: str) -> dict:
    t0 = time.perf_counter()
    if body.get("stream"):
        chunks, finish = [], None
        with httpx.stream("POST", url + path, json=body, timeout=600) as r:
            status = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    choice = json.loads(line[6:])["choices"][0]
                    chunks.append(choice.get("text", ""))
                    finish = choice.get("finish_reason") or finish
        return {"status": status, "text": "".join(chunks), "finish_reason": finish, "usage": None,
                "seconds": time.perf_counter() - t0, "stream": True}
    r = httpx.post(url + path, json=body, timeout=600)
    out = r.json()
    if r.status_code != 200:
        return {"status": r.status_code, "error": out.get("error", {}).get("message"), "seconds": time.perf_counter() - t0}
    choice = out["choices"][0]
    return {"status": 200, "text": choice["text"],
            "finish_reason": choice["finish_reason"], "usage": out["usage"], "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--requests", type=int, default=6)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    proc = subprocess.Popen([sys.executable, "-m", "duoserve_core", "serve", "--model", "data/small-moe", "--device",
                             args.device, "--port", "0", "--max-batch", str(args.max_batch), "--max-context", "256"],
                            cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = proc.stdout.readline()
        if not line.startswith("serving"):
            raise SystemExit(f"error: the server did not start: {line.strip()} {proc.stderr.read().strip()}")
        url = line.split()[3].removesuffix("/v1")
        wait_for(url, proc)
        prompts = PROMPTS[:args.requests]
        bodies = [("/v1/completions", {"model": "small-moe", "prompt": t, "max_tokens": args.max_tokens,
                                       "temperature": 0}) for t in prompts]
        bodies.append(("/v1/completions", {"model": "small-moe", "prompt": prompts[0], "max_tokens": args.max_tokens,
                                           "temperature": 0, "stream": True}))
        bodies.append(("/v1/completions", {"model": "small-moe", "prompt": "", "max_tokens": 4}))
        t0 = time.perf_counter()
        with ThreadPoolExecutor(len(bodies)) as pool:
            answers = list(pool.map(lambda pb: complete(url, pb[1], pb[0]), bodies))
        wall = time.perf_counter() - t0
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    finally:
        proc.kill()
    import duoserve_core  # the same prompts alone, greedy, in this process: what each answer must say
    rt = duoserve_core.load(ROOT / "data" / "small-moe", device=args.device, max_context=256)
    alone = [rt.tokenizer.decode(rt.generate(t, max_new_tokens=args.max_tokens).tokens) for t in prompts]
    rows = []
    for i, (body, answer) in enumerate(zip(bodies, answers)):
        kind = "stream" if body[1].get("stream") else ("empty prompt" if body[1].get("prompt") == "" else "completion")
        expected = alone[i] if kind == "completion" else (alone[0] if kind == "stream" else None)
        rows.append({"kind": kind, **answer, "matches_alone": None if expected is None else answer.get("text") == expected})
    ok = (all(r["status"] == 200 for r in rows if r["kind"] != "empty prompt")
          and all(r["status"] == 400 for r in rows if r["kind"] == "empty prompt")
          and all(r["matches_alone"] is not False for r in rows) and code == 130)
    record = {"device": rt.device_names(), "date": time.strftime("%Y-%m-%d"), "requests": rows, "wall_s": wall,
              "exit_code_after_sigint": code, "ok": ok,
              "command": "python benchmarks/serve_smoke.py " + " ".join(argv or sys.argv[1:])}
    for r in rows:
        print(f"{r['kind']:<13} {r['status']} {str(r.get('finish_reason')):<7} {r['seconds'] * 1e3:8.0f} ms  "
              f"same as alone: {r['matches_alone']}")
    print(f"{len(rows)} requests at once in {wall:.2f} s on {rt.device_names()}; server exit {code}; ok {ok}")
    if args.out:
        atomic_write_json(Path(args.out), record)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
