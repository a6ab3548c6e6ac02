"""Bookkeeping of one instance's KV blocks: which physical block ids are free.

Integer ids only; no torch. The tensors the ids index live in ``KVCache``.
"""

from __future__ import annotations

from collections import deque


class OutOfBlocks(RuntimeError):
    """Raised when an allocation asks for more blocks than are free."""


class BlockPool:
    """A free list over ``num_blocks`` physical blocks, with double-free detection."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"a block pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def free_ids(self) -> list[int]:
        """The free block ids, in the order they will be handed out."""
        return list(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` free blocks; all or nothing."""
        if n > len(self._free):
            raise OutOfBlocks(f"asked for {n} blocks, {len(self._free)} free")
        ids = [self._free.popleft() for _ in range(n)]
        self._used.update(ids)
        return ids

    def free(self, ids: list[int]) -> None:
        """Return blocks to the pool; a block that is not in use is a bug upstream."""
        for block in ids:
            if block not in self._used:
                raise ValueError(f"block {block} freed but not in use")
            self._used.remove(block)
            self._free.append(block)

    def check_integrity(self) -> None:
        """free + used == capacity, and no id is both free and used."""
        assert len(self._free) + len(self._used) == self.num_blocks, (
            f"free {len(self._free)} + used {len(self._used)} != capacity {self.num_blocks}"
        )
        assert not self._used.intersection(self._free), "a block is both free and used"
