"""The engine: add requests, step (schedule, execute, update), abort, over a cluster of
one or more instances whose KV may be pooled."""

from __future__ import annotations

import itertools
import logging
from typing import TYPE_CHECKING

from infinite_llm.config import CacheConfig, ModelConfig, PoolingConfig, SchedulerConfig
from infinite_llm.engine.cluster import Cluster
from infinite_llm.engine.detokenizer import Detokenizer
from infinite_llm.engine.model_runner import InstanceFailure, Runner
from infinite_llm.engine.outputs import CompletionOutput, RequestOutput
from infinite_llm.engine.request import Request, RequestStatus
from infinite_llm.engine.sampler import SampledToken
from infinite_llm.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from infinite_llm.memory.gmanager import GManager
    from infinite_llm.model.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class LLMEngine:
    """The driver of a cluster: requests and their bookkeeping live here; ``runner``
    computes the step plans (in this process, or on one Ray actor per instance).
    ``gmanager``: the cluster's gManager when it lives elsewhere (the Ray backend's
    actor proxy); by default a plain one in this process."""

    def __init__(
        self,
        model_config: ModelConfig,
        tokenizer: Tokenizer | None,
        cache: CacheConfig,
        scheduler: SchedulerConfig,
        runner: Runner,
        num_blocks: int,
        instances: int = 1,
        pooling: PoolingConfig | None = None,
        gmanager: GManager | None = None,
    ) -> None:
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.scheduler_config = scheduler
        self.block_size = cache.block_size
        self.cluster = Cluster(
            num_blocks, cache, scheduler, pooling or PoolingConfig(), instances, gmanager
        )
        self.runner = runner
        self.requests: dict[str, Request] = {}
        self._detokenizers: dict[str, Detokenizer] = {}
        self._logprobs: dict[str, list[dict[int, float]]] = {}
        self._ids = itertools.count()
        per_instance = self.cluster.blocks_per_instance * self.block_size
        logger.info(
            "KV cache: %d instance(s) x %d blocks of %d tokens = %d tokens each, %d in all; "
            "one request can hold up to %d",
            instances, self.cluster.blocks_per_instance, self.block_size, per_instance,
            per_instance * instances, self.capacity_tokens,
        )

    @property
    def capacity_tokens(self) -> int:
        """The most KV tokens one request can hold: its home's pool, plus what the other
        instances may lend when pooling is on."""
        return self.cluster.max_request_tokens

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
        vocab = self.model_config.vocab_size
        if params.top_k > vocab:
            raise ValueError(f"top_k must be at most the vocabulary size ({vocab}), got {params.top_k}")
        if params.logprobs is not None and params.logprobs > vocab:
            raise ValueError(
                f"logprobs must be at most the vocabulary size ({vocab}), got {params.logprobs}"
            )
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
        self.cluster.add(request)
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
            instances = len(self.cluster.alive_instances)
            where = (
                f"the whole KV cache holds ({self.capacity_tokens} tokens)" if instances == 1
                else f"one request can hold in this cluster of {instances} instances "
                f"({self.capacity_tokens} tokens{'' if self.cluster.pooling.enabled else ', pooling off'})"
            )
            raise ValueError(
                f"the request needs KV cache for {num_prompt + max_tokens} tokens "
                f"({num_prompt} prompt + {max_tokens} to generate), more than {where}; "
                f"raise kv_cache_memory or the number of instances"
            )
        return max_tokens

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """End a request now, freeing its blocks; returns its last output (None if unknown)."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        self._finish(request, "abort")
        self.cluster.heartbeat()
        output = self._output(request)
        self._forget(request)
        return output

    def has_unfinished_requests(self) -> bool:
        return self.cluster.has_work()

    def step(self) -> list[RequestOutput]:
        """One iteration: schedule, execute, update. Returns outputs of requests that advanced.
        It ends with a heartbeat, so the gManager hears of every block this step moved,
        those finished requests gave back included."""
        plan = self.cluster.schedule()
        params = {c.request_id: self.requests[c.request_id].params for c in plan.chunks}
        try:
            sampled = self.runner.execute(plan, params)
        except InstanceFailure as failure:
            return self._recover(failure.dead)
        self.cluster.update(plan)
        outputs = []
        for request_id, token in sampled.items():
            request = self.requests[request_id]
            self._append(request, token)
            outputs.append(self._output(request))
            if request.finished:
                self._forget(request)
        self.cluster.heartbeat()
        return outputs

    def _recover(self, dead: list[int]) -> list[RequestOutput]:
        """Instances died: every request that had its home or any rBlock there starts over
        from its tokens on the survivors, or ends with an error when they cannot hold it."""
        outputs = []
        for instance in dead:
            affected = self.cluster.remove_instance(instance)
            logger.warning(
                "instance %d died; %d request(s) had KV or their home there", instance, len(affected)
            )
            for request in affected:
                if self.cluster.alive_instances and request.max_total_tokens <= self.capacity_tokens:
                    self.cluster.add(request)  # recomputed from its tokens on a survivor
                    continue
                request.status = RequestStatus.FINISHED
                request.finish_reason = "error"
                request.error = (
                    f"instance {instance} died holding this request's KV, and the surviving "
                    f"instances can hold at most {self.capacity_tokens} tokens for one request "
                    f"(it needs {request.max_total_tokens})"
                )
                self.runner.sampler.release(request.request_id)
                outputs.append(self._output(request))
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
        self.cluster.finish(request, reason, stop_reason)
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
            request.request_id, request.prompt, request.prompt_token_ids, [completion],
            request.finished, request.error,
        )

    def _forget(self, request: Request) -> None:
        self.requests.pop(request.request_id, None)
        self._detokenizers.pop(request.request_id, None)
        self._logprobs.pop(request.request_id, None)

    def check_integrity(self) -> None:
        """Every block is free or held by exactly one live request; the ledger balances."""
        self.cluster.check_integrity()

