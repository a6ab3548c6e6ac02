"""Prometheus metrics with vLLM's names under an ``infinite_llm:`` prefix.

Each server has its own registry (no process globals), so two servers in one process
(tests) count separately. Token counts and latencies are recorded by the engine thread
as outputs arrive; request counts, KV usage and per-instance blocks are read at scrape
time from the latest ``ClusterSnapshot``.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from infinite_llm.core.snapshot import ClusterSnapshot
from infinite_llm.engine.outputs import RequestOutput

PREFIX = "infinite_llm:"
_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)
KINDS = ("ttft", "itl", "e2e")
MAX_RECENT = 100_000  # samples of each kind kept for the dashboard's window
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)


class Recent:
    """TTFT, ITL and E2E samples (seconds) of the last ``keep_s`` seconds, each with the
    time it was taken, and running totals: written by the engine thread, read by the
    event loop (the dashboard's quantiles over time; Prometheus keeps only buckets)."""

    def __init__(self, keep_s: float) -> None:
        self.keep_s = keep_s
        self._lock = threading.Lock()
        # Bounded in count too: a burst of tokens cannot grow it without end.
        self._samples: dict[str, deque[tuple[float, float]]] = {
            k: deque(maxlen=MAX_RECENT) for k in KINDS}
        self.finished = 0  # requests ended (any reason), since the start
        self.generated = 0  # tokens generated, since the start

    def add(self, kind: str, now: float, seconds: float) -> None:
        samples = self._samples[kind]
        with self._lock:
            samples.append((now, seconds))
            while samples and samples[0][0] < now - self.keep_s:
                samples.popleft()

    def since(self, kind: str, start: float) -> list[float]:
        with self._lock:
            return [s for t, s in self._samples[kind] if t > start]


@dataclass
class RequestTimes:
    """One engine request's clock, kept by the engine thread."""

    arrival: float
    last_token: float | None = None  # None until the first token
    num_tokens: int = 0


class ServerMetrics:
    def __init__(self, model_name: str, view: Callable[[], ClusterSnapshot],
                 keep_s: float = 30.0) -> None:
        self.registry = CollectorRegistry()
        self.recent = Recent(keep_s)
        label = ["model_name"]

        def counter(name: str, doc: str) -> Counter:
            return Counter(PREFIX + name, doc, label, registry=self.registry).labels(model_name)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(
                PREFIX + name, doc, label, buckets=buckets, registry=self.registry
            ).labels(model_name)

        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens prefilled.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self._success = Counter(
            PREFIX + "request_success", "Requests finished, by finish reason.",
            ["model_name", "finished_reason"], registry=self.registry,
        )
        self._model_name = model_name
        self.ttft = histogram(
            "time_to_first_token_seconds", "From arrival to the first token.", _LATENCY_BUCKETS
        )
        self.itl = histogram(
            "inter_token_latency_seconds", "Between consecutive tokens of a request.",
            _LATENCY_BUCKETS,
        )
        self.e2e = histogram(
            "e2e_request_latency_seconds", "From arrival to the last output.", _E2E_BUCKETS
        )
        self.registry.register(_ClusterCollector(model_name, view))

    def on_output(self, times: RequestTimes, output: RequestOutput, now: float) -> None:
        """Count an engine output's new tokens and, when it is final, the request."""
        new = len(output.outputs[0].token_ids) - times.num_tokens
        if new > 0:  # a step adds one token per request
            if times.last_token is None:
                self.ttft.observe(now - times.arrival)
                self.recent.add("ttft", now, now - times.arrival)
                self.prompt_tokens.inc(len(output.prompt_token_ids))
            else:
                self.itl.observe(now - times.last_token)
                self.recent.add("itl", now, now - times.last_token)
            self.generation_tokens.inc(new)
            self.recent.generated += new
            times.num_tokens += new
            times.last_token = now
        if output.finished:
            self.e2e.observe(now - times.arrival)
            self.recent.add("e2e", now, now - times.arrival)
            self.recent.finished += 1
            reason = output.outputs[0].finish_reason or "abort"
            self._success.labels(self._model_name, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ClusterCollector:
    """Gauges read at scrape time from the engine thread's latest view."""

    def __init__(self, model_name: str, view: Callable[[], ClusterSnapshot]) -> None:
        self.model_name = model_name
        self.view = view

    def collect(self) -> Iterator[Metric]:
        view = self.view()
        model = [self.model_name]
        for name, doc, value in (
            ("num_requests_running", "Requests scheduled on some instance.", view.running),
            ("num_requests_waiting", "Requests waiting to be admitted.", view.waiting),
            ("kv_cache_usage_perc", "Fraction of the cluster's KV blocks in use (0-1).",
             view.kv_cache_usage),
        ):
            gauge = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
            gauge.add_metric(model, value)
            yield gauge
        preemptions = CounterMetricFamily(
            PREFIX + "num_preemptions", "Preemptions by recompute.", labels=["model_name"]
        )
        preemptions.add_metric(model, view.num_preemptions)
        yield preemptions
        for name, doc in (
            ("moved_blocks", "KV blocks switched into place by live migration and DGFM."),
            ("aborted", "Live migrations given up."),
            ("recalls", "Migrations DGFM started to bring blocks home or up from host memory."),
            ("cancelled_cycles", "Debt cycles DGFM cancelled."),
            ("copied_blocks", "KV blocks the runners copied for migrations and DGFM."),
            ("moved_bytes", "Bytes of KV the runners copied for migrations and DGFM."),
            ("stall_s", "Seconds steps spent copying migrated KV before computing."),
            ("rehomed", "Waiting requests the planner moved to another instance."),
        ):
            counter = CounterMetricFamily(
                f"{PREFIX}migration_{name}", doc, labels=["model_name"]
            )
            counter.add_metric(model, getattr(view.migration, name))
            yield counter
        in_flight = GaugeMetricFamily(
            PREFIX + "migrations_in_flight", "Live migrations not yet switched.",
            labels=["model_name"],
        )
        in_flight.add_metric(model, view.migration.in_flight)
        yield in_flight
        remote = GaugeMetricFamily(
            PREFIX + "kv_remote_share",
            "Share of attended KV blocks (summed over steps) that lived away from their "
            "request's home.", labels=["model_name"],
        )
        remote.add_metric(model, view.remote_share)
        yield remote
        alive = GaugeMetricFamily(PREFIX + "instance_alive", "1 while an instance is alive.",
                                  labels=["model_name", "instance"])
        for inst in view.instances:
            alive.add_metric([self.model_name, str(inst.instance_id)], float(inst.alive))
        yield alive
        for state, doc in (
            ("free", "Free KV blocks of an instance."),
            ("used", "KV blocks of an instance holding its own requests' KV."),
            ("lent", "KV blocks of an instance lent to other instances' requests."),
            ("borrowed", "KV blocks an instance's requests hold on other instances."),
            ("host_free", "Free KV blocks of an instance's host-memory tier."),
        ):
            gauge = GaugeMetricFamily(
                f"{PREFIX}kv_{state}_blocks", doc, labels=["model_name", "instance"]
            )
            for inst in view.instances:
                gauge.add_metric([self.model_name, str(inst.instance_id)], getattr(inst, state))
            yield gauge
        for name, doc in (
            ("migrated_out", "KV blocks copied out of an instance by migrations and DGFM."),
            ("migrated_in", "KV blocks copied into an instance by migrations and DGFM."),
        ):
            counter = CounterMetricFamily(
                f"{PREFIX}kv_{name}_blocks", doc, labels=["model_name", "instance"]
            )
            for inst in view.instances:
                counter.add_metric([self.model_name, str(inst.instance_id)], getattr(inst, name))
            yield counter
