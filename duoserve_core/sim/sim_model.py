"""The simulated model: its config, expert format and memory plan, with no weight materialised.

The slot count comes from the same ``plan_memory`` as the real runtime's (non-expert bytes from
the meta-device skeleton, KV cache at the same ``max_context``, the calibrated device's dtype and
allocator margin), so ``--memory-budget 15%`` gives the simulator the slots the GPU run gets.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import MixtralConfig

from ..checkpoint import PRESETS, SYNTHETIC_PREFIX, _Namespace, check_mixtral_config, open_source
from ..errors import BudgetError, CheckpointError
from ..experts.formats import ExpertFormat, make_format
from ..memory import MemoryPlan, plan_memory, resolve_budget
from ..mixtral import build_skeleton, dense_bytes


@dataclass
class SimModel:
    name: str
    config: MixtralConfig
    format: ExpertFormat
    plan: MemoryPlan
    quant: str
    attention_quant: str
    dtype: torch.dtype
    device_type: str
    max_context: int

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def full_model_bytes(self) -> int:
        c = self.config
        return c.num_hidden_layers * c.num_local_experts * self.format.nbytes + self.plan.dense_bytes

    def describe(self) -> dict:
        """Like ``Runtime.describe``'s model part, for result files."""
        c = self.config
        return {"model": self.name, "layers": c.num_hidden_layers, "experts": c.num_local_experts,
                "top_k": c.num_experts_per_tok, "quant": self.quant, "attention_quant": self.attention_quant,
                "expert_format": self.format.name, "compute_dtype": str(self.dtype).split(".")[-1],
                "max_context": self.max_context, "memory_plan": self.plan.as_dict(),
                "full_model_bytes": self.full_model_bytes}


class _ConfigOnly:
    """What ``build_skeleton`` reads of a tensor source: the config."""

    def __init__(self, config: MixtralConfig):
        self.config = config


def open_config(model: str | Path, num_layers: int | None = None) -> tuple[str, MixtralConfig, torch.dtype]:
    """``mixtral-8x7b`` / ``synthetic:<preset>``, a checkpoint folder or a ``config.json``:
    the name the runtime would report, the config, and the checkpoint dtype."""
    text = str(model)
    if text in PRESETS:
        text = SYNTHETIC_PREFIX + text
    if text.startswith(SYNTHETIC_PREFIX):
        source = open_source(text, num_layers=num_layers)
        return source.name, source.config, source.dtype
    path = Path(text)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"--model-preset {model}: not a preset ({', '.join(PRESETS)}), nor a checkpoint "
                              "folder or config.json")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{file} is not valid JSON: {exc}") from exc
    check_mixtral_config(_Namespace(raw), str(file))
    config = MixtralConfig(**{k: v for k, v in raw.items() if k not in ("architectures", "transformers_version")})
    if num_layers is not None:
        if not 1 <= num_layers <= config.num_hidden_layers:
            raise CheckpointError(f"--num-layers {num_layers} is outside 1..{config.num_hidden_layers}")
        config.num_hidden_layers = num_layers
    dtype = config.dtype or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    name = (path if path.is_dir() else path.parent).name
    return name, config, dtype


def build_model(model: str | Path, *, quant: str = "nf4", attention_quant: str = "none",
                memory_budget: str | int = "all", max_context: int = 4096, device_type: str = "cuda",
                dtype: torch.dtype | None = None, num_layers: int | None = None,
                num_slots: int | None = None, devices: int = 1,
                device_slots: list[int] | None = None, cpu_split: float = 0.0) -> SimModel:
    """The simulated model at a budget (on each of ``devices`` devices); ``num_slots`` (one device) or
    ``device_slots`` (one count per device) overrides the plan's slots, to mirror a measured run whose
    slots are known; ``cpu_split``: records laid out for a shared expert (``--cpu-split``, int4)."""
    name, config, checkpoint_dtype = open_config(model, num_layers)
    dtype = dtype or (torch.bfloat16 if device_type == "cuda" else torch.float32)
    if max_context > config.max_position_embeddings:
        raise BudgetError(f"max_context {max_context} exceeds the model's context of "
                          f"{config.max_position_embeddings} tokens")
    fmt = make_format(quant, config.hidden_size, config.intermediate_size, checkpoint_dtype, cpu_split)
    dense = dense_bytes(build_skeleton(_ConfigOnly(config), dtype, attention_quant))
    unbounded = plan_memory(config, dense, fmt, None, max_context, dtype, device_type)
    full = unbounded.total_experts * fmt.nbytes + dense
    budget = resolve_budget(memory_budget, unbounded.fixed_bytes, fmt.nbytes, unbounded.total_experts, full)
    plan = plan_memory(config, dense, fmt, budget, max_context, dtype, device_type, devices=devices)
    if device_slots is not None:
        if len(device_slots) != devices or any(n < 0 for n in device_slots) \
                or not config.num_experts_per_tok <= sum(device_slots) <= plan.total_experts:
            raise BudgetError(f"device slots {device_slots}: need one count per device ({devices}), "
                              f"{config.num_experts_per_tok}..{plan.total_experts} in all")
        plan.device_slots, plan.num_slots = list(device_slots), sum(device_slots)
    elif num_slots is not None:
        if devices > 1:
            raise BudgetError("num_slots gives one device's slots; on several devices give device_slots")
        if not config.num_experts_per_tok <= num_slots <= plan.total_experts:
            raise BudgetError(f"{num_slots} slots: need {config.num_experts_per_tok}..{plan.total_experts}")
        plan.num_slots = num_slots
    return SimModel(name, config, fmt, plan, quant, attention_quant, dtype, device_type, max_context)
