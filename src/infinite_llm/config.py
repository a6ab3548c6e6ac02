"""Every configuration of the engine, as frozen dataclasses validated once."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from typing import Any

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


def parse_memory_size(value: int | str, allow_zero: bool = False) -> int:
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
    if size < 0 or (size == 0 and not allow_zero):
        raise ValueError(f"memory size must be positive, got {value!r}")
    return size


def format_memory_size(size: int) -> str:
    """``1073741824`` -> ``"1GiB"``: the largest binary unit that divides it."""
    for unit, name in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if size % unit == 0:
            return f"{size // unit}{name}"
    return str(size)


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
    """The KV block pool of one instance: device memory, and optionally a tier in host
    memory used after every instance's device memory (a separate budget on a CPU-only
    machine)."""

    kv_cache_memory: int = 1 << 30  # bytes
    block_size: int = 16
    host_kv_cache_memory: int = 0  # bytes; 0: no host tier

    def __post_init__(self) -> None:
        for name in ("kv_cache_memory", "block_size", "host_kv_cache_memory"):
            value = getattr(self, name)
            least = 0 if name == "host_kv_cache_memory" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                kind = "an int >= 0" if least == 0 else "a positive int"
                raise ValueError(f"{name} must be {kind}, got {value!r}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Per-step limits of one instance's scheduler, and the longest request."""

    # Token budget of one step (prefill chunks + decodes). 8192 as vLLM's offline LLM:
    # large prefill steps keep the matrix products efficient, and prompts that fit one
    # step take the mask-free causal path.
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256  # requests running at once
    max_model_len: int | None = None  # prompt + output tokens of one request; None: the model's
    # Admission keeps room for this share of every running and admitted request's
    # remaining max_tokens (at least a block each): 0 admits as vLLM does (a block of
    # headroom each, preempting when outputs grow), 1 never preempts a request that
    # runs to max_tokens.
    admission_output_reserve: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.admission_output_reserve <= 1.0:  # also refuses NaN
            raise ValueError(
                f"admission_output_reserve must be in [0, 1], got {self.admission_output_reserve!r}"
            )
        for name in ("max_num_batched_tokens", "max_num_seqs", "max_model_len"):
            value = getattr(self, name)
            if value is None and name == "max_model_len":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")


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
    # Live migration: KV tokens copied per step, cluster-wide (whole blocks, at least
    # one), and how many steps a reservation on the target lives before it is let go.
    migration_tokens_per_step: int = 16
    migration_lease_steps: int = 64
    # DGFM (recalls, debt cycles cancelled) every this many steps; 0: off.
    dgfm_period: int = 0
    # The greedy planner every this many steps (0: off), predicting with the cost model
    # that `infinite-llm profile` wrote to this file.
    planner_period: int = 0
    cost_model: str | None = None

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
        for name in ("migration_tokens_per_step", "migration_lease_steps", "dgfm_period",
                     "planner_period"):
            value = getattr(self, name)
            least = 0 if name in ("dgfm_period", "planner_period") else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
        if self.planner_period and not self.cost_model:
            raise ValueError(
                "the planner predicts with a cost model: pass cost_model, the file that "
                "`infinite-llm profile` writes"
            )


@dataclass(frozen=True)
class RayConfig:
    """The Ray backend: which cluster to join and when an instance counts as dead.

    Before each step, and every ``heartbeat_timeout_s`` while one runs, the driver pings
    every actor; one that does not answer within ``heartbeat_timeout_s`` misses a
    heartbeat, and after ``max_missed_heartbeats`` in a row it is declared dead (killed,
    and its requests recovered), as when Ray itself reports the actor died. An actor that
    answers but whose step runs past its deadline while it computes (not waiting on a
    peer in an exchange) is stuck and declared dead the same way: the deadline is
    ``step_timeout_factor`` times the step's expected time (its tokens at the slowest
    pace per token of the recent steps), and never under ``step_timeout_min_s``.
    """

    address: str | None = None  # None: a private local Ray on 127.0.0.1
    heartbeat_timeout_s: float = 5.0
    max_missed_heartbeats: int = 3
    step_timeout_factor: float = 20.0
    step_timeout_min_s: float = 30.0

    def __post_init__(self) -> None:
        if not self.heartbeat_timeout_s > 0:
            raise ValueError(f"heartbeat_timeout_s must be positive, got {self.heartbeat_timeout_s}")
        if self.max_missed_heartbeats < 1:
            raise ValueError(
                f"max_missed_heartbeats must be at least 1, got {self.max_missed_heartbeats}"
            )
        if not self.step_timeout_factor >= 1:
            raise ValueError(
                f"step_timeout_factor must be at least 1, got {self.step_timeout_factor}")
        if not self.step_timeout_min_s > 0:
            raise ValueError(
                f"step_timeout_min_s must be positive, got {self.step_timeout_min_s}")


