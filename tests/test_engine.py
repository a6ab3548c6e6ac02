"""The engine end to end on a tiny random model: memory pressure, sampling, stops, errors."""

from __future__ import annotations

import pytest
import torch

from infinite_llm import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), kv_cache_memory="4MiB", block_size=4, max_num_batched_tokens=64)


def prompts_of(lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 320, (n,), generator=g).tolist() for n in lengths]


def assert_pool_full(llm: LLM) -> None:
    engine = llm.engine
    engine.check_integrity()
    for inst in engine.cluster.instances:
        assert inst.rmanager.num_free == inst.rmanager.capacity
    assert not engine.has_unfinished_requests() and not engine.requests


def test_64_mixed_requests_under_a_small_kv_budget_equal_each_alone(tiny_llama_dir):
    """More KV than the pool holds: admission waits and preemption recomputes, yet every
    request finishes with exactly the tokens it gets when it runs alone."""
    g = torch.Generator().manual_seed(7)
    lengths = torch.randint(3, 120, (64,), generator=g).tolist()
    prompts = prompts_of(lengths, seed=7)
    outs = [int(n) for n in torch.randint(1, 40, (64,), generator=g)]
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in outs]

    # 96 blocks of 4 tokens: 384 tokens for ~4,900 of KV in total.
    small = LLM(str(tiny_llama_dir), kv_cache_memory=96 * 4 * 2 * 3 * 2 * 16 * 4, block_size=4,
                max_num_batched_tokens=48)
    assert small.engine.cluster.blocks_per_instance == 96
    assert sum(lengths) + sum(outs) > 4 * small.engine.capacity_tokens
    together = small.generate(prompts, params, use_tqdm=False)
    assert small.engine.cluster.num_preemptions > 0  # the budget really was exceeded

    alone = LLM(str(tiny_llama_dir), kv_cache_memory="4MiB", block_size=4)
    for prompt, p, out in zip(prompts, params, together):
        expected = alone.generate([prompt], p, use_tqdm=False)[0].outputs[0].token_ids
        assert out.outputs[0].token_ids == expected
        assert len(expected) == p.max_tokens
    assert_pool_full(small)


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(llm):
    prompt = prompts_of([20])[0]
    params = SamplingParams(max_tokens=24, temperature=1.0, top_k=50, top_p=0.9, seed=1234, ignore_eos=True)
    alone = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    crowd = prompts_of([5, 33, 12], seed=3)
    mixed = llm.generate([*crowd, prompt], [SamplingParams(max_tokens=30, temperature=0.8)] * 3 + [params],
                         use_tqdm=False)
    assert mixed[-1].outputs[0].token_ids == alone
    other = SamplingParams(max_tokens=24, temperature=1.0, top_k=50, top_p=0.9, seed=99, ignore_eos=True)
    assert llm.generate([prompt], other, use_tqdm=False)[0].outputs[0].token_ids != alone
    assert_pool_full(llm)


def test_top_k_1_and_tiny_top_p_are_greedy(llm):
    prompt = prompts_of([15], seed=4)[0]
    greedy = llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    top_k = SamplingParams(max_tokens=16, temperature=2.0, top_k=1, ignore_eos=True)
    top_p = SamplingParams(max_tokens=16, temperature=2.0, top_p=1e-6, ignore_eos=True)
    assert llm.generate([prompt], top_k, use_tqdm=False)[0].outputs[0].token_ids == greedy
    assert llm.generate([prompt], top_p, use_tqdm=False)[0].outputs[0].token_ids == greedy


def test_sampling_follows_the_filtered_distribution():
    """The exponential race draws from softmax(logits / T) restricted to top-k and top-p."""
    from infinite_llm.engine.sampler import Sampler, SampleRequest

    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    sampler = Sampler(seed=0)
    cases = [
        (SamplingParams(temperature=1.0), [0.5, 0.25, 0.15, 0.1]),
        (SamplingParams(temperature=1.0, top_k=2), [2 / 3, 1 / 3, 0, 0]),
        (SamplingParams(temperature=1.0, top_p=0.7), [2 / 3, 1 / 3, 0, 0]),
        (SamplingParams(temperature=0.5), [0.25 / 0.345, 0.0625 / 0.345, 0.0225 / 0.345, 0.01 / 0.345]),
    ]
    for params, expected in cases:
        rows = [SampleRequest(str(i), params) for i in range(4000)]
        tokens = [t.token_id for t in sampler(logits.expand(4000, 4), rows)]
        freq = torch.bincount(torch.tensor(tokens), minlength=4).float() / 4000
        torch.testing.assert_close(freq, torch.tensor(expected), atol=0.03, rtol=0)


