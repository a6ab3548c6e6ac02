"""One completion or chat completion: from the request body to engine requests, and
from their outputs to an OpenAI response or a stream of server-sent events.

A body with P prompts and ``n`` samples becomes P x n engine requests, choice
``p * n + j`` being sample j of prompt p; seeded samples get seeds seed, seed+1, ...
(``SamplingParams.samples``, as in the offline API).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from fastapi import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from infinite_llm.core.sampling_params import SamplingParams, StructuredOutput
from infinite_llm.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from infinite_llm.server import protocol as p
from infinite_llm.server.engine_loop import EngineDeadError, EngineLoop, EngineRequest, RequestGroup
from infinite_llm.server.errors import ApiError, error_body
from infinite_llm.server.limits import Limits
from infinite_llm.server.prompts import token_text

if TYPE_CHECKING:
    from infinite_llm.model.tokenizer import Tokenizer

_MIN_LOGPROB = -9999.0  # JSON has no -inf


def sampling_params(
    body: p.CompletionRequest | p.ChatCompletionRequest, prompt_len: int, limits: Limits
) -> SamplingParams:
    if isinstance(body, p.ChatCompletionRequest):
        max_tokens = body.max_completion_tokens or body.max_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
    else:
        max_tokens, logprobs = body.max_tokens, body.logprobs
    if max_tokens is None:
        # As much as the context and the KV cache leave; when nothing is left, None lets
        # the engine refuse with the numbers.
        room = min(limits.max_model_len, limits.max_request_tokens) - prompt_len
        max_tokens = room if room > 0 else None
    try:
        return SamplingParams(
            n=body.n,
            max_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=-1 if body.top_k is None else body.top_k,
            seed=body.seed,
            stop=body.stop,
            stop_token_ids=body.stop_token_ids,
            ignore_eos=body.ignore_eos,
            logprobs=logprobs,
            skip_special_tokens=body.skip_special_tokens,
            structured_output=structured_output(body.response_format),
        )
    except ValueError as error:
        raise ApiError(400, str(error)) from error


def structured_output(response_format: p.ResponseFormat | None) -> StructuredOutput | None:
    """OpenAI's ``response_format`` as the engine's structured output (text: none)."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return StructuredOutput(json_object=True)
    return StructuredOutput(json_schema=response_format.json_schema.schema_)


