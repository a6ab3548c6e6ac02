"""``infinite-llm bench sweep``: one dataset through the engine in this process over
instance counts, pooling modes and request rates, one fresh engine per point; a row of
``vllm bench serve``'s numbers per point (and the longest request the cluster holds),
and plots (``infinite_llm.plots``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from infinite_llm.bench import offline
from infinite_llm.bench.datasets import Dataset
from infinite_llm.bench.results import report

# Per point, the summary's numbers are kept; of the per-request lists, what the
# distribution plots need.
_KEPT_LISTS = ("ttfts",)


def sweep(
    build: Callable[[int, str], Any], dataset: Dataset, instances: Sequence[int],
    modes: Sequence[str], rates: Sequence[float], max_concurrency: int | None = None,
    ignore_eos: bool = True, slos: dict[str, float] | None = None, progress: bool = True,
    on_point: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Every (instances, mode, rate): ``build(instances, mode)`` gives an ``LLM``, the
    dataset at that rate runs through it offline. Returns one row per point."""
    rows = []
    for n in instances:
        for mode in modes:
            llm = build(n, mode)
            try:
                engine = llm.engine
                for rate in rates:
                    requests, _ = replace(dataset, request_rate=rate).requests(
                        engine.max_model_len, engine.model_config.vocab_size)
                    results, duration = offline.run(engine, requests, max_concurrency,
                                                    ignore_eos, progress)
                    numbers = report(results, duration, {}, slos)
                    row = {
                        "instances": n, "mode": mode, "request_rate": rate,
                        "longest_request_tokens": min(engine.capacity_tokens, engine.max_model_len),
                        "kv_capacity_tokens": engine.capacity_tokens,
                        **{k: v for k, v in numbers.items()
                           if not isinstance(v, list) or k in _KEPT_LISTS},
                        "tpots": [t.tpot_s for t in (r.timing() for r in results if r.ok)
                                  if t.tpot_s is not None],
                    }
                    rows.append(row)
                    if on_point is not None:
                        on_point(row)
            finally:
                llm.shutdown()
    return rows
