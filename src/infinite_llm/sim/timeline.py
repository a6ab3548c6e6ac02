"""What a simulated run leaves behind besides its summary: every step's span, each
instance's use of its pool sampled over time, and the files they are written to (a
per-request CSV, a utilisation CSV, a Chrome trace for ``chrome://tracing`` or
Perfetto). No torch.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the simulator imports this module; only its types come back
    from infinite_llm.core.cluster import Cluster
    from infinite_llm.sim.simulator import RequestRecord


@dataclass(frozen=True)
class StepSpan:
    """One cluster step on simulated time."""

    start_s: float
    end_s: float
    tokens: int  # computed in the step, every instance's together
    sequences: int
    moved_blocks: int  # migration copies riding on it


@dataclass(frozen=True)
class InstanceSample:
    """One instance's pool and queues at ``time_s``."""

    time_s: float
    instance: int
    running: int
    waiting: int
    used_blocks: int  # holding its own requests' KV
    lent_blocks: int  # holding other instances' requests' KV
    borrowed_blocks: int  # its requests' KV held elsewhere
    free_blocks: int


@dataclass
class Timeline:
    """Collects steps, and every ``interval_s`` of simulated time one sample per live
    instance (samples, not every step: an hour of steps on 32 instances would be
    millions of rows)."""

    interval_s: float = 1.0
    steps: list[StepSpan] = field(default_factory=list)
    samples: list[InstanceSample] = field(default_factory=list)
    _next_sample_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.interval_s > 0:
            raise ValueError(f"the sampling interval must be > 0 s, got {self.interval_s!r}")

    def step(self, span: StepSpan, cluster: Cluster) -> None:
        self.steps.append(span)
        if span.start_s < self._next_sample_s:
            return
        for inst in cluster.alive_instances:
            rm, sched = inst.rmanager, inst.scheduler
            self.samples.append(InstanceSample(
                span.start_s, inst.instance_id, len(sched.running), len(sched.waiting),
                rm.num_used, rm.num_lent, sum(rm.borrowed_from.values()), rm.num_free,
            ))
        self._next_sample_s = span.start_s + self.interval_s


REQUEST_COLUMNS = ("request_id", "arrival_s", "input_tokens", "output_tokens",
                   "first_token_s", "finish_s", "ttft_ms", "tpot_ms", "e2el_ms",
                   "remote_kv_share", "refused")


def write_requests_csv(records: list[RequestRecord], path: str | Path) -> None:
    """One row per request: its times in simulated seconds, latencies in ms and the
    share of its KV other instances held when it finished (empty for a refused request,
    whose reason is in the last column)."""
    with Path(path).open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(REQUEST_COLUMNS)
        for r in records:
            times = r.token_times
            if r.finished and times:
                first, last = times[0], times[-1]
                tpot = (last - first) / (len(times) - 1) * 1e3 if len(times) > 1 else ""
                timing = [first, last, (first - r.arrival_s) * 1e3, tpot,
                          (last - r.arrival_s) * 1e3]
            else:
                timing = [""] * 5
            share = "" if r.remote_kv_share is None else r.remote_kv_share
            out.writerow([r.request_id, r.arrival_s, r.input_tokens, r.output_tokens,
                          *timing, share, r.refused or ""])


def write_utilization_csv(timeline: Timeline, path: str | Path) -> None:
    names = [f.name for f in fields(InstanceSample)]
    with Path(path).open("w", newline="") as f:
        out = csv.DictWriter(f, names)
        out.writeheader()
        out.writerows(asdict(s) for s in timeline.samples)


def chrome_trace(timeline: Timeline, records: list[RequestRecord]) -> dict:
    """The run as Chrome trace events (microseconds): process 0 the cluster's steps
    (and the migration copies they carry), process 1 each instance's batch and pool
    over time as counters, process 2 each request from arrival to its last token."""
    us = 1e6
    events: list[dict] = [
        {"ph": "M", "pid": 0, "name": "process_name", "args": {"name": "cluster steps"}},
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "instances"}},
        {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "requests"}},
    ]
    for s in timeline.steps:
        events.append({"ph": "X", "pid": 0, "tid": 0, "name": "step", "ts": s.start_s * us,
                       "dur": (s.end_s - s.start_s) * us,
                       "args": {"tokens": s.tokens, "sequences": s.sequences}})
        if s.moved_blocks:
            events.append({"ph": "X", "pid": 0, "tid": 1, "name": "migration",
                           "ts": s.start_s * us, "dur": (s.end_s - s.start_s) * us,
                           "args": {"blocks": s.moved_blocks}})
    for x in timeline.samples:
        ts = x.time_s * us
        events.append({"ph": "C", "pid": 1, "name": f"instance {x.instance} requests", "ts": ts,
                       "args": {"running": x.running, "waiting": x.waiting}})
        events.append({"ph": "C", "pid": 1, "name": f"instance {x.instance} blocks", "ts": ts,
                       "args": {"used": x.used_blocks, "lent": x.lent_blocks,
                                "free": x.free_blocks}})
    for n, r in enumerate(records):
        if not (r.finished and r.token_times):
            continue
        common = {"pid": 2, "cat": "request", "id": n, "name": r.request_id}
        events += [
            {**common, "ph": "b", "ts": r.arrival_s * us,
             "args": {"input_tokens": r.input_tokens, "output_tokens": r.output_tokens}},
            {**common, "ph": "n", "ts": r.token_times[0] * us, "args": {"first token": True}},
            {**common, "ph": "e", "ts": r.token_times[-1] * us},
        ]
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_chrome_trace(timeline: Timeline, records: list[RequestRecord], path: str | Path) -> None:
    Path(path).write_text(json.dumps(chrome_trace(timeline, records)))
