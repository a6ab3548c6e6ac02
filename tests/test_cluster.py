"""A cluster of instances whose KV pools form one: placement never changes outputs,
nothing leaks, and requests too large for the cluster are refused up front."""

from __future__ import annotations

import pytest
import torch

from infinite_llm import LLM, SamplingParams
from infinite_llm.engine.engine import LLMEngine

from test_hf_equivalence import paged_logits, random_prompts, relative_error

BLOCK = 4
TINY_BLOCK_BYTES = 3 * 2 * 2 * 16 * 4 * BLOCK  # layers x (k, v) x kv heads x head dim x fp32
GREEDY = dict(temperature=0, ignore_eos=True)
MAX_STEPS = 3000


def tiny_cluster(path, instances, blocks_each, **kwargs) -> LLM:
    return LLM(
        str(path),
        kv_cache_memory=blocks_each * TINY_BLOCK_BYTES,
        block_size=BLOCK,
        instances=instances,
        max_num_batched_tokens=kwargs.pop("max_num_batched_tokens", 32),
        **kwargs,
    )


def run_watching_owners(engine: LLMEngine, prompts, params) -> tuple[list[list[int]], int]:
    """Generate to the end; also returns the most owners one request's table ever had."""
    ids = [engine.add_request(p, params).request_id for p in prompts]
    outputs, most = {}, 0
    for _ in range(MAX_STEPS):  # a livelock fails the test instead of hanging it
        if not engine.has_unfinished_requests():
            break
        for inst in engine.cluster.instances:
            for request in inst.scheduler.running:
                most = max(most, len(request.block_table.owners()))
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out.outputs[0].token_ids
        engine.check_integrity()
    assert not engine.has_unfinished_requests(), f"not done after {MAX_STEPS} steps"
    return [outputs[i] for i in ids], most


def assert_all_pools_full(engine: LLMEngine) -> None:
    engine.check_integrity()
    for inst in engine.cluster.instances:
        assert inst.rmanager.num_free == inst.rmanager.capacity
    assert engine.cluster.ledger().total_debt == 0
    assert not engine.requests


@pytest.mark.parametrize("instances", [2, 3, 4])
def test_kv_spread_over_instances_gives_the_same_greedy_tokens(tiny_llama_dir, alone_tokens, instances):
    # 8 blocks of 4 tokens per instance; the long prompt needs every instance.
    llm = tiny_cluster(tiny_llama_dir, instances, 8, max_lend_fraction=1.0)
    long_len = 32 * instances - 24
    prompts = [random_prompts(1, long_len, long_len + 1, 320, seed=instances)[0]]
    prompts += random_prompts(3, 3, 12, 320, seed=10 + instances)
    got, most = run_watching_owners(llm.engine, prompts, SamplingParams(max_tokens=16, **GREEDY))
    assert most == instances  # the long request really spanned every instance
    assert got == alone_tokens(prompts, 16)
    assert_all_pools_full(llm.engine)


def test_borrowing_that_starts_in_the_middle_of_decode_keeps_outputs(tiny_llama_dir, alone_tokens):
    # The prompt fits its home (8 blocks = 32 tokens); decoding past token 32 borrows.
    llm = tiny_cluster(tiny_llama_dir, 2, 8, max_lend_fraction=1.0)
    prompt = random_prompts(1, 28, 29, 320, seed=5)
    engine = llm.engine
    request = engine.add_request(prompt[0], SamplingParams(max_tokens=20, **GREEDY))
    owners_by_step = []
    while engine.has_unfinished_requests():
        owners_by_step.append(len(request.block_table.owners()))
        engine.step()
    assert owners_by_step[1] == 1 and max(owners_by_step) == 2  # local prefill, then borrowed
    assert request.output_token_ids == alone_tokens(prompt, 20)[0]
    assert_all_pools_full(engine)


