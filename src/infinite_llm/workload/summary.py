"""The numbers a serving run is judged by, under the keys ``vllm bench serve`` writes,
so that scripts written for vLLM read ours. From per-request token times (the
simulator's records, the benchmark client's or the offline runner's). No torch, no
numpy."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# What a goodput SLO may bound (vLLM's --goodput names), in milliseconds.
SLO_METRICS = ("ttft", "tpot", "e2el")


@dataclass(frozen=True)
class Timing:
    """One served request: when it arrived and when each piece of its output came
    (seconds on one clock), its prompt length, and how many tokens it generated (None:
    one per time, as when every token is seen; a stream's chunk may carry several)."""

    arrival_s: float
    token_times: Sequence[float]
    input_tokens: int
    output_tokens: int | None = None

    def __post_init__(self) -> None:
        if not self.token_times:
            raise ValueError("a served request has at least one output time")

    @property
    def num_output(self) -> int:
        return len(self.token_times) if self.output_tokens is None else self.output_tokens

    @property
    def ttft_s(self) -> float:
        return self.token_times[0] - self.arrival_s

    @property
    def e2el_s(self) -> float:
        return self.token_times[-1] - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        """Per output token after the first; None with a single output token."""
        if self.num_output < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (self.num_output - 1)


def parse_goodput(items: Sequence[str]) -> dict[str, float]:
    """``["ttft:500", "tpot:50"]`` (vLLM's ``--goodput`` form, milliseconds) -> SLOs."""
    slos: dict[str, float] = {}
    for item in items:
        name, _, value = item.partition(":")
        if name not in SLO_METRICS:
            raise ValueError(f"--goodput {item!r}: the metric is one of {', '.join(SLO_METRICS)}")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(
                f"--goodput {item!r}: the bound is milliseconds, e.g. ttft:500") from None
        if not (math.isfinite(ms) and ms > 0):
            raise ValueError(f"--goodput {item!r}: the bound must be a positive number of ms")
        slos[name] = ms
    return slos


def meets(t: Timing, slos: Mapping[str, float]) -> bool:
    """Whether a request met every SLO (ms); a single-token request has no TPOT to miss."""
    values = {"ttft": t.ttft_s, "tpot": t.tpot_s or 0.0, "e2el": t.e2el_s}
    return all(values[name] * 1000 <= bound for name, bound in slos.items())


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile with linear interpolation between ranks (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    rank = (len(ordered) - 1) * p / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _stats(name: str, values_s: list[float], percentiles: Sequence[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values_s]
    stats = {
        f"mean_{name}_ms": statistics.fmean(ms) if ms else 0.0,
        f"median_{name}_ms": statistics.median(ms) if ms else 0.0,
        f"std_{name}_ms": statistics.pstdev(ms) if ms else 0.0,
    }
    for p in percentiles:
        stats[f"p{p:g}_{name}_ms"] = percentile(ms, p)
    return stats


def _peaks(served: Sequence[Timing], start_s: float) -> tuple[float, int]:
    """The most output tokens (times) in one second, and the most requests in flight
    during one second, seconds counted from ``start_s`` (vLLM's one-second buckets)."""
    tokens: dict[int, int] = {}
    for t in served:
        for when in t.token_times:
            bucket = int(when - start_s)
            tokens[bucket] = tokens.get(bucket, 0) + 1
    # Requests in flight: +1 in the bucket it arrives, -1 after the bucket it ends.
    change: dict[int, int] = {}
    for t in served:
        first, last = int(t.arrival_s - start_s), int(t.token_times[-1] - start_s)
        change[first] = change.get(first, 0) + 1
        change[last + 1] = change.get(last + 1, 0) - 1
    running, peak = 0, 0
    for bucket in sorted(change):
        running += change[bucket]
        peak = max(peak, running)
    return float(max(tokens.values(), default=0)), peak


def summarize(
    served: Sequence[Timing], duration_s: float, failed: int = 0,
    slos: Mapping[str, float] | None = None, percentiles: Sequence[float] = (99,),
) -> dict[str, float | int | None]:
    """Throughputs over ``duration_s``; TTFT, TPOT (per output token after the first,
    per request), ITL (every gap between output times) and E2E latency statistics in
    ms; goodput (requests a second that met every SLO in ``slos``, ms; None without);
    the peak output tokens in a second and requests in flight."""
    if not duration_s > 0:
        raise ValueError(f"duration must be positive, got {duration_s}")
    tpot = [t.tpot_s for t in served if t.tpot_s is not None]
    itl = [b - a for t in served for a, b in zip(t.token_times, t.token_times[1:])]
    output = sum(t.num_output for t in served)
    prompt = sum(t.input_tokens for t in served)
    start = min((t.arrival_s for t in served), default=0.0)
    peak_tokens, peak_requests = _peaks(served, start)
    good = sum(meets(t, slos) for t in served) if slos else None
    return {
        "duration": duration_s,
        "completed": len(served),
        "failed": failed,
        "total_input_tokens": prompt,
        "total_output_tokens": output,
        "request_throughput": len(served) / duration_s,
        "request_goodput": None if good is None else good / duration_s,
        "output_throughput": output / duration_s,
        "total_token_throughput": (prompt + output) / duration_s,
        "max_output_tokens_per_s": peak_tokens,
        "max_concurrent_requests": peak_requests,
        **_stats("ttft", [t.ttft_s for t in served], percentiles),
        **_stats("tpot", tpot, percentiles),
        **_stats("itl", itl, percentiles),
        **_stats("e2el", [t.e2el_s for t in served], percentiles),
    }
