"""What the simulator knows about hardware it does not have: a GPU's data-sheet numbers
(``DeviceSpec``, from the packaged ``devices/*.json``) and a Llama-style decoder's shape
(``ModelShape``, from the packaged ``models/*.json`` or any Hugging Face ``config.json``).
``roofline.Roofline`` turns the two into step times and KV capacity. No torch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

_PACKAGE = "infinite_llm.sim"


def _packaged(folder: str) -> Traversable:
    return files(_PACKAGE) / folder


def _names(folder: str) -> tuple[str, ...]:
    """The sorted stems of the ``*.json`` files in one of the package's data folders."""
    return tuple(sorted(
        entry.name.removesuffix(".json") for entry in _packaged(folder).iterdir()
        if entry.name.endswith(".json")
    ))


DEVICES: tuple[str, ...] = _names("devices")
MODELS: tuple[str, ...] = _names("models")


@dataclass(frozen=True)
class DeviceSpec:
    """One GPU as its data sheet states it, in SI units (bytes, seconds, FLOP/s)."""

    name: str
    memory_bytes: float  # HBM capacity of one GPU
    peak_flops: float  # dense BF16/FP16 tensor FLOP/s, without sparsity
    memory_bytes_per_s: float  # HBM bandwidth
    gpus_per_node: int  # GPUs that share the fast intra-node link
    intra_node_bytes_per_s: float  # NVLink bandwidth per GPU, one direction
    intra_node_latency_s: float  # one NVLink message's fixed cost
    inter_node_bytes_per_s: float  # network bandwidth per GPU (its NIC), one direction
    inter_node_latency_s: float  # one network message's fixed cost
    compute_efficiency: float  # fraction of peak_flops a real kernel reaches
    memory_efficiency: float  # fraction of memory_bytes_per_s a real kernel reaches
    source: str  # where each number comes from

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("name", "source"):
                if not isinstance(value, str) or not value:
                    raise ValueError(f"{f.name} must be a non-empty string, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{f.name} must be a number, got {value!r}")
            elif not (math.isfinite(value) and value > 0):
                raise ValueError(f"{f.name} must be positive, got {value!r}")
        if self.gpus_per_node != int(self.gpus_per_node):
            raise ValueError(f"gpus_per_node must be a whole number, got {self.gpus_per_node!r}")
        for name in ("compute_efficiency", "memory_efficiency"):
            if not getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)!r}")


def device_spec(name: str) -> DeviceSpec:
    """The packaged device ``name`` (one of ``DEVICES``), read and validated."""
    if name not in DEVICES:
        raise ValueError(f"unknown device {name!r}; known devices: {', '.join(DEVICES)}")
    where = f"devices/{name}.json"
    data = _read_json(_packaged("devices") / f"{name}.json", where)
    wanted = {f.name for f in fields(DeviceSpec)}
    missing = sorted(wanted - data.keys())
    if missing:
        raise ValueError(f"{where}: missing key {missing[0]!r}")
    unknown = sorted(data.keys() - wanted)
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}")
    try:
        return DeviceSpec(**data)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Llama-style decoder (RMSNorm, grouped-query attention, a gated MLP,
    an untied lm_head) that decide its compute, weight and KV-cache cost."""

    name: str
    layers: int
    hidden: int
    heads: int  # query heads
    kv_heads: int  # key/value heads (== heads without grouped-query attention)
    head_dim: int
    intermediate: int  # the MLP's inner width
    vocab: int
    dtype_bytes: int  # bytes of one weight and one cached K or V element

    def __post_init__(self) -> None:
        for name in ("layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate",
                     "vocab", "dtype_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of "
                             f"kv_heads ({self.kv_heads})")

    @property
    def _layer_matmul_params(self) -> int:
        """Weights one layer's token multiplies: q, k, v, o projections and the MLP."""
        q = self.heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        attention = self.hidden * q + 2 * self.hidden * kv + q * self.hidden
        return attention + 3 * self.hidden * self.intermediate

    @property
    def params(self) -> int:
        """All parameters: embeddings, the layers (projections, MLP, two RMSNorms), the
        final RMSNorm and the (untied) lm_head."""
        per_layer = self._layer_matmul_params + 2 * self.hidden
        return 2 * self.vocab * self.hidden + self.layers * per_layer + self.hidden

    @property
    def weight_bytes(self) -> int:
        return self.params * self.dtype_bytes

    @property
    def matmul_flops_per_token(self) -> int:
        """FLOPs of one token's matrix products (a multiply and an add per weight): every
        layer's projections and MLP and the lm_head; the embedding is a lookup."""
        return 2 * (self.layers * self._layer_matmul_params + self.vocab * self.hidden)

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes one token's keys and values take in the cache, all layers."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def attention_flops_per_pair(self) -> int:
        """FLOPs of one (query, key) pair's attention, all layers and heads: its score
        (QK^T) and its share of the weighted sum of values (PV), 2 * head_dim each."""
        return 4 * self.layers * self.heads * self.head_dim


_DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


def model_shape(name_or_path: str) -> ModelShape:
    """A packaged model (one of ``MODELS``), or a Hugging Face ``config.json``: the file
    itself or the directory that holds it."""
    if name_or_path in MODELS:
        where = f"models/{name_or_path}.json"
        data = _read_json(_packaged("models") / f"{name_or_path}.json", where)
        return _shape_from_config(name_or_path, data, where)
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"unknown model {name_or_path!r}: neither a known model "
                         f"({', '.join(MODELS)}) nor a config.json file or directory")
    name = path.parent.name if path.name == "config.json" else path.stem
    return _shape_from_config(name or str(path), _read_json(path, str(path)), str(path))


def _shape_from_config(name: str, config: dict[str, Any], where: str) -> ModelShape:
    def need(key: str) -> Any:
        if key not in config:
            raise ValueError(f"{where}: missing key {key!r}")
        return config[key]

    layers = need("num_hidden_layers")
    hidden = need("hidden_size")
    heads = need("num_attention_heads")
    intermediate = need("intermediate_size")
    vocab = need("vocab_size")
    dtype = config.get("torch_dtype", config.get("dtype")) or "float16"
    if not isinstance(dtype, str) or dtype not in _DTYPE_BYTES:
        raise ValueError(f"{where}: unsupported torch_dtype {dtype!r} "
                         f"(known: {', '.join(_DTYPE_BYTES)})")
    try:
        return ModelShape(
            name=name,
            layers=layers,
            hidden=hidden,
            heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or hidden // heads,
            intermediate=intermediate,
            vocab=vocab,
            dtype_bytes=_DTYPE_BYTES[dtype],
        )
    except (TypeError, ZeroDivisionError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from e


def _read_json(source: Traversable | Path, where: str) -> dict[str, Any]:
    try:
        data = json.loads(source.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object")
    return data
