"""Scheduler logic on tiny numbers: budgets, chunking, admission, preemption, blocks."""

from __future__ import annotations

import pytest

from infinite_llm.config import CacheConfig, PoolingConfig, SchedulerConfig
from infinite_llm.core.cluster import Cluster
from infinite_llm.core.request import Request, RequestStatus
from infinite_llm.core.sampling_params import SamplingParams
from infinite_llm.core.step import SampledToken, StepResult
from infinite_llm.memory.block_pool import BlockPool, OutOfBlocks


class Lone:
    """The scheduler of a lone instance (nobody to borrow from), driven through the
    cluster's real step: schedule, a fake runner that samples ``token``, update."""

    def __init__(self, num_blocks, block_size, budget, max_seqs, reserve=0.0):
        self.cluster = Cluster(
            num_blocks, CacheConfig(1, block_size),
            SchedulerConfig(budget, max_seqs, 1024, admission_output_reserve=reserve),
            PoolingConfig(), 1,
        )
        self.scheduler = self.cluster.instances[0].scheduler
        self.running, self.waiting = self.scheduler.running, self.scheduler.waiting

    def add(self, request):
        self.cluster.add(request)

    def finish(self, request, reason):
        self.cluster.finish(request, reason)

    def has_work(self):
        return self.cluster.has_work()


def make(num_blocks=11, block_size=4, budget=16, max_seqs=8, reserve=0.0):
    lone = Lone(num_blocks, block_size, budget, max_seqs, reserve)
    return lone, lone.scheduler.memory.pool


def request(rid, prompt_len, max_tokens=8):
    return Request(rid, list(range(prompt_len)), SamplingParams(max_tokens=max_tokens), max_tokens)


def run_step(lone, sampled_token=7):
    """One step of the real bookkeeping with a fake runner that samples ``sampled_token``."""
    plan = lone.cluster.schedule()
    tokens = {c.request_id: SampledToken(sampled_token) for c in plan.chunks if c.sample}
    lone.cluster.update(plan, StepResult(tokens))
    return plan


def test_pool_allocates_all_or_nothing_and_detects_double_free():
    pool = BlockPool(3)
    assert pool.allocate(2) == [0, 1]
    with pytest.raises(OutOfBlocks):
        pool.allocate(2)
    assert pool.num_free == 1
    pool.free([1])
    with pytest.raises(ValueError):
        pool.free([1])
    pool.check_integrity()


def test_long_prompt_is_chunked_by_the_token_budget():
    scheduler, pool = make(budget=6)
    r = request("a", 14)
    scheduler.add(r)
    plans = [run_step(scheduler) for _ in range(3)]
    assert [len(p.chunks[0].token_ids) for p in plans] == [6, 6, 2]
    assert [p.chunks[0].first_pos for p in plans] == [0, 6, 12]
    assert [p.chunks[0].sample for p in plans] == [False, False, True]
    assert r.num_computed_tokens == 14 and r.output_token_ids == [7]
    assert r.block_table.num_blocks == 4  # ceil(14 / 4)
    plan = run_step(scheduler)  # the decode of the sampled token
    assert plan.chunks[0].token_ids == (7,) and plan.chunks[0].first_pos == 14


def test_decodes_go_first_and_the_budget_admits_the_rest():
    scheduler, _ = make(num_blocks=20, budget=8)
    a, b = request("a", 5), request("b", 6)
    scheduler.add(a)
    run_step(scheduler)
    scheduler.add(b)
    plan = run_step(scheduler)
    assert [(c.request_id, len(c.token_ids)) for c in plan.chunks] == [("a", 1), ("b", 6)]


def test_admission_waits_for_free_blocks():
    scheduler, pool = make(num_blocks=5, budget=64)
    scheduler.add(request("a", 12))  # 3 blocks
    scheduler.add(request("b", 8))  # needs 2 blocks + 1 headroom for a's growth
    plan = run_step(scheduler)
    assert [c.request_id for c in plan.chunks] == ["a"]
    assert [r.request_id for r in scheduler.waiting] == ["b"]


def test_preemption_frees_the_newest_and_recomputes_it_later():
    scheduler, pool = make(num_blocks=4, block_size=4, budget=64)
    a, b = request("a", 7), request("b", 4)
    scheduler.add(a)
    scheduler.add(b)
    run_step(scheduler)  # a: 2 blocks, b: 1 block (3 of 4 used, 1 headroom)
    assert a.status is b.status is RequestStatus.RUNNING
    run_step(scheduler)  # a at 8 tokens fits; b's 5th token takes the last block
    assert pool.num_free == 0
    plan = run_step(scheduler)  # a needs a third block: b is preempted
    assert plan.preempted == ("b",)
    assert b.status is RequestStatus.WAITING and b.block_table.num_blocks == 0 and b.num_computed_tokens == 0
    assert [c.request_id for c in plan.chunks] == ["a"]
    scheduler.finish(a, "length")
    plan = run_step(scheduler)  # b comes back and recomputes prompt + its output so far
    assert plan.chunks[0].request_id == "b" and len(plan.chunks[0].token_ids) == 6
    scheduler.finish(b, "length")
    pool.check_integrity()
    assert pool.num_free == pool.num_blocks


