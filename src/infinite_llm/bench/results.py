"""A benchmark's outcome: per request what came back and when, summed up under
``vllm bench serve``'s JSON keys (scripts written for vLLM read ours), with what no
peer reports: per request, the share of its KV on remote owners and the time it
stalled for KV migration (ours only; a peer's server leaves them null)."""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from infinite_llm.workload.summary import Timing, summarize


@dataclass
class RequestResult:
    """One request: when it was sent and when each piece of output came (seconds from
    the run's start), how many tokens it brought and generated, its text, or why it
    failed."""

    sent_s: float
    input_tokens: int
    token_times: list[float] = field(default_factory=list)
    output_tokens: int | None = None  # None: one per time (the server did not say)
    text: str = ""
    error: str | None = None
    remote_kv_share: float | None = None
    migration_stall_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.token_times)

    def timing(self) -> Timing:
        return Timing(self.sent_s, self.token_times, self.input_tokens, self.output_tokens)


def report(
    results: Sequence[RequestResult], duration_s: float, config: Mapping[str, Any],
    slos: Mapping[str, float] | None = None, percentiles: Sequence[float] = (99,),
) -> dict[str, Any]:
    """The run as vLLM's result JSON: ``config`` (date, backend, model, rate, ...) then
    the summary, the per-request lists, and ours."""
    served = [r for r in results if r.ok]
    numbers = summarize([r.timing() for r in served], duration_s,
                        failed=len(results) - len(served), slos=slos, percentiles=percentiles)
    shares = [r.remote_kv_share for r in served if r.remote_kv_share is not None]
    stalls = [r.migration_stall_s * 1000 for r in served if r.migration_stall_s is not None]
    return {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        **config,
        **numbers,
        "input_lens": [r.input_tokens for r in results],
        "output_lens": [r.timing().num_output if r.ok else 0 for r in results],
        "ttfts": [r.token_times[0] - r.sent_s if r.ok else 0.0 for r in results],
        "itls": [[b - a for a, b in zip(r.token_times, r.token_times[1:])] for r in results],
        "start_times": [r.sent_s for r in results],
        "generated_texts": [r.text for r in results],
        "errors": [r.error or "" for r in results],
        # Ours: where each request's KV lived, and what migration cost it.
        "remote_kv_shares": [r.remote_kv_share for r in results],
        "migration_stalls_ms": [None if r.migration_stall_s is None else r.migration_stall_s * 1000
                                for r in results],
        "mean_remote_kv_share": statistics.fmean(shares) if shares else None,
        "max_remote_kv_share": max(shares, default=None),
        "mean_migration_stall_ms": statistics.fmean(stalls) if stalls else None,
        "max_migration_stall_ms": max(stalls, default=None),
    }


_LATENCIES = (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
              ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency"))


def table(result: Mapping[str, Any]) -> str:
    """The summary as lines for the terminal, in vLLM's order and words."""
    rows: list[tuple[str, Any]] = [
        ("Successful requests:", result["completed"]),
        ("Failed requests:", result["failed"]),
        ("Benchmark duration (s):", result["duration"]),
        ("Total input tokens:", result["total_input_tokens"]),
        ("Total generated tokens:", result["total_output_tokens"]),
        ("Request throughput (req/s):", result["request_throughput"]),
    ]
    if result["request_goodput"] is not None:
        rows.append(("Request goodput (req/s):", result["request_goodput"]))
    rows += [
        ("Output token throughput (tok/s):", result["output_throughput"]),
        ("Peak output token throughput (tok/s):", result["max_output_tokens_per_s"]),
        ("Peak concurrent requests:", result["max_concurrent_requests"]),
        ("Total token throughput (tok/s):", result["total_token_throughput"]),
    ]
    lines = [f"{' Serving Benchmark Result ':=^50}"] + [_row(k, v) for k, v in rows]
    for name, header in _LATENCIES:
        lines.append(f"{header:-^50}")
        upper = name.upper()
        for key in sorted(k for k in result if k.endswith(f"_{name}_ms")
                          and not k.startswith("std_")):
            stat = key.split("_")[0]
            label = {"mean": "Mean", "median": "Median"}.get(stat, stat.upper())
            lines.append(_row(f"{label} {upper} (ms):", result[key]))
    if result.get("mean_remote_kv_share") is not None:
        lines.append(f"{'KV pooling (infinite-llm)':-^50}")
        lines.append(_row("Mean remote KV share (%):", 100 * result["mean_remote_kv_share"]))
        lines.append(_row("Max remote KV share (%):", 100 * result["max_remote_kv_share"]))
        lines.append(_row("Mean migration stall (ms):", result["mean_migration_stall_ms"]))
        lines.append(_row("Max migration stall (ms):", result["max_migration_stall_ms"]))
    lines.append("=" * 50)
    return "\n".join(lines)


_COMPARED = (("request_throughput", "req/s"), ("output_throughput", "out tok/s"),
             ("mean_ttft_ms", "mean TTFT ms"), ("p99_ttft_ms", "p99 TTFT ms"),
             ("mean_tpot_ms", "mean TPOT ms"), ("mean_itl_ms", "mean ITL ms"),
             ("mean_e2el_ms", "mean E2E ms"))


def side_by_side(results: Sequence[Mapping[str, Any]]) -> str:
    """Several runs' main numbers, a column each (by base URL, else model)."""
    names = [str(r.get("base_url") or r.get("model_id")) for r in results]
    width = max(14, *(len(n) for n in names))
    lines = [f"{'':<16}" + "".join(f"{n:>{width + 2}}" for n in names)]
    for key, label in (("completed", "completed"), ("failed", "failed"), *_COMPARED):
        cells = "".join(f"{_shown(r.get(key)):>{width + 2}}" for r in results)
        lines.append(f"{label:<16}{cells}")
    return "\n".join(lines)


def _shown(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def _row(label: str, value: Any) -> str:
    return f"{label:<40} {_shown(value):<10}"


def save(result: Mapping[str, Any] | Sequence[Mapping[str, Any]], path: str | Path) -> None:
    Path(path).write_text(json.dumps(result, indent=2) + "\n")
