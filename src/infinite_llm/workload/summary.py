"""The numbers a serving run is judged by, under the keys ``vllm bench serve`` writes,
so that scripts written for vLLM read ours. From per-request token times (the
simulator's records, or a benchmark client's). No torch, no numpy."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Timing:
    """One served request: when it arrived, when each output token came (seconds on
    one clock), and its prompt length."""

    arrival_s: float
    token_times: Sequence[float]
    input_tokens: int


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile with linear interpolation between ranks (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    rank = (len(ordered) - 1) * p / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _stats(name: str, values_s: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values_s]
    return {
        f"mean_{name}_ms": statistics.fmean(ms) if ms else 0.0,
        f"median_{name}_ms": statistics.median(ms) if ms else 0.0,
        f"std_{name}_ms": statistics.pstdev(ms) if ms else 0.0,
        f"p99_{name}_ms": percentile(ms, 99),
    }


def summarize(served: Sequence[Timing], duration_s: float) -> dict[str, float]:
    """Throughputs over ``duration_s`` and TTFT, TPOT (per output token after the
    first, per request), ITL (every gap between tokens) and E2E latency statistics."""
    if not duration_s > 0:
        raise ValueError(f"duration must be positive, got {duration_s}")
    ttft = [t.token_times[0] - t.arrival_s for t in served]
    tpot = [
        (t.token_times[-1] - t.token_times[0]) / (len(t.token_times) - 1)
        for t in served if len(t.token_times) > 1
    ]
    itl = [b - a for t in served for a, b in zip(t.token_times, t.token_times[1:])]
    e2el = [t.token_times[-1] - t.arrival_s for t in served]
    output = sum(len(t.token_times) for t in served)
    prompt = sum(t.input_tokens for t in served)
    return {
        "duration": duration_s,
        "completed": len(served),
        "total_input_tokens": prompt,
        "total_output_tokens": output,
        "request_throughput": len(served) / duration_s,
        "output_throughput": output / duration_s,
        "total_token_throughput": (prompt + output) / duration_s,
        **_stats("ttft", ttft),
        **_stats("tpot", tpot),
        **_stats("itl", itl),
        **_stats("e2el", e2el),
    }
