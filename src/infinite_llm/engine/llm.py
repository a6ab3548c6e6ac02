"""The offline API, as vLLM users know it: ``LLM(model=...).generate(prompts, params)``."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import replace

from tqdm.auto import tqdm

from infinite_llm.config import (
    CacheConfig,
    PoolingConfig,
    RayConfig,
    SchedulerConfig,
    parse_memory_size,
)
from infinite_llm.engine.chat import Message, chat_prompt
from infinite_llm.engine.device import torch_device, torch_dtype
from infinite_llm.engine.engine import LLMEngine
from infinite_llm.engine.host_memory import keep_freed_host_memory
from infinite_llm.engine.model_runner import ModelRunner, Runner, build_model
from infinite_llm.engine.outputs import RequestOutput
from infinite_llm.engine.sampler import Sampler
from infinite_llm.engine.sampling_params import SamplingParams
from infinite_llm.memory.kv_cache import KVCache, num_blocks_for
from infinite_llm.model.checkpoint import load_checkpoint
from infinite_llm.model.tokenizer import Tokenizer

Prompt = str | list[int]


class LLM:
    """Load a model and generate from batches of prompts.

    ``model`` is a built-in name (``"smollm2"``), a ``.gguf`` file or a Hugging Face
    model directory. ``instances`` model replicas run in this process, each with its own
    KV pool of ``kv_cache_memory`` (bytes or "256MiB"). With ``kv_pooling`` (the default)
    the pools form one: an instance short of blocks borrows from the others, each lending
    at most ``max_lend_fraction`` of its pool, so one request can hold far more KV than one
    instance has. ``kv_pooling=False`` gives isolated replicas. ``backend="ray"`` runs
    each instance as a Ray actor and the gManager as a named one (joining
    ``ray_address``, or a local Ray started here); the default ``"local"`` runs them all
    in this process.
    ``device`` is ``"auto"`` (a GPU when there is one, else the CPU), ``"cpu"``,
    ``"cuda"`` or ``"cuda:N"``; with Ray, ``"auto"`` gives each instance actor a GPU of
    its own when the Ray cluster has one per instance (a share of one otherwise) and the
    CPU when it has none. ``dtype="auto"`` is float32 on CPU and bfloat16 on GPU.
    ``max_model_len`` defaults to the model's trained context; a larger value is
    refused unless ``allow_long_context=True``, which only warns.
    ``max_num_batched_tokens`` defaults to 8192 as in vLLM's offline ``LLM``: large
    prefill steps keep the matrix products efficient, and prompts that fit one step
    take the mask-free causal path.
    """

    def __init__(
        self,
        model: str,
        *,
        dtype: str = "auto",
        device: str = "auto",
        kv_cache_memory: int | str = "1GiB",
        block_size: int = 16,
        max_num_batched_tokens: int = 8192,
        max_num_seqs: int = 256,
        max_model_len: int | None = None,
        allow_long_context: bool = False,
        seed: int | None = 0,
        instances: int = 1,
        kv_pooling: bool = True,
        max_lend_fraction: float = PoolingConfig.max_lend_fraction,
        backend: str = "local",
        ray_address: str | None = None,
        ray_config: RayConfig | None = None,
    ) -> None:
        # Cheap checks first, so a typo fails before seconds of loading.
        cache = CacheConfig(parse_memory_size(kv_cache_memory), block_size)
        pooling = PoolingConfig(enabled=kv_pooling, max_lend_fraction=max_lend_fraction)
        if not isinstance(instances, int) or instances < 1:
            raise ValueError(f"instances must be a positive int, got {instances!r}")
        if backend not in ("local", "ray"):
            raise ValueError(f"backend must be 'local' or 'ray', got {backend!r}")
        torch_dtype(dtype)  # a bad name fails here, before loading
        if backend == "local":
            where = torch_device(device)
        checkpoint = load_checkpoint(model)
        trained = checkpoint.config.max_position_embeddings
        max_model_len = max_model_len or trained
        if max_model_len > trained:
            if not allow_long_context:
                raise ValueError(
                    f"max_model_len={max_model_len} exceeds the model's trained context of "
                    f"{trained} tokens; pass allow_long_context=True to allow it anyway"
                )
            warnings.warn(
                f"max_model_len={max_model_len} is beyond the trained context ({trained}); "
                "outputs past it may degrade",
                stacklevel=2,
            )
        if backend == "ray":
            from infinite_llm.transport.ray import RayRunner

            # Joins (or starts) Ray and sees what devices it offers; no actor yet.
            ray_runner = RayRunner(ray_config or RayConfig(address=ray_address), device, instances)
            where = ray_runner.device
        weight_dtype = torch_dtype(dtype, where)
        num_blocks = num_blocks_for(checkpoint.config, cache, weight_dtype)
        if num_blocks < 1:
            if backend == "ray":
                ray_runner.shutdown()
            raise ValueError(
                f"kv_cache_memory={cache.kv_cache_memory} bytes holds no block of "
                f"{cache.block_size} tokens for this model"
            )
        if backend == "local":
            if where.type == "cpu":
                keep_freed_host_memory()
            module = build_model(checkpoint, weight_dtype, where)
            kv_caches = {
                i: KVCache(checkpoint.config, num_blocks, cache.block_size, weight_dtype, where)
                for i in range(instances)
            }
            runner: Runner = ModelRunner(module, kv_caches, Sampler(seed))
            gmanager = None  # the cluster makes a plain GManager
        else:
            try:
                ray_runner.start(
                    model, weight_dtype, num_blocks, cache.block_size, Sampler(seed), pooling
                )
            except BaseException:
                ray_runner.shutdown()
                raise
            runner, gmanager = ray_runner, ray_runner.gmanager  # a proxy to the gManager actor
        self.tokenizer: Tokenizer | None = checkpoint.tokenizer
        self.engine = LLMEngine(
            checkpoint.config,
            checkpoint.tokenizer,
            cache,
            SchedulerConfig(max_num_batched_tokens, max_num_seqs, max_model_len),
            runner,
            num_blocks,
            instances=instances,
            pooling=pooling,
            gmanager=gmanager,
        )

    def get_tokenizer(self) -> Tokenizer | None:
        return self.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); outputs in the prompts' order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        params = _params_per_prompt(sampling_params, len(prompts))

        # Validate every prompt before any runs, so a bad one leaves nothing queued.
        added: list[list[str]] = []
        try:
            for prompt, p in zip(prompts, params):
                added.append([self._add(prompt, child) for child in p.samples()])
        except ValueError:
            for ids in added:
                for request_id in ids:
                    self.engine.abort_request(request_id)
            raise
        finals = self._run(sum(len(ids) for ids in added), use_tqdm)
        results = []
        for ids in added:
            first = finals[ids[0]]
            outputs = [replace(finals[rid].outputs[0], index=i) for i, rid in enumerate(ids)]
            results.append(RequestOutput(first.request_id, first.prompt, first.prompt_token_ids, outputs, True))
        return results

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, with the model's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.chat_prompt(c) for c in conversations]
        outputs = self.generate([ids for _, ids in prompts], sampling_params, use_tqdm)
        for output, (text, _) in zip(outputs, prompts):
            output.prompt = text
        return outputs

    def chat_prompt(self, messages: list[Message]) -> tuple[str, list[int]]:
        """A conversation rendered with the model's chat template, as text and token ids."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer, so no chat template")
        return chat_prompt(self.tokenizer, messages)

    def stream(self, prompt: Prompt, params: SamplingParams) -> Iterator[RequestOutput]:
        """Outputs of one request as it advances; aborts the request if the caller stops early."""
        request_id = self._add(prompt, params)
        try:
            while True:
                for output in self.engine.step():
                    if output.request_id == request_id:
                        yield output
                        if output.finished:
                            return
        finally:
            self.engine.abort_request(request_id)

    def _add(self, prompt: Prompt, params: SamplingParams) -> str:
        return self.engine.add_request(prompt, params).request_id

    def _run(self, total: int, use_tqdm: bool) -> dict[str, RequestOutput]:
        finals: dict[str, RequestOutput] = {}
        with tqdm(total=total, desc="Generating", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    if output.finished:
                        finals[output.request_id] = output
                        bar.update(1)
        return finals


def _params_per_prompt(
    params: SamplingParams | Sequence[SamplingParams] | None, count: int
) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * count
    if isinstance(params, SamplingParams):
        return [params] * count
    params = list(params)
    if len(params) != count:
        raise ValueError(f"got {len(params)} sampling params for {count} prompts")
    return params
