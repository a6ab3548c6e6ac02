"""Bookkeeping of one instance's KV blocks: which physical block ids are free.

An instance's pool has two tiers: device memory (ids ``0 .. device_blocks``) and, when
configured, host memory after it (ids ``device_blocks ..``). Every instance of a cluster
has the same split, so a block id alone says its tier (``Tiers``). Integer ids only; no
torch. The tensors the ids index live in ``KVCache``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import Enum


class Tier(Enum):
    DEVICE = "device"
    HOST = "host"


@dataclass(frozen=True)
class Tiers:
    """How a cluster's pools split into tiers: the first ``device_blocks`` ids of every
    pool are device memory, the next ``host_blocks`` host memory."""

    device_blocks: int
    host_blocks: int = 0

    @property
    def total(self) -> int:
        return self.device_blocks + self.host_blocks

    def of(self, block: int) -> Tier:
        return Tier.DEVICE if block < self.device_blocks else Tier.HOST

    def ids(self, tier: Tier) -> range:
        if tier is Tier.DEVICE:
            return range(self.device_blocks)
        return range(self.device_blocks, self.total)


class OutOfBlocks(RuntimeError):
    """Raised when an allocation asks for more blocks than are free."""


class BlockPool:
    """A free list per tier over ``tiers.total`` physical blocks, with double-free detection.

    ``BlockPool(n)`` is a device-only pool of n blocks."""

    def __init__(self, tiers: Tiers | int) -> None:
        tiers = Tiers(tiers) if isinstance(tiers, int) else tiers
        if tiers.device_blocks <= 0 or tiers.host_blocks < 0:
            raise ValueError(f"a block pool needs at least one device block, got {tiers}")
        self.tiers = tiers
        self.num_blocks = tiers.total
        self._free = {tier: deque(tiers.ids(tier)) for tier in Tier}
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free[Tier.DEVICE]) + len(self._free[Tier.HOST])

    def free_in(self, tier: Tier) -> int:
        return len(self._free[tier])

    def free_ids(self) -> list[int]:
        """The free block ids, in the order they will be handed out (device first)."""
        return [*self._free[Tier.DEVICE], *self._free[Tier.HOST]]

    @property
    def num_used(self) -> int:
        return len(self._used)

    def allocate(self, n: int, tier: Tier | None = None) -> list[int]:
        """Take ``n`` free blocks of ``tier`` (None: device first, then host); all or nothing."""
        tiers = list(Tier) if tier is None else [tier]
        free = sum(len(self._free[t]) for t in tiers)
        if n > free:
            raise OutOfBlocks(f"asked for {n} blocks, {free} free")
        ids = []
        for t in tiers:
            queue = self._free[t]
            while len(ids) < n and queue:
                ids.append(queue.popleft())
        self._used.update(ids)
        return ids

    def free(self, ids: list[int]) -> None:
        """Return blocks to the pool; a block that is not in use is a bug upstream."""
        for block in ids:
            if block not in self._used:
                raise ValueError(f"block {block} freed but not in use")
            self._used.remove(block)
            self._free[self.tiers.of(block)].append(block)

    def check_integrity(self) -> None:
        """free + used == capacity, no id both free and used, each free id in its tier."""
        assert self.num_free + len(self._used) == self.num_blocks, (
            f"free {self.num_free} + used {len(self._used)} != capacity {self.num_blocks}"
        )
        for tier, free in self._free.items():
            assert all(self.tiers.of(b) is tier for b in free), "a free block in the wrong tier"
            assert not self._used.intersection(free), "a block is both free and used"