def test_logits_do_not_depend_on_placement(tiny_llama_dir):
    """Blocks dealt round-robin over 4 instances, in chunks mixed with decodes: the
    logits equal the all-local ones within 1e-5 (float32)."""
    llm = tiny_cluster(tiny_llama_dir, 4, 64)
    sequences = random_prompts(5, 1, 60, 320, seed=3)
    local = paged_logits(llm, sequences, chunk=7)
    spread = paged_logits(llm, sequences, chunk=7, owner_of=lambda i, j: (i + j) % 4)
    for a, b in zip(local, spread):
        assert relative_error(b, a) < 1e-5
    assert_all_pools_full(llm.engine)


def test_isolated_instances_refuse_what_pooled_ones_serve(tiny_llama_dir, alone_tokens):
    prompt = random_prompts(1, 40, 41, 320, seed=8)  # 40 + 8 tokens: 12 blocks of 4
    params = SamplingParams(max_tokens=8, **GREEDY)
    isolated = tiny_cluster(tiny_llama_dir, 2, 8, kv_pooling=False)
    with pytest.raises(ValueError, match=r"needs KV cache for 48 tokens.*\(32 tokens, pooling off\)"):
        isolated.generate(prompt, params, use_tqdm=False)
    assert_all_pools_full(isolated.engine)
    pooled = tiny_cluster(tiny_llama_dir, 2, 8, max_lend_fraction=1.0)
    out = pooled.generate(prompt, params, use_tqdm=False)
    assert out[0].outputs[0].token_ids == alone_tokens(prompt, 8)[0]
    assert_all_pools_full(pooled.engine)


def test_refusal_names_the_need_and_the_cluster_capacity(tiny_llama_dir):
    # 3 instances x 8 blocks, each lending at most half: one request holds 8 + 2 x 4 blocks.
    llm = tiny_cluster(tiny_llama_dir, 3, 8, max_lend_fraction=0.5)
    assert llm.engine.capacity_tokens == 16 * BLOCK
    with pytest.raises(ValueError) as error:
        llm.generate([list(range(1, 60))], SamplingParams(max_tokens=10), use_tqdm=False)
    message = str(error.value)
    assert "69 tokens" in message and "cluster of 3 instances (64 tokens)" in message
    assert_all_pools_full(llm.engine)


def test_requests_that_fit_the_cluster_but_not_its_free_space_wait_their_turn(
    tiny_llama_dir, alone_tokens
):
    # Each request needs ~70% of the cluster's 64 blocks: they must run one after another.
    llm = tiny_cluster(tiny_llama_dir, 4, 16, max_lend_fraction=1.0)
    prompts = random_prompts(3, 150, 151, 320, seed=12)
    got, _ = run_watching_owners(llm.engine, prompts, SamplingParams(max_tokens=30, **GREEDY))
    assert got == alone_tokens(prompts, 30)
    assert_all_pools_full(llm.engine)


def test_many_requests_over_a_pooled_cluster_equal_each_alone(tiny_llama_dir, alone_tokens):
    """Mixed lengths, more KV than the cluster holds at once: borrowing, lend refusals
    and preemptions all happen; every request still gets its exact tokens."""
    g = torch.Generator().manual_seed(4)
    prompts = random_prompts(24, 3, 90, 320, seed=4)
    outs = [int(n) for n in torch.randint(1, 30, (24,), generator=g)]
    llm = tiny_cluster(tiny_llama_dir, 3, 12, max_lend_fraction=0.75)
    engine = llm.engine
    ids = [
        engine.add_request(p, SamplingParams(max_tokens=n, **GREEDY)).request_id
        for p, n in zip(prompts, outs)
    ]
    finished, borrowed = {}, 0
    for _ in range(MAX_STEPS):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.outputs[0].token_ids
        borrowed = max(borrowed, engine.cluster.ledger().total_debt)
        engine.check_integrity()
    assert not engine.has_unfinished_requests(), f"not done after {MAX_STEPS} steps"
    assert borrowed > 0 and engine.cluster.num_preemptions > 0
    for rid, p, n in zip(ids, prompts, outs):
        assert finished[rid] == alone_tokens([p], n)[0]
    assert_all_pools_full(engine)


