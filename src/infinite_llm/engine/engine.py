"""The engine of one instance: add requests, step (schedule, execute, update), abort."""

from __future__ import annotations

import itertools
import logging
from typing import TYPE_CHECKING

import torch

from infinite_llm.config import CacheConfig, ModelConfig, SchedulerConfig
from infinite_llm.engine.detokenizer import Detokenizer
from infinite_llm.engine.model_runner import ModelRunner
from infinite_llm.engine.outputs import CompletionOutput, RequestOutput
from infinite_llm.engine.request import Request
from infinite_llm.engine.sampler import SampledToken, Sampler
from infinite_llm.engine.sampling_params import SamplingParams
from infinite_llm.engine.scheduler import Scheduler
from infinite_llm.memory.block_pool import BlockPool
from infinite_llm.memory.kv_cache import KVCache, num_blocks_for
from infinite_llm.model.llama import LlamaForCausalLM

if TYPE_CHECKING:
    from infinite_llm.model.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(
        self,
        model: LlamaForCausalLM,
        tokenizer: Tokenizer | None,
        cache: CacheConfig,
        scheduler: SchedulerConfig,
        seed: int | None = 0,
    ) -> None:
        self.model_config: ModelConfig = model.config
        self.tokenizer = tokenizer
        self.scheduler_config = scheduler
        dtype = next(model.parameters()).dtype
        num_blocks = num_blocks_for(model.config, cache, dtype)
        if num_blocks < 1:
            raise ValueError(
                f"kv_cache_memory={cache.kv_cache_memory} bytes holds no block of "
                f"{cache.block_size} tokens for this model"
            )
        self.block_size = cache.block_size
        self.pool = BlockPool(num_blocks)
        self.scheduler = Scheduler(scheduler, self.pool, cache.block_size)
        kv_cache = KVCache(model.config, num_blocks, cache.block_size, dtype)
        self.runner = ModelRunner(model, kv_cache, Sampler(seed))
        self.requests: dict[str, Request] = {}
        self._detokenizers: dict[str, Detokenizer] = {}
        self._logprobs: dict[str, list[dict[int, float]]] = {}
        self._ids = itertools.count()
        logger.info(
            "KV cache: %d blocks of %d tokens = %d tokens",
            num_blocks, cache.block_size, self.capacity_tokens,
        )

    @property
    def capacity_tokens(self) -> int:
        return self.pool.num_blocks * self.block_size

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None = None,
    ) -> Request:
        """Validate and queue a request; raises ValueError and changes nothing if it is bad."""
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, token_ids = self._tokenize(prompt)
        max_tokens = self._check_lengths(len(token_ids), params)
        if params.stop_strings and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer, and this model has none")
        request = Request(request_id, token_ids, params, max_tokens, prompt=text)
        self.requests[request_id] = request
        if self.tokenizer is not None:
            self._detokenizers[request_id] = Detokenizer(
                self.tokenizer, params.stop_strings, params.skip_special_tokens
            )
        if params.logprobs is not None:
            self._logprobs[request_id] = []
        self.scheduler.add(request)
        return request

    def _tokenize(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompts as token-id lists")
            return prompt, self.tokenizer.encode(prompt)
        token_ids = list(prompt)
        vocab = self.model_config.vocab_size
        if not all(isinstance(t, int) and 0 <= t < vocab for t in token_ids):
            raise ValueError(f"prompt token ids must be ints in [0, {vocab})")
        return None, token_ids

    def _check_lengths(self, num_prompt: int, params: SamplingParams) -> int:
        """The request's max_tokens, after checking it fits the context and the KV cache."""
        max_len = self.scheduler_config.max_model_len
        if num_prompt == 0:
            raise ValueError("the prompt is empty")
        if num_prompt >= max_len:
            raise ValueError(
                f"the prompt has {num_prompt} tokens; this model's maximum context length "
                f"is {max_len} tokens, which must also leave room for at least one output token"
            )
        max_tokens = params.max_tokens if params.max_tokens is not None else max_len - num_prompt
        if num_prompt + max_tokens > max_len:
            raise ValueError(
                f"this model's maximum context length is {max_len} tokens, but the request "
                f"asks for {num_prompt + max_tokens} ({num_prompt} in the prompt, "
                f"{max_tokens} to generate)"
            )
        if num_prompt + max_tokens > self.capacity_tokens:
            raise ValueError(
                f"the request needs KV cache for {num_prompt + max_tokens} tokens "
                f"({num_prompt} prompt + {max_tokens} to generate), more than the whole KV "
                f"cache holds ({self.capacity_tokens} tokens); raise kv_cache_memory"
            )
        return max_tokens

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """End a request now, freeing its blocks; returns its last output (None if unknown)."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        self._finish(request, "abort")
        output = self._output(request)
        self._forget(request)
        return output

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[RequestOutput]:
        """One iteration: schedule, execute, update. Returns outputs of requests that advanced."""
        plan = self.scheduler.schedule()
        params = {c.request_id: self.requests[c.request_id].params for c in plan.chunks}
        sampled = self.runner.execute(plan, params)
        self.scheduler.update(plan)
        outputs = []
        for request_id, token in sampled.items():
            request = self.requests[request_id]
            self._append(request, token)
            outputs.append(self._output(request))
            if request.finished:
                self._forget(request)
        return outputs

    def _append(self, request: Request, token: SampledToken) -> None:
        request.output_token_ids.append(token.token_id)
        if token.logprob is not None:
            entry = {token.token_id: token.logprob}
            entry.update(token.top_logprobs or {})
            self._logprobs[request.request_id].append(entry)
        stop = None
        detokenizer = self._detokenizers.get(request.request_id)
        if detokenizer is not None:
            stop = detokenizer.push(token.token_id)
        params = request.params
        if stop is not None:
            self._finish(request, "stop", stop)
        elif token.token_id in params.stop_token_ids:
            self._finish(request, "stop", token.token_id)
        elif not params.ignore_eos and token.token_id in self.model_config.eos_token_ids:
            self._finish(request, "stop", None)
        elif len(request.output_token_ids) >= request.max_tokens:
            self._finish(request, "length")

    def _finish(self, request: Request, reason: str, stop_reason: str | int | None = None) -> None:
        self.scheduler.finish(request, reason, stop_reason)
        self.runner.sampler.release(request.request_id)

    def _output(self, request: Request) -> RequestOutput:
        detokenizer = self._detokenizers.get(request.request_id)
        logprobs = self._logprobs.get(request.request_id)
        completion = CompletionOutput(
            index=0,
            text=detokenizer.text if detokenizer else "",
            token_ids=list(request.output_token_ids),
            finish_reason=request.finish_reason,
            stop_reason=request.stop_reason,
            cumulative_logprob=None if logprobs is None else float(
                sum(step[t] for step, t in zip(logprobs, request.output_token_ids))
            ),
            logprobs=None if logprobs is None else list(logprobs),
        )
        return RequestOutput(
            request.request_id, request.prompt, request.prompt_token_ids, [completion], request.finished
        )

    def _forget(self, request: Request) -> None:
        self.requests.pop(request.request_id, None)
        self._detokenizers.pop(request.request_id, None)
        self._logprobs.pop(request.request_id, None)

    def check_integrity(self) -> None:
        """Every block is either free or held by exactly one live request."""
        self.pool.check_integrity()
        held = [b for r in self.scheduler.running + list(self.scheduler.waiting) for b in r.block_ids]
        assert len(held) == len(set(held)) == self.pool.num_used, "block ownership is inconsistent"


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a user-facing name; 'auto' is float32 on CPU."""
    dtypes = {
        "auto": torch.float32,
        "float32": torch.float32,
        "float": torch.float32,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
        "half": torch.float16,
    }
    if name not in dtypes:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(dtypes)}")
    return dtypes[name]
