"""The greedy planner on hand-made loads with exact expected moves, and through the
cluster: orders become live migrations, a stale view's refusal is planned again."""

from __future__ import annotations

import pytest

from infinite_llm.config import PoolingConfig
from infinite_llm.core.cost_model import CostModel
from infinite_llm.core.planner import (
    Candidate,
    GreedyPlanner,
    InstanceLoad,
    MoveOrder,
    RehomeOrder,
    admitted,
    predicted_rate,
)

from test_migration_protocol import add, step

BLOCK = 4
# 10 ms a step, 1 ms per token, 1 us per token of context: batch is what pays.
COST = CostModel(0.010, 0.001, 1e-6)


def planner():
    return GreedyPlanner(COST, BLOCK)


def test_admission_room_counts_headroom_and_order():
    load = InstanceLoad(0, free=0, lendable=0, running=2, context_tokens=100,
                        waiting_blocks=(4, 4, 9))
    assert [admitted(load, room) for room in (5, 6, 10, 18, 19)] == [0, 1, 2, 2, 3]


def test_a_debtor_held_down_by_memory_moves_its_longest_request_to_the_most_free():
    loads = [
        InstanceLoad(0, free=0, lendable=0, running=2, context_tokens=160, waiting_blocks=(4, 4)),
        InstanceLoad(1, free=20, lendable=20, running=1, context_tokens=40),
        InstanceLoad(2, free=30, lendable=30, running=1, context_tokens=40),
    ]
    candidates = [Candidate("short", 0, 0, 8), Candidate("long", 0, 0, 16)]
    orders = planner().plan(loads, candidates)
    # Moving all 16 blocks of the longest admits both waiting requests: the best of
    # 4 / 8 / 16; the creditor is the one with most free blocks.
    assert orders[0] == MoveOrder("long", 0, 16, 2)
    before = predicted_rate(COST, loads, BLOCK)
    assert before < predicted_rate(COST, [
        InstanceLoad(0, free=16, lendable=0, running=2, context_tokens=96,
                     waiting_blocks=(4, 4), remote_pairs=1),
        loads[1],
        InstanceLoad(2, free=14, lendable=14, running=1, context_tokens=104),
    ], BLOCK)
    # A creditor that may lend only 3 blocks is passed over for one that may lend more.
    capped = [loads[0], loads[1], InstanceLoad(2, free=30, lendable=3, running=1,
                                               context_tokens=40)]
    assert planner().plan(capped, candidates)[0] == MoveOrder("long", 0, 16, 1)


def test_a_creditor_with_its_own_queue_lends_what_its_queue_leaves():
    loads = [
        InstanceLoad(0, free=0, lendable=0, running=1, context_tokens=64,
                     waiting_blocks=(4, 4, 4)),
        # Its one waiting request takes 4 of its 30 free blocks: 25 more are idle.
        InstanceLoad(1, free=30, lendable=30, running=1, context_tokens=40, waiting_blocks=(4,)),
    ]
    assert planner().plan(loads, [Candidate("long", 0, 0, 16)]) == [MoveOrder("long", 0, 16, 1)]
    # Room its own queue needs is not taken: 8 free, a waiting request of 6.
    tight = [loads[0], InstanceLoad(1, free=8, lendable=8, running=1, context_tokens=40,
                                    waiting_blocks=(6,))]
    assert planner().plan(tight, [Candidate("long", 0, 0, 16)]) == []
    # Nor the room its running requests will grow into (28 of its 30 free blocks).
    growing = [loads[0], InstanceLoad(1, free=30, lendable=30, running=1, context_tokens=40,
                                      growth=28)]
    assert planner().plan(growing, [Candidate("long", 0, 0, 16)]) == []


def test_admission_borrows_when_the_batch_pays_for_the_exchange():
    # 2 running over 100 tokens: 2 / 12.1 ms = 165 tok/s. A third request of 50 tokens
    # with remote blocks: 3 / 13.15 ms = 228 tok/s when remote pairs cost nothing,
    # 3 / 33.15 ms = 90 tok/s at 20 ms a pair.
    assert planner().worth_borrowing(2, 100, 0, 50)
    costly = GreedyPlanner(CostModel(0.010, 0.001, 1e-6, per_remote_s=0.020), BLOCK)
    assert not costly.worth_borrowing(2, 100, 0, 50)
    # An idle instance gains from any request.
    assert costly.worth_borrowing(0, 0, 0, 50)



def test_on_ray_a_borrowing_instance_pays_one_exchange_a_step_however_many_cross():
    """A profile taken on Ray (``per_instance``) prices remote pairs once a step: one
    more crossing sequence costs nothing where one crosses already, as on Ray, where
    every actor joins one exchange a layer; in process each pair costs its own."""
    ray = CostModel(0.010, 0.001, 1e-6, per_remote_s=0.020, source={"per_instance": True})
    assert ray.exchange_once_a_step and not COST.exchange_once_a_step
    assert ray.step_time(4, 400, 3) == pytest.approx(ray.step_time(4, 400, 1))
    assert ray.step_time(4, 400, 1) == pytest.approx(ray.step_time(4, 400) + 0.020)
    in_process = CostModel(0.010, 0.001, 1e-6, per_remote_s=0.020)
    assert in_process.step_time(4, 400, 3) == pytest.approx(in_process.step_time(4, 400) + 0.060)
    # 2 running over 100 tokens, one of them across already: a third borrowing adds no
    # exchange on Ray (3 / 33.15 ms against 2 / 32.1), one more pair in process.
    assert GreedyPlanner(ray, BLOCK).worth_borrowing(2, 100, 1, 50)
    assert not GreedyPlanner(in_process, BLOCK).worth_borrowing(2, 100, 1, 50)

