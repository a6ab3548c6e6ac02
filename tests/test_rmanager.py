"""rManager, gManager and block table on tiny pools, with exact owners and block ids."""

from __future__ import annotations

import pytest

from infinite_llm.config import PoolingConfig
from infinite_llm.memory.block_pool import BlockPool
from infinite_llm.memory.gmanager import GManager, InstanceLedger, Ledger
from infinite_llm.memory.rblock import BlockTable, RBlock
from infinite_llm.memory.rmanager import Heartbeat, RManager, lendable


def make_cluster(capacities, config=PoolingConfig(), resort_interval=1):
    """RManagers wired in process; ``calls`` records every remote (instance, method)."""
    gm = GManager(resort_interval)
    managers: dict[int, RManager] = {}
    calls: list[tuple[int, str]] = []

    def call(iid, method, *args):
        calls.append((iid, method))
        return getattr(managers[iid], method)(*args)

    for iid, capacity in enumerate(capacities):
        gm.register(iid, capacity)
        managers[iid] = RManager(iid, BlockPool(capacity), config, gm, call)
    return managers, gm, calls


def sync(managers, gm) -> Ledger:
    for m in managers.values():
        gm.apply(m.heartbeat())
    return gm.ledger()


def table_of(*runs: tuple[int, list[int]]) -> BlockTable:
    table = BlockTable()
    for owner, ids in runs:
        table.append(owner, ids)
    return table


def assert_all_home(managers, gm) -> None:
    for m in managers.values():
        m.check_integrity()
        assert (m.num_free, m.num_used, m.num_lent) == (m.capacity, 0, 0)
        assert m.lent_to == {} and m.borrowed_from == {}
    ledger = sync(managers, gm)
    ledger.check_balanced()
    assert ledger.total_debt == 0


def test_block_table_runs_and_slots():
    table = table_of((0, [7, 2, 9]), (2, [0]), (2, [3]), (0, [4, 1]))
    a, b, c = RBlock(0, 0, (7, 2, 9)), RBlock(2, 3, (0, 3)), RBlock(0, 5, (4, 1))
    assert table.rblocks == (a, b, c)
    assert table.num_blocks == 7 and table.owners() == {0, 2}
    assert table.blocks_by_owner() == {0: 5, 2: 2}
    assert table.physical_ids(0) == [7, 2, 9, 4, 1] and table.physical_ids(5) == []
    assert [table.slot(p, 4) for p in (0, 13, 16, 27)] == [
        (0, 7, 0), (2, 0, 1), (2, 3, 0), (0, 1, 3)]
    for bad in (-1, 28):
        with pytest.raises(IndexError, match="outside the 7 blocks"):
            table.slot(bad, 4)
    assert (b.token_range(4, 22), c.token_range(4, 22), c.token_range(4, 10)) == (
        (12, 20), (20, 22), (20, 20))
    table.clear()
    assert table.rblocks == () and table.num_blocks == 0


def test_local_allocation_uses_home_only():
    managers, _, calls = make_cluster([4, 4])
    m0, table = managers[0], BlockTable()
    assert m0.allocate("a", table, 3) and m0.allocate("a", table, 0)
    assert m0.allocate("a", table, 1)
    assert table.rblocks == (RBlock(0, 0, (0, 1, 2, 3)),)
    assert (m0.num_free, m0.num_used, m0.num_lent) == (0, 4, 0)
    assert calls == []


def test_borrows_from_the_most_free_instance_when_home_is_short():
    managers, gm, calls = make_cluster([2, 4, 6], PoolingConfig(max_lend_fraction=1.0))
    table = BlockTable()
    assert managers[0].allocate("a", table, 5)
    assert table.rblocks == (RBlock(0, 0, (0, 1)), RBlock(2, 2, (0, 1, 2)))
    assert table.slot(9, 2) == (2, 2, 1)
    assert calls == [(2, "lend")]
    assert managers[0].borrowed_from == {2: 3} and managers[2].lent_to == {0: 3}
    assert (managers[2].num_free, managers[2].num_used, managers[2].num_lent) == (3, 0, 3)
    ledger = sync(managers, gm)
    ledger.check_balanced()
    assert ledger.instances[0] == InstanceLedger(2, 0, {}, {2: 3})
    assert ledger.instances[2] == InstanceLedger(6, 3, {0: 3}, {})


