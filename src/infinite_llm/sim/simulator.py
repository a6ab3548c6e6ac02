"""Simulated time for the real bookkeeping: a trace's requests go through the very
``Cluster`` the engine runs (schedulers, rManagers, gManager, planner, migration,
DGFM), step by step, with a clock in place of the runners: each plan costs the time a
cost model predicts, and every sampled token is a fixed id. Outputs never depend on
token values here (no stop strings, EOS ignored), so the schedule is the engine's.
No torch.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from infinite_llm.config import PoolingConfig
from infinite_llm.core.cluster import Cluster
from infinite_llm.core.cost_model import CostModel
from infinite_llm.core.request import Request
from infinite_llm.core.sampling_params import SamplingParams
from infinite_llm.core.step import SampledToken, StepPlan, StepResult
from infinite_llm.sim.roofline import Roofline
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


class StepClock(Protocol):
    def step_s(self, plan: StepPlan, cluster: Cluster) -> float:
        """Seconds the runners would take for ``plan``."""
        ...


class MeasuredClock:
    """Step times from a measured ``CostModel`` (``infinite-llm profile``). In one
    process every instance's chunks run in one forward: one step of all their tokens.
    With ``parallel`` (instances in processes of their own, as on Ray) the instances
    compute side by side and the step lasts as long as the slowest."""

    def __init__(self, cost: CostModel, parallel: bool) -> None:
        self.cost = cost
        self.parallel = parallel

    def step_s(self, plan: StepPlan, cluster: Cluster) -> float:
        # home -> [tokens, context tokens, remote pairs, sequences]
        per: dict[int, list[int]] = {}
        for chunk in plan.chunks:
            request = cluster.requests[chunk.request_id]
            load = per.setdefault(chunk.home, [0, 0, 0, 0])
            load[0] += chunk.num_tokens
            n = chunk.num_tokens  # its queries score the keys before them and their own
            load[1] += n * chunk.first_pos + n * (n + 1) // 2
            load[2] += len(request.block_table.owners()) - 1
            load[3] += 1
        if not per:
            return 0.0
        if self.parallel:
            return max(self.cost.step_time(*load) for load in per.values())
        return self.cost.step_time(*(sum(column) for column in zip(*per.values())))


class RooflineClock:
    """Step times of hardware this machine is not, from a ``Roofline``: the instances
    compute side by side (each on GPUs of its own) and a step lasts as long as the
    slowest. A (sequence, remote owner) pair's exchange crosses NVLink when both
    instances are on one node (instances fill nodes in id order), else the network."""

    def __init__(self, roofline: Roofline) -> None:
        self.roofline = roofline
        self.per_node = max(1, roofline.device.gpus_per_node // roofline.gpus_per_instance)

    def step_s(self, plan: StepPlan, cluster: Cluster) -> float:
        # home -> [tokens, pairs, keys, sequences, remote pairs on its node, elsewhere]
        per: dict[int, list[int]] = {}
        for chunk in plan.chunks:
            request = cluster.requests[chunk.request_id]
            load = per.setdefault(chunk.home, [0, 0, 0, 0, 0, 0])
            n = chunk.num_tokens
            load[0] += n
            load[1] += n * chunk.first_pos + n * (n + 1) // 2
            load[2] += chunk.first_pos + n
            load[3] += 1
            node = chunk.home // self.per_node
            for owner in request.block_table.owners():
                if owner != chunk.home:
                    load[4 if owner // self.per_node == node else 5] += 1
        r = self.roofline
        return max(
            (r.step_time(t, p, k, n) + near * r.exchange_s(True) + far * r.exchange_s(False)
             for t, p, k, n, near, far in per.values()),
            default=0.0,
        )


class Simulator:
    """Runs a trace through ``cluster`` on simulated time."""

    def __init__(self, cluster: Cluster, clock: StepClock) -> None:
        self.cluster = cluster
        self.clock = clock
        self.now = 0.0
        self.steps = 0

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
            start = self.now
            self.now += self.clock.step_s(plan, cluster)
            self.steps += 1
            if timeline is not None:
                timeline.step(StepSpan(
                    start, self.now, sum(c.num_tokens for c in plan.chunks), len(plan.chunks),
                    sum(len(m.src_blocks) for m in plan.moves),
                ), cluster)
            tokens = {c.request_id: SampledToken(TOKEN) for c in plan.chunks if c.sample}
            for request in cluster.update(plan, StepResult(tokens)):
                by_id[request.request_id].token_times.append(self.now)
        return records

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


def summary(records: list[RequestRecord]) -> dict[str, float]:
    """``vllm bench serve``'s numbers for the served requests, over the simulated time
    from the first arrival to the last token; ``refused`` counts the rest."""
    served = [r for r in records if r.finished]
    if not served:
        raise ValueError("no request was served")
    start = min(r.arrival_s for r in records)
    end = max(r.token_times[-1] for r in served)
    timings = [Timing(r.arrival_s, r.token_times, r.input_tokens) for r in served]
    return {**summarize(timings, end - start), "refused": len(records) - len(served)}
