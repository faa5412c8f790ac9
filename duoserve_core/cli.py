"""``python -m duoserve_core generate ...``: one generation, as a table or as JSON;
``python -m duoserve_core serve ...``: an OpenAI-compatible HTTP server (``duoserve_core.server``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .atomic import check_writable
from .runtime import has_tokenizer, load
from .errors import DuoServeError, PromptError
from .experts.formats import QUANT_CHOICES
from .mixtral import ATTENTION_QUANT_CHOICES
from .progress import interruptible
from .knob_args import (Parser, add_device_arguments, add_graph_argument, add_knob_arguments, add_schedule_arguments, budget,
                        devices_from_args, knobs_from_args, number, seed, whole)
from .policy import POLICIES
from .units import format_bytes

DTYPE_CHOICES = ("auto", "bf16", "fp16", "fp32")  # names ``runtime.resolve_dtype`` takes, as the API does


def _ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--prompt-ids takes comma-separated integers, got {text!r}") from exc


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that say which model to load and how (``load_runtime`` reads them), shared by every
    subcommand that loads one."""
    parser.add_argument("--model", required=True, help="checkpoint folder, or synthetic:mixtral-8x7b|mixtral-8x22b|tiny")
    parser.add_argument("--memory-budget", type=budget, default=None,
                        help="device memory ceiling: 12GiB, 4.5GB, or 15%% of the model; default: 90%% of free GPU memory")
    parser.add_argument("--quant", choices=QUANT_CHOICES, default="nf4",
                        help="how experts are stored (none = checkpoint dtype)")
    parser.add_argument("--quant-attention", choices=ATTENTION_QUANT_CHOICES, default="none",
                        help="store the attention projections in NF4 as well (what a 15%% budget needs at 8x7B)")
    add_graph_argument(parser)
    parser.add_argument("--policy", choices=POLICIES, default="on-demand")
    add_knob_arguments(parser)
    add_device_arguments(parser)
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                        help="compute dtype (auto: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--num-layers", type=whole(1), default=None, help="keep only the first N layers (quick runs)")
    parser.add_argument("--max-context", type=whole(1), default=None, help="longest prompt + output to plan memory for")


def load_runtime(args: argparse.Namespace, max_batch: int, **extra):
    """The runtime ``add_model_arguments``' flags describe, its memory plan holding ``max_batch`` KV caches."""
    return load(args.model, **devices_from_args(args), quant=args.quant, memory_budget=args.memory_budget,
                num_layers=args.num_layers, dtype=args.dtype, max_context=args.max_context,
                attention_quant=args.quant_attention, max_batch=max_batch, cuda_graphs=args.cuda_graphs,
                device_routing=args.device_routing,
                knobs=knobs_from_args(args, args.policy), **extra)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m duoserve_core", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate from a Mixtral checkpoint with offloaded experts")
    add_model_arguments(g)
    prompt = g.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (needs a tokenizer in the checkpoint)")
    prompt.add_argument("--prompt-ids", type=_ids, help="comma-separated token ids, e.g. 1,2,3")
    prompt.add_argument("--prompts", default=None,
                        help="a text file, one prompt per line: generate for all of them, --max-batch at once")
    g.add_argument("--max-new-tokens", type=whole(1), default=32)
    g.add_argument("--max-batch", type=whole(1), default=8,
                   help="with --prompts: requests decoded together (continuous batching); the memory plan holds "
                        "their KV caches")
    add_schedule_arguments(g)
    g.add_argument("--seed", type=seed, default=0, help="sampling seed, and the seed of synthesized weights")
    g.add_argument("--temperature", type=number(0.0), default=0.0, help="0 = greedy")
    g.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    g.add_argument("--routing-trace", default=None,
                   help="take each token's experts from this trace (realistic reuse on synthesized weights)")
    g.add_argument("--timeline-out", default=None, help="write a Chrome trace (open in ui.perfetto.dev)")
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.add_argument("--force", action="store_true", help="replace --timeline-out if it exists")
    s = sub.add_parser("serve", help="serve a checkpoint over an OpenAI-compatible HTTP API (Ctrl-C stops)")
    add_model_arguments(s)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    s.add_argument("--port", type=whole(0), default=8000, help="TCP port to listen on (0: any free one)")
    s.add_argument("--max-batch", type=whole(1), default=8,
                   help="requests decoded together (continuous batching); the memory plan holds their KV caches, "
                        "and further requests wait")
    add_schedule_arguments(s)
    s.add_argument("--served-model-name", default=None,
                   help="the model id clients send and /v1/models lists (default: the checkpoint folder's name)")
    return parser