def test_a_request_preempts_itself_when_alone_with_no_room():
    scheduler, pool = make(num_blocks=2, block_size=4, budget=64)
    a = request("a", 8)
    scheduler.add(a)
    run_step(scheduler)
    pool.allocate(pool.num_free)  # someone else took the rest (no headroom left)
    plan = run_step(scheduler)
    assert plan.preempted == ("a",) and plan.chunks == ()
    assert a.status is RequestStatus.WAITING


def test_max_num_seqs_caps_running_requests():
    scheduler, _ = make(num_blocks=50, budget=64, max_seqs=2)
    for i in range(4):
        scheduler.add(request(str(i), 3))
    run_step(scheduler)
    assert len(scheduler.running) == 2 and len(scheduler.waiting) == 2


def test_finish_and_abort_return_every_block():
    scheduler, pool = make(num_blocks=10, budget=64)
    reqs = [request(str(i), 5) for i in range(3)]
    for r in reqs:
        scheduler.add(r)
    run_step(scheduler)
    scheduler.finish(reqs[0], "stop")
    scheduler.finish(reqs[1], "abort")
    scheduler.finish(reqs[2], "abort")
    assert pool.num_free == 10 and not scheduler.has_work()
    pool.check_integrity()


@pytest.mark.parametrize("reserve, preemptions, b_starts", [(0.0, 1, 0), (1.0, 0, 8)])
def test_admission_can_keep_room_for_the_outputs_to_come(reserve, preemptions, b_starts):
    """a (7 + 8 tokens: 4 blocks at the end) and b (4 + 8: 3 blocks) on 5 blocks: with
    a block of headroom b starts at once and is preempted when a grows; with room kept
    for a's outputs b waits, and runs once it fits, never preempted."""
    scheduler, pool = make(num_blocks=5, block_size=4, budget=64, reserve=reserve)
    a, b = request("a", 7), request("b", 4)
    scheduler.add(a)
    scheduler.add(b)
    started = None
    for k in range(40):
        if not scheduler.has_work():
            break
        plan = run_step(scheduler)
        if started is None and any(c.request_id == "b" for c in plan.chunks):
            started = k
    assert (scheduler.scheduler.num_preemptions, started) == (preemptions, b_starts)
    assert a.output_token_ids == b.output_token_ids == [7] * 8
    assert pool.num_free == pool.num_blocks


class HomeZero:
    """Placement that sends every request to instance 0."""

    def home(self, request, alive, load):
        return 0


def pooled_pair(reserve=1.0, planner_cost=None, blocks=6):
    """Two pooled instances of ``blocks`` blocks of 4 tokens; every request's home is 0."""
    planner = dict(planner_period=1, cost_model=str(planner_cost)) if planner_cost else {}
    return Cluster(
        blocks, CacheConfig(1, 4), SchedulerConfig(64, 8, 4096, admission_output_reserve=reserve),
        PoolingConfig(max_lend_fraction=1.0, **planner), 2, placement=HomeZero(),
    )


def step_all(c):
    plan = c.schedule()
    c.update(plan, StepResult({ch.request_id: SampledToken(3) for ch in plan.chunks if ch.sample}))
    c.check_integrity()
    return plan


def test_pooled_admission_keeps_the_growth_room_at_home_and_borrows_the_rest():
    c = pooled_pair()
    # 24 prompt tokens (6 blocks) + 8 outputs (2 more): 4 blocks at home, 2 borrowed,
    # and the 2 its outputs will take stay free at home.
    big = request("big", 24)
    c.add(big)
    step_all(c)
    home = c.instances[0].rmanager
    assert big.block_table.blocks_by_owner() == {0: 4, 1: 2}
    assert home.num_free == home.keep == 2
    # Nothing else is admitted at home: the room kept is all it has (instance 1 could
    # lend, but growth borrowed is growth nobody keeps).
    small = request("small", 4, max_tokens=1)
    c.add(small)
    step_all(c)
    assert small.status is RequestStatus.WAITING
    while c.has_work():
        step_all(c)
    assert c.num_preemptions == 0 and big.block_table.num_blocks == 0
    assert c.snapshot().pools_full


@pytest.mark.parametrize("per_remote_s", [None, 0.0, 0.05])
def test_with_the_planner_on_its_model_says_when_admission_borrows(per_remote_s, tmp_path):
    """None: no planner, on-demand borrowing. With the planner, a request its home could
    hold borrows only when the model predicts a faster instance: always when remote
    blocks cost nothing, never when their exchange (50 ms a step) outweighs the batch."""
    from infinite_llm.core.cost_model import CostModel

    cost = tmp_path / "cost.json"
    CostModel(0.010, 0.001, 1e-6, per_remote_s or 0.0).save(cost)
    c = pooled_pair(planner_cost=None if per_remote_s is None else cost)
    first = request("first", 8, max_tokens=4)  # 2 blocks + 1 to come: 3 of the 6 left
    c.add(first)
    step_all(c)
    # 12 prompt tokens + 4 outputs: 4 blocks, which the home alone could hold.
    fits = request("fits", 12, max_tokens=4)
    c.add(fits)
    step_all(c)
    if per_remote_s:  # it waits for room at home (or for the planner to move KV)
        assert fits.status is RequestStatus.WAITING
    else:  # it borrows what the home lacks
        assert fits.status is RequestStatus.RUNNING and 1 in fits.block_table.owners()
    # Beyond the home's whole pool: borrowed in every case, once the home has its room.
    huge = request("huge", 28, max_tokens=4)
    c.add(huge)
    while huge.status is RequestStatus.WAITING:
        step_all(c)
    assert huge.block_table.owners() == {0, 1}
    while c.has_work():
        step_all(c)
    assert c.num_preemptions == 0 and c.snapshot().pools_full