def test_partial_grants_let_one_allocation_span_creditors():
    managers, _, _ = make_cluster([1, 4, 4])  # each creditor lends at most half: 2
    table = BlockTable()
    assert managers[0].allocate("a", table, 5)
    assert table.rblocks == (RBlock(0, 0, (0,)), RBlock(1, 1, (0, 1)), RBlock(2, 3, (0, 1)))
    assert managers[0].borrowed_from == {1: 2, 2: 2}


@pytest.mark.parametrize(
    "config, own, asks, grants",
    [
        (PoolingConfig(max_lend_fraction=1.0), 4, [1], [None]),  # full
        (PoolingConfig(), 0, [3, 1], [[0, 1], None]),  # half of 4 lent: over the cap
        (PoolingConfig(max_lend_fraction=1.0, reserve_blocks=3), 0, [5, 1], [[0], None]),
        (PoolingConfig(enabled=False), 0, [1], [None]),
    ],
)
def test_lend_grants_what_it_can_then_refuses(config, own, asks, grants):
    managers, _, _ = make_cluster([4, 4], config)
    assert managers[1].allocate("own", BlockTable(), own)
    assert [managers[1].lend(0, f"r{i}", n) for i, n in enumerate(asks)] == grants
    managers[1].check_integrity()


def test_lendable_is_a_function_of_counts():
    config = PoolingConfig(max_lend_fraction=0.5, reserve_blocks=2)
    assert [lendable(config, 10, free, 0) for free in (10, 4, 2, 0)] == [5, 2, 0, 0]
    assert lendable(config, 10, 10, 4) == 1
    assert lendable(PoolingConfig(enabled=False), 10, 10, 0) == 0


def test_refused_debtor_asks_the_next_candidate():
    managers, gm, calls = make_cluster([1, 8, 4])
    assert managers[1].allocate("own", BlockTable(), 8)  # no heartbeat: gManager says 8 free
    assert gm.candidates(0, 2) == [1, 2]
    table = BlockTable()
    assert managers[0].allocate("a", table, 3)
    assert calls == [(1, "lend"), (2, "lend")]
    assert table.rblocks == (RBlock(0, 0, (0,)), RBlock(2, 1, (0, 1)))


def test_all_or_nothing_when_the_cluster_cannot_give_n():
    managers, gm, calls = make_cluster([2, 2, 2])  # each creditor lends at most 1
    table = BlockTable()
    assert managers[0].allocate("a", table, 1)
    before = [(m.num_free, m.num_used, m.num_lent) for m in managers.values()]
    assert not managers[0].allocate("a", table, 5)  # 1 local + 1 + 1 < 5
    assert table.rblocks == (RBlock(0, 0, (0,)),)
    assert calls == [(1, "lend"), (2, "lend"), (1, "reclaim"), (2, "reclaim")]
    assert [(m.num_free, m.num_used, m.num_lent) for m in managers.values()] == before
    assert all(m.borrowed_from == {} and m.lent_to == {} for m in managers.values())
    managers[0].release("a", table)
    assert_all_home(managers, gm)


def test_isolated_instances_never_lend_or_borrow():
    managers, _, calls = make_cluster([2, 8], PoolingConfig(enabled=False))
    table = BlockTable()
    assert not managers[0].allocate("a", table, 3)
    assert calls == [] and table.num_blocks == 0 and managers[0].num_free == 2
    assert managers[1].lend(0, "a", 1) is None


