"""Where a request's KV lives: its block table, an ordered list of rBlocks.

An rBlock is a run of consecutive logical blocks of one request stored on one instance
(its *owner*). The table grows at the end, a new run starting whenever the owner
changes, and a range of blocks may move to another owner; an owner may appear in
several rBlocks::

    logical block   0   1   2 | 3   4 | 5   6          (block_size = 4)
    rBlock          #0        | #1    | #2
    owner           0 (home)  | 2     | 0
    physical ids    7   2   9 | 0   3 | 4   1
    tokens          0 ..... 12| 12..20| 20 ... num_tokens (the last block may be partial)

Pure bookkeeping over integer ids: no torch, no knowledge of pools or transports.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass


@dataclass(frozen=True)
class RBlock:
    """A run of one request's blocks on one instance, from logical block ``first_block``."""

    owner: int  # instance id whose pool holds the blocks
    first_block: int  # logical index, in the request's sequence, of block_ids[0]
    block_ids: tuple[int, ...]  # physical ids in the owner's pool

    @property
    def num_blocks(self) -> int:
        return len(self.block_ids)

    @property
    def end_block(self) -> int:
        """One past the logical index of the last block."""
        return self.first_block + len(self.block_ids)

    def token_range(self, block_size: int, num_tokens: int) -> tuple[int, int]:
        """[start, end) token positions stored here, for a request of ``num_tokens``.

        The run's capacity is clipped at ``num_tokens``: the last block is usually only
        partly written, and blocks allocated ahead of the tokens hold nothing yet.
        """
        start = self.first_block * block_size
        end = min(self.end_block * block_size, num_tokens)
        return start, max(start, end)


@dataclass(frozen=True)
class TableUpdate:
    """What changed in a request's block table since the runners last saw it: logical
    blocks from ``start`` on are now exactly ``runs``; those before are unchanged::

        runner's copy   | 0 ............ start | (dropped) |
        update                                 | runs ..................... |

    ``start`` is the old length when blocks were only appended, 0 for a whole table (a
    new request, or one recomputed after preemption), anything between when runs moved.
    Its size is what changed, never the context length.
    """

    request_id: str
    start: int
    runs: tuple[RBlock, ...]