class Generation:
    """The engine requests of one API request, and how their outputs become choices."""

    def __init__(
        self,
        body: p.CompletionRequest | p.ChatCompletionRequest,
        prompts: list[list[int]],
        model: str,
        tokenizer: Tokenizer | None,
        limits: Limits,
    ) -> None:
        self.body = body
        self.chat = isinstance(body, p.ChatCompletionRequest)
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.tokenizer = tokenizer
        self.n = body.n
        self.prompt_tokens = sum(len(ids) for ids in prompts)
        self.requests = []
        for i, ids in enumerate(prompts):
            params = sampling_params(body, len(ids), limits)
            for j, sample in enumerate(params.samples()):
                self.requests.append(EngineRequest(f"{self.id}-{i}-{j}", ids, sample))
        limits.check_outputs(sum(r.params.max_tokens or 0 for r in self.requests))
        self.group: RequestGroup | None = None

    async def submit(self, loop: EngineLoop) -> None:
        try:
            self.group = await loop.submit(self.requests)
        except ValueError as error:
            raise ApiError(400, str(error)) from error

    # -- a whole response ---------------------------------------------------------------

    async def response(self, request: Request) -> dict | None:
        """The full response, or None when the client went away first (its requests are
        then aborted)."""
        assert self.group is not None
        finals: dict[int, RequestOutput] = {}

        async def gather() -> None:
            async for index, output in self.group.outputs():
                if output.finished:
                    finals[index] = output

        work = asyncio.ensure_future(gather())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                return None
            work.result()
        finally:
            work.cancel()
            gone.cancel()
            self.group.close()
        for output in finals.values():
            _raise_if_failed(output)
        choices = [self._choice(i, finals[i].outputs[0]) for i in range(len(finals))]
        usage = self._usage(finals.values())
        if self.chat:
            return p.dump(p.ChatCompletionResponse(
                id=self.id, created=self.created, model=self.model, choices=choices, usage=usage))
        return p.dump(p.CompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage))

    def _choice(self, index: int, out: CompletionOutput) -> p.CompletionChoice | p.ChatChoice:
        token_ids = out.token_ids if self.body.return_token_ids else None
        logprobs = self._logprobs(out.token_ids, out.logprobs)
        if self.chat:
            return p.ChatChoice(
                index=index, message=p.ChatDelta(role="assistant", content=out.text),
                logprobs=logprobs, finish_reason=out.finish_reason, stop_reason=out.stop_reason,
                token_ids=token_ids,
            )
        return p.CompletionChoice(
            index=index, text=out.text, logprobs=logprobs, finish_reason=out.finish_reason,
            stop_reason=out.stop_reason, token_ids=token_ids,
        )

    def _usage(self, finals) -> p.Usage:
        finals = list(finals)
        completion = sum(len(o.outputs[0].token_ids) for o in finals)
        measured = [o.metrics for o in finals if o.metrics is not None]
        pooled = RequestMetrics.of_samples(measured) if measured else None
        # n samples of a prompt share it: it counts once, as in OpenAI's API.
        return p.Usage(
            prompt_tokens=self.prompt_tokens, completion_tokens=completion,
            total_tokens=self.prompt_tokens + completion,
            kv_remote_share=None if pooled is None else pooled.remote_kv_share,
            migration_stall_ms=None if pooled is None else pooled.migration_stall_s * 1000,
        )

    def _logprobs(self, token_ids: list[int], entries: list[dict[int, float]] | None):
        """Logprobs of ``token_ids`` (entries[i] holds token i's and the top ones)."""
        if entries is None:
            return None
        text = lambda t: token_text(self.tokenizer, t)  # noqa: E731
        if self.chat:
            k = self.body.top_logprobs or 0
            content = []
            for token, entry in zip(token_ids, entries, strict=True):
                top = sorted(entry.items(), key=lambda kv: -kv[1])[:k]
                content.append(p.TokenLogprob(
                    **_top(text(token), entry[token]),
                    top_logprobs=[p.TopLogprob(**_top(text(t), lp)) for t, lp in top],
                ))
            return p.ChatLogprobs(content=content)
        result = p.CompletionLogprobs()
        offset = 0
        for token, entry in zip(token_ids, entries, strict=True):
            piece = text(token)
            result.tokens.append(piece)
            result.token_logprobs.append(max(entry[token], _MIN_LOGPROB))
            result.top_logprobs.append({text(t): max(lp, _MIN_LOGPROB) for t, lp in entry.items()})
            result.text_offset.append(offset)
            offset += len(piece)
        return result

    # -- a stream -----------------------------------------------------------------------

    def stream(self) -> StreamingResponse:
        assert self.group is not None
        return _EventStream(self._events(), self.group)

    async def _events(self) -> AsyncIterator[str]:
        """Chunks as tokens arrive. Text that could still turn out to begin a stop string
        is held back, so the streamed text is exactly the final text."""
        assert self.group is not None
        hold = max((len(s) for s in self.requests[0].params.stop_strings), default=1) - 1
        sent_text = [0] * len(self.requests)
        sent_tokens = [0] * len(self.requests)
        finals: list[RequestOutput] = []
        try:
            if self.chat:
                for index in range(len(self.requests)):
                    yield _sse(self._chunk(index, "", None, role="assistant"))
            async for index, output in self.group.outputs():
                _raise_if_failed(output)
                out = output.outputs[0]
                ready = len(out.text)
                if not out.finished:
                    ready = max(sent_text[index], ready - hold)
                delta = out.text[sent_text[index]:ready]
                tokens = out.token_ids[sent_tokens[index]:]
                wants_tokens = self.body.return_token_ids or out.logprobs is not None
                if delta or out.finished or (tokens and wants_tokens):
                    logprobs = None
                    if out.logprobs is not None:
                        logprobs = self._logprobs(tokens, out.logprobs[sent_tokens[index]:])
                    yield _sse(self._chunk(index, delta, out, logprobs=logprobs, tokens=tokens))
                    sent_text[index], sent_tokens[index] = ready, len(out.token_ids)
                if output.finished:
                    finals.append(output)
            if self.body.include_usage:
                usage = self._usage(finals)
                chunk = self._chunk(0, "", None)
                chunk.update(choices=[], usage=p.dump(usage))
                yield _sse(chunk)
        except Exception as error:  # noqa: BLE001 - the status line is gone: say it in-band
            status = 503 if isinstance(error, EngineDeadError) else getattr(error, "status", 500)
            yield _sse(error_body(status, str(error)))
        yield "data: [DONE]\n\n"

    def _chunk(
        self, index: int, text: str, out: CompletionOutput | None, role: str | None = None,
        logprobs=None, tokens: list[int] | None = None,
    ) -> dict:
        finish = out.finish_reason if out is not None else None
        stop_reason = out.stop_reason if out is not None else None
        token_ids = tokens if self.body.return_token_ids and tokens is not None else None
        if self.chat:
            choice = p.ChatStreamChoice(
                index=index, delta=p.ChatDelta(role=role, content=text), logprobs=logprobs,
                finish_reason=finish, stop_reason=stop_reason, token_ids=token_ids,
            )
            return p.dump(p.ChatCompletionChunk(
                id=self.id, created=self.created, model=self.model, choices=[choice]))
        choice = p.CompletionChoice(
            index=index, text=text, logprobs=logprobs, finish_reason=finish,
            stop_reason=stop_reason, token_ids=token_ids,
        )
        return p.dump(p.CompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=[choice]))


def _raise_if_failed(output: RequestOutput) -> None:
    """A request the engine ended with finish_reason "error" (its instance died and the
    survivors cannot hold it) is the server's failure, not the client's."""
    if output.outputs[0].finish_reason == "error":
        raise ApiError(500, output.error or "the request failed in the engine")


def _top(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": max(logprob, _MIN_LOGPROB), "bytes": list(token.encode())}


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body was read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _EventStream(StreamingResponse):
    """Server-sent events that abort their engine requests however the response ends:
    finished, failed, or cancelled because the client disconnected."""

    def __init__(self, events: AsyncIterator[str], group: RequestGroup) -> None:
        super().__init__(
            events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
        self.group = group

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.group.close()
