"""Where a request's KV lives: its block table, an ordered list of rBlocks.

An rBlock is a run of consecutive logical blocks of one request stored on one instance
(its *owner*). The table only ever grows at the end, and a new run starts whenever the
owner changes, so an owner may appear in several rBlocks::

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


class BlockTable:
    """A request's rBlocks in logical order; appended to by its home rManager only."""

    def __init__(self) -> None:
        self._rblocks: list[RBlock] = []

    @property
    def rblocks(self) -> tuple[RBlock, ...]:
        return tuple(self._rblocks)

    @property
    def num_blocks(self) -> int:
        return self._rblocks[-1].end_block if self._rblocks else 0

    def append(self, owner: int, ids: list[int] | tuple[int, ...]) -> None:
        """Add blocks at the end: extends the last rBlock if it has the same owner."""
        if not ids:
            return
        last = self._rblocks[-1] if self._rblocks else None
        if last is not None and last.owner == owner:
            self._rblocks[-1] = RBlock(owner, last.first_block, last.block_ids + tuple(ids))
        else:
            self._rblocks.append(RBlock(owner, self.num_blocks, tuple(ids)))

    def owners(self) -> set[int]:
        return {rb.owner for rb in self._rblocks}

    def by_owner(self) -> dict[int, list[RBlock]]:
        """The rBlocks grouped by owner, each group in logical order."""
        groups: dict[int, list[RBlock]] = {}
        for rb in self._rblocks:
            groups.setdefault(rb.owner, []).append(rb)
        return groups

    def physical_ids(self, owner: int) -> list[int]:
        """Every physical id this request holds in ``owner``'s pool, in logical order."""
        return [i for rb in self._rblocks if rb.owner == owner for i in rb.block_ids]

    def slot(self, position: int, block_size: int) -> tuple[int, int, int]:
        """(owner, physical block id, offset in the block) of token ``position``."""
        logical = position // block_size
        if position < 0 or logical >= self.num_blocks:
            raise IndexError(
                f"token {position} is outside the {self.num_blocks} blocks of this table"
            )
        # The rBlock whose first_block is the last one <= logical.
        k = bisect_right([rb.first_block for rb in self._rblocks], logical) - 1
        rb = self._rblocks[k]
        return rb.owner, rb.block_ids[logical - rb.first_block], position % block_size

    def clear(self) -> None:
        """Forget every rBlock, once the rManager has returned them to their owners."""
        self._rblocks.clear()

    def __repr__(self) -> str:
        runs = ", ".join(f"{rb.owner}:{list(rb.block_ids)}" for rb in self._rblocks)
        return f"BlockTable([{runs}])"
