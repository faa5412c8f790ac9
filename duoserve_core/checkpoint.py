"""Where weights come from: a Hugging Face Mixtral checkpoint on disk, or synthesized ones.

Both sources answer the same two questions, so the loader never knows which one it reads:
``dense(name)`` returns a non-expert tensor by its transformers parameter name, and
``expert(layer, e)`` returns one expert's three matrices. Nothing reads a whole model into
memory: experts are fetched one at a time, straight from the safetensors file (or generated).

Two on-disk layouts exist for Mixtral experts and both load:
- ``model.layers.N.block_sparse_moe.experts.E.w1/w3/w2.weight`` (official checkpoints, and
  what transformers 5 ``save_pretrained`` writes), router ``block_sparse_moe.gate.weight``;
- fused ``model.layers.N.mlp.experts.gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]``
  (transformers 5 in-memory names), router ``mlp.gate.weight``.
"""

from __future__ import annotations

import json
import zlib
from abc import ABC, abstractmethod
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import MixtralConfig

from .errors import CheckpointError

# Published shapes of the Mixtral family (config.json of the v0.1 checkpoints), plus a tiny
# model of the same architecture for CI and quick runs on a CPU.
PRESETS: dict[str, dict] = {
    "mixtral-8x7b": dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=32768, rms_norm_eps=1e-5, dtype="bfloat16",
    ),
    "mixtral-8x22b": dict(
        vocab_size=32000, hidden_size=6144, intermediate_size=16384, num_hidden_layers=56,
        num_attention_heads=48, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=65536, rms_norm_eps=1e-5, dtype="bfloat16",
    ),
    "tiny": dict(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=1024, rms_norm_eps=1e-5, dtype="float32",
    ),
}
SYNTHETIC_PREFIX = "synthetic:"


@dataclass
class ExpertTensors:
    """One expert's weights in the checkpoint's orientation (``out x in``)."""

    w1: torch.Tensor  # gate  [I, H]
    w3: torch.Tensor  # up    [I, H]
    w2: torch.Tensor  # down  [H, I]


def expert_shapes(config: MixtralConfig) -> dict[str, tuple[int, int]]:
    h, i = config.hidden_size, config.intermediate_size
    return {"w1": (i, h), "w3": (i, h), "w2": (h, i)}


def check_mixtral_config(config, where: str) -> None:
    """Refuse configs that are not a Mixtral-style sparse MoE before anything is built."""
    if getattr(config, "model_type", None) != "mixtral":
        raise CheckpointError(
            f"{where}: model_type is {getattr(config, 'model_type', None)!r}, not 'mixtral'. "
            "The lab serves Mixtral-architecture MoE checkpoints (config.json with model_type 'mixtral', "
            "num_local_experts and num_experts_per_tok)."
        )
    e, k = getattr(config, "num_local_experts", None), getattr(config, "num_experts_per_tok", None)
    if not (isinstance(e, int) and isinstance(k, int) and 1 <= k <= e):
        raise CheckpointError(
            f"{where}: num_local_experts={e} and num_experts_per_tok={k} do not describe a sparse MoE "
            "(need 1 <= num_experts_per_tok <= num_local_experts)."
        )
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "vocab_size", "max_position_embeddings"):
        value = getattr(config, field, None)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise CheckpointError(f"{where}: {field}={value!r}; it must be a positive whole number")


class TensorSource(ABC):
    """A model's weights, read one tensor (or one expert) at a time."""

    config: MixtralConfig
    name: str
    path: Path | None = None

    @abstractmethod
    def dense(self, name: str) -> torch.Tensor:
        """The non-expert tensor with transformers' parameter name ``name``."""

    @abstractmethod
    def expert(self, layer: int, expert: int) -> ExpertTensors:
        """Expert ``expert`` of layer ``layer``."""

    def close(self) -> None:
        """Release open files."""


WEIGHT_DTYPES = ("BF16", "F16", "F32")  # safetensors' names; integer or float64 weights are a wrongly saved checkpoint


