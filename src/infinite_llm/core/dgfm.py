"""DGFM, debt-graph-based fragmented memory management: instances are nodes, debts are
edges (A -> B weighted by A's blocks held on B), and two moves restore locality:

    recall   a debtor with free blocks again takes its blocks home (a live migration
             of a run from the creditor into the debtor's own pool); blocks in host
             memory come into device memory first
    cancel   a cycle A -> B -> ... -> A of minimum weight w: each instance's w guest
             blocks receive w of its own blocks that lived on the next instance, all in
             one step, so locality improves without a free block anywhere

      before   A holds C's KV in gA, B holds A's in gB, C holds B's in gC
      after    A's KV in gA, B's in gB, C's in gC: every edge of the cycle lighter by w

A cancelled cycle is a permutation of block contents: its copies read every source
before any is written (the runners' moves are read-all-then-write). The planning reads
the gManager's ledger (advice); the tables and rManagers say what really is. No torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from infinite_llm.core.request import Request, RequestStatus
from infinite_llm.memory.block_pool import Tier, Tiers
from infinite_llm.memory.gmanager import Ledger

DebtGraph = dict[int, dict[int, int]]  # debtor -> creditor -> blocks


def debt_graph(ledger: Ledger) -> DebtGraph:
    """Who holds whose blocks, from the ledger's borrowed-from side."""
    return {i: dict(e.borrowed_from) for i, e in ledger.instances.items() if e.borrowed_from}


def find_cycle(graph: DebtGraph) -> list[int] | None:
    """A simple cycle [a0, a1, ..., ak-1] with edges a_i -> a_(i+1 mod k), or None; the
    lowest-numbered instances are tried first, so the answer is deterministic."""
    done: set[int] = set()
    for start in sorted(graph):
        if start in done:
            continue
        path, on_path = [start], {start: 0}
        stack = [iter(sorted(graph.get(start, {})))]
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                stack.pop()
                done.add(path.pop())
                on_path = {node: k for k, node in enumerate(path)}
                continue
            if nxt in on_path:
                return path[on_path[nxt]:]
            if nxt not in done:
                on_path[nxt] = len(path)
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, {}))))
    return None


@dataclass(frozen=True)
class Leg:
    """``count`` of ``request``'s blocks, logical ``first_block ..``, held on ``creditor``
    (``blocks``): in a cancelled cycle they come home to its debtor."""

    request: Request
    creditor: int
    first_block: int
    blocks: tuple[int, ...]

    @property
    def debtor(self) -> int:
        return self.request.home


def _leg(requests: list[Request], debtor: int, creditor: int, weight: int) -> Leg | None:
    """A run of ``weight`` blocks of one running request of ``debtor`` on ``creditor``."""
    for request in sorted(requests, key=lambda r: r.arrival):
        if request.home != debtor or request.status is not RequestStatus.RUNNING:
            continue
        for rb in request.block_table.rblocks:
            if rb.owner == creditor and rb.num_blocks >= weight:
                return Leg(request, creditor, rb.first_block, rb.block_ids[:weight])
    return None


def plan_cancellation(
    graph: DebtGraph, requests: list[Request], busy: set[str]
) -> list[Leg] | None:
    """The legs of one cancellable cycle: per edge a request whose run on the creditor
    holds the cycle's weight (the minimum edge, lowered to the longest runs found).
    ``busy``: requests that must not move now (a migration in flight)."""
    cycle = find_cycle(graph)
    if cycle is None:
        return None
    edges = list(zip(cycle, cycle[1:] + cycle[:1]))
    weight = min(graph[a][b] for a, b in edges)
    free = [r for r in requests if r.request_id not in busy]
    while weight > 0:
        legs = [_leg(free, a, b, weight) for a, b in edges]
        if all(leg is not None for leg in legs):
            return legs  # type: ignore[return-value]
        weight -= 1
    return None


@dataclass(frozen=True)
class Recall:
    request: Request
    first_block: int
    count: int
    target: int  # the request's home, or for blocks in host memory any device room


def plan_recalls(
    requests: list[Request], free: dict[int, int], busy: set[str],
    tiers: Tiers | None = None, remote: bool = True,
) -> list[Recall]:
    """Runs of blocks that can come into device memory now, as many blocks as ``free``
    says each instance has there: first every request's blocks in host memory
    (``tiers``; its home's or a creditor's), into its home's device memory or else the
    instance with the most; then (``remote``) runs on creditors, into their home's;
    oldest requests first within each."""
    finders: list[tuple[Callable[[Request], tuple[int, int] | None], bool]] = []
    if tiers is not None and tiers.host_blocks:
        finders.append((lambda request: _host_run(request, tiers), True))
    if remote:
        finders.append((_remote_run, False))
    recalls = []
    room = dict(free)
    ordered = [
        r for r in sorted(requests, key=lambda r: r.arrival)
        if r.request_id not in busy and r.status is RequestStatus.RUNNING
    ]
    picked: set[str] = set()  # one migration at a time per request
    for find, anywhere in finders:
        for request in ordered:
            target = request.home
            if anywhere and room.get(target, 0) <= 0:
                target = max(sorted(room), key=lambda i: room[i], default=target)
            if request.request_id in picked or room.get(target, 0) <= 0:
                continue
            run = find(request)
            if run is not None:
                first, count = run
                count = min(count, room[target])
                recalls.append(Recall(request, first, count, target))
                room[target] -= count
                picked.add(request.request_id)
    return recalls


def _remote_run(request: Request) -> tuple[int, int] | None:
    """(first block, count) of the request's first run on another instance."""
    for rb in request.block_table.rblocks:
        if rb.owner != request.home:
            return rb.first_block, rb.num_blocks
    return None


def _host_run(request: Request, tiers: Tiers) -> tuple[int, int] | None:
    """(first block, count) of the request's first stretch of blocks in host memory
    (within one owner's run)."""
    for rb in request.block_table.rblocks:
        start = None
        for k, block in enumerate(rb.block_ids):
            if tiers.of(block) is Tier.HOST and start is None:
                start = k
            elif tiers.of(block) is not Tier.HOST and start is not None:
                return rb.first_block + start, k - start
        if start is not None:
            return rb.first_block + start, rb.num_blocks - start
    return None
