"""``infinite-llm bench serve``: requests sent to any OpenAI-compatible server (ours or a
peer's) at their times, streamed back, timed as ``vllm bench serve`` times them: TTFT
from sending to the first chunk with output, an inter-token latency per later chunk, the
output length from the stream's usage (``stream_options.include_usage``), else one
token per chunk. It asks for ``return_token_ids`` (vLLM's and ours) unless told not
to, so that every token comes in a chunk of its own even where its text is not
complete yet, and a model without a tokenizer is timed too. With httpx (already the test client of the server), asynchronous, one
connection per request in flight.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence

from infinite_llm.bench.datasets import BenchRequest
from infinite_llm.bench.results import RequestResult


def _httpx():
    try:
        import httpx
    except ImportError as error:  # pragma: no cover - the bench extra brings it
        raise SystemExit(f"bench serve needs httpx: pip install 'infinite-llm[bench]' ({error})")
    return httpx


def server_model(base_url: str, api_key: str | None = None) -> tuple[str, int | None]:
    """The first model the server lists (``/v1/models``), and its context length where
    it says it (vLLM and ours: ``max_model_len``)."""
    httpx = _httpx()
    try:
        response = httpx.get(f"{base_url.rstrip('/')}/v1/models", headers=_headers(api_key),
                             timeout=30)
        response.raise_for_status()
        card = response.json()["data"][0]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as error:
        raise ValueError(f"{base_url}: no model listed at /v1/models ({error})") from None
    return card["id"], card.get("max_model_len")


def run(
    base_url: str, model: str, requests: Sequence[BenchRequest], max_concurrency: int | None = None,
    ignore_eos: bool = True, api_key: str | None = None, progress: bool = True,
    timeout_s: float | None = None, token_ids: bool = True,
) -> tuple[list[RequestResult], float]:
    """Send every request at its arrival time (waiting for one of ``max_concurrency``
    slots), stream its completion back. Returns the results, in order, and the seconds
    from the start to the last response."""
    return asyncio.run(_run(base_url, model, requests, max_concurrency, ignore_eos, api_key,
                            progress, timeout_s, token_ids))


async def _run(base_url, model, requests, max_concurrency, ignore_eos, api_key, progress,
               timeout_s, token_ids) -> tuple[list[RequestResult], float]:
    httpx = _httpx()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    from tqdm.auto import tqdm

    url = f"{base_url.rstrip('/')}/v1/completions"
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    limits = httpx.Limits(max_connections=max_concurrency or len(requests) or 1)
    bar = tqdm(total=len(requests), disable=not progress, desc="requests")
    headers = _headers(api_key)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits, headers=headers) as client:
        start = time.perf_counter()

        async def one(request: BenchRequest) -> RequestResult:
            await asyncio.sleep(max(0.0, request.arrival_s - (time.perf_counter() - start)))
            if slots is None:
                result = await _send(client, url, model, request, ignore_eos, token_ids, start)
            else:
                async with slots:
                    result = await _send(client, url, model, request, ignore_eos, token_ids,
                                         start)
            bar.update(1)
            return result

        results = await asyncio.gather(*(one(r) for r in requests))
        duration = time.perf_counter() - start
    bar.close()
    return list(results), duration


async def _send(client, url: str, model: str, request: BenchRequest, ignore_eos: bool,
                token_ids: bool, start: float) -> RequestResult:
    body = {
        "model": model, "prompt": request.prompt_token_ids, "max_tokens": request.output_tokens,
        "temperature": 0.0, "ignore_eos": ignore_eos, "stream": True,
        "stream_options": {"include_usage": True},
    }
    if token_ids:
        body["return_token_ids"] = True
    result = RequestResult(time.perf_counter() - start, len(request.prompt_token_ids))
    pieces: list[str] = []
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {text[:500]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter() - start
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = str(chunk["error"].get("message", chunk["error"]))
                    break
                for choice in chunk.get("choices") or ():
                    pieces.append(choice.get("text") or "")
                    # A chunk brought output when it has text or token ids (a model
                    # without a tokenizer, or tokens whose text is not complete yet).
                    if choice.get("text") or choice.get("token_ids"):
                        result.token_times.append(now)
                usage = chunk.get("usage")
                if usage:
                    result.output_tokens = usage.get("completion_tokens")
                    result.remote_kv_share = usage.get("kv_remote_share")
                    stall = usage.get("migration_stall_ms")
                    result.migration_stall_s = None if stall is None else stall / 1000
    except Exception as error:  # noqa: BLE001 - any failure is this request's, reported
        result.error = f"{type(error).__name__}: {error}"
    result.text = "".join(pieces)
    if result.error is None and not result.token_times:
        result.error = "the stream brought no text"
    return result


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}
