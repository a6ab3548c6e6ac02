"""The gManager: one per cluster, the global debt ledger and the creditor directory.

It never allocates anything. Its view is assembled from rManager heartbeats, so it is
*loosely coherent*: between heartbeats an instance's free count and debts may have moved
on. That is by design. A candidate list is advice; the creditor's answer to ``lend`` is
the authority, and a debtor whose candidate says no simply asks the next one.

The candidate order (most free first) is a second, deliberate staleness: it is
recomputed every ``resort_interval`` heartbeats applied (or on ``resort()``), not on
every query, so a query costs one pass over a list rather than a sort.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from infinite_llm.config import PoolingConfig
from infinite_llm.memory.rmanager import Heartbeat, lendable


@dataclass(frozen=True)
class InstanceLedger:
    """One instance as the gManager last heard of it. Zero debts are left out."""

    capacity: int
    free: int
    lent_to: dict[int, int] = field(default_factory=dict)  # debtor -> blocks
    borrowed_from: dict[int, int] = field(default_factory=dict)  # creditor -> blocks


@dataclass(frozen=True)
class Ledger:
    """A snapshot of the cluster's debts, for metrics and tests.

    The dicts are fresh copies: nothing done to a snapshot reaches the gManager.
    """

    instances: dict[int, InstanceLedger]

    def check_balanced(self) -> None:
        """Every debt is recorded on both sides: lent_to[a][b] == borrowed_from[b][a]."""
        empty = InstanceLedger(0, 0)
        for a, entry in self.instances.items():
            for b, n in entry.lent_to.items():
                got = self.instances.get(b, empty).borrowed_from.get(a, 0)
                assert got == n, f"{a} lent {n} blocks to {b}, which borrowed {got} from {a}"
            for b, n in entry.borrowed_from.items():
                got = self.instances.get(b, empty).lent_to.get(a, 0)
                assert got == n, f"{a} borrowed {n} blocks from {b}, which lent {got} to {a}"

    @property
    def total_debt(self) -> int:
        """Blocks held for a remote debtor, cluster-wide."""
        return sum(n for entry in self.instances.values() for n in entry.lent_to.values())


class GManager:
    """Debts and free space per instance, kept up to date by heartbeats."""

    def __init__(self, resort_interval: int = 8, config: PoolingConfig | None = None) -> None:
        if resort_interval < 1:
            raise ValueError(f"resort_interval must be >= 1, got {resort_interval}")
        self.resort_interval = resort_interval
        self.config = config or PoolingConfig()
        self._capacity: dict[int, int] = {}
        self._free: dict[int, int] = {}
        self._lent: dict[int, dict[int, int]] = {}
        self._borrowed: dict[int, dict[int, int]] = {}
        self._removed: set[int] = set()
        self._order: list[int] = []  # instances, most free first, as of the last sort
        self._since_sort = 0

    def register(self, instance_id: int, capacity: int) -> None:
        """Add an instance with an empty pool of ``capacity`` blocks (a restart may reuse an id)."""
        if instance_id in self._capacity:
            raise ValueError(f"instance {instance_id} is already registered")
        if capacity <= 0:
            raise ValueError(f"instance {instance_id}: capacity must be positive, got {capacity}")
        self._removed.discard(instance_id)
        self._capacity[instance_id] = capacity
        self._free[instance_id] = capacity
        self._lent[instance_id] = {}
        self._borrowed[instance_id] = {}
        self.resort()

    def remove(self, instance_id: int) -> None:
        """Forget a dead instance: no longer a candidate nor in the ledger.

        Other instances' entries naming it stay: those blocks are still held on the
        creditors until fault recovery frees them, and their heartbeats will say so.
        """
        if instance_id not in self._capacity:
            raise ValueError(f"instance {instance_id} is not registered")
        for table in (self._capacity, self._free, self._lent, self._borrowed):
            del table[instance_id]
        self._order.remove(instance_id)
        self._removed.add(instance_id)

    def apply(self, heartbeat: Heartbeat) -> None:
        """Fold one heartbeat into the ledger; a late one from a removed instance is dropped."""
        iid = heartbeat.instance_id
        if iid in self._removed:
            return
        if iid not in self._capacity:
            raise ValueError(f"heartbeat from unregistered instance {iid}")
        if heartbeat.num_free is not None:
            self._free[iid] = heartbeat.num_free
        for debts, changes in ((self._lent[iid], heartbeat.lent_to),
                               (self._borrowed[iid], heartbeat.borrowed_from)):
            for peer, n in changes:
                if n:
                    debts[peer] = n
                else:
                    debts.pop(peer, None)
        self._since_sort += 1
        if self._since_sort >= self.resort_interval:
            self.resort()

    def apply_all(self, heartbeats: list[Heartbeat]) -> None:
        """Fold a batch of heartbeats, in order: one message for every instance's beat of a
        step, where the gManager is a Ray actor."""
        for heartbeat in heartbeats:
            self.apply(heartbeat)

    def resort(self) -> None:
        """Recompute the candidate order from the free counts heard so far."""
        self._order = sorted(self._capacity, key=lambda i: (-self._free[i], i))
        self._since_sort = 0

    def candidates(self, debtor_id: int, need: int) -> list[int]:
        """Creditors for ``debtor_id`` to ask in turn, most free first (as of the last sort).

        Instances last heard to have no free block are left out. ``need`` is the number
        of blocks sought; the most-free-first policy asks every candidate in turn until
        it is met, so it does not narrow the list, and is kept for policies that would.
        """
        if need <= 0:
            raise ValueError(f"need must be positive, got {need}")
        return [i for i in self._order if i != debtor_id and self._free[i] > 0]

    def lendable_elsewhere(self, debtor_id: int) -> int:
        """What every other instance could still lend, by the lending rule on stale counts."""
        return sum(
            lendable(self.config, self._capacity[i], self._free[i], sum(self._lent[i].values()))
            for i in self._capacity
            if i != debtor_id
        )

    def max_request_blocks(self) -> int:
        """The most blocks one request can ever hold (``max_request_blocks`` below)."""
        return max_request_blocks(self._capacity, self.config)

    def ledger(self) -> Ledger:
        return Ledger({
            i: InstanceLedger(
                self._capacity[i], self._free[i], dict(self._lent[i]), dict(self._borrowed[i])
            )
            for i in sorted(self._capacity)
        })


def max_request_blocks(capacity: dict[int, int], config: PoolingConfig) -> int:
    """The most blocks one request can ever hold among instances of these capacities:
    its home's whole pool plus what every other instance may lend at most (its lend
    cap, less its reserve)."""
    if not config.enabled:
        return max(capacity.values(), default=0)
    caps = {
        i: max(0, min(int(c * config.max_lend_fraction), c - config.reserve_blocks))
        for i, c in capacity.items()
    }
    total = sum(caps.values())
    return max((c + total - caps[i] for i, c in capacity.items()), default=0)
