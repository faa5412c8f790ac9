"""The memory budget, spent once, before anything is loaded.

Order of claims on the budget: non-expert weights (exact, from the model's parameters), the KV
cache at the longest context the runtime accepts, activations of the largest forward pass,
the workspace a quantized expert needs while it is computed, a margin for the allocator; the
rest is expert slots. A budget that cannot hold one layer's top-k experts after that fails
here, with the figure that would work.

On several devices the budget applies to each: the first device holds the fixed costs above and
slots; every other device holds activations, the expert workspace and the margin (it computes the
experts in its slots over the layer's hidden states), and slots in the rest, so it holds more.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from transformers import MixtralConfig

from .errors import BudgetError
from .experts.formats import ExpertFormat, Int4Format, NF4Format, SplitInt4Format
from .units import format_bytes, parse_bytes, parse_slots

# Room for what torch holds on a GPU outside the model's tensors: cuBLAS's workspace for each stream that
# runs matmuls (32 MiB each on an H200: the compute stream's, and ``side_stream``'s once graphs are
# captured; benchmarks/diagnostics/peak_memory.py lists them). The caching allocator's rounding is not
# counted apart. The CPU has neither.
CUDA_ALLOCATOR_MARGIN = 64 * 2**20

# Tokens of KV cache and activations a plan reserves when it is given requests, not a context: the
# committed GPU runs' prompt of 512 and 128 new tokens. Then "15%" of Mixtral-8x7B (NF4 experts and
# attention) is 21 expert slots of 256 on 1.78 GiB of fixed costs wherever it is asked: the README,
# notebooks 06 and 07, `sim`, `sim --sweep`, a QoS run. Planned for the bundled trace's requests
# themselves (about 100 tokens), notebook 07 and `sim --sweep` reserved 0.17 GiB less and got 22.
PLAN_CONTEXT = 640


@dataclass
class MemoryPlan:
    budget_bytes: int | None
    dense_bytes: int
    kv_cache_bytes: int
    activation_bytes: int
    workspace_bytes: int
    margin_bytes: int
    expert_bytes: int          # one expert record
    num_slots: int
    total_experts: int
    max_batch: int = 1         # requests whose KV caches (at the planned context) the plan holds at once
    device_slots: list[int] | None = None  # slots on each device, the first device's first (None: one device)
    peer_fixed_bytes: int = 0  # what each other device holds besides its slots (activations, workspace, margin)

    @property
    def devices(self) -> int:
        return len(self.device_slots) if self.device_slots else 1

    @property
    def fixed_bytes(self) -> int:
        return (self.dense_bytes + self.kv_cache_bytes + self.activation_bytes + self.workspace_bytes
                + self.margin_bytes)

    @property
    def slot_bytes(self) -> int:
        return self.num_slots * self.expert_bytes

    @property
    def headroom_bytes(self) -> int | None:
        """What the budget leaves beyond the fixed costs and the slots (None: no budget)."""
        return None if self.budget_bytes is None else self.budget_bytes - self.fixed_bytes - self.slot_bytes

    def as_dict(self) -> dict:
        return {**asdict(self), "fixed_bytes": self.fixed_bytes, "slot_bytes": self.slot_bytes, "devices": self.devices}

    def describe_devices(self) -> list[dict]:
        """Each device's share of the plan: its budget, fixed bytes, slots and slot bytes."""
        slots = self.device_slots or [self.num_slots]
        return [{"device": d, "budget_bytes": self.budget_bytes, "slots": n, "slot_bytes": n * self.expert_bytes,
                 "fixed_bytes": self.fixed_bytes if d == 0 else self.peer_fixed_bytes} for d, n in enumerate(slots)]


def kv_cache_bytes(config: MixtralConfig, context: int, dtype: torch.dtype, batch: int = 1) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim
    return batch * context * per_token * _size(dtype)


def activation_bytes(config: MixtralConfig, tokens: int, dtype: torch.dtype) -> int:
    """Live activations of one layer's forward over ``tokens`` tokens (an upper estimate)."""
    h, i, k, e = config.hidden_size, config.intermediate_size, config.num_experts_per_tok, config.num_local_experts
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    qkv = (2 * config.num_attention_heads + 2 * config.num_key_value_heads) * head_dim
    per_token = (6 * h + qkv + k * h + 2 * h + 3 * i) * _size(dtype) + 3 * e * 4
    return tokens * per_token + config.vocab_size * 4 * 2