def test_nothing_moves_without_a_creditor_or_a_gain():
    full = [
        InstanceLoad(0, free=0, lendable=0, running=2, context_tokens=160, waiting_blocks=(4,)),
        InstanceLoad(1, free=1, lendable=1, running=1, context_tokens=40, waiting_blocks=(4,)),
    ]
    assert planner().plan(full, [Candidate("a", 0, 0, 16)]) == []
    # Room to spare but nobody waiting: moving only shifts attention, no gain.
    idle = [
        InstanceLoad(0, free=0, lendable=0, running=2, context_tokens=160),
        InstanceLoad(1, free=20, lendable=20, running=1, context_tokens=40),
    ]
    assert planner().plan(idle, [Candidate("a", 0, 0, 16)]) == []


def test_the_cluster_runs_the_planner_and_a_refused_reservation_is_planned_again(tmp_path):
    from infinite_llm.config import CacheConfig, SchedulerConfig
    from infinite_llm.core.cluster import Cluster

    path = tmp_path / "cost.json"
    COST.save(path)
    pooling = PoolingConfig(
        enabled=True, max_lend_fraction=0.5, planner_period=1, cost_model=str(path),
        migration_tokens_per_step=64,
    )
    homes = {"big": 0, "idle": 1, "late": 0}

    class Fixed:
        def home(self, request, alive, load):
            return homes[request.request_id]

    c = Cluster(8, CacheConfig(1, BLOCK), SchedulerConfig(64, 8, 4096), pooling, 2,
                placement=Fixed())
    big = add(c, "big", 28, max_tokens=4)  # 7 blocks of home 0's 8
    add(c, "idle", 4, max_tokens=8)  # home 1: 7 blocks free there, 2 for its outputs
    step(c)
    add(c, "late", 12, max_tokens=4)  # home 0 again: must wait
    # The view goes stale: instance 1's pool fills behind the gManager's back.
    taken = c.instances[1].rmanager.pool.allocate(6)
    assert c.replan() == []  # ordered, refused by instance 1, nothing reserved
    assert not c.migrator.active
    c.instances[1].rmanager.pool.free(taken)
    c.heartbeat()
    # Room again: the waiting request moves to it (free: it holds no KV yet), rather
    # than blocks of the running one.
    assert c.replan() == [RehomeOrder("late", 1)]
    assert c.requests["late"].home == 1 and not c.migrator.active
    step(c)
    assert c.requests["late"].status.value == "running"
    assert c.requests["late"].block_table.owners() == {1}
    while c.has_work():
        step(c)
    assert c.snapshot().pools_full
    assert big.block_table.num_blocks == 0


def test_waiting_requests_move_to_room_from_the_longest_queue_first():
    loads = [
        InstanceLoad(0, free=2, lendable=0, running=1, context_tokens=100,
                     waiting_blocks=(4, 3), waiting_ids=("a", "b")),
        InstanceLoad(1, free=1, lendable=0, running=1, context_tokens=100,
                     waiting_blocks=(2, 2, 9), waiting_ids=("c", "d", "e")),
        InstanceLoad(2, free=12, lendable=12, running=1, context_tokens=40),
        InstanceLoad(3, free=6, lendable=6, running=0, context_tokens=0),
    ]
    # Room is free blocks less one per running request. Instance 1 admits none of its
    # three, 0 none of its two: 1's "c" goes to the most room (2: 11 -> 8); queues even
    # (2 each), 0's "a" to 2 again (8 > 6 on 3; 2 keeps 3); 1's "d" to 3 (6 > 3; 3 keeps
    # 3); 0's "b" (3 blocks) to 2 (3 each, lower id); "e" (9 blocks) fits nowhere.
    assert planner().rehome(loads) == [
        RehomeOrder("c", 2), RehomeOrder("a", 2), RehomeOrder("d", 3), RehomeOrder("b", 2)
    ]
    # Nobody with room and an empty queue: nothing moves.
    assert planner().rehome(loads[:2]) == []


def test_the_planner_needs_a_cost_model():
    with pytest.raises(ValueError, match="cost model"):
        PoolingConfig(planner_period=4)


def test_outputs_do_not_change_when_the_planner_rehomes_and_migrates(
    tiny_llama_dir, alone_tokens, tmp_path
):
    """Mixed lengths on 3 small instances with the planner every step and DGFM: requests
    change homes while waiting and blocks move while decoding; the greedy tokens are
    those of one instance holding everything."""
    from infinite_llm import SamplingParams

    from test_cluster import GREEDY, assert_all_pools_full, tiny_cluster
    from test_hf_equivalence import random_prompts

    path = tmp_path / "cost.json"
    COST.save(path)
    llm = tiny_cluster(tiny_llama_dir, 3, 12, max_lend_fraction=1.0, planner_period=1,
                       cost_model=str(path), dgfm_period=2, migration_tokens_per_step=8)
    prompts = random_prompts(9, 4, 40, 320, seed=8)
    prompts[0] = prompts[0] + random_prompts(1, 60, 61, 320, seed=9)[0]  # spans instances
    params = SamplingParams(max_tokens=10, **GREEDY)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    expected = alone_tokens(prompts, 10)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    snap = llm.engine.snapshot()
    assert snap.migration.rehomed > 0
    assert_all_pools_full(llm.engine)
