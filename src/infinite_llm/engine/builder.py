"""Assembling an engine from its config: the parts every backend shares, and the local
backend (every instance in this process). The Ray backend's builder is
``transport.ray.build_ray``; both end in ``assemble``."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import replace

import torch

from infinite_llm.attention.kv_cache import KVCache, num_blocks_for
from infinite_llm.config import EngineConfig, GraphConfig
from infinite_llm.core.cluster import Cluster
from infinite_llm.core.step import Runner
from infinite_llm.engine.device import torch_device, torch_dtype
from infinite_llm.engine.engine import LLMEngine
from infinite_llm.engine.host_memory import keep_freed_host_memory, trim_host_memory
from infinite_llm.engine.model_runner import ModelRunner, build_model
from infinite_llm.engine.sampler import Sampler
from infinite_llm.engine.structured import Grammars
from infinite_llm.memory.block_pool import Tiers
from infinite_llm.memory.gmanager import GManager
from infinite_llm.model.checkpoint import Checkpoint


def resolve_model_len(config: EngineConfig, checkpoint: Checkpoint) -> EngineConfig:
    """``max_model_len`` from the model's trained context when unset; beyond it only with
    ``allow_long_context`` (and a warning)."""
    trained = checkpoint.config.max_position_embeddings
    max_model_len = config.scheduler.max_model_len or trained
    if max_model_len > trained:
        if not config.allow_long_context:
            raise ValueError(
                f"max_model_len={max_model_len} exceeds the model's trained context of "
                f"{trained} tokens; pass allow_long_context=True to allow it anyway"
            )
        warnings.warn(
            f"max_model_len={max_model_len} is beyond the trained context ({trained}); "
            "outputs past it may degrade",
            stacklevel=2,
        )
    return replace(config, scheduler=replace(config.scheduler, max_model_len=max_model_len))


def blocks_per_instance(
    config: EngineConfig, checkpoint: Checkpoint, dtype: torch.dtype, device: torch.device
) -> Tiers:
    """How many KV blocks each instance's budgets hold (device, host); none is refused,
    and so is a host tier on a GPU (not built yet: its blocks would have to be pinned
    host memory that attention reads across the bus)."""
    tiers = num_blocks_for(checkpoint.config, config.cache, dtype)
    if tiers.device_blocks < 1:
        raise ValueError(
            f"kv_cache_memory={config.cache.kv_cache_memory} bytes holds no block of "
            f"{config.cache.block_size} tokens for this model"
        )
    if config.cache.host_kv_cache_memory and device.type != "cpu":
        raise ValueError(
            f"host_kv_cache_memory is supported on CPU instances only for now, not on "
            f"{device.type}; leave it at 0 there"
        )
    return tiers


def assemble(
    config: EngineConfig,
    checkpoint: Checkpoint,
    tiers: Tiers,
    runner: Runner,
    gmanager: GManager | None = None,
) -> LLMEngine:
    """The bookkeeping for ``tiers`` blocks per instance, and the engine over it and
    ``runner``; ``gmanager``: the cluster's when it lives elsewhere (a Ray actor's proxy)."""
    config = resolve_model_len(config, checkpoint)
    cluster = Cluster(
        tiers,
        config.cache,
        config.scheduler,
        config.pooling,
        config.parallel.instances,
        eos_token_ids=checkpoint.config.eos_token_ids,
        gmanager=gmanager if gmanager is not None else GManager(config=config.pooling),
    )
    return LLMEngine(config, checkpoint.config, checkpoint.tokenizer, cluster, runner)


def sampler_for(config: EngineConfig, checkpoint: Checkpoint) -> Sampler:
    """The sampler, seeded; with the model's tokenizer, it follows structured outputs."""
    grammars = None
    if checkpoint.tokenizer is not None:
        grammars = Grammars(checkpoint.tokenizer, checkpoint.config.vocab_size,
                            checkpoint.config.eos_token_ids)
    return Sampler(config.seed, grammars)


def graphs_on(config: EngineConfig, device: torch.device) -> GraphConfig | None:
    """How decode steps replay CUDA graphs on ``device`` (``EngineConfig.graphs``);
    torch.compile without a GPU is refused, before any weight is read."""
    if config.enable_torch_compile and device.type != "cuda":
        raise ValueError(
            f"enable_torch_compile compiles the decode steps replayed from CUDA graphs: it "
            f"needs a CUDA device, and the instances are on {device.type}"
        )
    return config.graphs


def build_local(config: EngineConfig, load: Callable[[], Checkpoint]) -> LLMEngine:
    """Every instance in this process: one model, one KV cache per instance. A device
    that is not there is refused before ``load`` reads any weight."""
    device = torch_device(config.device)
    graphs = graphs_on(config, device)
    dtype = torch_dtype(config.dtype, device)
    checkpoint = load()
    tiers = blocks_per_instance(config, checkpoint, dtype, device)
    if device.type == "cpu":
        keep_freed_host_memory()
    model = build_model(checkpoint, dtype, device)
    whole, kv_caches = KVCache.joined(checkpoint.config, tiers.total, config.cache.block_size,
                                      dtype, device, config.parallel.instances)
    if device.type == "cpu":
        trim_host_memory()  # what loading freed goes back (only what steps free is kept)
    runner = ModelRunner(model, kv_caches, sampler_for(config, checkpoint), whole, graphs)
    return assemble(config, checkpoint, tiers, runner)
