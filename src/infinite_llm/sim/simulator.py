"""Simulated time for the real bookkeeping: a trace's requests go through the very
``Cluster`` the engine runs (schedulers, rManagers, gManager, planner, migration,
DGFM), step by step, with a clock in place of the runners: each plan costs the time a
cost model predicts, and every sampled token is a fixed id. Outputs never depend on
token values here (no stop strings, EOS ignored), so the schedule is the engine's.
No torch.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from infinite_llm.config import PoolingConfig
from infinite_llm.core.cluster import Cluster
from infinite_llm.core.request import Request
from infinite_llm.core.sampling_params import SamplingParams
from infinite_llm.core.step import SampledToken, StepPlan, StepResult
from infinite_llm.sim.clock import StepClock, StepLoad
from infinite_llm.sim.timeline import StepSpan, Timeline
from infinite_llm.workload.summary import Timing, summarize
from infinite_llm.workload.traces import TraceRequest

TOKEN = 0  # every simulated output token


@dataclass
class RequestRecord:
    """What happened to one request of the trace, in simulated seconds."""

    request_id: str
    arrival_s: float
    input_tokens: int
    output_tokens: int
    token_times: list[float] = field(default_factory=list)  # when each output token came
    refused: str | None = None  # why it was refused at arrival
    remote_kv_share: float | None = None  # of its KV, on other instances when it finished

    @property
    def finished(self) -> bool:
        return len(self.token_times) == self.output_tokens


MODES = ("isolated", "pooled", "planner", "single")


def pooling_for(mode: str, cost_model: str) -> PoolingConfig:
    """The pooling of a simulated mode: isolated instances (vLLM-multi; ``single``, one
    instance over all the GPUs, is isolated too), on-demand borrowing, or the planner
    (every step, predicting with ``cost_model``) with DGFM every 8 steps."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode in ("isolated", "single"):
        return PoolingConfig(enabled=False)
    if mode == "pooled":
        return PoolingConfig()
    return PoolingConfig(planner_period=1, cost_model=cost_model, dgfm_period=8)


class Simulator:
    """Runs a trace through ``cluster`` on simulated time. With ``fast_forward``, the
    steady decode steps the cluster vouches for (``Cluster.steady_steps``: only
    counters change) are priced and accounted without being scheduled one by one; the
    result is the same to the last bit (tested), only faster."""

    def __init__(self, cluster: Cluster, clock: StepClock, fast_forward: bool = True) -> None:
        self.cluster = cluster
        self.clock = clock
        self.fast_forward = fast_forward
        self.now = 0.0
        self.steps = 0
        self.fast_forwarded = 0  # of ``steps``, those accounted without scheduling

    def run(
        self, trace: list[TraceRequest], duration_s: float | None = None,
        timeline: Timeline | None = None,
    ) -> list[RequestRecord]:
        """Every request arriving before ``duration_s`` (all when None), in arrival order,
        run to the end; each step also goes to ``timeline``, if given. Returns one record
        per request, in trace order."""
        records = [
            RequestRecord(f"sim-{i}", r.arrival_s, r.input_tokens, r.output_tokens)
            for i, r in enumerate(trace)
            if duration_s is None or r.arrival_s < duration_s
        ]
        by_id = {record.request_id: record for record in records}
        pending = deque(sorted(records, key=lambda r: r.arrival_s))
        cluster = self.cluster
        while pending or cluster.has_work():
            while pending and pending[0].arrival_s <= self.now:
                self._arrive(pending.popleft())
            if not cluster.has_work():
                if pending:
                    self.now = max(self.now, pending[0].arrival_s)
                continue
            plan = cluster.schedule()
            loads = self.clock.loads(plan, cluster)
            self._step(plan, loads, 0, timeline)
            tokens = {c.request_id: SampledToken(TOKEN) for c in plan.chunks if c.sample}
            for request in cluster.update(plan, StepResult(tokens)):
                record = by_id[request.request_id]
                record.token_times.append(self.now)
                if request.finished:
                    record.remote_kv_share = request.remote_kv_share
            if not self.fast_forward:
                continue
            # Repeats of a steady decode, up to the next arrival (it would join them).
            steady, repeats = cluster.steady_steps(plan, TOKEN), 0
            while repeats < steady and not (pending and pending[0].arrival_s <= self.now):
                repeats += 1
                self._step(plan, loads, repeats, timeline)
                for chunk in plan.chunks:
                    by_id[chunk.request_id].token_times.append(self.now)
            if repeats:
                cluster.fast_forward(plan, repeats, TOKEN)
                self.fast_forwarded += repeats
        return records

    def _step(self, plan: StepPlan, loads: list[StepLoad], shift: int,
              timeline: Timeline | None) -> None:
        """The clock moves by ``plan``'s step, ``shift`` tokens on."""
        start = self.now
        self.now += self.clock.price(loads, shift)
        self.steps += 1
        if timeline is not None:
            timeline.step(StepSpan(
                start, self.now, sum(load.tokens for load in loads),
                sum(load.sequences for load in loads),
                0 if shift else sum(len(m.src_blocks) for m in plan.moves),
            ), self.cluster)

    def _arrive(self, record: RequestRecord) -> None:
        total = record.input_tokens + record.output_tokens
        if total > self.cluster.max_request_tokens:
            record.refused = (
                f"needs KV for {total} tokens; one request can hold at most "
                f"{self.cluster.max_request_tokens} in this cluster"
            )
            return
        params = SamplingParams(max_tokens=record.output_tokens, ignore_eos=True)
        self.cluster.add(Request(
            record.request_id, [TOKEN] * record.input_tokens, params, record.output_tokens
        ))


def summary(
    records: list[RequestRecord], slos: Mapping[str, float] | None = None,
) -> dict[str, float | int | None]:
    """``vllm bench serve``'s numbers for the served requests, over the simulated time
    from the first arrival to the last token; ``failed`` counts the refused ones;
    goodput against ``slos`` (ms), where given."""
    served = [r for r in records if r.finished]
    if not served:
        raise ValueError("no request was served")
    start = min(r.arrival_s for r in records)
    end = max(r.token_times[-1] for r in served)
    timings = [Timing(r.arrival_s, r.token_times, r.input_tokens) for r in served]
    return summarize(timings, end - start, failed=len(records) - len(served), slos=slos)
