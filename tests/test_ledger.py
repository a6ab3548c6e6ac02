"""Random traffic on a small cluster: no block is ever lost or double-owned, debts balance.

A hypothesis state machine drives 2-4 instances with pools of 3-12 blocks (and, on some
runs, a host-memory tier of 1-4 blocks each) through allocations (new requests and
growth, some keeping room at home), room kept for growth set at random, finishes,
aborts, live migrations (reserve on a target or, for host blocks, at home; switch,
abort or expire), heartbeats and re-sorts, and checks the memory invariants after every
step. Heartbeats are sent at random, so the
gManager's view is as stale as it is in a real cluster.
"""

from __future__ import annotations

from collections import Counter

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from infinite_llm.config import PoolingConfig
from infinite_llm.memory.block_pool import BlockPool, Tier, Tiers
from infinite_llm.memory.gmanager import GManager, InstanceLedger
from infinite_llm.memory.rblock import BlockTable
from infinite_llm.memory.rmanager import RManager


def free_ids(pool: BlockPool) -> list[int]:
    return pool.free_ids()


class PooledCluster(RuleBasedStateMachine):
    @initialize(
        capacities=st.lists(st.integers(3, 12), min_size=2, max_size=4),
        fraction=st.sampled_from([0.25, 0.5, 1.0]),
        reserve=st.integers(0, 2),
        enabled=st.sampled_from([True, True, True, False]),
        resort_interval=st.integers(1, 4),
        host=st.sampled_from([0, 0, 1, 4]),
    )
    def setup(self, capacities, fraction, reserve, enabled, resort_interval, host):
        config = PoolingConfig(enabled, fraction, reserve)
        self.gm = GManager(resort_interval)
        self.managers: dict[int, RManager] = {}

        def call(iid, method, *args):
            return getattr(self.managers[iid], method)(*args)

        for iid, capacity in enumerate(capacities):
            # With a host tier every pool has the same split (an id says its tier).
            tiers = Tiers(capacities[0], host) if host else Tiers(capacity)
            self.gm.register(iid, tiers.total)
            self.managers[iid] = RManager(iid, BlockPool(tiers), config, self.gm, call)
        self.requests: dict[str, tuple[int, BlockTable]] = {}
        # request -> (first block, target, reserved ids) of its migration in flight
        self.migrations: dict[str, tuple[int, int, list[int]]] = {}
        self.next_id = 0

    def _counts(self):
        return [(m.num_free, m.num_used, m.num_lent, m.lent_to, m.borrowed_from)
                for m in self.managers.values()]

    def _allocate(self, request_id: str, n: int, keep: int = 0) -> None:
        home, table = self.requests[request_id]
        before, rblocks = self._counts(), table.rblocks
        free = self.managers[home].num_free
        lent = {iid: m.num_lent for iid, m in self.managers.items()}
        if self.managers[home].allocate(request_id, table, n, keep):
            assert table.num_blocks == sum(rb.num_blocks for rb in rblocks) + n
            # The room kept at home stays free, what it could not keep aside.
            assert self.managers[home].num_free >= min(free, keep)
            for iid, m in self.managers.items():  # a creditor lends none of its kept room
                if m.num_lent > lent[iid]:
                    assert m.num_free >= m.keep + m.config.reserve_blocks
        else:
            assert self._counts() == before and table.rblocks == rblocks  # nothing changed

    def _pick(self, pick: int) -> str:
        return sorted(self.requests)[pick % len(self.requests)]

    @rule(home=st.integers(0, 3), n=st.integers(1, 8), keep=st.integers(0, 3))
    def start(self, home, n, keep):
        request_id = f"r{self.next_id}"
        self.next_id += 1
        self.requests[request_id] = (home % len(self.managers), BlockTable())
        self._allocate(request_id, n, keep)

    @rule(iid=st.integers(0, 3), keep=st.integers(0, 4))
    def keep_room(self, iid, keep):
        """An instance's scheduler keeps room for its requests' growth."""
        self.managers[iid % len(self.managers)].keep = keep

    @precondition(lambda self: self.requests)
    @rule(pick=st.integers(0, 99), n=st.integers(1, 4))
    def grow(self, pick, n):
        self._allocate(self._pick(pick), n)

    @precondition(lambda self: self.requests)
    @rule(pick=st.integers(0, 99))
    def finish(self, pick):
        request_id = self._pick(pick)
        self._drop_migration(request_id)
        home, table = self.requests.pop(request_id)
        self.managers[home].release(request_id, table)
        assert table.num_blocks == 0

    @precondition(lambda self: self.requests)
    @rule(pick=st.integers(0, 99), run=st.integers(0, 9), to=st.integers(0, 3),
          first=st.integers(0, 12), count=st.integers(1, 6))
    def reserve(self, pick, run, to, first, count):
        """Start a migration of part of one run of a request to another instance."""
        request_id = self._pick(pick)
        home, table = self.requests[request_id]
        runs = table.rblocks
        if request_id in self.migrations or not runs:
            return
        rb = runs[run % len(runs)]
        target = to % len(self.managers)
        first = rb.first_block + first % rb.num_blocks
        count = min(count, rb.end_block - first)
        tiers = self.managers[rb.owner].pool.tiers
        offset = first - rb.first_block
        host = all(tiers.of(b) is Tier.HOST for b in rb.block_ids[offset:offset + count])
        if target == rb.owner and not host:  # host blocks may move up at their owner
            return
        before = self._counts()
        ids = self.managers[home].reserve(request_id, target, count)
        if ids is None:
            assert self._counts() == before  # refused: nothing changed
        else:
            assert len(ids) == count
            self.migrations[request_id] = (first, target, ids)

    @precondition(lambda self: self.migrations)
    @rule(pick=st.integers(0, 99))
    def switch(self, pick):
        """The copies are done: the table switches, the blocks it left go back."""
        request_id = sorted(self.migrations)[pick % len(self.migrations)]
        first, target, ids = self.migrations.pop(request_id)
        home, table = self.requests[request_id]
        left = table.replace(first, target, ids)
        assert sum(rb.num_blocks for rb in left) == len(ids)
        self.managers[home].free_moved(request_id, left)

    @precondition(lambda self: self.migrations)
    @rule(pick=st.integers(0, 99))
    def abort_or_expire(self, pick):
        """Either side gives up, or the lease runs out: the reservation goes back."""
        self._drop_migration(sorted(self.migrations)[pick % len(self.migrations)])

    def _drop_migration(self, request_id: str) -> None:
        if request_id in self.migrations:
            _, target, ids = self.migrations.pop(request_id)
            home, _ = self.requests[request_id]
            self.managers[home].unreserve(request_id, target, ids)

    @rule(home=st.integers(0, 3), n=st.integers(1, 30))
    def abort(self, home, n):
        """A request refused or cut short right after its first allocation."""
        home %= len(self.managers)
        table = BlockTable()
        self.managers[home].allocate("aborted", table, n)
        self.managers[home].release("aborted", table)

    @rule(iid=st.integers(0, 3))
    def heartbeat(self, iid):
        self.gm.apply(self.managers[iid % len(self.managers)].heartbeat())

    @rule()
    def resort(self):
        self.gm.resort()

    @rule()
    def sync(self):
        """After a heartbeat from everyone the gManager knows exactly what they know."""
        for m in self.managers.values():
            self.gm.apply(m.heartbeat())
        ledger = self.gm.ledger()
        ledger.check_balanced()
        assert ledger.instances == {
            iid: InstanceLedger(m.capacity, m.num_free, m.lent_to, m.borrowed_from)
            for iid, m in self.managers.items()
        }

    @invariant()
    def every_block_has_one_place(self):
        places = Counter((iid, b) for iid, m in self.managers.items() for b in free_ids(m.pool))
        for _, table in self.requests.values():
            places.update((rb.owner, b) for rb in table.rblocks for b in rb.block_ids)
        for _, target, ids in self.migrations.values():
            places.update((target, b) for b in ids)
        expected = {(iid, b) for iid, m in self.managers.items() for b in range(m.capacity)}
        assert set(places) == expected and set(places.values()) == {1}

    @invariant()
    def counts_agree(self):
        held = Counter()  # (owner, home) -> blocks held by the tables
        for home, table in self.requests.values():
            for rb in table.rblocks:
                held[rb.owner, home] += rb.num_blocks
        for request_id, (_, target, ids) in self.migrations.items():
            held[target, self.requests[request_id][0]] += len(ids)
        for iid, m in self.managers.items():
            m.check_integrity()
            assert m.num_used == held[iid, iid]
            assert m.num_lent <= int(m.capacity * m.config.max_lend_fraction)  # the lend cap
            for peer, other in self.managers.items():
                if peer != iid:
                    lent = m.lent_to.get(peer, 0)
                    assert lent == other.borrowed_from.get(iid, 0) == held[iid, peer]

    def teardown(self):
        if not hasattr(self, "managers"):
            return
        for request_id in list(self.migrations):
            self._drop_migration(request_id)
        for request_id, (home, table) in self.requests.items():
            self.managers[home].release(request_id, table)
        self.requests.clear()
        self.every_block_has_one_place()
        self.sync()
        for m in self.managers.values():
            assert m.num_free == m.capacity
        assert self.gm.ledger().total_debt == 0


PooledCluster.TestCase.settings = settings(
    max_examples=300, stateful_step_count=30, deadline=None
)
TestPooledCluster = PooledCluster.TestCase