def workspace_bytes(fmt: ExpertFormat, dtype: torch.dtype, device_type: str) -> int:
    """What computing or landing one expert needs beside its record. NF4 experts over many tokens are
    dequantized to dense weights for the duration of a matmul. Int4 on a GPU re-packs each landed
    matrix for tinygemm (``Int4Format.arrive``: the matrix re-paired, then converted: two temporaries
    of its size, on the relayout stream while the compute stream works; the H200 runs of 2026-11-30,
    planned without them, peaked 43 MB above their plans). Int4's group sizes (multiples of 32) always
    suit tinygemm's tiles, so it is never dequantized on a GPU. A split int4 record (``--cpu-split``) is
    reassembled before that (``SplitInt4Format.arrive``: ``w13`` re-paired, concatenated and converted while
    ``w2``'s re-paired half waits: 2.5 times ``w13``'s bytes at most), and a shared expert's tail lands in
    a buffer of its own."""
    if isinstance(fmt, NF4Format):
        return fmt.params * _size(dtype)
    if isinstance(fmt, SplitInt4Format):
        return fmt.tail_bytes + (5 * fmt.whole.segments["w13.q"].nbytes // 2 if device_type == "cuda" else 0)
    if isinstance(fmt, Int4Format) and device_type == "cuda":
        return 2 * max(fmt.segments[f"{name}.q"].nbytes for name in ("w13", "w2"))
    return 0


def resolve_budget(budget: str | int, fixed_bytes: int, expert_bytes: int, total_experts: int,
                   full_model_bytes: int) -> int:
    """A budget as bytes: bytes, ``%`` of the whole model, ``Nslots`` (the fixed memory + N experts) or
    ``all`` (the fixed memory + every expert). The runtime, the bench and the simulator share it."""
    if isinstance(budget, str) and budget == "all":
        return fixed_bytes + total_experts * expert_bytes
    try:
        if isinstance(budget, str) and budget.strip().lower().endswith("slots"):
            return fixed_bytes + parse_slots(budget) * expert_bytes
        return parse_bytes(budget, percent_of=full_model_bytes)
    except ValueError as exc:
        raise BudgetError(str(exc)) from exc


def plan_context(longest_request: int, model_context: int, max_context: int | None = None) -> int:
    """The context a plan reserves: ``max_context`` where one is asked for; else ``PLAN_CONTEXT``
    (the model's own context if that is shorter), or the longest request where that is longer. Every
    view that plans for requests (the simulator's, the lab's) goes through here, so a budget gives the
    same slots in all of them while their requests fit in ``PLAN_CONTEXT``."""
    if max_context is not None:
        if max_context < longest_request:
            raise BudgetError(f"max_context {max_context} is shorter than the longest request ({longest_request} "
                              f"tokens, prompt + generated); raise it to at least {longest_request} or leave it out")
        return max_context
    return max(longest_request, min(PLAN_CONTEXT, model_context))


def plan_memory(config: MixtralConfig, dense_bytes: int, fmt: ExpertFormat, budget: int | None,
                max_context: int, dtype: torch.dtype, device_type: str, max_batch: int = 1,
                devices: int = 1) -> MemoryPlan:
    """What fits in ``budget``: the fixed costs (``max_batch`` requests' KV caches at ``max_context``
    among them), then as many expert slots as the rest holds; on ``devices`` devices ``budget`` on each
    (see the module doc), shared evenly where the devices could hold more than every expert (``share_slots``)."""
    total = config.num_hidden_layers * config.num_local_experts
    plan = MemoryPlan(
        budget_bytes=budget, dense_bytes=dense_bytes, max_batch=max_batch,
        kv_cache_bytes=kv_cache_bytes(config, max_context, dtype, max_batch),
        activation_bytes=activation_bytes(config, max_context, dtype),
        workspace_bytes=workspace_bytes(fmt, dtype, device_type), margin_bytes=CUDA_ALLOCATOR_MARGIN if device_type == "cuda" else 0,
        expert_bytes=fmt.nbytes, num_slots=total, total_experts=total,
    )
    if devices > 1:
        plan.peer_fixed_bytes = plan.activation_bytes + plan.workspace_bytes + plan.margin_bytes
    if budget is None:
        if devices > 1:
            plan.device_slots = [total // devices + (d < total % devices) for d in range(devices)]
        return plan
    minimum = plan.fixed_bytes + config.num_experts_per_tok * fmt.nbytes
    if budget < minimum:
        raise BudgetError(
            f"memory budget {format_bytes(budget)} is too small: non-expert weights {format_bytes(plan.dense_bytes)} "
            f"+ KV cache {format_bytes(plan.kv_cache_bytes)} ({max_context} tokens x {max_batch} request"
            f"{'s' if max_batch > 1 else ''}) + activations "
            f"{format_bytes(plan.activation_bytes)} + expert workspace {format_bytes(plan.workspace_bytes)} "
            f"+ margin {format_bytes(plan.margin_bytes)} + one layer's top-{config.num_experts_per_tok} experts "
            f"({config.num_experts_per_tok} x {format_bytes(fmt.nbytes)}) need {format_bytes(minimum)}. "
            f"Raise --memory-budget to at least {format_bytes(minimum)}, or lower --max-context"
            + (" or --max-batch." if max_batch > 1 else ".")
        )
    plan.num_slots = min(total, (budget - plan.fixed_bytes) // fmt.nbytes)
    if devices > 1:
        room = [(budget - plan.fixed_bytes) // fmt.nbytes] + \
               [max(0, (budget - plan.peer_fixed_bytes) // fmt.nbytes)] * (devices - 1)
        plan.device_slots = share_slots(room, total)
        plan.num_slots = sum(plan.device_slots)
    return plan


def share_slots(room: list[int], total: int) -> list[int]:
    """Slots per device: each device's ``room`` where they hold no more than ``total`` experts together;
    else ``total`` shared as evenly as the rooms allow (smallest room first, each taking at most an even
    share of what is left). Filling one device first would leave another's link idle: an expert is
    computed, and copied, on the device whose slot holds it."""
    if sum(room) <= total:
        return list(room)
    out, left = [0] * len(room), total
    order = sorted(range(len(room)), key=lambda d: (room[d], d))
    for i, d in enumerate(order):
        out[d] = min(room[d], left // (len(room) - i))
        left -= out[d]
    for d in range(len(room)):  # the remainder of the division, to devices with room left, first device first
        extra = min(left, room[d] - out[d])
        out[d] += extra
        left -= extra
    return out


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