class BlockTable:
    """A request's rBlocks in logical order; changed by its home rManager only.

    Appending to the last run and replacing a range of blocks cost what they add, not
    the table's length, and ``take_update`` hands the runners only what changed since
    they last saw the table, so a step costs the same at 4K tokens as at 4M.
    """

    def __init__(self) -> None:
        # One entry per run, in logical order; a run's ids grow in place.
        self._owners: list[int] = []
        self._starts: list[int] = []  # first logical block of each run
        self._ids: list[list[int]] = []
        self._num_blocks = 0
        self._synced = 0  # the runners' copy is current for logical blocks [0, _synced)

    @property
    def rblocks(self) -> tuple[RBlock, ...]:
        """Every run as an immutable rBlock: a copy of the whole table (tests, checks)."""
        return tuple(RBlock(o, s, tuple(ids)) for o, s, ids in zip(self._owners, self._starts, self._ids))

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    def append(self, owner: int, ids: list[int] | tuple[int, ...]) -> None:
        """Add blocks at the end: extends the last run if it has the same owner."""
        if not ids:
            return
        if self._owners and self._owners[-1] == owner:
            self._ids[-1].extend(ids)
        else:
            self._owners.append(owner)
            self._starts.append(self._num_blocks)
            self._ids.append(list(ids))
        self._num_blocks += len(ids)

    def replace(self, first_block: int, owner: int, ids: list[int] | tuple[int, ...]) -> list[RBlock]:
        """Logical blocks ``first_block ..`` (as many as ``ids``) now live on ``owner`` at
        ``ids``; returns the rBlocks they were in before, for their owners to free.

            before   | a a a | b b b b b |          replace(4, c, [x, y])
            after    | a a a | b | c c | b b |      returns [RBlock(b, 4, ..2 ids)]
        """
        end = first_block + len(ids)
        if not ids or first_block < 0 or end > self._num_blocks:
            raise IndexError(
                f"cannot replace blocks {first_block}..{end} of a table of {self._num_blocks}"
            )
        runs = list(zip(self._owners, self._starts, self._ids))
        k = bisect_right(self._starts, first_block) - 1
        last = bisect_right(self._starts, end - 1) - 1
        replaced, head, tail = [], [], []
        for o, s, run in runs[k : last + 1]:
            lo, hi = max(first_block, s), min(end, s + len(run))
            replaced.append(RBlock(o, lo, tuple(run[lo - s : hi - s])))
            if s + len(run) > end:
                tail.append((o, end, run[end - s :]))
            if s < first_block:
                del run[first_block - s :]  # the head keeps its list: no copy of it
                head.append((o, s, run))
        # Neighbouring runs of one owner join, so the table stays as short as it can.
        merged: list[tuple[int, int, list[int]]] = []
        for o, s, run in [*runs[:k], *head, (owner, first_block, list(ids)), *tail, *runs[last + 1 :]]:
            if merged and merged[-1][0] == o:
                merged[-1][2].extend(run)
            else:
                merged.append((o, s, run))
        self._owners = [o for o, _, _ in merged]
        self._starts = [s for _, s, _ in merged]
        self._ids = [run for _, _, run in merged]
        self._synced = min(self._synced, first_block)
        return replaced

    def take_update(self, request_id: str) -> TableUpdate | None:
        """What changed since the last update taken (None: nothing), and mark it seen."""
        start = self._synced
        if start == self._num_blocks:
            return None
        self._synced = self._num_blocks
        return TableUpdate(request_id, start, tuple(self.rblocks_between(start, self._num_blocks)))

    def resync(self) -> None:
        """The runners lost their copy: the next update carries the whole table."""
        self._synced = 0

    def rblocks_between(self, lo: int, hi: int) -> list[RBlock]:
        """The runs covering logical blocks lo .. hi-1, clipped to them."""
        out = []
        k = max(0, bisect_right(self._starts, lo) - 1)
        for o, s, ids in zip(self._owners[k:], self._starts[k:], self._ids[k:]):
            if s >= hi:
                break
            a, b = max(lo, s), min(hi, s + len(ids))
            if a < b:
                out.append(RBlock(o, a, tuple(ids[a - s : b - s])))
        return out

    def owners(self) -> set[int]:
        return set(self._owners)

    def spans(self) -> list[tuple[int, int, int]]:
        """(owner, first logical block, blocks) of every run, in order; no ids copied."""
        return [(o, s, len(ids)) for o, s, ids in zip(self._owners, self._starts, self._ids)]

    def blocks_by_owner(self) -> dict[int, int]:
        """owner -> how many of this request's blocks it holds."""
        counts: dict[int, int] = {}
        for owner, ids in zip(self._owners, self._ids):
            counts[owner] = counts.get(owner, 0) + len(ids)
        return counts

    def physical_ids(self, owner: int) -> list[int]:
        """Every physical id this request holds in ``owner``'s pool, in logical order."""
        return [i for o, ids in zip(self._owners, self._ids) if o == owner for i in ids]

    def slot(self, position: int, block_size: int) -> tuple[int, int, int]:
        """(owner, physical block id, offset in the block) of token ``position``."""
        logical = position // block_size
        if position < 0 or logical >= self._num_blocks:
            raise IndexError(
                f"token {position} is outside the {self._num_blocks} blocks of this table"
            )
        k = bisect_right(self._starts, logical) - 1
        return self._owners[k], self._ids[k][logical - self._starts[k]], position % block_size

    def clear(self) -> None:
        """Forget every rBlock, once the rManager has returned them to their owners."""
        self._owners, self._starts, self._ids = [], [], []
        self._num_blocks = 0
        self._synced = 0

    def __repr__(self) -> str:
        runs = ", ".join(f"{o}:{ids}" for o, ids in zip(self._owners, self._ids))
        return f"BlockTable([{runs}])"
