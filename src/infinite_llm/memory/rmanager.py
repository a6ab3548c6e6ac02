"""The rManager: one per instance, the only writer of its pool's bookkeeping.

It allocates blocks for the requests whose home is this instance, borrows from other
instances (creditors) when its own pool is short, lends to remote debtors first come
first served, and reports what changed to the gManager in heartbeats.

Every block of the pool is in exactly one of three states, and the counts say so::

    capacity = num_free + num_used (own requests' KV, here) + num_lent (remote debtors' KV)

A pool may have a host-memory tier after its device blocks (``BlockPool``): a request
takes device memory anywhere in the cluster (its own, then borrowed) before host memory
(its own, then borrowed), and migrations always move into device memory.

Other instances are reached only through ``call(instance_id, method_name, *args)``,
which invokes ``method_name`` on that instance's rManager (a direct call in process,
an actor call on Ray). Nothing here knows which. Pure bookkeeping: no torch.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from infinite_llm.config import PoolingConfig
from infinite_llm.memory.block_pool import BlockPool, Tier
from infinite_llm.memory.rblock import BlockTable, RBlock

Call = Callable[..., Any]


class CreditorDirectory(Protocol):
    """What an rManager needs of the gManager: who might lend, best first."""

    def candidates(self, debtor_id: int, need: int) -> list[int]: ...

    def lendable_elsewhere(self, debtor_id: int) -> int: ...


@dataclass(frozen=True)
class Heartbeat:
    """What changed on one instance since its previous heartbeat.

    Changed entries carry their *new value*, not a difference: applying a heartbeat
    twice is harmless, and a lost one only leaves those entries stale until they change
    again. A peer whose count fell to zero is sent as ``(peer, 0)``.
    """

    instance_id: int
    num_free: int | None = None  # None: unchanged
    lent_to: tuple[tuple[int, int], ...] = ()  # (debtor, blocks lent to it now)
    borrowed_from: tuple[tuple[int, int], ...] = ()  # (creditor, blocks borrowed now)

    @property
    def is_empty(self) -> bool:
        return self.num_free is None and not self.lent_to and not self.borrowed_from


def lendable(config: PoolingConfig, capacity: int, num_free: int, num_lent: int) -> int:
    """How many blocks an instance may still lend: the lend cap and the reserve both hold."""
    if not config.enabled:
        return 0
    cap = int(capacity * config.max_lend_fraction)
    return max(0, min(num_free - config.reserve_blocks, cap - num_lent))


def _changed(old: dict[int, int], new: dict[int, int]) -> tuple[tuple[int, int], ...]:
    if old == new:  # most heartbeats: nothing lent or borrowed changed
        return ()
    return tuple((p, new.get(p, 0)) for p in sorted(old.keys() | new.keys())
                 if old.get(p, 0) != new.get(p, 0))


class RManager:
    """One instance's blocks: allocate, borrow, lend, release, reclaim, heartbeat.

    A lend is a partial grant: a creditor asked for n gives ``min(n, lendable)`` blocks
    and says no (None) only when it can give none, so one allocation may span several
    creditors. ``allocate`` itself stays all or nothing for the request: it gives back
    whatever it took when the cluster cannot supply every block asked for.
    """

    def __init__(
        self,
        instance_id: int,
        pool: BlockPool,
        config: PoolingConfig,
        gmanager: CreditorDirectory,
        call: Call,
    ) -> None:
        self.instance_id = instance_id
        self.pool = pool
        self.config = config
        self.gmanager = gmanager
        self.call = call
        self._own: set[int] = set()  # physical ids holding this instance's requests' KV
        self._lent: dict[int, tuple[int, str]] = {}  # physical id -> (debtor, request)
        self._lent_to: Counter[int] = Counter()  # debtor -> blocks lent to it now
        self._borrowed: Counter[int] = Counter()  # creditor -> blocks borrowed from it
        self.keep = 0  # free blocks its scheduler keeps for its requests' growth
        # What the gManager was last told; registration starts it at an empty pool.
        self._reported: tuple[int, dict[int, int], dict[int, int]] = (pool.num_blocks, {}, {})

    # -- counts ---------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free(self) -> int:
        return self.pool.num_free

    @property
    def num_used(self) -> int:
        return len(self._own)

    @property
    def num_lent(self) -> int:
        return len(self._lent)

    @property
    def lent_to(self) -> dict[int, int]:
        return {peer: n for peer, n in self._lent_to.items() if n}

    @property
    def borrowed_from(self) -> dict[int, int]:
        return {peer: n for peer, n in self._borrowed.items() if n}

    def borrowable(self) -> int:
        """Blocks the other instances could lend now, as the gManager last heard (advice)."""
        if not self.config.enabled:
            return 0
        return self.gmanager.lendable_elsewhere(self.instance_id)

    # -- the home side ----------------------------------------------------------------

    def allocate(
        self, request_id: str, table: BlockTable, n: int, keep: int = 0, borrow: bool = True
    ) -> bool:
        """Give ``request_id`` n more blocks, appended to ``table``; all or nothing.

        Local blocks first, except ``keep`` of them (room an admission leaves at home
        for the growth of the requests here); the remainder is borrowed (unless
        ``borrow`` is False) from the gManager's candidates in their order, each
        granting what it can. On failure everything taken in this call is given back,
        ``table`` is untouched, and the answer is False.
        """
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({n})")
        grants: list[tuple[int, list[int]]] = []
        missing = n
        try:
            for tier in Tier if self.pool.tiers.host_blocks else [Tier.DEVICE]:
                free = self.pool.free_in(tier)
                usable = max(0, free - keep)
                keep = max(0, keep - free)  # what the device tier could not keep, the host keeps
                local = self.pool.allocate(min(missing, usable), tier)
                self._own.update(local)
                grants.append((self.instance_id, local))
                missing -= len(local)
                if missing and self.config.enabled and borrow:
                    missing = self._borrow(request_id, missing, grants, tier)
                if not missing:
                    break
        except BaseException:
            self._give_back(request_id, grants)  # a peer failed mid-borrow: undo, then raise
            raise
        if missing:
            self._give_back(request_id, grants)
            return False
        for owner, ids in grants:
            table.append(owner, ids)
        return True

    def _borrow(
        self, request_id: str, missing: int, grants: list[tuple[int, list[int]]], tier: Tier
    ) -> int:
        """Ask the candidates in order for blocks of ``tier``, appending each grant;
        returns what is still missing."""
        for peer in self.gmanager.candidates(self.instance_id, missing):
            if peer == self.instance_id:
                continue
            ids = self.call(peer, "lend", self.instance_id, request_id, missing, tier)
            if not ids:
                continue  # it said no: the gManager's view was stale; ask the next
            self._borrowed[peer] += len(ids)
            grants.append((peer, list(ids)))
            if len(ids) > missing:
                raise RuntimeError(f"instance {peer} lent {len(ids)} blocks, {missing} asked")
            missing -= len(ids)
            if not missing:
                break
        return missing

    def release(self, request_id: str, table: BlockTable) -> None:
        """Free every block of a finished, aborted or failed request, then clear its table.

        Local blocks go back to this pool; borrowed ones to their creditors via
        ``reclaim``. A table naming blocks this instance does not hold for its own
        requests is a bug: it raises before anything is freed.
        """
        groups = {owner: table.physical_ids(owner) for owner in table.owners()}
        local = groups.pop(self.instance_id, [])
        if len(set(local)) != len(local) or not self._own.issuperset(local):
            raise ValueError(
                f"request {request_id!r}: its table names local blocks {sorted(local)} that "
                f"are not all held for this instance's requests"
            )
        for peer, ids in groups.items():
            if len(ids) > self._borrowed[peer]:
                raise ValueError(
                    f"request {request_id!r}: {len(ids)} blocks on instance {peer}, but only "
                    f"{self._borrowed[peer]} are borrowed from it"
                )
        self._give_back(request_id, [(self.instance_id, local), *groups.items()])
        table.clear()

    # -- live migration (the home side) -------------------------------------------------

    def reserve(self, request_id: str, target: int, n: int) -> list[int] | None:
        """Reserve n device blocks on ``target`` for moving some of ``request_id``'s KV
        there: this pool when ``target`` is this instance (blocks coming home, or up
        from host memory), else a lend from ``target``, whose answer is the authority
        (the gManager's view may be stale). All or nothing: None when ``target`` cannot
        give all n. Reserved blocks count as used here / lent there at once, so the
        ledger balances throughout."""
        if n <= 0:
            raise ValueError(f"a reservation asks for at least one block, got {n}")
        if target == self.instance_id:
            if self.pool.free_in(Tier.DEVICE) - self.keep < n:  # the growth room stays
                return None
            ids = self.pool.allocate(n, Tier.DEVICE)
            self._own.update(ids)
            return ids
        if not self.config.enabled:
            return None
        ids = self.call(target, "lend", self.instance_id, request_id, n, Tier.DEVICE)
        if not ids:
            return None
        self._borrowed[target] += len(ids)
        if len(ids) < n:  # a partial grant is no reservation: give it back
            self._give_back(request_id, [(target, list(ids))])
            return None
        return list(ids)

    def unreserve(
        self, request_id: str, target: int, ids: list[int], target_alive: bool = True
    ) -> None:
        """A migration was aborted: its reserved blocks go back (a dead target's blocks
        went with it: only this side's count is undone)."""
        if target_alive:
            self._give_back(request_id, [(target, list(ids))])
        else:
            self._borrowed[target] -= len(ids)

    def free_moved(self, request_id: str, moved: list[RBlock]) -> None:
        """A migration switched the table: the blocks the request left go back to their
        owners (this pool, or the creditors that lent them)."""
        self._give_back(request_id, [(rb.owner, list(rb.block_ids)) for rb in moved])

    def _give_back(self, request_id: str, grants: list[tuple[int, list[int]]]) -> None:
        for owner, ids in grants:
            if not ids:
                continue
            if owner == self.instance_id:
                self._own.difference_update(ids)
                self.pool.free(ids)
            else:
                self.call(owner, "reclaim", self.instance_id, request_id, ids)
                self._borrowed[owner] -= len(ids)

    # -- the creditor side ------------------------------------------------------------

    def lend(
        self, debtor_id: int, request_id: str, n: int, tier: Tier | None = None
    ) -> list[int] | None:
        """Serve a remote borrow: up to n blocks of ``tier`` (None: device first), or
        None when none can be lent.

        Only this pool is ever touched: a creditor never borrows on a debtor's behalf,
        so debts are one hop and a refusal is final for this call.
        """
        if n <= 0:
            raise ValueError(f"a lend asks for at least one block, got {n}")
        if debtor_id == self.instance_id:
            raise ValueError(f"instance {debtor_id} cannot lend to itself")
        # Room its own scheduler keeps for its requests' growth is not lent either.
        free = self.num_free - self.keep
        grant = min(n, lendable(self.config, self.capacity, free, self.num_lent))
        if tier is not None:
            grant = min(grant, self.pool.free_in(tier))
        if grant <= 0:
            return None
        ids = self.pool.allocate(grant, tier)
        for block in ids:
            self._lent[block] = (debtor_id, request_id)
        self._lent_to[debtor_id] += grant
        return ids

    def reclaim(self, debtor_id: int, request_id: str, ids: list[int]) -> None:
        """Take back blocks lent to ``debtor_id`` for ``request_id``; a mismatch is a bug."""
        self._unlend(debtor_id, request_id, ids)
        self.pool.free(list(ids))

    def take_over(self, debtor_id: int, request_id: str, ids: list[int]) -> None:
        """Blocks lent to ``debtor_id`` for ``request_id`` now hold one of this
        instance's own requests (a cancelled debt cycle): lent -> used, nothing freed."""
        self._unlend(debtor_id, request_id, ids)
        self._own.update(ids)

    def settle(self, creditor_id: int, n: int) -> None:
        """n blocks borrowed from ``creditor_id`` were taken over by it (a cancelled debt
        cycle): this instance no longer owes them."""
        if not 0 < n <= self._borrowed[creditor_id]:
            raise ValueError(
                f"instance {self.instance_id} cannot settle {n} blocks with {creditor_id}, "
                f"it borrowed {self._borrowed[creditor_id]}"
            )
        self._borrowed[creditor_id] -= n

    def _unlend(self, debtor_id: int, request_id: str, ids: list[int]) -> None:
        wrong = [b for b in ids if self._lent.get(b) != (debtor_id, request_id)]
        if wrong or len(set(ids)) != len(ids):
            raise ValueError(
                f"instance {self.instance_id}: blocks {sorted(wrong or ids)} were not lent to "
                f"instance {debtor_id} for request {request_id!r}"
            )
        for block in ids:
            del self._lent[block]
        self._lent_to[debtor_id] -= len(ids)

    # -- reporting --------------------------------------------------------------------

    def heartbeat(self) -> Heartbeat:
        """What changed since the previous heartbeat, for ``GManager.apply``."""
        free, lent, borrowed = self.num_free, self.lent_to, self.borrowed_from
        old_free, old_lent, old_borrowed = self._reported
        self._reported = (free, lent, borrowed)
        return Heartbeat(
            self.instance_id,
            None if free == old_free else free,
            _changed(old_lent, lent),
            _changed(old_borrowed, borrowed),
        )

    def report(self) -> Heartbeat:
        """Everything the ledger holds of this instance, not only what changed: what a new
        gManager is rebuilt from (``GManager.apply`` takes it like any heartbeat)."""
        free, lent, borrowed = self.num_free, self.lent_to, self.borrowed_from
        self._reported = (free, lent, borrowed)
        return Heartbeat(self.instance_id, free, tuple(sorted(lent.items())),
                         tuple(sorted(borrowed.items())))

    def check_integrity(self) -> None:
        """free + used + lent == capacity, the three states disjoint, the pool sound."""
        self.pool.check_integrity()
        assert self.num_free + self.num_used + self.num_lent == self.capacity, (
            f"instance {self.instance_id}: free {self.num_free} + used {self.num_used} + "
            f"lent {self.num_lent} != capacity {self.capacity}"
        )
        assert not self._own.intersection(self._lent), "a block is both used and lent"
        assert all(n >= 0 for n in self._borrowed.values()), "negative borrowed count"
        counted = Counter(debtor for debtor, _ in self._lent.values())
        assert counted == +self._lent_to, f"lent counts {dict(self._lent_to)} != {dict(counted)}"
