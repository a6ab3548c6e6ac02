"""Live KV migration: blocks move between instances while their request keeps decoding,
and the greedy tokens never change; aborted or refused migrations change nothing."""

from __future__ import annotations

import pytest

from infinite_llm import SamplingParams

from test_cluster import GREEDY, TINY_BLOCK_BYTES, assert_all_pools_full, tiny_cluster
from test_hf_equivalence import random_prompts


def spanning_request(llm, prompt_len=56, max_tokens=24, seed=5):
    """One request on instance 0 whose prompt needs blocks of a second instance."""
    engine = llm.engine
    prompt = random_prompts(1, prompt_len, prompt_len + 1, 320, seed=seed)[0]
    request = engine.add_request(prompt, SamplingParams(max_tokens=max_tokens, **GREEDY))
    while request.num_computed_tokens < prompt_len:
        engine.step()
    assert request.home == 0 and len(request.block_table.owners()) == 2
    return prompt, request


def remote_run(request):
    """(first block, count, owner) of the request's run on another instance."""
    (run,) = [rb for rb in request.block_table.rblocks if rb.owner != request.home]
    return run.first_block, run.num_blocks, run.owner


def finish(engine, watch=None):
    """Step to the end, checking integrity each step; ``watch`` sees the engine each step."""
    while engine.has_unfinished_requests():
        engine.step()
        engine.check_integrity()
        if watch is not None:
            watch(engine)


@pytest.mark.parametrize("budget", [4, 16, 64])
def test_blocks_move_to_a_third_instance_mid_decode_and_tokens_do_not_change(
    tiny_llama_dir, alone_tokens, budget
):
    llm = tiny_cluster(
        tiny_llama_dir, 3, 12, max_lend_fraction=1.0, migration_tokens_per_step=budget
    )
    engine = llm.engine
    prompt, request = spanning_request(llm)
    first, count, source = remote_run(request)
    target = 3 - source  # the instance that holds none of it
    assert engine.cluster.migrate(request.request_id, first, count, target)
    steps_to_switch = []

    def watch(engine):
        runs = request.block_table.rblocks_between(first, first + count)
        if {rb.owner for rb in runs} == {target} and not steps_to_switch:
            steps_to_switch.append(request.num_computed_tokens)

    finish(engine, watch)
    assert steps_to_switch, "the table never switched"
    assert request.output_token_ids == alone_tokens([prompt], 24)[0]
    assert engine.cluster.migrator.moved_blocks == count
    assert_all_pools_full(engine)
    # What it cost, in the snapshot: every block copied once, bytes as the cache holds them.
    snap = engine.snapshot()
    assert snap.migration.copied_blocks == count
    assert snap.migration.moved_bytes == count * TINY_BLOCK_BYTES
    assert snap.migration.stall_s > 0
    # The request waited for every copy, and its finished output says so.
    assert request.migration_stall_s == pytest.approx(snap.migration.stall_s)
    assert [(i.migrated_out, i.migrated_in) for i in snap.instances] == [
        (count if i == source else 0, count if i == target else 0) for i in range(3)
    ]
    # The migration, in the recent events: the planner's kind, moved, where from and to.
    assert [(e.kind, e.outcome, e.request_id, e.source, e.target, e.blocks)
            for e in snap.migration.recent] == [
        ("migrate", "moved", request.request_id, source, target, count)]
    # Tokens computed, by home: every token of the one request, at its home.
    assert [i.computed_tokens for i in snap.instances] == [
        snap.computed_tokens if i == request.home else 0 for i in range(3)]


def test_blocks_come_home_when_room_frees(tiny_llama_dir, alone_tokens):
    """Part of the home's run moves out to a third instance; then the borrowed run
    comes home into the room that left: two migrations, one after the other."""
    llm = tiny_cluster(tiny_llama_dir, 3, 12, max_lend_fraction=1.0)
    engine = llm.engine
    prompt, request = spanning_request(llm)
    first, count, source = remote_run(request)
    assert engine.cluster.migrate(request.request_id, 0, 4, target=3 - source)
    while request.request_id in engine.cluster.migrator.active:
        engine.step()
    assert engine.cluster.instances[0].rmanager.num_free >= count
    assert engine.cluster.migrate(request.request_id, first, count, target=0)
    finish(engine)
    assert request.output_token_ids == alone_tokens([prompt], 24)[0]
    assert engine.cluster.migrator.moved_blocks == 4 + count
    assert_all_pools_full(engine)


