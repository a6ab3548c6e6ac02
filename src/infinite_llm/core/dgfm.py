"""DGFM, debt-graph-based fragmented memory management: instances are nodes, debts are
edges (A -> B weighted by A's blocks held on B), and two moves restore locality:

    recall   a debtor with free blocks again takes its blocks home (a live migration
             of a run from the creditor into the debtor's own pool)
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

from dataclasses import dataclass

from infinite_llm.core.request import Request, RequestStatus
from infinite_llm.memory.gmanager import Ledger
from infinite_llm.memory.rblock import RBlock

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


def plan_recalls(requests: list[Request], free: dict[int, int], busy: set[str]) -> list[Recall]:
    """Runs of blocks that can come home now: per debtor, its oldest running requests'
    runs on creditors, as many blocks as ``free`` says it has (the rManager's count)."""
    recalls = []
    room = dict(free)
    for request in sorted(requests, key=lambda r: r.arrival):
        home = request.home
        if request.request_id in busy or request.status is not RequestStatus.RUNNING:
            continue
        runs: list[RBlock] = [rb for rb in request.block_table.rblocks if rb.owner != home]
        if runs and room.get(home, 0) > 0:
            rb = runs[0]
            count = min(rb.num_blocks, room[home])
            recalls.append(Recall(request, rb.first_block, count))
            room[home] -= count
    return recalls
