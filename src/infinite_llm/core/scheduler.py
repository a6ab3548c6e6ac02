"""Continuous batching for one instance: which tokens of which requests run this step.

Each step has a token budget. Running requests go first, in arrival order, each asking
for the tokens it has not computed (one for a decode, a chunk of its prompt otherwise);
then waiting requests are admitted while the budget, the request cap and blocks allow:
the room the running requests will grow into stays free at home (and is not lent), and
a request's own blocks come from the rest of the home's pool, then from what its
rManager can borrow from other instances (where the planner runs, when its model says
the remote blocks pay).
When a running request needs a block and none can be had, the most recently arrived
running request of this instance is preempted: its blocks, local and borrowed, are
freed and it waits to be recomputed from its tokens. Pure bookkeeping: no torch.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from infinite_llm.config import SchedulerConfig
from infinite_llm.core.planner import GreedyPlanner
from infinite_llm.core.request import Request, RequestStatus
from infinite_llm.core.step import Chunk
from infinite_llm.memory.rmanager import RManager


class Arbiter(Protocol):
    """The cluster's say in one instance's scheduling, where instances share blocks."""

    def preempt_newer(self, request: Request) -> bool:
        """``request`` cannot grow and is its instance's newest: preempt a newer request
        on another instance now, so its blocks come back? False when there is none."""
        ...

    def admission_open(self) -> bool:
        """Whether new requests may be admitted now (not while older ones are stuck)."""
        ...


@dataclass(frozen=True)
class InstanceBatch:
    """What one instance's scheduler chose for this step."""

    chunks: list[Chunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        memory: RManager,
        block_size: int,
        arbiter: Arbiter,
        planner: GreedyPlanner | None = None,
    ) -> None:
        self.config = config
        self.memory = memory
        self.arbiter = arbiter
        self.planner = planner  # where it runs, its model says when borrowing pays
        self.block_size = block_size
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> InstanceBatch:
        budget = self.config.max_num_batched_tokens
        chunks: list[Chunk] = []
        preempted: list[Request] = []

        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            if self._make_room(request, n, preempted):
                chunks.append(self._chunk(request, n))
                budget -= n
            index += 1  # past the end when the request preempted itself

        # Admit only when nobody was preempted (otherwise we would evict and admit in
        # one breath) and leave room for the running requests' growth (at least a block
        # each), so the next decodes do not immediately preempt what was just admitted.
        # That room is kept at home: not used for admissions, not lent to other instances.
        reserve = self.config.admission_output_reserve
        growth = sum(self._growth(r) for r in self.running) if reserve else len(self.running)
        self.memory.keep = growth
        while (
            not preempted
            and self.waiting
            and budget > 0
            and len(self.running) < self.config.max_num_seqs
            and self.arbiter.admission_open()
        ):
            request = self.waiting[0]
            left = request.num_tokens - request.num_computed_tokens
            n = min(left, budget)
            # Blocks for the whole prompt, not only this step's chunk: a long prompt
            # admitted for its first chunk would find no room for the next ones and be
            # preempted half prefilled, again and again.
            need = self._blocks_needed(request, left)
            # The room for the running requests' growth and this one's (where outputs
            # are reserved) must be free here; the request's own blocks may be borrowed
            # where they do not fit beside it. What the others could lend is asked only
            # then: on Ray it is a call to the gManager actor.
            keep = growth + (self._growth(request, need) if reserve else 0)
            short = need + keep - self.memory.num_free
            if keep > self.memory.num_free or (short > 0 and not self._may_borrow(request, short)):
                break
            # Blocks beyond the room kept are borrowed; a stale gManager view: wait.
            table = request.block_table
            if need and not self.memory.allocate(request.request_id, table, need, keep):
                break
            growth += self._growth(request)
            self.memory.keep = growth
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            chunks.append(self._chunk(request, n))
            budget -= n
        return InstanceBatch(chunks, preempted)

    def finish(self, request: Request, reason: str, stop_reason: str | int | None = None) -> None:
        """End a request (finished, aborted or failed) and return all of its blocks."""
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        self.memory.release(request.request_id, request.block_table)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        request.stop_reason = stop_reason

    def _growth(self, request: Request, more: int = 0) -> int:
        """Blocks kept free for a running request's growth: what ``admission_output_reserve``
        of its remaining max_tokens will need beyond the blocks it holds (and ``more``
        about to be given), at least one."""
        if not self.config.admission_output_reserve:
            return 1
        left = request.max_tokens - len(request.output_token_ids)
        final = request.num_tokens + int(self.config.admission_output_reserve * left)
        held = request.block_table.num_blocks + more
        return max(1, -(-final // self.block_size) - held)

    def _may_borrow(self, request: Request, short: int) -> bool:
        """Whether admitting ``request`` may borrow ``short`` blocks: the others could
        lend them (the gManager's view), and, where the planner runs, the request is
        larger than this instance's whole device pool or the model predicts this
        instance decodes faster with it (one more remote pair against a larger batch)."""
        if self.planner is not None:
            held = request.num_blocks_needed(self.block_size)
            fits = held + self._growth(request, held) <= self.memory.pool.tiers.device_blocks
            running = self.running
            if fits and not self.planner.worth_borrowing(
                len(running), sum(r.num_tokens for r in running),
                sum(len(r.block_table.owners()) - 1 for r in running), request.num_tokens,
            ):
                return False
        return short <= self.memory.borrowable()

    def _borrow_to_grow(self, request: Request) -> bool:
        """Whether ``request`` may borrow the blocks it grows into rather than preempt
        this instance's newest request (itself, if it is the newest): always without
        the planner, when it already spans instances or when its home alone cannot
        hold it to the end; otherwise when the model says the exchange over its
        remaining outputs costs less than computing the newest's tokens again."""
        if self.planner is None or len(request.block_table.owners()) > 1:
            return True
        if request.max_blocks(self.block_size) > self.memory.pool.tiers.device_blocks:
            return True
        left = request.max_tokens - len(request.output_token_ids)
        return self.planner.borrow_beats_recompute(left, self.running[-1].num_tokens)

    def _blocks_needed(self, request: Request, n: int) -> int:
        total = request.num_computed_tokens + n
        return max(0, -(-total // self.block_size) - request.block_table.num_blocks)

    def _grow(self, request: Request, n: int) -> bool:
        need = self._blocks_needed(request, n)
        return need == 0 or self.memory.allocate(
            request.request_id, request.block_table, need, borrow=self._borrow_to_grow(request)
        )

    def _make_room(self, request: Request, n: int, preempted: list[Request]) -> bool:
        """Blocks for n more tokens of ``request``: preempt this instance's newest running
        requests until they fit. When the request is itself the newest here, the cluster
        may first free a newer request elsewhere (``arbiter.preempt_newer``), so the
        oldest work always advances; only when there is none does it preempt itself."""
        while not self._grow(request, n):
            if self.running[-1] is request and self.arbiter.preempt_newer(request):
                continue
            victim = self.running.pop()
            self._preempt(victim)
            preempted.append(victim)
            if victim is request:
                return False
        return True

    def unqueue(self, request: Request) -> None:
        """Take a request out (running or waiting), all its blocks freed and its progress
        reset, without finishing it: the cluster re-queues it elsewhere or fails it."""
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self.memory.release(request.request_id, request.block_table)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING

    def preempt(self, request: Request) -> None:
        """Preempt a running request on the cluster's behalf (it waits to be recomputed)."""
        self.running.remove(request)
        self._preempt(request)

    def _preempt(self, request: Request) -> None:
        self.memory.release(request.request_id, request.block_table)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)
        self.num_preemptions += 1

    def _chunk(self, request: Request, n: int) -> Chunk:
        start = request.num_computed_tokens
        return Chunk(
            request_id=request.request_id,
            home=request.home,
            token_ids=tuple(request.token_ids(start, start + n)),
            first_pos=start,
            sample=start + n == request.num_tokens,
        )