def test_stop_token_ids_and_max_tokens(llm):
    prompt = prompts_of([10], seed=5)[0]
    tokens = llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    stop_at = tokens[5]
    first = tokens.index(stop_at)
    out = llm.generate([prompt], SamplingParams(max_tokens=16, temperature=0, stop_token_ids=[stop_at]),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == tokens[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at
    out = llm.generate([prompt], SamplingParams(max_tokens=3, temperature=0), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == tokens[:3] and out.finish_reason == "length"


def test_logprobs_are_log_softmax_of_the_logits(llm):
    prompt = prompts_of([12], seed=6)[0]
    out = llm.generate([prompt], SamplingParams(max_tokens=4, temperature=0, logprobs=3, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == 4
    total = 0.0
    for token, step in zip(out.token_ids, out.logprobs):
        best = max(step, key=step.get)
        assert best == token  # greedy picks the most likely token
        assert all(v <= 0 for v in step.values()) and len(step) == 3
        total += step[token]
    assert out.cumulative_logprob == pytest.approx(total)


def test_n_samples_per_prompt(llm):
    prompt = prompts_of([9], seed=8)[0]
    out = llm.generate([prompt], SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=5, ignore_eos=True),
                       use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 8 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1


@pytest.mark.parametrize("bad, message", [
    (dict(max_tokens=-1), "max_tokens"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_k=-3), "top_k"),
    (dict(n=0), "n must"),
    (dict(seed=2**64), "seed"),
])
def test_bad_sampling_params_raise(bad, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**bad)


def test_bad_requests_raise_and_leave_nothing_behind(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), kv_cache_memory=20 * 4 * 2 * 3 * 2 * 16 * 4, block_size=4)
    capacity = llm.engine.capacity_tokens
    assert capacity == 80
    good = prompts_of([5])[0]
    with pytest.raises(ValueError, match=r"needs KV cache for 90 tokens .* holds \(80 tokens\)"):
        llm.generate([good, prompts_of([60])[0]], SamplingParams(max_tokens=30), use_tqdm=False)
    with pytest.raises(ValueError, match="maximum context length is 1024"):
        llm.generate([prompts_of([1030])[0]], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="token ids must be ints"):
        llm.generate([[1, 2, 999999]], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="no tokenizer"):
        llm.generate(["text prompt"], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match=r"top_k must be at most the vocabulary size \(320\)"):
        llm.generate([good], SamplingParams(top_k=2**40), use_tqdm=False)
    with pytest.raises(ValueError, match="logprobs must be at most"):
        llm.generate([good], SamplingParams(logprobs=321), use_tqdm=False)
    assert_pool_full(llm)
    # The engine still serves after the refusals.
    assert len(llm.generate([good], GREEDY, use_tqdm=False)[0].outputs[0].token_ids) == 16


def test_unknown_model_and_bad_memory_sizes():
    with pytest.raises(ValueError, match="not-a-model"):
        LLM("not-a-model")
    from infinite_llm.config import parse_memory_size

    assert parse_memory_size("256MiB") == 256 << 20
    assert parse_memory_size("1.5GB") == 1_500_000_000
    assert parse_memory_size(4096) == 4096
    for bad in ("lots", "-1MiB", 0, "12 parsecs"):
        with pytest.raises(ValueError):
            parse_memory_size(bad)


@pytest.mark.parametrize("field, bad, message", [
    ("heartbeat_timeout_s", 0, "heartbeat_timeout_s must be positive"),
    ("max_missed_heartbeats", 0, "max_missed_heartbeats must be at least 1"),
    ("step_timeout_factor", 0.5, "step_timeout_factor must be at least 1"),
    ("step_timeout_min_s", -1, "step_timeout_min_s must be positive"),
])
def test_bad_ray_failure_settings_are_refused(field, bad, message):
    from infinite_llm.config import EngineConfig

    with pytest.raises(ValueError, match=message):
        EngineConfig.from_options("m", **{field: bad})


def test_abort_frees_blocks_and_returns_a_final_output(llm):
    engine = llm.engine
    request = engine.add_request(prompts_of([40], seed=9)[0], GREEDY)
    engine.step()
    assert engine.cluster.instances[0].rmanager.num_used > 0
    final = engine.abort_request(request.request_id)
    assert final.finished and final.outputs[0].finish_reason == "abort"
    assert_pool_full(llm)
    assert engine.abort_request(request.request_id) is None


@pytest.mark.parametrize("check", [True, False])
def test_the_integrity_check_runs_whenever_the_engine_goes_idle(tiny_llama_dir, check):
    """With check_integrity on (the whole suite runs so), a block leaked behind the
    rManager's back is caught the moment the engine has no work left; off, it is not."""
    llm = LLM(str(tiny_llama_dir), kv_cache_memory="1MiB", block_size=4, check_integrity=check)
    assert llm.engine.config.check_integrity is check
    llm.generate(prompts_of([5]), GREEDY, use_tqdm=False)  # sound: passes either way
    llm.engine.cluster.instances[0].rmanager.pool.allocate(1)  # a leak
    if check:
        with pytest.raises(AssertionError, match="free .* != capacity"):
            llm.generate(prompts_of([5]), GREEDY, use_tqdm=False)
    else:
        llm.generate(prompts_of([5]), GREEDY, use_tqdm=False)


def test_the_suite_runs_with_the_integrity_check_on(llm):
    assert llm.engine.config.check_integrity


def test_the_runner_lets_go_of_ended_requests_through_the_plans(llm):
    """A runner keeps each request's table and sampling state until a plan says it
    ended: the step after the last one leaves it holding nothing. A request aborted
    before it was ever scheduled is never announced to it at all."""
    runner, engine = llm.engine.runner, llm.engine
    llm.generate(prompts_of([5, 9, 30], seed=11), GREEDY, use_tqdm=False)
    assert len(runner.tables) > 0 and runner.sampler.num_requests > 0
    engine.abort_request(engine.add_request(prompts_of([4])[0], GREEDY).request_id)
    engine.step()
    assert len(runner.tables) == 0 and runner.sampler.num_requests == 0
