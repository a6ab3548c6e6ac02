"""DGFM on hand-made debt graphs and small clusters, bookkeeping only (no torch): cycles
found, chains left alone, a 3-cycle and a 2-cycle cancelled with exact moves and no free
block, debtors with room taking their blocks home."""

from __future__ import annotations

from infinite_llm.core.dgfm import debt_graph, find_cycle
from infinite_llm.core.step import BlockMove

from test_migration_protocol import add, cluster, step


def test_cycles_are_found_and_chains_are_not():
    assert find_cycle({0: {1: 2}, 1: {2: 1}, 2: {0: 5}}) == [0, 1, 2]
    assert find_cycle({0: {1: 2}, 1: {0: 1}}) == [0, 1]
    assert find_cycle({0: {1: 2}, 1: {2: 1}, 2: {3: 1}}) is None  # a chain
    assert find_cycle({3: {1: 1}, 1: {2: 1}, 2: {1: 4}}) == [1, 2]  # a cycle behind a tail
    assert find_cycle({}) is None


def ring(instances: int, dgfm_period: int = 0):
    """Each instance's request moves its first block to the next instance: a debt cycle
    0 -> 1 -> ... -> 0 of weight 1. Pools of 4 blocks: 2 of its own request's, a guest,
    and the one its request left, kept as headroom for its growth: no room to recall."""
    c = cluster(instances=instances, blocks=4, tokens_per_step=64, dgfm_period=dgfm_period)
    # 8 prompt tokens: 2 blocks, and a block of headroom kept for growth, so the next
    # instance can lend one; the third block is taken while the first moves.
    requests = [add(c, f"r{i}", 8, max_tokens=6) for i in range(instances)]
    step(c)
    assert [r.home for r in requests] == list(range(instances))
    for i, r in enumerate(requests):
        assert c.migrate(r.request_id, 0, 1, target=(i + 1) % instances)
    step(c)  # every migration copies and switches in this plan
    c.heartbeat()
    return c, requests


def test_a_3_cycle_is_cancelled_in_one_plan_without_a_free_block():
    c, (r0, r1, r2) = ring(3)
    assert debt_graph(c.ledger()) == {0: {1: 1}, 1: {2: 1}, 2: {0: 1}}
    assert [c.instances[i].rmanager.num_free for i in range(3)] == [1, 1, 1]
    guests = [r.block_table.rblocks[0] for r in (r0, r1, r2)]  # each on the next instance
    assert [(g.owner, g.block_ids) for g in guests] == [(1, (2,)), (2, (2,)), (0, (2,))]
    assert c.defragment() == (0, 1)  # no room for a recall (headroom); one cycle
    plan = step(c)
    # r_i's block on instance i+1 comes home into the block there that held r_(i-1).
    assert set(plan.moves) == {
        BlockMove("r0", 1, (2,), 0, (2,)),
        BlockMove("r1", 2, (2,), 1, (2,)),
        BlockMove("r2", 0, (2,), 2, (2,)),
    }
    assert all(r.block_table.owners() == {r.home} for r in (r0, r1, r2))
    c.heartbeat()
    assert c.ledger().total_debt == 0 and c.migrator.cancelled_cycles == 1
    while c.has_work():
        step(c)
    assert c.snapshot().pools_full


def test_a_2_cycle_is_cancelled_too_and_a_chain_is_left_to_recalls():
    c, (r0, r1) = ring(2)
    assert debt_graph(c.ledger()) == {0: {1: 1}, 1: {0: 1}}
    assert c.defragment() == (0, 1)
    step(c)
    assert r0.block_table.owners() == {0} and r1.block_table.owners() == {1}
    c.heartbeat()
    assert c.ledger().total_debt == 0


def test_a_debtor_with_room_takes_its_blocks_home():
    c = cluster(instances=2, blocks=8)
    long = add(c, "long", 36, max_tokens=20)  # 9 blocks: 8 at home, 1 on instance 1
    step(c)
    assert long.block_table.owners() == {0, 1}
    # Room at home appears (here: the request's own first 4 blocks move out first).
    assert c.migrate("long", 0, 4, target=1)
    while "long" in c.migrator.active:
        step(c)
    c.heartbeat()
    recalls, cycles = c.defragment()
    assert (recalls, cycles) == (1, 0)
    recalled = c.migrator.active["long"].count
    while "long" in c.migrator.active:
        step(c)
    assert [(e.kind, e.outcome, e.request_id, e.source, e.target, e.blocks)
            for e in c.snapshot().migration.recent] == [
        ("migrate", "moved", "long", 0, 1, 4), ("recall", "moved", "long", 1, 0, recalled)]
    # The run of 4 on instance 1 came home; the newest blocks may still be away.
    assert [rb.owner for rb in long.block_table.rblocks][:1] == [0]
    while c.has_work():
        step(c)
    assert c.snapshot().pools_full


def test_dgfm_runs_every_period_and_the_snapshot_counts_what_it_did():
    c, requests = ring(3, dgfm_period=1)  # the ring formed; the next step's pass cancels it
    step(c)
    assert all(r.block_table.owners() == {r.home} for r in requests)
    migration = c.snapshot().migration
    assert (migration.cancelled_cycles, migration.moved_blocks) == (1, 6)  # 3 moves + 3 back
    assert (migration.in_flight, migration.aborted, migration.recalls) == (0, 0, 0)
    # Each leg of the cycle: its request's blocks back from the creditor to its home.
    # The ring's three migrations, then each leg of the cycle: its request's block back
    # from the creditor to its home.
    assert [(e.kind, e.request_id, e.source, e.target) for e in migration.recent] == [
        ("migrate", r.request_id, r.home, (r.home + 1) % 3) for r in requests] + [
        ("cycle", r.request_id, (r.home + 1) % 3, r.home) for r in requests]


def test_dgfm_keeps_more_kv_at_home_on_a_churn_workload():
    """The churn workload of benchmarks/churn.py, smaller: with DGFM every 4 steps,
    fewer of the attended blocks live away from their request's home (counts, not times:
    the same on every machine). Pools full at the end either way (checked inside)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "churn.py"
    spec = importlib.util.spec_from_file_location("churn", path)
    churn = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(churn)
    off = churn.run_churn(0, requests=80, seed=3)
    on = churn.run_churn(4, requests=80, seed=3)
    assert on["moved"] > 0 and on["cycles"] + on["recalls"] > 0
    assert on["remote"] < off["remote"], (on, off)
