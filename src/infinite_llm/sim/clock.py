"""Clocks of the simulator: what a step plan would take on the hardware simulated. A
plan becomes each instance's ``StepLoad`` (its own tokens, and the attention over the
KV it holds, where DistAttention computes it); a clock prices those loads, also a
number of tokens further on (repeats of a steady decode, which the simulator
fast-forwards). ``MeasuredClock``: this machine, from a profile; ``RooflineClock``: a
GPU, from its data sheet. No torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from infinite_llm.core.cluster import Cluster
from infinite_llm.core.cost_model import CostModel
from infinite_llm.core.step import StepPlan
from infinite_llm.sim.roofline import Roofline


@dataclass
class StepLoad:
    """What one instance does in a step: as a home, ``tokens`` of ``sequences``
    sequences, ``near`` of whose (sequence, remote owner) pairs are on its own node and
    ``far`` on others; as an owner of KV (its own requests' and its debtors'), the
    attention over it: ``pairs`` (query, key) pairs scored over ``keys`` keys.
    ``newest``: the chunks whose newest key it holds (a repeat of a steady decode
    adds one key and one pair for each); ``decodes``: of its sequences, those computing
    one token."""

    tokens: int = 0
    sequences: int = 0
    decodes: int = 0
    pairs: int = 0
    keys: int = 0
    near: int = 0
    far: int = 0
    newest: int = 0

    def shifted(self, steps: int) -> tuple[int, int, int]:
        """(tokens, pairs, keys) of the same decodes ``steps`` tokens further on."""
        return (self.tokens, self.pairs + self.newest * steps,
                self.keys + self.newest * steps)


def _pairs(a: int, b: int, first: int, n: int) -> int:
    """(query, key) pairs the causal queries ``first .. first + n - 1`` score over keys
    ``a .. b - 1``: query q scores the keys up to itself."""
    width = b - a

    def upto(x: int) -> int:  # sum of clamp(y, 0, width) for y = 0 .. x
        if x < 0:
            return 0
        if x <= width:
            return x * (x + 1) // 2
        return width * (width + 1) // 2 + (x - width) * width

    return upto(first + n - a) - upto(first - a)


def step_loads(plan: StepPlan, cluster: Cluster, per_node: int) -> list[StepLoad]:
    """Each instance's share of ``plan`` (instances fill nodes of ``per_node`` in id
    order): DistAttention scores each query over the KV where it lives."""
    per: dict[int, StepLoad] = {}

    def at(instance: int) -> StepLoad:
        load = per.get(instance)
        if load is None:
            load = per[instance] = StepLoad()
        return load

    bs = cluster.block_size
    for chunk in plan.chunks:
        home = at(chunk.home)
        n, first = chunk.num_tokens, chunk.first_pos
        home.tokens += n
        home.sequences += 1
        home.decodes += n == 1
        spans = cluster.requests[chunk.request_id].block_table.spans()
        end, remote = first + n, set()
        for owner, start, blocks in spans:
            a, b = start * bs, min((start + blocks) * bs, end)
            if a >= b:
                continue
            load = at(owner)
            load.keys += b - a
            load.pairs += _pairs(a, b, first, n)
            if owner != chunk.home:
                remote.add(owner)
        at(spans[-1][0]).newest += 1
        node = chunk.home // per_node
        for owner in remote:
            if owner // per_node == node:
                home.near += 1
            else:
                home.far += 1
    return list(per.values())


class StepClock(Protocol):
    """Prices steps: ``loads`` of a plan, then ``price`` of those loads ``shift``
    tokens further on (a repeat of a steady decode: see ``Cluster.steady_steps``)."""

    def loads(self, plan: StepPlan, cluster: Cluster) -> list[StepLoad]: ...

    def price(self, loads: list[StepLoad], shift: int = 0) -> float: ...


def step_s(clock: StepClock, plan: StepPlan, cluster: Cluster) -> float:
    """Seconds the runners would take for ``plan``."""
    return clock.price(clock.loads(plan, cluster))


class MeasuredClock:
    """Step times from a measured ``CostModel`` (``infinite-llm profile``). In one
    process every instance's chunks run in one forward: one step of all their tokens.
    With ``parallel`` (instances in processes of their own, as on Ray) the instances
    compute side by side and the step lasts as long as the slowest."""

    def __init__(self, cost: CostModel, parallel: bool) -> None:
        self.cost = cost
        self.parallel = parallel

    def loads(self, plan: StepPlan, cluster: Cluster) -> list[StepLoad]:
        return step_loads(plan, cluster, per_node=1)

    def price(self, loads: list[StepLoad], shift: int = 0) -> float:
        if not loads:
            return 0.0
        costs = []  # the cost model's (tokens, pairs, remote pairs, sequences, decodes)
        for load in loads:
            tokens, pairs, _ = load.shifted(shift)
            costs.append((tokens, pairs, load.near + load.far, load.sequences, load.decodes))
        if not self.parallel:  # one forward of everything
            return self.cost.step_time(*(sum(column) for column in zip(*costs)))
        # Side by side, every instance joins one exchange a layer whenever any sequence
        # crosses, however many do (``transport/ray.py``): what a profile's spread points
        # measured (``per_remote_s``), once a step. An instance with no tokens of its own
        # only serves attention over its KV; one computing while every other idles (no
        # exchange) runs at the profile's ``alone`` speed.
        crossing = any(c[2] for c in costs)
        alone = not crossing and sum(1 for c in costs if c[0]) == 1
        return (max(self.cost.step_time(t, p, 0, n, d, alone) if t
                    else self.cost.per_context_token_s * p for t, p, _, n, d in costs)
                + (self.cost.per_remote_s * self.cost.scale[0] if crossing else 0.0))


class RooflineClock:
    """Step times of hardware this machine is not, from a ``Roofline``: the instances
    compute side by side (each on GPUs of its own) and a step lasts as long as the
    slowest. A (sequence, remote owner) pair's exchange crosses NVLink when both
    instances are on one node (instances fill nodes in id order), else the network."""

    def __init__(self, roofline: Roofline) -> None:
        self.roofline = roofline
        self.per_node = max(1, roofline.device.gpus_per_node // roofline.gpus_per_instance)
        self.near, self.far = roofline.exchange_s(True), roofline.exchange_s(False)

    def loads(self, plan: StepPlan, cluster: Cluster) -> list[StepLoad]:
        return step_loads(plan, cluster, self.per_node)

    def price(self, loads: list[StepLoad], shift: int = 0) -> float:
        r = self.roofline
        return max(
            (r.step_time(*load.shifted(shift), load.sequences)
             + load.near * self.near + load.far * self.far for load in loads),
            default=0.0,
        )