def test_release_returns_every_block_to_its_owner():
    managers, gm, _ = make_cluster([2, 4, 6], PoolingConfig(max_lend_fraction=1.0))
    a, b = BlockTable(), BlockTable()
    assert managers[0].allocate("a", a, 5)  # 2 local + 3 from instance 2
    assert managers[1].allocate("b", b, 6)  # 4 local + 2 from instance 2 (stale view)
    assert b.rblocks == (RBlock(1, 0, (0, 1, 2, 3)), RBlock(2, 4, (3, 4)))
    assert managers[2].lent_to == {0: 3, 1: 2} and managers[2].num_free == 1
    managers[0].release("a", a)
    managers[1].release("b", b)
    assert a.num_blocks == 0 and b.num_blocks == 0
    assert_all_home(managers, gm)


def test_two_debtors_race_for_one_creditor_with_a_stale_view():
    managers, gm, calls = make_cluster([1, 1, 4, 4])  # 2 and 3 each lend at most 2
    a, b = BlockTable(), BlockTable()
    assert managers[0].allocate("a", a, 3)
    assert gm.candidates(1, 2)[0] == 2  # no heartbeat yet: 2 still looks the most free
    assert managers[1].allocate("b", b, 3)  # 2 says no (lend cap); 3 serves it
    assert calls == [(2, "lend"), (2, "lend"), (3, "lend")]
    assert a.rblocks == (RBlock(0, 0, (0,)), RBlock(2, 1, (0, 1)))
    assert b.rblocks == (RBlock(1, 0, (0,)), RBlock(3, 1, (0, 1)))
    held = [(rb.owner, i) for t in (a, b) for rb in t.rblocks for i in rb.block_ids]
    assert len(held) == len(set(held)) == 6
    assert managers[2].lent_to == {0: 2} and managers[3].lent_to == {1: 2}
    sync(managers, gm).check_balanced()
    gm.resort()
    assert gm.candidates(1, 1) == [2, 3]  # both now at 2 free, instance 0 at none
    managers[0].release("a", a)
    managers[1].release("b", b)
    assert_all_home(managers, gm)


def test_the_loser_of_a_race_rolls_back():
    managers, gm, calls = make_cluster([1, 1, 4, 2])  # 2 lends 2, 3 lends 1
    a, b = BlockTable(), BlockTable()
    assert managers[0].allocate("a", a, 3)
    assert not managers[1].allocate("b", b, 3)  # 2: no, 3: one block, 0 (stale): no
    assert calls[1:] == [(2, "lend"), (3, "lend"), (0, "lend"), (3, "reclaim")]
    assert b.num_blocks == 0 and managers[1].num_free == 1 and managers[3].num_free == 2
    managers[0].release("a", a)
    assert_all_home(managers, gm)


def test_bad_reclaim_is_an_error_and_changes_nothing():
    managers, gm, _ = make_cluster([1, 4])
    table = BlockTable()
    assert managers[0].allocate("a", table, 3)  # instance 1 lent [0, 1]
    m1 = managers[1]
    for debtor, request, ids in [(0, "b", [0]), (2, "a", [0]), (0, "a", [3]), (0, "a", [0, 0])]:
        with pytest.raises(ValueError, match="were not lent to instance"):
            m1.reclaim(debtor, request, ids)
    assert m1.lent_to == {0: 2} and m1.num_free == 2
    managers[0].release("a", table)
    assert_all_home(managers, gm)


def test_bad_release_is_an_error_and_changes_nothing():
    managers, gm, _ = make_cluster([2, 4])
    table = BlockTable()
    assert managers[0].allocate("a", table, 3)
    with pytest.raises(ValueError, match="not all held"):
        managers[0].release("a", table_of((0, [0, 0])))
    with pytest.raises(ValueError, match="only 1 are borrowed"):
        managers[0].release("a", table_of((1, [0, 1])))
    assert managers[0].num_used == 2 and managers[1].lent_to == {0: 1}
    managers[0].release("a", table)
    assert_all_home(managers, gm)


