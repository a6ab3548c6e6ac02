"""The engine: add requests, step, abort, over a cluster of one or more instances
whose KV may be pooled. The bookkeeping (``Cluster``) plans and updates each step, a
runner computes it; the engine keeps what needs text: tokenizing, detokenizing, stop
strings, logprobs, outputs."""

from __future__ import annotations

import itertools
import logging
import time
from typing import TYPE_CHECKING

from infinite_llm.config import EngineConfig, ModelConfig
from infinite_llm.core.cluster import Cluster
from infinite_llm.core.request import Request
from infinite_llm.core.sampling_params import SamplingParams
from infinite_llm.core.snapshot import ClusterSnapshot
from infinite_llm.core.step import InstanceFailure, Runner, SampledToken
from infinite_llm.engine.detokenizer import Detokenizer
from infinite_llm.engine.errors import RequestTooLarge
from infinite_llm.engine.structured import grammar_of
from infinite_llm.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput

if TYPE_CHECKING:
    from infinite_llm.model.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class LLMEngine:
    """The driver of a cluster: ``cluster`` is its bookkeeping, ``runner`` computes its
    steps (in this process, or on one Ray actor per instance); both are handed in by a
    backend's builder."""

    def __init__(
        self,
        config: EngineConfig,
        model_config: ModelConfig,
        tokenizer: Tokenizer | None,
        cluster: Cluster,
        runner: Runner,
    ) -> None:
        if config.scheduler.max_model_len is None:
            raise ValueError("the engine needs max_model_len resolved against the model")
        self.config = config
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.cluster = cluster
        self.runner = runner
        self._detokenizers: dict[str, Detokenizer] = {}
        self._logprobs: dict[str, list[dict[int, float]]] = {}
        self._ids = itertools.count()
        # Seconds the runner took in the last step: the rest of a step is the engine's
        # own work (scheduling, updating, outputs), which ``profile`` reports.
        self.last_execute_s = 0.0
        per_instance = cluster.blocks_per_instance * cluster.block_size
        instances = len(cluster.instances)
        logger.info(
            "KV cache: %d instance(s) x %d blocks of %d tokens = %d tokens each, %d in all "
            "(+ %d blocks each in host memory); one request can hold up to %d",
            instances, cluster.blocks_per_instance, cluster.block_size, per_instance,
            per_instance * instances, cluster.tiers.host_blocks, self.capacity_tokens,
        )

    @property
    def max_model_len(self) -> int:
        return self.config.scheduler.max_model_len

    @property
    def capacity_tokens(self) -> int:
        """The most KV tokens one request can hold: its home's pool, plus what the other
        instances may lend when pooling is on."""
        return self.cluster.max_request_tokens

    @property
    def requests(self) -> dict[str, Request]:
        """Every unfinished request, by id (the bookkeeping's own map)."""
        return self.cluster.requests

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None = None,
    ) -> Request:
        """Validate and queue a request; raises ValueError and changes nothing if it is bad."""
        request_id = request_id if request_id is not None else str(next(self._ids))
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
        if params.structured_output is not None:
            if self.tokenizer is None:
                raise ValueError("structured outputs need a tokenizer, and this model has none")
            grammar_of(params.structured_output)  # a schema it cannot follow: refused now
        request = Request(request_id, token_ids, params, max_tokens, prompt=text)
        self.cluster.add(request)
        if self.tokenizer is not None:
            self._detokenizers[request_id] = Detokenizer(
                self.tokenizer, params.stop_strings, params.skip_special_tokens
            )
        if params.logprobs is not None:
            self._logprobs[request_id] = []
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
        """The request's max_tokens, after checking it fits the context and the KV cache;
        what does not is refused with what would fit (``RequestTooLarge``)."""
        max_len = self.max_model_len
        if num_prompt == 0:
            raise ValueError("the prompt is empty")
        if num_prompt >= max_len:
            raise RequestTooLarge(
                f"the prompt has {num_prompt} tokens; this model's maximum context length "
                f"is {max_len} tokens, which must also leave room for at least one output token",
                ("shorten the prompt",),
            )
        max_tokens = params.max_tokens if params.max_tokens is not None else max_len - num_prompt
        if num_prompt + max_tokens > max_len:
            raise RequestTooLarge(
                f"this model's maximum context length is {max_len} tokens, but the request "
                f"asks for {num_prompt + max_tokens} ({num_prompt} in the prompt, "
                f"{max_tokens} to generate)",
                (f"lower {{max_tokens}} to at most {max_len - num_prompt}",),
            )
        capacity = self.capacity_tokens
        if num_prompt + max_tokens > capacity:
            instances = len(self.cluster.alive_instances)
            pooled = self.cluster.pooling.enabled
            device = self.cluster.max_request_device_tokens
            tokens = (
                f"{capacity} tokens: {device} in device memory + "
                f"{capacity - device} in host memory"
                if capacity > device else f"{capacity} tokens"
            )
            where = (
                f"the whole KV cache holds ({tokens})" if instances == 1
                else f"one request can hold in this cluster of {instances} instances "
                f"({tokens}{'' if pooled else ', pooling off'})"
            )
            remedies = []
            if num_prompt < capacity:  # the prompt fits with some output
                remedies.append(f"lower {{max_tokens}} to at most {capacity - num_prompt}")
            remedies.append("raise {kv_cache_memory}")
            if instances > 1 and not pooled:
                remedies.append("pool the instances' KV ({kv_pooling})")
            elif pooled:
                remedies.append("raise {instances}")
            raise RequestTooLarge(
                f"the request needs KV cache for {num_prompt + max_tokens} tokens "
                f"({num_prompt} prompt + {max_tokens} to generate), more than {where}",
                tuple(remedies),
            )
        return max_tokens

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """End a request now, freeing its blocks; returns its last output (None if unknown)."""
        request = self.cluster.abort(request_id)
        if request is None:
            return None
        self._when_idle()
        return self._output(request)

    def has_unfinished_requests(self) -> bool:
        return self.cluster.has_work()

    def step(self) -> list[RequestOutput]:
        """One iteration: schedule, execute, update. Returns the outputs of the requests
        that got a token (or failed with an instance)."""
        plan = self.cluster.schedule()
        start = time.perf_counter()
        try:
            result = self.runner.execute(plan)
            self.last_execute_s = time.perf_counter() - start
        except InstanceFailure as failure:
            advanced = self.cluster.fail_instances(failure.dead, plan)
        else:
            advanced = self.cluster.update(plan, result, self._observe)
        outputs = [self._output(request) for request in advanced]
        self._when_idle()
        return outputs

    def _observe(self, request: Request, token: SampledToken) -> str | None:
        """A sampled token, before the cluster's stop checks: its logprobs kept, its text
        decoded; returns the stop string it completes, if any."""
        if token.logprob is not None:
            entry = {token.token_id: token.logprob}
            entry.update(token.top_logprobs or {})
            self._logprobs[request.request_id].append(entry)
        detokenizer = self._detokenizers.get(request.request_id)
        return None if detokenizer is None else detokenizer.push(token.token_id)

    def _output(self, request: Request) -> RequestOutput:
        """The request's output so far; a finished request's text state is let go."""
        if request.finished:
            detokenizer = self._detokenizers.pop(request.request_id, None)
            logprobs = self._logprobs.pop(request.request_id, None)
        else:
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
        metrics = RequestMetrics(
            request.remote_kv_share, request.migration_stall_s, request.num_preemptions,
        ) if request.finished else None
        return RequestOutput(
            request.request_id, request.prompt, request.prompt_token_ids, [completion],
            request.finished, request.error, metrics,
        )

    def _when_idle(self) -> None:
        """With ``check_integrity`` on (the test suite), check the cluster whenever no
        work is left: every block back in its pool, the ledger balanced."""
        if self.config.check_integrity and not self.cluster.has_work():
            self.check_integrity()
            assert not self.cluster.requests, f"idle with requests {list(self.cluster.requests)}"

    def snapshot(self) -> ClusterSnapshot:
        """The cluster as immutable values (blocks, ledger, requests' placement)."""
        return self.cluster.snapshot()

    def check_integrity(self) -> None:
        """Every block is free or held by exactly one live request; the ledger balances."""
        self.cluster.check_integrity()

    def shutdown(self) -> None:
        """Stop the runner (and, on Ray, its actors)."""
        self.runner.shutdown()
