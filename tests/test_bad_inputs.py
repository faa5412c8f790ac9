"""Every CLI against a table of bad inputs: one line on stderr naming the problem, exit 2, nothing written.

The project's rules (issue 15): a CLI error is one line on stderr with exit 2 and no traceback;
``--json`` prints JSON alone, so a failing ``--json`` run prints nothing on stdout; an output that
exists needs ``--force``, so a refused run leaves every file as it was. Each row is one bad input:
the CLI, its argv, and a fragment the message must contain (the flag or the value at fault).

Most rows call the CLI's ``main(argv)`` in this process: a subprocess costs about 7 s of imports
on a 2-core machine, the whole table in-process about a minute. An uncaught exception counts as the
traceback it would print. ``test_subprocess_sample`` runs a few rows as real processes (argparse's
and runpy's stderr as a user sees it); ``test_every_row_as_a_subprocess`` (marked exhaustive: not in ``make test``) runs them all.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import json
import os
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"

MODULES = {  # the CLI as a user runs it (python -m ...), and the module whose main(argv) it calls
    "generate": ("duoserve_core", "duoserve_core.cli", ["generate"]),
    "bench": ("duoserve_core.bench", "duoserve_core.bench.__main__", []),
    "sim": ("duoserve_core.sim", "duoserve_core.sim.__main__", []),
    "calibrate": ("duoserve_core.calibrate", "duoserve_core.calibrate.__main__", []),
    "synth": ("duoserve_core.traces", "duoserve_core.traces.__main__", ["synth"]),
    "expand": ("duoserve_core.traces", "duoserve_core.traces.__main__", ["expand"]),
    "record": ("duoserve_core.traces", "duoserve_core.traces.__main__", ["record"]),
}

# A valid run of each CLI, short and on the bundled model; each row replaces or adds a few flags.
BASE = {
    "generate": ["--model", "{small}", "--prompt-ids", "1,2,3", "--max-new-tokens", "2", "--device", "cpu", "--json"],
    "bench": ["--model", "{small}", "--device", "cpu", "--prompt-len", "8", "--gen", "2", "--repeats", "1",
              "--policies", "on-demand", "--memory-budget", "all", "--out", "{tmp}/bench.json", "--json"],
    "sim": ["--trace", "{trace}", "--model-preset", "mixtral-8x7b", "--calibration", "{cal}", "--quant-attention", "nf4",
            "--policy", "on-demand",
            "--prompt-len", "8", "--gen", "2", "--json"],
    "calibrate": ["--model", "{small}", "--device", "cpu", "--out", "{tmp}/cal.json", "--json", "--quiet"],
    "synth": ["--preset", "random", "--layers", "4", "--experts", "8", "--top-k", "2", "--tokens", "4",
              "--requests", "2", "--out", "{tmp}/synth.parquet", "--json"],
    "expand": ["--trace", "{trace}", "--layers", "16", "--out", "{tmp}/expanded.parquet"],
    "record": ["--model", "{small}", "--prompts", "{prompts}", "--max-new-tokens", "2", "--device", "cpu",
               "--out", "{tmp}/recorded.parquet"],
}


@dataclass(frozen=True)
class Row:
    cli: str
    args: tuple[str, ...]  # replaces BASE's value of each flag given here; other flags are added
    fragment: str  # the one-line message contains this (case-insensitive)
    drop: tuple[str, ...] = ()  # BASE flags to leave out
    xfail: str | None = None

    @property
    def id(self) -> str:
        return f"{self.cli}[{' '.join(self.args) or '-'.join(self.drop)}]"

    def argv(self, paths: dict[str, str]) -> list[str]:
        base, extra = list(BASE[self.cli]), list(self.args)
        for flag in self.drop:
            i = base.index(flag)
            del base[i:i + (2 if i + 1 < len(base) and not base[i + 1].startswith("--") else 1)]
        i = 0
        while i < len(extra):  # --flag VALUE pairs of the row replace BASE's
            flag = extra[i]
            value_follows = i + 1 < len(extra) and not (extra[i + 1].startswith("--") and len(extra[i + 1]) > 2)
            if flag in base and value_follows and base.index(flag) + 1 < len(base):
                j = base.index(flag)
                base[j + 1] = extra[i + 1]
                del extra[i:i + 2]
                continue
            i += 2 if value_follows else 1
        return MODULES[self.cli][2] + [a.format(**paths) for a in base + extra]


def rows_for(cli: str, *rows: tuple, xfail: dict[str, str] | None = None) -> list[Row]:
    """``xfail``: the reason a row still fails, by its first value (left to a larger fix than this table's)."""
    made = [Row(cli, tuple(args), fragment, **(extra[0] if extra else {})) for args, fragment, *extra in rows]
    return [Row(r.cli, r.args, r.fragment, r.drop, (xfail or {}).get(r.args[1] if len(r.args) > 1 else "")) for r in made]


BUDGETS = [  # every CLI that takes --memory-budget
    (("--memory-budget", "inf"), "inf"),
    (("--memory-budget", "nan"), "nan"),
    (("--memory-budget=-5%",), "-5%"),
    (("--memory-budget", "inf%"), "inf%"),
    (("--memory-budget", "nan%"), "nan%"),
    (("--memory-budget", "0"), "too small"),
    (("--memory-budget", "abcslots"), "abcslots"),
    (("--memory-budget", "2.5slots"), "2.5slots"),
    (("--memory-budget=-3slots",), "-3slots"),
    (("--memory-budget", "1e400GiB"), "1e400GiB"),
    (("--memory-budget", "1e999"), "1e999"),
    (("--memory-budget", "12 parsecs"), "12 parsecs"),
]
KNOBS = [  # every CLI that takes the schedule's knobs
    (("--prefetch-depth", "0"), "prefetch"),
    (("--prefetch-depth", "-1"), "prefetch"),
    (("--prefetch-depth", "two"), "--prefetch-depth"),
    (("--predictor-threshold", "1.5"), "threshold"),
    (("--predictor-threshold", "nan"), "threshold"),
    (("--predictor-threshold", "-0.1"), "threshold"),
    (("--copy-slack", "-1"), "slack"),
    (("--copy-slack", "inf"), "slack"),
    (("--cpu-threads", "0"), "cpu threads"),
    (("--cpu-split", "1.5"), "cpu split"),
    (("--cpu-split", "0.5"), "needs --quant int4"),  # every base run uses NF4 experts
]
DEVICES = [
    (("--device", "cuda:7"), "cuda:7"),
    (("--device", "tpu"), "tpu"),
    (("--device", "banana"), "banana"),
]
OUTPUTS = [  # {flag} is the CLI's output flag
    (("{flag}", "{tmp}/existing.out"), "--force"),
    (("{flag}", "{tmp}"), "folder"),
    (("{flag}", "{tmp}/existing.out/x.out"), "is a file"),
]


def outputs(flag: str) -> list[tuple]:
    return [(tuple(a.replace("{flag}", flag) for a in args), fragment) for args, fragment in OUTPUTS]


CHECKPOINTS = [  # {flag} is the CLI's model flag
    (("{flag}", "{tmp}/missing-model"), "does not exist"),
    (("{flag}", "{empty_dir}"), "config.json"),
    (("{flag}", "{not_json}"), "JSON"),
    (("{flag}", "{list_config}"), "config.json"),
    (("{flag}", "{llama}"), "llama"),
    (("{flag}", "{negative_sizes}"), "hidden_size"),
]


def checkpoints(flag: str) -> list[tuple]:
    return [(tuple(a.replace("{flag}", flag) for a in args), fragment) for args, fragment in CHECKPOINTS]


BAD_TRACES = [  # {flag} is the CLI's trace flag
    (("{flag}", "{tmp}/missing.parquet"), "does not exist"),
    (("{flag}", "{not_parquet}"), "Parquet"),
    (("{flag}", "{empty_file}"), "Parquet"),
    (("{flag}", "{wrong_columns}"), "trace"),
    (("{flag}", "{empty_trace}"), "trace"),
]


def bad_traces(flag: str) -> list[tuple]:
    return [(tuple(a.replace("{flag}", flag) for a in args), fragment) for args, fragment in BAD_TRACES]


GENERATE = rows_for(
    "generate", *BUDGETS, *KNOBS, *DEVICES, *outputs("--timeline-out"), *checkpoints("--model"),
    *bad_traces("--routing-trace"),
    (("--seed", "-1"), "--seed"),
    (("--seed", "1.5"), "--seed"),
    (("--seed", str(2**64)), "--seed"),
    (("--temperature", "nan"), "--temperature"),
    (("--temperature", "-1"), "--temperature"),
    (("--temperature", "inf"), "--temperature"),
    (("--top-p", "1.5"), "--top-p"),  # generate has no top-p: the flag is named as unknown
    (("--max-new-tokens", "0"), "--max-new-tokens"),
    (("--max-new-tokens", "-4"), "--max-new-tokens"),
    (("--max-context", "0"), "--max-context"),
    (("--max-context", "4"), "context"),
    (("--max-new-tokens", "5000"), "context"),
    (("--num-layers", "0"), "--num-layers"),
    (("--prompt", ""), "prompt", {"drop": ("--prompt-ids",)}),
    (("--prompt-ids", ""), "prompt"),
    (("--prompt-ids", "1.7"), "--prompt-ids"),
    (("--prompt-ids", "-1"), "token"),
    (("--prompt-ids", "99999"), "token"),
    (("--prompt", "hello"), "--prompt"),  # with --prompt-ids as well
    (("--policy", "fastest"), "--policy"),
    (("--dtype", "fp8"), "--dtype"),
    (("--quant", "int3"), "--quant"),
    (("--policy", "duoserve", "--predictor", "{random_bytes}"), "predictor"),
    (("--policy", "duoserve", "--predictor", "{tmp}/missing.safetensors"), "predictor"),
    (("--policy", "duoserve", "--predictor", "{predictor_x32}"), "predictor"),
)

BENCH = rows_for(
    "bench", *BUDGETS, *KNOBS, *DEVICES[:2], *outputs("--out"), *checkpoints("--model"),
    *bad_traces("--routing-trace"),
    (("--record-trace", "{tmp}/existing.out"), "--force"),
    (("--timelines", "{tmp}/existing.out"), "--timelines"),
    (("--gen", "0"), "--gen"),
    (("--gen", "-1"), "--gen"),
    (("--prompt-len", "0"), "--prompt-len"),
    (("--prompt-len", "-8"), "--prompt-len"),
    (("--repeats", "0"), "--repeats"),
    (("--policies", "fastest"), "fastest"),
    (("--quant", "int3"), "int3"),
    (("--peer", "{tmp}/missing.json"), "--peer"),
    (("--peer", "{not_json}/config.json"), "--peer"),
    (("--sweep", "--budgets", "abc"), "abc"),
    (("--sweep", "--prompt-lens", "8,x"), "--prompt-lens"),
    (("--sweep", "--depths", "0"), "depth"),
    (("--sweep", "--thresholds", "2"), "threshold"),
)

SIM = rows_for(
    "sim", *BUDGETS, *KNOBS, *outputs("--out"), *bad_traces("--trace"),
    *[(args, fragment) for args, fragment in checkpoints("--model-preset") if "missing-model" not in args[1]],
    (("--model-preset", "{tmp}/missing-model"), "--model-preset"),
    (("--timeline-out", "{tmp}/existing.out"), "--force"),
    (("--gen", "0"), "--gen"),
    (("--gen", "-1"), "--gen"),
    (("--prompt-len", "0"), "--prompt-len"),
    (("--prompt-len", "-3"), "--prompt-len"),
    (("--max-context", "0"), "--max-context"),
    (("--requests", "0", "--sweep"), "--requests"),
    (("--requests", "-2", "--sweep"), "--requests"),
    (("--warmup", "-1"), "--warmup"),
    (("--seed", "-1", "--arrival-rate", "2"), "--seed"),
    (("--arrival-rate", "-1"), "--arrival-rate"),
    (("--arrival-rate", "nan"), "--arrival-rate"),
    (("--arrivals", "0,x"), "--arrivals"),
    (("--arrivals", "0,-1"), "--arrivals"),
    (("--slo-ttft-ms", "-5", "--arrival-rate", "2"), "--slo-ttft-ms"),
    (("--policy", "fastest"), "fastest"),
    (("--quant", "int3"), "int3"),
    (("--calibration", "{tmp}/missing.json"), "calibration"),
    (("--calibration", "{not_json}/config.json"), "JSON"),
    (("--calibration", "{random_bytes}"), "JSON"),
    (("--calibration", "{cal}", "--model-preset", "mixtral-8x22b"), "calibration"),
    (("--policy", "duoserve", "--predictor", "{random_bytes}"), "predictor"),
    (("--policy", "duoserve", "--predictor", "{predictor_8}"), "predictor"),
)

CALIBRATE = rows_for(
    "calibrate", *DEVICES, *outputs("--out"), *checkpoints("--model"),
    (("--sizes-mib", "abc"), "--sizes-mib"),
    (("--sizes-mib", "-1"), "--sizes-mib"),
    (("--sizes-mib", "nan"), "--sizes-mib"),
    (("--contexts", "abc"), "--contexts"),
    (("--contexts", "0"), "--contexts"),
    (("--formats", "int3"), "int3"),
    (("--repeats", "0"), "--repeats"),
    (("--max-tokens", "0"), "--max-tokens"),
    (("--num-layers", "0"), "--num-layers"),
    (("--quant", "int3"), "int3"),
    (("--routing-trace", "{not_parquet}"), "Parquet"),
)

SYNTH = rows_for(
    "synth", *outputs("--out"),
    (("--layers", "0"), "--layers"),
    (("--experts", "0"), "--experts"),
    (("--top-k", "0"), "--top-k"),
    (("--top-k", "9"), "--top-k"),
    (("--tokens", "0"), "--tokens"),
    (("--requests", "-1"), "--requests"),
    (("--seed", "-1"), "--seed"),
    (("--seed", "1.5"), "--seed"),
    (("--prompt-len", "-1"), "--prompt-len"),
    (("--repeat", "1.5"), "--repeat"),
    (("--repeat", "nan"), "--repeat"),
    (("--repeat", "x"), "--repeat"),
    (("--skew", "nan"), "skew"),
    (("--skew", "-1"), "skew"),
    (("--gate-precision", "1.5"), "gate"),
    (("--preset", "nope"), "nope"),
)

EXPAND = rows_for(
    "expand", *outputs("--out"), *bad_traces("--trace"),
    (("--layers", "0"), "--layers"),
    (("--layers", "-8"), "--layers"),
    (("--seed", "-1"), "--seed"),
)

RECORD = rows_for(
    "record", *outputs("--out"), *checkpoints("--model"), *DEVICES[:2],
    (("--prompts", "{tmp}/missing.txt"), "prompts"),
    (("--prompts", "{empty_file}"), "prompt"),
    (("--max-new-tokens", "0"), "--max-new-tokens"),
    (("--hidden-dims", "0"), "--hidden-dims"),
    (("--hidden-basis", "{trace}"), "basis"),
    (("--quant", "int3"), "int3"),
)

TABLE = GENERATE + BENCH + SIM + CALIBRATE + SYNTH + EXPAND + RECORD
# a few rows run as real processes on every test run (argparse, runpy and torch's stderr included)
SAMPLE = {"generate[--memory-budget 1e400GiB]", "generate[--seed 1.5]", "bench[--gen 0]", "sim[--memory-budget abcslots]",
          "calibrate[--contexts abc]", "synth[--layers 0]", "expand[--trace {not_parquet}]"}


def _params(rows):
    return [pytest.param(r, id=r.id, marks=[pytest.mark.xfail(strict=True, reason=r.xfail)] if r.xfail else [])
            for r in rows]


@pytest.fixture(scope="module")
def materials(tmp_path_factory) -> dict[str, str]:
    """The bad files every row may point at, made once (none of them loads a model)."""
    import pandas as pd

    d = tmp_path_factory.mktemp("bad_inputs")
    config = json.loads((DATA / "small-moe" / "config.json").read_text())

    def checkpoint(name: str, text: str) -> str:
        (d / name).mkdir()
        (d / name / "config.json").write_text(text)
        return str(d / name)

    (d / "empty_dir").mkdir()
    (d / "not_parquet.parquet").write_text("request_id,layer\n0,0\n")
    (d / "empty_file").write_bytes(b"")
    (d / "random_bytes.safetensors").write_bytes(os.urandom(4096))
    pd.DataFrame({"a": [1, 2], "b": [3, 4]}).to_parquet(d / "wrong_columns.parquet")
    from duoserve_core.traces import read_trace
    trace = read_trace(DATA / "traces" / "small-moe-heldout.parquet")
    _write_raw_trace(d / "empty_trace.parquet", trace.df.iloc[:0], DATA / "traces" / "small-moe-heldout.parquet")
    return {
        "small": str(DATA / "small-moe"),
        "trace": str(DATA / "traces" / "small-moe-heldout.parquet"),
        "cal": str(DATA / "calibration" / "h100_mixtral-8x7b_nf4.json"),
        "prompts": str(DATA / "prompts" / "prompts_heldout.txt"),
        "predictor_8": str(DATA / "predictors" / "small-moe-depth2.safetensors"),
        "predictor_x32": str(DATA / "predictors" / "small-moe-x32-depth2.safetensors"),
        "empty_dir": str(d / "empty_dir"),
        "not_json": checkpoint("not_json", "{not json"),
        "list_config": checkpoint("list_config", "[1, 2, 3]"),
        "llama": checkpoint("llama", json.dumps({**config, "model_type": "llama"})),
        "negative_sizes": checkpoint("negative_sizes", json.dumps({**config, "hidden_size": -256})),
        "not_parquet": str(d / "not_parquet.parquet"),
        "empty_file": str(d / "empty_file"),
        "wrong_columns": str(d / "wrong_columns.parquet"),
        "empty_trace": str(d / "empty_trace.parquet"),
        "random_bytes": str(d / "random_bytes.safetensors"),
    }


def _write_raw_trace(path: Path, df, like: Path) -> None:
    """``df`` with ``like``'s Parquet metadata, bypassing ``write_trace``'s checks (a trace gone bad)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta = pq.read_schema(like).metadata
    table = pa.Table.from_pandas(df, preserve_index=False)
    pq.write_table(table.replace_schema_metadata({**(table.schema.metadata or {}), **meta}), path)


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def _in_process(cli: str, argv: list[str]) -> tuple[int, str, str]:
    """``main(argv)`` with stdout and stderr captured; an uncaught exception is the traceback Python prints."""
    main = importlib.import_module(MODULES[cli][1]).main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except Exception:  # noqa: BLE001 (what the user would see)
            traceback.print_exc()
            code = 1
    return code, out.getvalue(), err.getvalue()


def _subprocess(cli: str, argv: list[str], cwd: Path) -> tuple[int, str, str]:
    # every warning shown, as a user would see it, but torch's own deprecation of TorchScript, which torch's
    # imports trigger in torch 2.13 (pyproject's filterwarnings drops it in-process the same way)
    env = {**os.environ, "PYTHONPATH": str(ROOT),
           "PYTHONWARNINGS": "default,ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"}
    p = subprocess.run([sys.executable, "-m", MODULES[cli][0], *argv], capture_output=True, text=True, cwd=cwd,
                       env=env, timeout=180)
    return p.returncode, p.stdout, p.stderr


def _check(row: Row, materials: dict[str, str], tmp_path: Path, run) -> None:
    (tmp_path / "existing.out").write_text("an earlier result\n")
    argv = row.argv({**materials, "tmp": str(tmp_path)})
    before = _snapshot(tmp_path)
    code, out, err = run(row.cli, argv)
    shown = f"argv: {argv}\nexit {code}\nstdout: {out[-2000:]}\nstderr: {err[-4000:]}"
    assert "Traceback" not in err, shown
    assert code == 2, shown
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].strip(), f"stderr must be one non-empty line\n{shown}"
    assert row.fragment.lower() in lines[0].lower(), f"the message does not name {row.fragment!r}\n{shown}"
    if "--json" in argv:
        assert out == "", f"--json: nothing but JSON on stdout, and no JSON on failure\n{shown}"
    assert _snapshot(tmp_path) == before, f"a refused run wrote or changed files\n{shown}"


@pytest.mark.parametrize("row", _params(TABLE))
def test_bad_input(row: Row, materials, tmp_path):
    _check(row, materials, tmp_path, _in_process)


@pytest.mark.parametrize("row", _params([r for r in TABLE if r.id in SAMPLE]))
def test_subprocess_sample(row: Row, materials, tmp_path):
    _check(row, materials, tmp_path, lambda cli, argv: _subprocess(cli, argv, tmp_path))


def test_sample_names_real_rows():
    assert SAMPLE <= {r.id for r in TABLE}


@pytest.mark.exhaustive  # about 30 minutes: `pytest -m exhaustive tests/test_bad_inputs.py`, not in make test
@pytest.mark.parametrize("row", _params(TABLE))
def test_every_row_as_a_subprocess(row: Row, materials, tmp_path):
    _check(row, materials, tmp_path, lambda cli, argv: _subprocess(cli, argv, tmp_path))


# -- the Python API: the project's error types, at the call that received the argument -------------------------

BAD_BUDGETS = ["inf", "nan", "-5%", "inf%", "nan%", "abcslots", "2.5slots", "1e400GiB", "1e999", 0, -1, float("nan"),
               float("inf")]


@pytest.fixture(scope="module")
def runtime():
    import duoserve_core

    return duoserve_core.load(DATA / "small-moe", device="cpu", num_layers=2, max_context=64)


@pytest.mark.parametrize("budget", BAD_BUDGETS, ids=str)
def test_load_with_a_bad_budget_raises_budget_error(budget):
    import duoserve_core
    from duoserve_core import BudgetError

    with pytest.raises(BudgetError):
        duoserve_core.load(DATA / "small-moe", device="cpu", num_layers=2, max_context=64, memory_budget=budget)


@pytest.mark.parametrize("budget", BAD_BUDGETS, ids=str)
def test_configure_with_a_bad_budget_raises_and_keeps_the_plan(runtime, budget):
    from duoserve_core import BudgetError

    plan = runtime.plan.as_dict()
    with pytest.raises(BudgetError):
        runtime.configure(memory_budget=budget)
    assert runtime.plan.as_dict() == plan


@pytest.mark.parametrize("knobs", [dict(prefetch_depth=0), dict(predictor_threshold=1.5),
                                   dict(predictor_threshold=float("nan")), dict(policy="fastest")], ids=str)
def test_configure_with_bad_knobs_raises_knob_error(runtime, knobs):
    from duoserve_core.errors import KnobError

    with pytest.raises(KnobError):
        runtime.configure(**knobs)


@pytest.mark.parametrize("device", ["tpu", "banana", "cuda:7"])
def test_load_on_a_bad_device_raises_device_error(device):
    import duoserve_core
    from duoserve_core import DeviceError

    with pytest.raises(DeviceError, match=device.split(":")[0]):
        duoserve_core.load(DATA / "small-moe", device=device)


@pytest.mark.parametrize("kwargs", [
    dict(temperature=float("nan")), dict(temperature=-1.0), dict(temperature=float("inf")),
    dict(max_new_tokens=0), dict(prompt_ids=[]),
    dict(prompt_ids=[1.7]),
    dict(prompt_ids=[-1]), dict(prompt_ids=[10**6]),
    dict(seed=-1), dict(seed=1.5),
], ids=str)
def test_generate_with_bad_arguments_raises_duoserve_error(runtime, kwargs):
    from duoserve_core.errors import DuoServeError

    kwargs = {"prompt_ids": [1, 2, 3], "max_new_tokens": 2, **kwargs}
    with pytest.raises(DuoServeError):
        runtime.generate(**kwargs)


def _bundled_copy(tmp_path: Path, change_weights=None) -> Path:
    """A copy of the bundled checkpoint to damage; ``change_weights(tensors)`` edits its weights first."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "ckpt"
    shutil.copytree(DATA / "small-moe", folder)
    if change_weights is not None:
        weights = load_file(folder / "model.safetensors")
        change_weights(weights)
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("tokenizer", ["broken", "missing"])
def test_a_bad_or_missing_tokenizer_is_one_line_before_any_weight_loads(tmp_path, capsys, tokenizer):
    """A malformed tokenizer.json is a CheckpointError naming the folder; a text prompt without a tokenizer
    is refused before the checkpoint loads (it took 21 s of weights before)."""
    from duoserve_core.cli import main as generate_main

    folder = _bundled_copy(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if tokenizer == "broken" and name == "tokenizer.json":
            (folder / name).write_text("{broken")
        elif tokenizer == "missing":
            (folder / name).unlink()
    code = generate_main(["generate", "--model", str(folder), "--prompt", "hi", "--max-new-tokens", "2",
                          "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert ("cannot be read" if tokenizer == "broken" else "has no tokenizer") in err and "--prompt-ids" in err


@pytest.mark.parametrize("tensor", ["model.layers.1.block_sparse_moe.experts.0.w3.weight", "model.layers.0.self_attn.q_proj.weight"])
@pytest.mark.parametrize("quant", ["nf4", "bf16"])
def test_nan_weights_are_a_checkpoint_error_naming_the_tensor(tmp_path, tensor, quant):
    """A NaN in an expert or a dense weight is refused at load, naming what holds it (it decoded tokens
    of 0 before), for a quantized and a dense expert format."""
    import duoserve_core
    from duoserve_core.errors import CheckpointError

    def poison(weights):
        assert tensor in weights, sorted(weights)[:12]
        weights[tensor].view(-1)[7] = float("nan")

    folder = _bundled_copy(tmp_path, poison)
    with pytest.raises(CheckpointError, match="NaN or infinite") as caught:
        duoserve_core.load(folder, device="cpu", quant=quant, memory_budget="4slots")
    where = "expert 0 of layer 1 (w3)" if "experts" in tensor else tensor
    assert where in str(caught.value)


@pytest.mark.parametrize("tensor, dtype", [("model.layers.1.block_sparse_moe.experts.0.w3.weight", "int32"),
                                           ("model.embed_tokens.weight", "int8"),
                                           ("model.layers.0.block_sparse_moe.experts.2.w1.weight", "float64")])
def test_non_float_weights_are_refused_from_the_header(tmp_path, tensor, dtype):
    """Integer or float64 weights (they loaded silently, or failed deep in NF4) are refused before any
    weight is read, naming the tensor and its dtype."""
    import torch

    import duoserve_core
    from duoserve_core.errors import CheckpointError

    def retype(weights):
        weights[tensor] = (weights[tensor].float() * 100).to(getattr(torch, dtype))

    folder = _bundled_copy(tmp_path, retype)
    for quant in ("none", "nf4"):
        with pytest.raises(CheckpointError, match=f"{tensor}.*stored as"):
            duoserve_core.load(folder, device="cpu", quant=quant, memory_budget="4slots")


@pytest.mark.parametrize("setting, error, match", [
    ({"dtype": "fp8"}, "SettingError", "dtype 'fp8' is not a compute dtype"),
    ({"dtype": "int8"}, "SettingError", "use bf16, fp16 or fp32"),
    ({"quant": "int8"}, "SettingError", "unknown --quant 'int8'"),
    ({"attention_quant": "int8"}, "SettingError", "unknown attention quantization"),
    ({"max_context": 0}, "PromptError", "max_context must be a whole number"),
])
def test_the_api_names_a_bad_setting_with_the_projects_errors(setting, error, match):
    """``load`` raises the project's error types (ValueError subclasses) for bad settings; dtype names
    work as on the command line (``dtype="fp16"`` said 'Invalid device string' before)."""
    import duoserve_core
    from duoserve_core import errors

    with pytest.raises(getattr(errors, error), match=match):
        duoserve_core.load(Path(__file__).resolve().parents[1] / "data" / "small-moe", device="cpu", **setting)


def test_dtype_names_are_accepted_by_the_api():
    import torch

    import duoserve_core

    rt = duoserve_core.load(Path(__file__).resolve().parents[1] / "data" / "small-moe", device="cpu", dtype="bf16",
                            memory_budget="4slots")
    assert rt.dtype == torch.bfloat16