def test_bad_arguments():
    managers, _, _ = make_cluster([2, 2])
    with pytest.raises(ValueError, match="negative"):
        managers[0].allocate("a", BlockTable(), -1)
    with pytest.raises(ValueError, match="itself"):
        managers[0].lend(0, "a", 1)
    with pytest.raises(ValueError, match="at least one block"):
        managers[0].lend(1, "a", 0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_lend_fraction=-0.1), "max_lend_fraction"),
        (dict(max_lend_fraction=1.5), "max_lend_fraction"),
        (dict(max_lend_fraction=float("nan")), "max_lend_fraction"),
        (dict(reserve_blocks=-1), "reserve_blocks must be >= 0"),
        (dict(reserve_blocks=1.5), "reserve_blocks must be an int"),
        (dict(enabled="yes"), "enabled must be a bool"),
    ],
)
def test_bad_pooling_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PoolingConfig(**kwargs)


def test_heartbeats_carry_only_what_changed():
    managers, gm, _ = make_cluster([2, 4])
    assert managers[0].heartbeat().is_empty
    table = BlockTable()
    assert managers[0].allocate("a", table, 3)
    assert managers[0].heartbeat() == Heartbeat(0, 0, (), ((1, 1),))
    assert managers[1].heartbeat() == Heartbeat(1, 3, ((0, 1),), ())
    assert managers[0].heartbeat().is_empty
    managers[0].release("a", table)
    assert managers[0].heartbeat() == Heartbeat(0, 2, (), ((1, 0),))
    assert managers[1].heartbeat() == Heartbeat(1, 4, ((0, 0),), ())


def test_gmanager_resorts_periodically_and_forgets_the_dead():
    gm = GManager(resort_interval=2)
    for iid, capacity in enumerate([4, 8, 6]):
        gm.register(iid, capacity)
    assert gm.candidates(0, 1) == [1, 2]
    gm.apply(Heartbeat(1, num_free=2))
    assert gm.candidates(0, 1) == [1, 2]  # one heartbeat: the order is stale
    gm.apply(Heartbeat(2))
    assert gm.candidates(0, 1) == [2, 1]  # the second one re-sorts
    gm.apply(Heartbeat(2, num_free=0))
    assert gm.candidates(0, 1) == [1]  # none free as last heard: not asked
    gm.remove(1)
    assert gm.candidates(0, 1) == [] and sorted(gm.ledger().instances) == [0, 2]
    gm.apply(Heartbeat(1, num_free=8))  # late heartbeat of the dead: dropped
    with pytest.raises(ValueError, match="unregistered"):
        gm.apply(Heartbeat(7))
    with pytest.raises(ValueError, match="already registered"):
        gm.register(0, 4)
    with pytest.raises(ValueError, match="resort_interval"):
        GManager(0)
    with pytest.raises(ValueError, match="need"):
        gm.candidates(0, 0)


def test_ledger_detects_a_one_sided_debt():
    Ledger({0: InstanceLedger(4, 2, {1: 2}), 1: InstanceLedger(4, 4, {}, {0: 2})}).check_balanced()
    with pytest.raises(AssertionError, match="0 lent 2 blocks to 1, which borrowed 0"):
        Ledger({0: InstanceLedger(4, 2, {1: 2}), 1: InstanceLedger(4, 4)}).check_balanced()


def test_the_room_kept_for_growth_is_neither_lent_nor_taken_by_an_admission():
    managers, gm, _ = make_cluster([6, 6], PoolingConfig(max_lend_fraction=1.0))
    home, creditor = managers[0], managers[1]
    creditor.keep = 4  # its requests will grow into 4 of its 6 free blocks
    sync(managers, gm)
    table = BlockTable()
    # 9 blocks asked with 2 kept at home: 4 local, 2 lent (6 free - 4 kept): 3 short.
    assert not home.allocate("a", table, 9, keep=2)
    assert table.num_blocks == 0 and home.num_free == 6 and creditor.num_free == 6
    assert home.allocate("a", table, 6, keep=2)
    assert table.blocks_by_owner() == {0: 4, 1: 2}
    assert home.num_free == 2 and creditor.num_free == 4 == creditor.keep
    # Migrations into the creditor (or back home) leave the kept room alone too.
    assert creditor.lend(0, "b", 1) is None
    home.keep = 2
    assert home.reserve("a", 0, 1) is None
    home.release("a", table)
    assert_all_home(managers, gm)