BACKENDS = ("local", "ray")


@dataclass(frozen=True)
class ParallelConfig:
    """How many instances there are, and where they run: all in this process
    (``local``) or one Ray actor each (``ray``)."""

    instances: int = 1
    backend: str = "local"
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        if isinstance(self.instances, bool) or not isinstance(self.instances, int) or self.instances < 1:
            raise ValueError(f"instances must be a positive int, got {self.instances!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {self.backend!r}")


@dataclass(frozen=True)
class ServerConfig:
    """What the server needs beyond the engine.

    ``served_model_names``: the names clients may ask for; the first is the one
    responses carry. ``api_key``: when set, every /v1, /tokenize and /detokenize call
    must send ``Authorization: Bearer <key>``. ``max_body_bytes``: larger request bodies
    get a 413. ``drain_timeout``: seconds a shutdown waits for in-flight requests before
    aborting them. ``host``, ``port``: where it listens (loopback unless told otherwise);
    ``log_level``: uvicorn's.

    What one request may ask for (a 400 beyond): ``max_prompt_chars``, characters of a
    text prompt or conversation (None: as many as the context could hold at the
    vocabulary's longest token each); ``max_completions_per_request``, prompts x n;
    ``max_output_tokens_per_request``, max_tokens summed over its completions;
    ``max_stop_strings`` and ``max_stop_string_chars``.

    Connections: ``max_connections`` open at once (more get 503);
    ``timeout_keep_alive``, seconds an idle keep-alive connection stays open;
    ``request_read_timeout``, seconds a client may take to send a whole body (then 408).
    """

    served_model_names: tuple[str, ...]
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "info"
    model_path: str = ""
    api_key: str | None = None
    max_body_bytes: int = 16 << 20
    drain_timeout: float = 30.0
    max_prompt_chars: int | None = None
    max_completions_per_request: int = 256
    max_output_tokens_per_request: int = 1 << 20
    max_stop_strings: int = 64
    max_stop_string_chars: int = 1024
    max_connections: int = 1024
    timeout_keep_alive: float = 5.0
    request_read_timeout: float = 30.0

    def __post_init__(self) -> None:
        if not self.served_model_names or not all(self.served_model_names):
            raise ValueError("served_model_names needs at least one non-empty name")
        if self.api_key == "":
            raise ValueError("api_key must not be empty (leave it unset for no key)")
        if self.max_body_bytes <= 0:
            raise ValueError(f"max_body_bytes must be positive, got {self.max_body_bytes}")
        if not self.drain_timeout >= 0:
            raise ValueError(f"drain_timeout must be >= 0, got {self.drain_timeout}")
        for name in ("max_completions_per_request", "max_output_tokens_per_request",
                     "max_stop_string_chars", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_stop_strings < 0:
            raise ValueError(f"max_stop_strings must be >= 0, got {self.max_stop_strings}")
        if self.max_prompt_chars is not None and self.max_prompt_chars < 1:
            raise ValueError(f"max_prompt_chars must be at least 1, got {self.max_prompt_chars}")
        for name in ("timeout_keep_alive", "request_read_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]


def _integrity_default() -> bool:
    # Read when a config is made, not at import: the test suite turns it on for every engine.
    return os.environ.get("INFINITE_LLM_CHECK_INTEGRITY", "0") not in ("", "0")


@dataclass(frozen=True)
class GraphConfig:
    """How decode steps are replayed from CUDA graphs on a GPU (``engine/decode_graphs.py``)."""

    max_batch: int  # the largest decode batch with a graph of its own
    torch_compile: bool  # each step compiled by torch.compile before its graph is captured


@dataclass(frozen=True)
class EngineConfig:
    """Everything an engine is built from, each default stated here once. ``LLM``, the
    command line and the server take the flat option names of ``OPTIONS``."""

    model: str  # a built-in name (smollm2), a .gguf file or a Hugging Face directory
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16; auto: float32 on CPU, bf16 on GPU
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int | None = 0  # the engine's sampling seed (requests may bring their own)
    allow_long_context: bool = False  # max_model_len beyond the trained context only warns
    # On a GPU, never replay decode steps from CUDA graphs: every step op by op.
    enforce_eager: bool = False
    # On a GPU, compile each decode step with torch.compile before capturing its graph.
    enable_torch_compile: bool = False
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    pooling: PoolingConfig = field(default_factory=PoolingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # Debug: check every pool, table and the ledger whenever the engine goes idle.
    check_integrity: bool = field(default_factory=_integrity_default)

    def __post_init__(self) -> None:
        if self.enable_torch_compile and self.enforce_eager:
            raise ValueError("enable_torch_compile compiles the decode steps replayed from "
                             "CUDA graphs; enforce_eager turns those off: choose one")

    @property
    def graphs(self) -> GraphConfig | None:
        """How decode steps are replayed from CUDA graphs on a GPU (None: never)."""
        if self.enforce_eager:
            return None
        return GraphConfig(self.scheduler.max_num_seqs, self.enable_torch_compile)

    @staticmethod
    def from_options(model: str, **options: Any) -> EngineConfig:
        """A config from flat options (``kv_cache_memory="256MiB"``, ``instances=4``, ...);
        an unknown name or a bad value is refused with what is allowed."""
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise TypeError(
                f"unknown option(s) {', '.join(unknown)}; the options are: {', '.join(OPTIONS)}"
            )
        for name in ("kv_cache_memory", "host_kv_cache_memory"):
            if name in options:
                try:
                    options[name] = parse_memory_size(options[name], name.startswith("host"))
                except ValueError as error:
                    raise ValueError(f"{name}: {error}") from None
        changes: dict[str, Any] = {}  # nested by section, so each is validated whole
        for name, value in options.items():
            *sections, leaf = OPTIONS[name].split(".")
            node = changes
            for section in sections:
                node = node.setdefault(section, {})
            node[leaf] = value
        return _replace_nested(EngineConfig(model), changes)


def _replace_nested(obj: Any, changes: dict[str, Any]) -> Any:
    return replace(obj, **{
        name: _replace_nested(getattr(obj, name), value) if isinstance(value, dict) else value
        for name, value in changes.items()
    })


# The flat option names users write (LLM keyword arguments, command-line flags) and
# where each lives in ``EngineConfig``.
OPTIONS = {
    "dtype": "dtype",
    "device": "device",
    "seed": "seed",
    "allow_long_context": "allow_long_context",
    "enforce_eager": "enforce_eager",
    "enable_torch_compile": "enable_torch_compile",
    "kv_cache_memory": "cache.kv_cache_memory",
    "host_kv_cache_memory": "cache.host_kv_cache_memory",
    "block_size": "cache.block_size",
    "max_num_batched_tokens": "scheduler.max_num_batched_tokens",
    "max_num_seqs": "scheduler.max_num_seqs",
    "max_model_len": "scheduler.max_model_len",
    "admission_output_reserve": "scheduler.admission_output_reserve",
    "instances": "parallel.instances",
    "backend": "parallel.backend",
    "ray_address": "parallel.ray.address",
    "heartbeat_timeout_s": "parallel.ray.heartbeat_timeout_s",
    "max_missed_heartbeats": "parallel.ray.max_missed_heartbeats",
    "step_timeout_factor": "parallel.ray.step_timeout_factor",
    "step_timeout_min_s": "parallel.ray.step_timeout_min_s",
    "kv_pooling": "pooling.enabled",
    "max_lend_fraction": "pooling.max_lend_fraction",
    "migration_tokens_per_step": "pooling.migration_tokens_per_step",
    "dgfm_period": "pooling.dgfm_period",
    "planner_period": "pooling.planner_period",
    "cost_model": "pooling.cost_model",
    "check_integrity": "check_integrity",
}


def option_default(name: str) -> Any:
    """The default of a flat option, read from the dataclasses above."""
    value: Any = EngineConfig("")
    for part in OPTIONS[name].split("."):
        value = getattr(value, part)
    return value