def test_pooled_instances_that_keep_room_for_outputs_never_preempt(tmp_path):
    """Mixed lengths submitted at once on 3 pooled instances: with room kept for every
    output (reserve 1), admission may borrow but never over-commits, so nobody is
    preempted, with or without the planner; every request runs to max_tokens."""
    import random

    from infinite_llm.core.cost_model import CostModel

    cost = tmp_path / "cost.json"
    CostModel(0.010, 0.001, 1e-6).save(cost)
    rng = random.Random(5)
    specs = [(rng.choice([4, 9, 17, 30, 70]), rng.choice([4, 12, 24])) for _ in range(40)]
    for planner in ({}, dict(planner_period=1, cost_model=str(cost))):
        c = Cluster(
            16, CacheConfig(1, 4), SchedulerConfig(64, 8, 4096, admission_output_reserve=1.0),
            PoolingConfig(max_lend_fraction=1.0, migration_tokens_per_step=8, **planner), 3,
        )
        requests = [request(f"r{i}", p, m) for i, (p, m) in enumerate(specs)]
        for r in requests:
            c.add(r)
        borrowed = 0
        while c.has_work():
            step_all(c)
            borrowed = max(borrowed, c.ledger().total_debt)
        assert borrowed > 0  # the long prompts (70 tokens: 18 blocks) span instances
        assert c.num_preemptions == 0
        assert all(len(r.output_token_ids) == r.max_tokens for r in requests)
        assert c.snapshot().pools_full


@pytest.mark.parametrize("per_remote_s, preempted, spanned", [(0.0, 0, True), (0.05, 1, False)])
def test_with_the_planner_on_growth_borrows_only_when_cheaper_than_a_recompute(
    per_remote_s, preempted, spanned, tmp_path
):
    """a (8 + 12 tokens) and b (12 + 8) share home 0's 6 blocks and outgrow them: when
    b, the newest, needs a block, borrowing costs an exchange in each of its remaining
    steps, preempting it costs its tokens computed again. Free exchanges: it borrows;
    50 ms ones: it gives way, and the planner rehomes it to instance 1, where it runs
    whole: no request's KV ever spans instances."""
    from infinite_llm.core.cost_model import CostModel

    cost = tmp_path / "cost.json"
    CostModel(0.010, 0.001, 1e-6, per_remote_s).save(cost)
    c = pooled_pair(reserve=0.0, planner_cost=cost)
    a, b = request("a", 8, max_tokens=12), request("b", 12, max_tokens=8)
    c.add(a)
    c.add(b)
    owners = 1
    while c.has_work():
        step_all(c)
        owners = max([owners, *(len(r.block_table.owners()) for r in (a, b))])
    assert c.num_preemptions == preempted and (owners > 1) == spanned
    assert a.output_token_ids == [3] * 12 and b.output_token_ids == [3] * 8
    assert c.snapshot().pools_full


def test_admission_takes_the_whole_prompts_blocks_and_a_prompt_that_cannot_fit_waits():
    """Chunked prefill computes a long prompt over several steps, but its KV is taken at
    admission: a prompt admitted for its first chunk only would find no room for the
    next ones and be preempted half prefilled (again and again, on long traces)."""
    from infinite_llm.config import CacheConfig, PoolingConfig, SchedulerConfig
    from infinite_llm.core.cluster import Cluster
    from infinite_llm.core.request import Request
    from infinite_llm.core.sampling_params import SamplingParams
    from infinite_llm.core.step import SampledToken, StepResult

    cluster = Cluster(12, CacheConfig(1, 16), SchedulerConfig(32, 8, 4096),
                      PoolingConfig(enabled=False), 1)
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    first, second = Request("a", [1] * 100, params, 2), Request("b", [1] * 100, params, 2)
    cluster.add(first)
    cluster.add(second)
    plan = cluster.schedule()
    assert [(c.request_id, c.num_tokens) for c in plan.chunks] == [("a", 32)]
    assert first.block_table.num_blocks == 7  # 100 tokens, not 32
    assert second.status.name == "WAITING"  # 7 more blocks do not fit beside them
    steps = 0
    while cluster.has_work():
        plan = cluster.schedule()
        tokens = {c.request_id: SampledToken(0) for c in plan.chunks if c.sample}
        cluster.update(plan, StepResult(tokens))
        steps += 1
    assert cluster.num_preemptions == 0 and first.finished and second.finished
