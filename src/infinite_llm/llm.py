"""The offline API, as vLLM users know it: ``LLM(model=...).generate(prompts, params)``."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

from tqdm.auto import tqdm

from infinite_llm.config import EngineConfig
from infinite_llm.core.sampling_params import SamplingParams
from infinite_llm.engine.chat import Message, chat_prompt
from infinite_llm.engine.device import torch_dtype
from infinite_llm.engine.engine import LLMEngine
from infinite_llm.engine.outputs import RequestMetrics, RequestOutput
from infinite_llm.model.checkpoint import Checkpoint, load_checkpoint
from infinite_llm.model.tokenizer import Tokenizer

Prompt = str | list[int]
Builder = Callable[[EngineConfig, Callable[[], Checkpoint]], LLMEngine]


def _builder(backend: str) -> Builder:
    """Each backend's builder, imported only when chosen (Ray is an optional extra)."""
    if backend == "ray":
        try:
            from infinite_llm.transport.ray import build_ray
        except ModuleNotFoundError as error:
            if error.name != "ray":
                raise
            raise ValueError(
                "backend 'ray' needs Ray: pip install 'infinite-llm[ray]'"
            ) from error

        return build_ray
    from infinite_llm.engine.builder import build_local

    return build_local


class LLM:
    """Load a model and generate from batches of prompts.

    ``model`` is a built-in name (``"smollm2"``), a ``.gguf`` file or a Hugging Face
    model directory. Options (defaults in ``infinite_llm.config``, names in
    ``config.OPTIONS``):

    - ``dtype`` ("auto": float32 on CPU, bfloat16 on GPU), ``device`` ("auto": a GPU
      when there is one; "cpu", "cuda", "cuda:N"), ``seed`` (0); ``enforce_eager``
      (False: on a GPU, decode steps are replayed from CUDA graphs);
      ``enable_torch_compile`` (False: on a GPU, each decode step compiled by
      torch.compile before its graph is captured);
    - ``kv_cache_memory`` (each instance's KV pool: bytes or "256MiB"; 1GiB),
      ``block_size`` (16);
    - ``max_num_batched_tokens`` (8192, as vLLM's offline ``LLM``), ``max_num_seqs``
      (256), ``max_model_len`` (the model's trained context; more only with
      ``allow_long_context=True``, which warns);
    - ``instances`` (1) model replicas; ``kv_pooling`` (True): instances short of blocks
      borrow from the others, each lending at most ``max_lend_fraction`` (0.5) of its
      pool, so one request can hold far more KV than one instance has; False gives
      isolated replicas;
    - ``backend`` ("local": every instance in this process; "ray": one Ray actor per
      instance and the gManager as a named actor, joining ``ray_address`` or a private
      local Ray; ``heartbeat_timeout_s``, ``max_missed_heartbeats``,
      ``step_timeout_factor``, ``step_timeout_min_s`` say when an actor counts as dead);
    - ``check_integrity``: check pools and ledger whenever the engine goes idle (debug).

    ``LLM.from_config(EngineConfig(...))`` takes a whole config instead.
    """

    def __init__(self, model: str, **options: Any) -> None:
        self._start(EngineConfig.from_options(model, **options))

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLM:
        llm = cls.__new__(cls)
        llm._start(config)
        return llm

    def _start(self, config: EngineConfig) -> None:
        torch_dtype(config.dtype)  # a bad name fails before seconds of loading
        self.config = config
        self.engine = _builder(config.parallel.backend)(config, lambda: load_checkpoint(config.model))
        self.tokenizer: Tokenizer | None = self.engine.tokenizer

    def get_tokenizer(self) -> Tokenizer | None:
        return self.tokenizer

    def shutdown(self) -> None:
        """Stop the backend (on Ray, its actors and the Ray this LLM started)."""
        self.engine.shutdown()

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
            metrics = RequestMetrics.of_samples([finals[rid].metrics for rid in ids])
            results.append(RequestOutput(first.request_id, first.prompt, first.prompt_token_ids,
                                         outputs, True, metrics=metrics))
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
