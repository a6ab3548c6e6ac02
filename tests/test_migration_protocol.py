"""The live-migration protocol on tiny numbers, bookkeeping only (no model, no torch):
exact block ids, a stale view, a refused reservation, an expired lease, a source that
dies, two migrations racing for one target."""

from __future__ import annotations

from infinite_llm.config import CacheConfig, PoolingConfig, SchedulerConfig
from infinite_llm.core.cluster import Cluster
from infinite_llm.core.request import Request
from infinite_llm.core.sampling_params import SamplingParams
from infinite_llm.core.step import BlockMove, SampledToken, StepResult

BLOCK = 4


def cluster(instances=3, blocks=8, tokens_per_step=4, lease=64, dgfm_period=0) -> Cluster:
    pooling = PoolingConfig(
        max_lend_fraction=1.0, migration_tokens_per_step=tokens_per_step,
        migration_lease_steps=lease, dgfm_period=dgfm_period,
    )
    return Cluster(blocks, CacheConfig(1, BLOCK), SchedulerConfig(64, 8, 4096), pooling, instances)


def add(c: Cluster, rid: str, prompt_len: int, max_tokens: int = 40) -> Request:
    request = Request(rid, [1] * prompt_len, SamplingParams(max_tokens=max_tokens), max_tokens)
    c.add(request)
    return request


def step(c: Cluster):
    plan = c.schedule()
    c.update(plan, StepResult({ch.request_id: SampledToken(3) for ch in plan.chunks if ch.sample}))
    c.check_integrity()
    return plan


def test_copies_go_block_by_block_and_the_switch_frees_the_source():
    c = cluster()
    r = add(c, "r", 40)  # 10 blocks: 8 at home (0), 2 borrowed from instance 1
    step(c)
    assert [(rb.owner, rb.block_ids) for rb in r.block_table.rblocks] == [
        (0, tuple(range(8))), (1, (0, 1))]
    assert c.migrate("r", 0, 3, target=2)  # 3 home blocks to instance 2: reserved 0, 1, 2
    ledger = c.ledger()
    c.heartbeat()
    assert c.ledger().instances[2].lent_to == {0: 3}  # the reservation counts at once
    assert ledger.instances[0].borrowed_from == {1: 2}
    plans = [step(c) for _ in range(3)]
    # One block per step (4 tokens of budget), oldest first; the third step copies the
    # last block and switches in the same plan.
    assert [p.moves for p in plans] == [
        (BlockMove("r", 0, (0,), 2, (0,)),),
        (BlockMove("r", 0, (1,), 2, (1,)),),
        (BlockMove("r", 0, (2,), 2, (2,)),),
    ]
    assert [(rb.owner, rb.block_ids) for rb in r.block_table.rblocks][:2] == [
        (2, (0, 1, 2)), (0, (3, 4, 5, 6, 7))]
    assert c.instances[0].rmanager.num_free == 3  # the source's blocks went back
    # The plan that switched told the runners: blocks 0.. of the table changed.
    assert plans[2].tables[0].start == 0
    assert c.migrator.moved_blocks == 3 and not c.migrator.active


def test_blocks_still_being_written_are_copied_last_with_the_switch():
    c = cluster(tokens_per_step=64)
    r = add(c, "r", 30, max_tokens=20)  # 8 blocks: the last (7) is half written
    step(c)
    assert c.migrate("r", 6, 2, target=1)
    plan = step(c)
    # Both fit the budget: copied in the plan that switches, before its token is written.
    assert plan.moves == (BlockMove("r", 0, (6, 7), 1, (0, 1)),)
    assert r.block_table.slot(r.num_computed_tokens - 1, BLOCK)[0] == 1


def test_a_target_that_refuses_changes_nothing_whatever_the_view_said():
    c = cluster()
    add(c, "r", 40)
    step(c)
    # Instance 2's pool fills behind the gManager's back: its view still says 8 free.
    c.instances[2].rmanager.pool.allocate(7)
    assert c.ledger().instances[2].free == 8
    before = c.ledger()
    assert not c.migrate("r", 0, 3, target=2)
    c.heartbeat()
    assert c.ledger().instances[0] == before.instances[0] and not c.migrator.active
    assert c.instances[2].rmanager.num_free == 1  # nothing reserved there


def test_two_migrations_racing_for_one_target_the_second_is_refused_until_room_frees():
    c = cluster(instances=3, blocks=8)
    a, b = add(c, "a", 20, max_tokens=4), add(c, "b", 20, max_tokens=12)  # homes 0 and 1
    step(c)
    assert (a.home, b.home) == (0, 1) and c.instances[2].rmanager.num_free == 8
    assert c.migrate("a", 0, 5, target=2)
    assert not c.migrate("b", 0, 5, target=2)  # 3 blocks left there
    while "a" in c.migrator.active:
        step(c)
    c.finish(a, "abort")  # a leaves instance 2: room again
    assert c.migrate("b", 0, 5, target=2)
    while "b" in c.migrator.active:
        step(c)
    assert b.block_table.rblocks[0].owner == 2 and b.block_table.rblocks[0].num_blocks == 5


def test_a_lease_that_runs_out_gives_the_reservation_back():
    c = cluster(tokens_per_step=4, lease=1)
    r = add(c, "r", 40)
    step(c)
    table = r.block_table.rblocks
    assert c.migrate("r", 0, 3, target=2)
    step(c)  # one block copied within the lease
    step(c)  # the lease ran out: aborted, nothing switched
    assert not c.migrator.active and c.migrator.aborted == 1
    assert r.block_table.rblocks[0] == table[0]
    assert c.instances[2].rmanager.num_free == 8


def test_a_source_that_dies_ends_the_migration_and_the_request_starts_over():
    c = cluster()
    r = add(c, "r", 40, max_tokens=8)  # 12 blocks at most: the survivors can hold it
    step(c)
    assert c.migrate("r", 8, 2, target=2)  # the 2 blocks borrowed from instance 1
    plan = c.schedule()
    failed = c.fail_instances([1], plan)
    assert failed == [] and not c.migrator.active
    assert r.block_table.num_blocks == 0 and r.num_computed_tokens == 0  # recomputed
    c.check_integrity()
    c.heartbeat()
    ledger = c.ledger()
    assert 1 not in ledger.instances and ledger.total_debt == 0
    while c.has_work():
        step(c)
    assert c.snapshot().pools_full
