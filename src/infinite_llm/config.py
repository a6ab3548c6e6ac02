"""Every configuration of the engine, as frozen dataclasses validated once."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1 << 10,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1 << 20,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1 << 30,
}


def parse_memory_size(value: int | str) -> int:
    """Bytes from an int or a string such as ``"256MiB"``, ``"1.5GiB"`` or ``"4096"``."""
    if isinstance(value, bool):
        raise ValueError(f"memory size must be an int or a string, got {value!r}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _SIZE_UNITS:
            raise ValueError(
                f"cannot parse memory size {value!r}: use bytes or a number with a unit "
                f"such as '256MiB' or '2GB'"
            )
        size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    else:
        raise ValueError(f"memory size must be an int or a string, got {type(value).__name__}")
    if size <= 0:
        raise ValueError(f"memory size must be positive, got {value!r}")
    return size


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling as found in checkpoints (``rope_scaling`` in HF configs)."""

    rope_type: str = "default"  # default | linear | llama3 | dynamic is not supported
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-family decoder (Llama 2/3, SmolLM, Qwen2, Mistral without SWA)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v bias, as in Qwen2
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V one token takes over all layers, per element byte."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim


@dataclass(frozen=True)
class CacheConfig:
    """The KV block pool of one instance."""

    kv_cache_memory: int  # bytes
    block_size: int = 16

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be positive, got {self.kv_cache_memory}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Per-step limits of one instance's scheduler."""

    max_num_batched_tokens: int = 2048  # token budget of one step (prefill chunks + decodes)
    max_num_seqs: int = 256  # requests running at once
    max_model_len: int = 2048  # prompt + output tokens of one request

    def __post_init__(self) -> None:
        for name in ("max_num_batched_tokens", "max_num_seqs", "max_model_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass(frozen=True)
class PoolingConfig:
    """How an instance shares its KV pool with the rest of the cluster.

    Lending is capped twice so that a generous creditor cannot starve its own requests:
    at most ``max_lend_fraction`` of its capacity is ever lent out, and a lend never
    leaves fewer than ``reserve_blocks`` free (headroom for its own requests' growth).
    """

    enabled: bool = True  # False: isolated instances that never lend or borrow
    max_lend_fraction: float = 0.5  # of capacity, lent out at most
    reserve_blocks: int = 0  # free blocks a lend must leave behind

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ValueError(f"enabled must be a bool, got {self.enabled!r}")
        if not 0.0 <= self.max_lend_fraction <= 1.0:  # also refuses NaN
            raise ValueError(
                f"max_lend_fraction must be in [0, 1], got {self.max_lend_fraction!r}"
            )
        if isinstance(self.reserve_blocks, bool) or not isinstance(self.reserve_blocks, int):
            raise ValueError(f"reserve_blocks must be an int, got {self.reserve_blocks!r}")
        if self.reserve_blocks < 0:
            raise ValueError(f"reserve_blocks must be >= 0, got {self.reserve_blocks}")


@dataclass(frozen=True)
class RayConfig:
    """The Ray backend: which cluster to join and when an instance counts as dead.

    Before each step the driver pings every actor; one that does not answer within
    ``heartbeat_timeout_s`` misses a heartbeat, and after ``max_missed_heartbeats`` in a
    row it is declared dead (killed, and its requests recovered), as when Ray itself
    reports the actor died.
    """

    address: str | None = None  # None: a private local Ray on 127.0.0.1
    heartbeat_timeout_s: float = 5.0
    max_missed_heartbeats: int = 3

    def __post_init__(self) -> None:
        if not self.heartbeat_timeout_s > 0:
            raise ValueError(f"heartbeat_timeout_s must be positive, got {self.heartbeat_timeout_s}")
        if self.max_missed_heartbeats < 1:
            raise ValueError(
                f"max_missed_heartbeats must be at least 1, got {self.max_missed_heartbeats}"
            )
