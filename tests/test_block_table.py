"""Block tables: runs replaced in place, only what changed handed to the runners, and
the runners' copy (``KVTable``) always equal to the table it mirrors."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infinite_llm.attention.tables import KVTables
from infinite_llm.core.step import StepPlan
from infinite_llm.memory.rblock import BlockTable, RBlock, TableUpdate


def test_replace_splits_a_run_and_returns_what_it_held():
    table = BlockTable()
    table.append(0, [10, 11, 12])
    table.append(1, [20, 21, 22, 23, 24])
    assert table.take_update("r") == TableUpdate(
        "r", 0, (RBlock(0, 0, (10, 11, 12)), RBlock(1, 3, (20, 21, 22, 23, 24))))
    old = table.replace(4, 2, [30, 31])
    assert old == [RBlock(1, 4, (21, 22))]
    assert table.rblocks == (
        RBlock(0, 0, (10, 11, 12)), RBlock(1, 3, (20,)), RBlock(2, 4, (30, 31)),
        RBlock(1, 6, (23, 24)))
    # The runners learn blocks 4.. again, nothing before.
    assert table.take_update("r") == TableUpdate(
        "r", 4, (RBlock(2, 4, (30, 31)), RBlock(1, 6, (23, 24))))
    assert table.take_update("r") is None
    # Moving a range home joins it with its neighbours of the same owner.
    assert table.replace(3, 0, [13, 14, 15, 16, 17]) == [
        RBlock(1, 3, (20,)), RBlock(2, 4, (30, 31)), RBlock(1, 6, (23, 24))]
    assert table.rblocks == (RBlock(0, 0, (10, 11, 12, 13, 14, 15, 16, 17)),)
    assert table.slot(29, 4) == (0, 17, 1)
    with pytest.raises(IndexError):
        table.replace(6, 0, [1, 2, 3])


def test_appends_send_only_the_new_blocks():
    table = BlockTable()
    table.append(0, list(range(1000)))
    assert table.take_update("r").start == 0
    table.append(0, [5000])
    table.append(1, [7])
    update = table.take_update("r")
    assert update == TableUpdate("r", 1000, (RBlock(0, 1000, (5000,)), RBlock(1, 1001, (7,))))
    table.clear()  # preempted: the whole table is new again
    table.append(1, [3])
    assert table.take_update("r") == TableUpdate("r", 0, (RBlock(1, 0, (3,)),))
    table.resync()  # the runners lost their copy
    assert table.take_update("r").start == 0


ops = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(0, 3), st.integers(1, 5)),
        st.tuples(st.just("replace"), st.integers(0, 3), st.integers(1, 6)),
        st.tuples(st.just("clear"), st.just(0), st.just(0)),
        st.tuples(st.just("sync"), st.just(0), st.just(0)),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(ops, st.randoms(use_true_random=False))
def test_the_runners_copy_follows_every_change(operations, rng):
    """Random appends, moves and clears; whenever the runner syncs, its copy holds the
    same blocks per owner, the same (owner, id) for every logical block, and the same
    visible counts, as the table; over joined pools, each block's id in the joined cache."""
    bases = {0: 0, 1: 10**6, 2: 3 * 10**6, 3: 7 * 10**6}
    table, runner, fresh = BlockTable(), KVTables(bases), iter(range(10**6))
    for op, owner, n in operations:
        if op == "append":
            table.append(owner, [next(fresh) for _ in range(n)])
        elif op == "replace" and table.num_blocks:
            first = rng.randrange(table.num_blocks)
            count = min(n, table.num_blocks - first)
            table.replace(first, owner, [next(fresh) for _ in range(count)])
        elif op == "clear":
            table.clear()
            runner.apply(StepPlan(preempted=("r",)))
        if op != "sync" and rng.random() < 0.5:
            continue  # not scheduled this step: the change waits in the table
        update = table.take_update("r")
        if update is not None:
            runner.apply(StepPlan(tables=(update,)))
        if not table.num_blocks:
            continue
        mirror = runner["r"]
        assert mirror.num_blocks == table.num_blocks
        assert {o: list(ids) for o, ids in mirror.by_owner.items()} == {
            o: table.physical_ids(o) for o in table.owners()}
        owners, ids = mirror.blocks(0, table.num_blocks)
        assert [(o, i) for o, i in zip(owners, ids)] == [
            table.slot(p * 4, 4)[:2] for p in range(table.num_blocks)]
        assert list(mirror.joined) == [bases[o] + i for o, i in zip(owners, ids)]
        limit = rng.randrange(table.num_blocks * 4 + 1)
        want = {o: 0 for o in table.owners()}
        for p in range(limit):
            want[table.slot(p, 4)[0]] += 1
        assert {o: n for o, (_, n) in mirror.owned_below(limit, 4).items()} == want