def read_prompts(path: str) -> list[str]:
    """Every non-blank line of ``path``, a prompt each."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptError(f"cannot read --prompts {path}: {exc}; give a UTF-8 text file, one prompt per line") from exc
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise PromptError(f"--prompts {path} holds no prompt; write one prompt per line")
    return prompts


def generate(args: argparse.Namespace) -> dict:
    prompts = read_prompts(args.prompts) if args.prompts else None  # before the model loads
    runtime = load_runtime(args, args.max_batch if prompts is not None else 1, seed=args.seed,
                           routing_trace=args.routing_trace)
    if prompts is not None:
        run = runtime.generate_many(prompts, max_batch=args.max_batch, max_new_tokens=args.max_new_tokens,
                                    temperature=args.temperature, seed=args.seed, stop_at_eos=not args.ignore_eos,
                                    prefill_schedule=args.prefill_schedule, prefill_chunk=args.prefill_chunk)
        out = {**run.as_dict(), "runtime": runtime.describe()}
    else:
        result = runtime.generate(args.prompt, prompt_ids=args.prompt_ids, max_new_tokens=args.max_new_tokens,
                                  temperature=args.temperature, seed=args.seed, stop_at_eos=not args.ignore_eos)
        out = {**result.as_dict(), "runtime": runtime.describe()}
    if args.timeline_out:
        runtime.timeline.write_chrome_trace(args.timeline_out)
    return out


def _devices_text(out: dict) -> str:
    """The device's name; on several, every device's name and which it is (``cuda:0``, ...)."""
    names = ", ".join(out["runtime"]["devices"])
    return out["device"] if len(out["runtime"]["devices"]) == 1 or out["device"] == names else f"{out['device']} ({names})"


def _by_device(rt: dict, values: list | None, fmt) -> str:
    """`` (a on cuda:0, b on cuda:1)`` on several devices, else nothing."""
    if not values or len(rt["devices"]) < 2:
        return ""
    return " (" + ", ".join(f"{fmt(v)} on {name}" for v, name in zip(values, rt["devices"])) + ")"


def _print_batch(out: dict) -> None:
    rt = out["runtime"]
    print(f"{len(out['requests'])} requests on {rt['model']}, {_devices_text(out)}, policy {rt['policy']}, "
          f"max batch {out['max_batch']} (mean {out['mean_batch']:.2f} over {out['decode_steps']} decode steps)")
    for i, r in enumerate(out["requests"]):
        tpot = "-" if r["tpot_s"] is None else f"{r['tpot_s'] * 1e3:.1f} ms"
        text = r["text"] if r["text"] is not None else " ".join(map(str, r["tokens"]))
        print(f"[{i}] TTFT {r['ttft_s'] * 1e3:.1f} ms, TPOT {tpot}: {text!r}")
    print(f"throughput {out['tokens_per_s']:.1f} tokens/s; TTFT p50/p99 {out['ttft_p50_s'] * 1e3:.1f}/"
          f"{out['ttft_p99_s'] * 1e3:.1f} ms; H2D {format_bytes(out['h2d_bytes'])} in {out['h2d_copies']} copies")


def _print_table(out: dict) -> None:
    rt = out["runtime"]
    rows = [
        ("model", f"{rt['model']} ({rt['layers']} layers, {rt['experts']} experts, top-{rt['top_k']})"),
        ("devices" if len(rt["devices"]) > 1 else "device", _devices_text(out)), ("policy", rt["policy"]),
        ("experts stored as", rt["expert_format"]),
        ("expert slots", f"{rt['memory_plan']['num_slots']} of {rt['memory_plan']['total_experts']}"
                         + _by_device(rt, [d["slots"] for d in rt["memory_plan_by_device"]], str)),
        ("tokens", " ".join(map(str, out["tokens"]))),
        ("TTFT", f"{out['ttft_s'] * 1e3:.1f} ms"),
        ("TPOT", "-" if out["tpot_s"] is None else f"{out['tpot_s'] * 1e3:.1f} ms"),
        ("E2E", f"{out['e2e_s'] * 1e3:.1f} ms"),
        ("peak GPU memory", "-" if out["peak_gpu_bytes"] is None else format_bytes(out["peak_gpu_bytes"])
         + _by_device(rt, out.get("peak_gpu_bytes_by_device"), format_bytes)),
        ("H2D moved", f"{format_bytes(out['h2d_bytes'])} in {out['h2d_copies']} copies"),
        ("expert hits / misses", f"{out['expert_hits']} / {out['expert_misses']}"),
    ]
    if out["text"] is not None:
        rows.insert(5, ("text", out["text"]))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = serve_command if args.command == "serve" else generate_command
    return interruptible(lambda: _one_line_errors(command, args))  # Ctrl-C 130, SIGTERM 143, a closed pipe 141


def _one_line_errors(command, args: argparse.Namespace) -> int:
    """``command(args)``'s status, or 2 with ``error: ...`` on stderr for an error the user can act on."""
    try:
        return command(args)
    except DuoServeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def serve_command(args: argparse.Namespace) -> int:
    """Load the model, then serve it until Ctrl-C (the port is taken first: a port in use fails at once)."""
    from .server import bind, create_app, serve  # FastAPI and uvicorn only for this subcommand

    if (Path(args.model).is_dir() or args.model.startswith("synthetic:")) and not has_tokenizer(args.model):
        raise PromptError(f"{args.model} has no tokenizer; the server answers with text, so serve a checkpoint "
                          "with tokenizer files")  # before the model loads
    sock = bind(args.host, args.port)
    try:
        runtime = load_runtime(args, args.max_batch, record_timeline=False)
        serve(create_app(runtime, max_batch=args.max_batch, model_name=args.served_model_name,
                         prefill_schedule=args.prefill_schedule, prefill_chunk=args.prefill_chunk), sock)
    finally:
        sock.close()
    return 0


def generate_command(args: argparse.Namespace) -> int:
    """One generation (or ``--prompts``' batch), printed as a table or as JSON."""
    if args.timeline_out:
        check_writable(args.timeline_out, args.force, "--timeline-out")  # before the model loads
    exists = Path(args.model).is_dir() or args.model.startswith("synthetic:")  # else open_source says what is wrong
    if args.prompt is not None and exists and not has_tokenizer(args.model):
        raise PromptError(f"{args.model} has no tokenizer, so --prompt text cannot be encoded; pass token "
                          "ids (--prompt-ids 1,2,3)")
    out = generate(args)
    if args.json:
        print(json.dumps(out))
    elif "requests" in out:
        _print_batch(out)
    else:
        _print_table(out)
    return 0