def test_abort_returns_borrowed_blocks_to_their_creditors(tiny_llama_dir):
    llm = tiny_cluster(tiny_llama_dir, 2, 8, max_lend_fraction=1.0)
    engine = llm.engine
    request = engine.add_request(list(range(1, 45)), SamplingParams(max_tokens=8))
    engine.step()
    engine.step()
    assert len(request.block_table.owners()) == 2
    assert engine.cluster.ledger().total_debt > 0
    final = engine.abort_request(request.request_id)
    assert final.outputs[0].finish_reason == "abort"
    assert_all_pools_full(engine)


def test_the_ledger_is_current_after_every_step_and_abort_and_reading_it_sends_nothing(
    tiny_llama_dir,
):
    """The engine heartbeats at the end of each step (blocks a finishing request gave back
    included) and of each abort; ``ledger()`` only reads."""
    engine = tiny_cluster(tiny_llama_dir, 2, 8, max_lend_fraction=1.0).engine
    sent = []
    apply_all = engine.cluster.gmanager.apply_all
    engine.cluster.gmanager.apply_all = lambda beats: (sent.append(beats), apply_all(beats))

    def assert_current() -> None:
        before = len(sent)
        ledger = engine.cluster.ledger()
        assert engine.cluster.ledger() == ledger and len(sent) == before
        for inst in engine.cluster.instances:
            entry, rm = ledger.instances[inst.instance_id], inst.rmanager
            assert (entry.free, entry.lent_to, entry.borrowed_from) == (
                rm.num_free, rm.lent_to, rm.borrowed_from
            )

    short = engine.add_request(list(range(1, 6)), SamplingParams(max_tokens=2, **GREEDY))
    spanning = engine.add_request(list(range(1, 45)), SamplingParams(max_tokens=8, **GREEDY))
    while not short.finished:
        engine.step()
        assert_current()
    assert len(spanning.block_table.owners()) == 2 and engine.cluster.ledger().total_debt > 0
    engine.abort_request(spanning.request_id)
    assert_current()
    assert engine.cluster.ledger().total_debt == 0


def test_homes_are_the_least_loaded_instances(tiny_llama_dir):
    llm = tiny_cluster(tiny_llama_dir, 3, 16)
    engine = llm.engine
    params = SamplingParams(max_tokens=4)
    homes = [engine.add_request([1] * n, params).home for n in (20, 5, 5, 5)]
    assert homes == [0, 1, 2, 1]  # 1 and 2 carry 9 tokens each after the first round
    for rid in list(engine.requests):
        engine.abort_request(rid)
    assert_all_pools_full(engine)


def test_bad_cluster_arguments_are_clear_errors(tiny_llama_dir):
    with pytest.raises(ValueError, match="instances"):
        tiny_cluster(tiny_llama_dir, 0, 8)
    with pytest.raises(ValueError, match="max_lend_fraction"):
        tiny_cluster(tiny_llama_dir, 2, 8, max_lend_fraction=1.5)


def test_smollm2_greedy_tokens_do_not_depend_on_placement(smollm2_path, smollm2_llm):
    """SmolLM2 (float32) with 64 KV tokens per instance: each prompt's KV spans 2, 3 or 4
    instances, and the tokens equal one instance holding everything."""
    per_token = 30 * 2 * 3 * 64 * 4
    pooled = LLM("smollm2", dtype="float32", instances=4, kv_cache_memory=64 * per_token,
                 max_lend_fraction=1.0)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1000, 49000, (n,), generator=g).tolist() for n in (90, 150, 220)]
    params = SamplingParams(max_tokens=16, **GREEDY)
    got, most = run_watching_owners(pooled.engine, prompts, params)
    assert most == 4
    expected = smollm2_llm.generate(prompts, params, use_tqdm=False)
    assert got == [o.outputs[0].token_ids for o in expected]
    assert_all_pools_full(pooled.engine)