class SafetensorsCheckpoint(TensorSource):
    """A Hugging Face Mixtral folder: ``config.json`` and one or several ``*.safetensors``."""

    def __init__(self, path: str | Path, num_layers: int | None = None):
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(f"checkpoint folder {self.path} does not exist; pass --model a folder with "
                                  "config.json and *.safetensors, or synthetic:mixtral-8x7b")
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path} is a file; --model expects the checkpoint's folder")
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{self.path} has no config.json; is this a Hugging Face checkpoint folder?")
        try:
            raw = json.loads(config_file.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{config_file} is not valid JSON: {exc}") from exc
        check_mixtral_config(_Namespace(raw, str(config_file)), str(config_file))
        self.config = MixtralConfig.from_pretrained(self.path)
        if num_layers is not None:
            _shrink(self.config, num_layers)
        self.name = self.path.name
        self._stack = ExitStack()
        self._handles: dict[str, object] = {}
        self._files = self._index()
        self._check_tensors()

    # -- discovery ---------------------------------------------------------------------------
    def _index(self) -> dict[str, Path]:
        index_file = self.path / "model.safetensors.index.json"
        if index_file.is_file():
            try:
                weight_map = json.loads(index_file.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"{index_file} is malformed ({exc}); it needs a 'weight_map'") from exc
            files = {k: self.path / v for k, v in weight_map.items()}
            for f in set(files.values()):
                if not f.is_file():
                    raise CheckpointError(f"{index_file} names {f.name}, which is not in {self.path}")
            return files
        shards = sorted(self.path.glob("*.safetensors"))
        if not shards:
            raise CheckpointError(f"{self.path} has no *.safetensors files (and no model.safetensors.index.json)")
        files = {}
        for f in shards:
            for key in self._open(f).keys():
                files[key] = f
        return files

    def _open(self, file: Path):
        key = str(file)
        if key not in self._handles:
            try:
                self._handles[key] = self._stack.enter_context(safe_open(key, framework="pt", device="cpu"))
            except Exception as exc:  # safetensors raises its own error types
                raise CheckpointError(f"cannot read {file}: {exc}") from exc
        return self._handles[key]

    def _layout(self, layer: int) -> str:
        if f"model.layers.{layer}.mlp.experts.gate_up_proj" in self._files:
            return "fused"
        return "split"

    def _disk_name(self, name: str) -> str:
        """Map a transformers parameter name to the name this checkpoint stores it under."""
        if name in self._files:
            return name
        if ".mlp.gate." in name:
            alt = name.replace(".mlp.gate.", ".block_sparse_moe.gate.")
            if alt in self._files:
                return alt
        if name == "lm_head.weight" and self.config.tie_word_embeddings:
            return "model.embed_tokens.weight"
        return name

    def _shape(self, disk_name: str) -> tuple[int, ...]:
        if disk_name not in self._files:
            raise CheckpointError(
                f"tensor {disk_name!r} is missing from {self.path} ({len(set(self._files.values()))} safetensors "
                "file(s)); the checkpoint is incomplete or its layer count does not match config.json"
            )
        return tuple(self._open(self._files[disk_name]).get_slice(disk_name).get_shape())

    def _expect(self, disk_name: str, shape: tuple[int, ...]) -> None:
        got = self._shape(disk_name)
        dtype = self._open(self._files[disk_name]).get_slice(disk_name).get_dtype()
        if dtype not in WEIGHT_DTYPES:
            raise CheckpointError(
                f"tensor {disk_name!r} in {self.path} is stored as {dtype}; Mixtral weights must be "
                f"{', '.join(WEIGHT_DTYPES)}: save the checkpoint again from the model in one of those dtypes")
        if got != tuple(shape):
            raise CheckpointError(
                f"tensor {disk_name!r} in {self.path} has shape {list(got)}, but config.json implies "
                f"{list(shape)}; the weights and config.json do not belong together"
            )

    def _check_tensors(self) -> None:
        """Check every tensor's presence and shape from the file headers, before loading anything."""
        for name, shape in dense_shapes(self.config).items():
            self._expect(self._disk_name(name), shape)
        c, shapes = self.config, expert_shapes(self.config)
        for layer in range(c.num_hidden_layers):
            if self._layout(layer) == "fused":
                i, h, e = c.intermediate_size, c.hidden_size, c.num_local_experts
                self._expect(f"model.layers.{layer}.mlp.experts.gate_up_proj", (e, 2 * i, h))
                self._expect(f"model.layers.{layer}.mlp.experts.down_proj", (e, h, i))
            else:
                for e in range(c.num_local_experts):
                    for w, shape in shapes.items():
                        self._expect(self._split_name(layer, e, w), shape)

    @staticmethod
    def _split_name(layer: int, expert: int, w: str) -> str:
        return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{w}.weight"

    # -- reading -----------------------------------------------------------------------------
    def _read(self, disk_name: str) -> torch.Tensor:
        return self._open(self._files[disk_name]).get_tensor(disk_name)

    def dense(self, name: str) -> torch.Tensor:
        return self._read(self._disk_name(name))

    def expert(self, layer: int, expert: int) -> ExpertTensors:
        if self._layout(layer) == "fused":
            prefix = f"model.layers.{layer}.mlp.experts."
            gate_up = self._open(self._files[prefix + "gate_up_proj"]).get_slice(prefix + "gate_up_proj")[expert]
            down = self._open(self._files[prefix + "down_proj"]).get_slice(prefix + "down_proj")[expert]
            w1, w3 = gate_up.chunk(2, dim=0)
            return ExpertTensors(w1=w1, w3=w3, w2=down)
        return ExpertTensors(*(self._read(self._split_name(layer, expert, w)) for w in ("w1", "w3", "w2")))

    def close(self) -> None:
        self._handles.clear()
        self._stack.close()


class SyntheticSource(TensorSource):
    """Deterministic synthesized weights of a preset shape, generated on demand on ``device``.

    Timing does not depend on weight values, so full-size Mixtral runs use these. Each tensor
    is drawn from a generator seeded by (seed, tensor name), so any tensor can be produced on
    its own, in any order, and twice gives the same values on the same device type. Generating
    on the GPU keeps 8x7B's 45B expert parameters to seconds, where the CPU needs minutes.
    """

    def __init__(self, preset: str, num_layers: int | None = None, seed: int = 0,
                 device: str | torch.device = "cpu"):
        if preset not in PRESETS:
            raise CheckpointError(f"unknown synthetic preset {preset!r}; choose one of "
                                  + ", ".join(SYNTHETIC_PREFIX + p for p in PRESETS))
        self.config = MixtralConfig(**PRESETS[preset], eos_token_id=None, bos_token_id=None)
        self.config.rope_parameters = {"rope_type": "default", "rope_theta": 1e6}
        if num_layers is not None:
            _shrink(self.config, num_layers)
        self.name = SYNTHETIC_PREFIX + preset
        self.seed, self.device = seed, torch.device(device)
        self.dtype = getattr(torch, PRESETS[preset]["dtype"])
        self._shapes = dense_shapes(self.config)

    def _randn(self, key: str, shape: tuple[int, ...], std: float) -> torch.Tensor:
        gen = torch.Generator(device=self.device).manual_seed(zlib.crc32(f"{self.seed}:{key}".encode()))
        out = torch.empty(shape, dtype=self.dtype, device=self.device)
        return out.normal_(0.0, std, generator=gen)

    def dense(self, name: str) -> torch.Tensor:
        shape = self._shapes[name]
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            return torch.ones(shape, dtype=self.dtype, device=self.device)
        # Router weights get a larger spread so that routing is not nearly uniform.
        std = 0.1 if ".mlp.gate." in name else self.config.initializer_range
        return self._randn(name, shape, std)

    def expert(self, layer: int, expert: int) -> ExpertTensors:
        std = self.config.initializer_range
        return ExpertTensors(**{
            w: self._randn(f"layers.{layer}.experts.{expert}.{w}", shape, std)
            for w, shape in expert_shapes(self.config).items()
        })


def dense_shapes(config: MixtralConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of every non-expert parameter, by transformers' parameter name."""
    h, v, e = config.hidden_size, config.vocab_size, config.num_local_experts
    hd = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}."
        shapes.update({
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate.weight": (e, h),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        })
    return shapes


def open_source(model: str | Path, *, num_layers: int | None = None, seed: int = 0,
                synth_device: str | torch.device = "cpu") -> TensorSource:
    """Open ``synthetic:<preset>`` or a checkpoint folder."""
    text = str(model)
    if text.startswith(SYNTHETIC_PREFIX):
        return SyntheticSource(text[len(SYNTHETIC_PREFIX):], num_layers=num_layers, seed=seed, device=synth_device)
    return SafetensorsCheckpoint(text, num_layers=num_layers)


def _shrink(config: MixtralConfig, num_layers: int) -> None:
    if not 1 <= num_layers <= config.num_hidden_layers:
        raise CheckpointError(f"--num-layers {num_layers} is outside 1..{config.num_hidden_layers} for this model")
    config.num_hidden_layers = num_layers


class _Namespace:
    """Attribute view of a raw config dict, so the Mixtral check runs before transformers parses it."""

    def __init__(self, raw: dict, where: str = "config.json"):
        if not isinstance(raw, dict):
            raise CheckpointError(f"{where} holds a {type(raw).__name__}, not a JSON object of config fields; "
                                  "is this a Hugging Face config.json?")
        self.__dict__.update(raw)
