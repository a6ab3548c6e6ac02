"""The live view behind ``/dashboard``: the cluster as of the last step (every instance's
blocks, the debt graph with its cycles, the running requests and where their KV lives,
the latest migrations) and a history of the last ``history_s`` seconds sampled every
``period_s`` (request and token rates, TTFT / ITL / E2E quantiles over the metrics'
sliding window, running and waiting requests, KV usage, preemptions), served as one
JSON feed, ``/dashboard/feed``.

The page itself (``server/static/``) is plain HTML, CSS and JavaScript served by this
server: no build step, nothing fetched from any other host.

Latencies are recorded by the engine thread as outputs arrive (``metrics.Recent``); the
history is sampled on the event loop from the engine thread's latest snapshot.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from infinite_llm.core.dgfm import debt_graph
from infinite_llm.core.snapshot import ClusterSnapshot, MigrationEvent
from infinite_llm.server.metrics import KINDS, Recent
from infinite_llm.workload.summary import percentile

QUANTILES = (0.5, 0.9, 0.99)
LONGEST_REQUESTS = 20  # rows of the requests table


def quantile(values: list[float], q: float) -> float | None:
    """The ``q`` quantile (``workload.summary.percentile``'s interpolation, numpy's
    default); None without values."""
    return percentile(values, 100 * q) if values else None


def debts(view: ClusterSnapshot) -> list[dict[str, Any]]:
    """The debt graph's edges (debtor -> creditor, blocks), each marked when it lies on
    a cycle (its creditor reaches back to its debtor): what DGFM cancels."""
    graph = debt_graph(view.ledger)

    def reaches(start: int, goal: int) -> bool:
        seen, todo = {start}, [start]
        while todo:
            node = todo.pop()
            if node == goal:
                return True
            for nxt in graph.get(node, {}):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return False

    return [{"debtor": d, "creditor": c, "blocks": n, "in_cycle": reaches(c, d)}
            for d in sorted(graph) for c, n in sorted(graph[d].items())]


@dataclass
class _Sample:
    t: float  # monotonic
    finished: int
    generated: int
    preemptions: int
    computed: dict[int, int]  # by instance


class Dashboard:
    """The feed of one server: ``sample`` every ``period_s`` (the server's task), ``feed``
    on every request of the page."""

    def __init__(self, model_name: str, view: Callable[[], ClusterSnapshot], latencies: Recent,
                 period_s: float = 2.0, history_s: float = 600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.model_name = model_name
        self.view = view
        self.latencies = latencies  # the quantiles' window: what it keeps
        self.window_s = latencies.keep_s
        self.period_s = period_s
        self.clock = clock
        keep = max(2, int(history_s / period_s))
        self._samples: deque[_Sample] = deque(maxlen=keep)
        self._points: deque[dict[str, Any]] = deque(maxlen=keep)
        self._seen: dict[MigrationEvent, float] = {}  # when each was first sampled

    def sample(self) -> None:
        """One point of the history: rates since the previous sample, quantiles over the
        last ``window_s`` seconds, and the queue and KV as of the last step."""
        view, now = self.view(), self.clock()
        current = _Sample(now, self.latencies.finished, self.latencies.generated,
                          view.num_preemptions,
                          {i.instance_id: i.computed_tokens for i in view.instances})
        previous = self._samples[-1] if self._samples else None
        self._samples.append(current)
        self._note_events(view, now)
        if previous is None:
            return
        dt = max(now - previous.t, 1e-9)
        point: dict[str, Any] = {
            "t": now,
            "requests_per_s": (current.finished - previous.finished) / dt,
            "tokens_per_s": (current.generated - previous.generated) / dt,
            "preemptions_per_s": (current.preemptions - previous.preemptions) / dt,
            "running": view.running,
            "waiting": view.waiting,
            "kv_usage": view.kv_cache_usage,
        }
        for kind in KINDS:
            recent = self.latencies.since(kind, now - self.window_s)
            for q in QUANTILES:
                value = quantile(recent, q)
                point[f"{kind}_p{round(q * 100)}_ms"] = None if value is None else value * 1e3
        self._points.append(point)

    def _note_events(self, view: ClusterSnapshot, now: float) -> None:
        recent = set(view.migration.recent)
        self._seen = {k: t for k, t in self._seen.items() if k in recent}
        for key in recent:
            self._seen.setdefault(key, now)

    def _tokens_per_s(self) -> dict[int, float]:
        """Tokens computed for each instance's requests a second, over the last two
        samples (0 before there are two)."""
        if len(self._samples) < 2:
            return {}
        a, b = self._samples[-2], self._samples[-1]
        dt = max(b.t - a.t, 1e-9)
        return {i: (n - a.computed.get(i, 0)) / dt for i, n in b.computed.items()}

    def feed(self) -> dict[str, Any]:
        """Everything the page draws, from one snapshot (so its numbers agree with each
        other and with ``/v1/cluster`` at the same step)."""
        view, now = self.view(), self.clock()
        rates = self._tokens_per_s()
        instances = [
            {"id": i.instance_id, "alive": i.alive, "capacity": i.capacity, "own": i.used,
             "lent": i.lent, "free": i.free, "borrowed": i.borrowed,
             "host_capacity": i.host_capacity, "host_free": i.host_free,
             "batch": i.running, "waiting": i.waiting,
             "tokens_per_s": rates.get(i.instance_id, 0.0)}
            for i in view.instances
        ]
        longest = sorted((r for r in view.requests if r.status == "running"),
                         key=lambda r: (-r.num_tokens, r.request_id))[:LONGEST_REQUESTS]
        events = [
            {"kind": e.kind, "outcome": e.outcome, "request_id": e.request_id,
             "source": e.source, "target": e.target, "blocks": e.blocks, "step": e.step,
             "age_s": now - self._seen.get(e, now)}
            for e in reversed(view.migration.recent)
        ]
        m = view.migration
        return {
            "model": self.model_name,
            "steps": view.steps,
            "period_s": self.period_s,
            "window_s": self.window_s,
            "totals": {
                "running": view.running, "waiting": view.waiting,
                "kv_usage": view.kv_cache_usage, "preemptions": view.num_preemptions,
                "total_debt": view.ledger.total_debt, "moved_blocks": m.moved_blocks,
                "recalls": m.recalls, "cancelled_cycles": m.cancelled_cycles,
                "migrations_in_flight": m.in_flight, "dead": view.dead,
            },
            "instances": instances,
            "debts": debts(view),
            "requests": [
                {"request_id": r.request_id, "home": r.home, "num_tokens": r.num_tokens,
                 "blocks": {str(owner): n for owner, n in r.blocks}}
                for r in longest
            ],
            "running_requests": sum(r.status == "running" for r in view.requests),
            "migrations": events,
            "series": [{**{k: v for k, v in p.items() if k != "t"}, "age_s": now - p["t"]}
                       for p in self._points],
        }

