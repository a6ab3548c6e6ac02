"""A runner's copy of each scheduled request's block table, kept current from the step
plans' ``TableUpdate``s (only what changed crosses to the runner, never a whole table
again), and read each step for where every sequence's KV lives.

The in-process runner and every Ray instance actor keep one each. Integer ids only, in
``array('q')`` per (request, owner): appended to in place, and read by the attention
plan as one int64 buffer (a memcpy, not a Python loop, however long the context). Where
the pools are views of one cache (``KVCache.joined``: every instance in one process),
each table also keeps its blocks' ids in that cache, in logical order (``joined``).
"""

from __future__ import annotations

from array import array
from bisect import bisect_right

from infinite_llm.core.step import StepPlan
from infinite_llm.memory.rblock import TableUpdate


class KVTable:
    """One request's runs, and per owner its physical ids in logical order."""

    def __init__(self, bases: dict[int, int] | None = None) -> None:
        self.bases = bases  # owner -> its pool's first block in the joined cache
        self.joined = array("q")  # with bases: each logical block's id in the joined cache
        self.owners: list[int] = []  # per run
        self.starts: list[int] = []  # first logical block of each run
        self.counts: list[int] = []  # blocks in each run
        self.by_owner: dict[int, array] = {}  # owner -> physical ids (int64), logical order
        self.num_blocks = 0

    def apply(self, update: TableUpdate) -> None:
        """Drop logical blocks ``update.start ..``, then append ``update.runs``."""
        self._truncate(update.start)
        for rb in update.runs:
            if rb.first_block != self.num_blocks:
                raise ValueError(
                    f"request {update.request_id!r}: a run starts at block {rb.first_block}, "
                    f"the table has {self.num_blocks}"
                )
            if self.owners and self.owners[-1] == rb.owner:
                self.counts[-1] += rb.num_blocks
            else:
                self.owners.append(rb.owner)
                self.starts.append(rb.first_block)
                self.counts.append(rb.num_blocks)
            self.by_owner.setdefault(rb.owner, array("q")).extend(rb.block_ids)
            if self.bases is not None:
                base = self.bases[rb.owner]
                self.joined.extend(base + i for i in rb.block_ids)
            self.num_blocks += rb.num_blocks

    def _truncate(self, start: int) -> None:
        """Forget blocks from logical ``start`` on: costs what is dropped."""
        while self.owners and self.starts[-1] + self.counts[-1] > start:
            owner, first, count = self.owners[-1], self.starts[-1], self.counts[-1]
            drop = min(count, first + count - start)
            ids = self.by_owner[owner]
            del ids[len(ids) - drop :]
            if not ids:
                del self.by_owner[owner]
            if drop == count:
                self.owners.pop(), self.starts.pop(), self.counts.pop()
            else:
                self.counts[-1] -= drop
        self.num_blocks = min(self.num_blocks, start)
        del self.joined[self.num_blocks :]

    def owned_below(self, limit: int, block_size: int) -> dict[int, tuple[array, int]]:
        """owner -> (its physical blocks of this request in logical order, how many of
        their slots hold positions < limit). An owner's blocks hold the positions below
        any limit as a prefix of their slots, so one count says what is visible."""
        visible: dict[int, int] = dict.fromkeys(self.by_owner, 0)
        for owner, first, count in zip(self.owners, self.starts, self.counts):
            visible[owner] += min(max(0, limit - first * block_size), count * block_size)
        return {owner: (ids, visible[owner]) for owner, ids in self.by_owner.items()}

    def blocks(self, lo: int, hi: int) -> tuple[list[int], list[int]]:
        """(owner, physical id) of logical blocks lo .. hi-1, as two lists."""
        if lo < 0 or hi > self.num_blocks:
            raise IndexError(f"blocks {lo}..{hi} of a table of {self.num_blocks}")
        owners: list[int] = []
        ids: list[int] = []
        k = bisect_right(self.starts, lo) - 1
        # Where each owner's list stands at run k: its ids of the runs before k.
        before: dict[int, int] = {}
        for owner, count in zip(self.owners[:k], self.counts[:k]):
            before[owner] = before.get(owner, 0) + count
        while lo < hi:
            owner, first, count = self.owners[k], self.starts[k], self.counts[k]
            end = min(hi, first + count)
            base = before.get(owner, 0) + lo - first
            ids += self.by_owner[owner][base : base + end - lo]
            owners += [owner] * (end - lo)
            before[owner] = before.get(owner, 0) + count
            lo, k = end, k + 1
        return owners, ids


class KVTables:
    """Every request's ``KVTable`` that the runner has been told of."""

    def __init__(self, bases: dict[int, int] | None = None) -> None:
        self.bases = bases  # see KVTable
        self._tables: dict[str, KVTable] = {}

    def apply(self, plan: StepPlan) -> None:
        """The plan's changes, in the contract's order: ended and preempted requests'
        tables go, then the updates apply."""
        for request_id in (*plan.finished, *plan.preempted):
            self._tables.pop(request_id, None)
        for update in plan.tables:
            table = self._tables.get(update.request_id)
            if table is None:
                table = self._tables[update.request_id] = KVTable(self.bases)
            table.apply(update)

    def clear(self) -> None:
        """Forget every table (the bookkeeping resends them whole)."""
        self._tables.clear()

    def __getitem__(self, request_id: str) -> KVTable:
        return self._tables[request_id]

    def __len__(self) -> int:
        return len(self._tables)