def test_a_migration_aborted_half_way_changes_nothing(tiny_llama_dir, alone_tokens):
    llm = tiny_cluster(tiny_llama_dir, 3, 12, max_lend_fraction=1.0, migration_tokens_per_step=4)
    engine = llm.engine
    prompt, request = spanning_request(llm)
    first, count, source = remote_run(request)
    assert engine.cluster.migrate(request.request_id, first, count, 3 - source)
    engine.step()  # one block copied
    migration = engine.cluster.migrator.active[request.request_id]
    assert 0 < migration.copied < count
    engine.cluster.migrator.abort(request.request_id)
    engine.check_integrity()
    finish(engine)
    assert request.block_table.num_blocks == 0  # released at the end, never switched
    assert request.output_token_ids == alone_tokens([prompt], 24)[0]
    assert engine.cluster.migrator.moved_blocks == 0
    assert_all_pools_full(engine)
    assert [(e.kind, e.outcome, e.source, e.target, e.blocks)
            for e in engine.snapshot().migration.recent] == [
        ("migrate", "aborted", source, 3 - source, count)]


def test_a_request_that_ends_mid_migration_returns_the_reservation(tiny_llama_dir):
    llm = tiny_cluster(tiny_llama_dir, 3, 12, max_lend_fraction=1.0, migration_tokens_per_step=4)
    engine = llm.engine
    _, request = spanning_request(llm)
    first, count, source = remote_run(request)
    assert engine.cluster.migrate(request.request_id, first, count, 3 - source)
    engine.step()
    engine.abort_request(request.request_id)
    assert not engine.cluster.migrator.active
    assert_all_pools_full(engine)


def test_a_target_without_room_refuses_and_nothing_changes(tiny_llama_dir):
    llm = tiny_cluster(tiny_llama_dir, 2, 12, max_lend_fraction=1.0)
    engine = llm.engine
    _, request = spanning_request(llm)
    before = request.block_table.rblocks
    # Home 0 is full: the remote run (on 1) cannot come home.
    first, count, _ = remote_run(request)
    assert engine.cluster.instances[0].rmanager.num_free < count
    assert not engine.cluster.migrate(request.request_id, first, count, target=0)
    assert request.block_table.rblocks == before and not engine.cluster.migrator.active
    engine.check_integrity()
    engine.abort_request(request.request_id)
    assert_all_pools_full(engine)


def run_a_cancelled_ring(llm, prompts, params):
    """Request i (home i) lends instance i+1 its first block, making a debt cycle of
    weight 1 with no room to recall; DGFM cancels it mid-decode. The final outputs."""
    engine, n = llm.engine, len(prompts)
    requests = [engine.add_request(p, params) for p in prompts]
    engine.step()
    assert [r.home for r in requests] == list(range(n))
    for i, r in enumerate(requests):
        assert engine.cluster.migrate(r.request_id, 0, 1, target=(i + 1) % n)
    engine.step()
    assert all(len(r.block_table.owners()) == 2 for r in requests)
    assert engine.cluster.defragment() == (0, 1)
    outputs = {out.request_id: out for out in engine.step()}
    assert all(r.block_table.owners() == {r.home} for r in requests)
    while engine.has_unfinished_requests():
        outputs.update({out.request_id: out for out in engine.step()})
    assert engine.cluster.migrator.cancelled_cycles == 1
    assert engine.snapshot().pools_full
    return [outputs[r.request_id].outputs[0] for r in requests]


def assert_same_tokens_and_logprobs(got, want):
    for g, w in zip(got, want):
        assert g.token_ids == w.outputs[0].token_ids
        for step_got, step_want in zip(g.logprobs, w.outputs[0].logprobs):
            (token, logprob), = step_want.items()
            assert abs(step_got[token] - logprob) < 1e-4


def test_a_cancelled_debt_cycle_changes_no_token(tiny_llama_dir):
    """A 3-cycle cancelled in one plan whose copies permute blocks: every request's
    tokens and log-probabilities are those it gets alone."""
    params = SamplingParams(max_tokens=6, logprobs=0, **GREEDY)
    prompts = random_prompts(3, 8, 9, 320, seed=21)
    alone = tiny_cluster(tiny_llama_dir, 1, 400).generate(prompts, params, use_tqdm=False)
    llm = tiny_cluster(tiny_llama_dir, 3, 4, max_lend_fraction=1.0, migration_tokens_per_step=64)
    assert_same_tokens_and_logprobs(run_a_cancelled_ring(llm, prompts, params), alone)
