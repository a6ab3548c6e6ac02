"""``infinite-llm bench offline``: the same requests through the engine in this process,
no HTTP: each is added when its arrival time comes (or a slot of ``max_concurrency``
frees), the engine steps, and every new token is timed when its step returns. What it
measures is the engine alone, the ceiling ``bench serve`` against our server is
compared with.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence

from infinite_llm.bench.datasets import BenchRequest
from infinite_llm.bench.results import RequestResult
from infinite_llm.core.sampling_params import SamplingParams
from infinite_llm.engine.engine import LLMEngine


def run(
    engine: LLMEngine, requests: Sequence[BenchRequest], max_concurrency: int | None = None,
    ignore_eos: bool = True, progress: bool = True,
) -> tuple[list[RequestResult], float]:
    """Every request through ``engine`` at its time. Returns the results, in order, and
    the seconds from the start to the last token."""
    from tqdm.auto import tqdm

    results = [RequestResult(0.0, len(r.prompt_token_ids)) for r in requests]
    pending = deque(sorted(range(len(requests)), key=lambda i: requests[i].arrival_s))
    by_id: dict[str, int] = {}
    bar = tqdm(total=len(requests), disable=not progress, desc="requests")
    freed_s = 0.0  # when a slot last freed while all max_concurrency were taken
    start = time.perf_counter()
    while pending or by_id:
        now = time.perf_counter() - start
        while (pending and requests[pending[0]].arrival_s <= now
               and (max_concurrency is None or len(by_id) < max_concurrency)):
            i = pending.popleft()
            params = SamplingParams(max_tokens=requests[i].output_tokens, temperature=0.0,
                                    ignore_eos=ignore_eos)
            # Sent when it arrived, as a client would send it (the wait for the next step
            # boundary is the engine's latency), or when a slot freed for it.
            results[i].sent_s = max(requests[i].arrival_s, freed_s)
            try:
                by_id[engine.add_request(requests[i].prompt_token_ids, params).request_id] = i
            except ValueError as error:  # too long for the cluster: this request fails
                results[i].error = str(error)
                bar.update(1)
        if not by_id:
            if pending:
                time.sleep(max(0.0, requests[pending[0]].arrival_s - now))
            continue
        full = max_concurrency is not None and len(by_id) >= max_concurrency
        outputs = engine.step()
        now = time.perf_counter() - start
        for output in outputs:
            result = results[by_id[output.request_id]]
            completion = output.outputs[0]
            result.token_times += [now] * (len(completion.token_ids) - len(result.token_times))
            if output.finished:
                del by_id[output.request_id]
                bar.update(1)
                result.text = completion.text
                if output.error is not None:
                    result.error = output.error
                if output.metrics is not None:
                    result.remote_kv_share = output.metrics.remote_kv_share
                    result.migration_stall_s = output.metrics.migration_stall_s
        if full and len(by_id) < max_concurrency:
            freed_s = now
    bar.close()
    return results, time.perf_counter() - start
