"""Decode steps from graphs (``engine.decode_graphs``): the padded step a graph replays
computes what the step op by op computes, and steps no graph takes run op by op. On the
CPU the padded step runs eagerly (``capture=False``); tests/test_cuda.py captures."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from infinite_llm import LLM, SamplingParams
from infinite_llm.attention.plan import JOINED
from infinite_llm.engine.decode_graphs import MAX_COMPILED_SHAPES, DecodeGraphs, GraphKey, bucket

from test_cluster import BLOCK, GREEDY, assert_all_pools_full, run_watching_owners, tiny_cluster


def with_graphs(llm: LLM, max_batch: int = 8, torch_compile: bool = False) -> DecodeGraphs:
    runner = llm.engine.runner
    runner.graphs = DecodeGraphs(runner.model, runner.pools, runner.scale, max_batch,
                                 capture=False, torch_compile=torch_compile)
    return runner.graphs


def generate(llm: LLM, prompts, max_tokens: int = 12):
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, logprobs=3)
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]


def assert_same(got, want) -> None:
    for (tokens, logprobs), (ref_tokens, ref_logprobs) in zip(got, want, strict=True):
        assert tokens == ref_tokens
        for a, b in zip(logprobs, ref_logprobs, strict=True):
            assert a.keys() == b.keys()
            assert all(abs(a[t] - b[t]) < 1e-4 for t in a)


def watch(graphs: DecodeGraphs) -> list[GraphKey | None]:
    """The graph each step offered to ``graphs`` would replay (None: op by op)."""
    seen = []
    logits = graphs.logits

    def watching(input_ids, positions, plan):
        seen.append(graphs.key(plan, input_ids.shape[0]))
        return logits(input_ids, positions, plan)

    graphs.logits = watching
    return seen


def test_buckets_are_powers_of_two_from_the_smallest():
    assert [bucket(n) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 16]
    assert [bucket(n, 16) for n in (1, 16, 17, 40)] == [16, 16, 32, 64]


def test_padded_decode_steps_give_the_op_by_op_tokens_and_logprobs(tiny_llama_dir):
    """Batches of 3 and 5 (padded to 4 and 8), contexts up to 29 and 82 tokens in blocks
    of 4 (tables padded to 16 and 32 blocks): every decode step from its graph's buffers,
    the same greedy tokens and log-probs; the padding rows' k, v went to the scratch
    slot only (the outputs would differ otherwise) and nothing is left behind."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 320, (n,), generator=g).tolist() for n in (5, 17, 9, 33, 70)]
    reference = LLM(str(tiny_llama_dir), dtype="float32", device="cpu", kv_cache_memory="2MiB",
                    block_size=BLOCK)
    want = [generate(reference, prompts[:3]), generate(reference, prompts)]
    llm = LLM(str(tiny_llama_dir), dtype="float32", device="cpu", kv_cache_memory="2MiB",
              block_size=BLOCK)
    graphs = with_graphs(llm)
    assert_same(generate(llm, prompts[:3]), want[0])
    assert_same(generate(llm, prompts), want[1])
    assert graphs.replays >= 2 * 11 and {k.owner for k in graphs.keys} == {JOINED}
    assert {(k.batch, k.width) for k in graphs.keys} == {(4, 16), (8, 32)}
    assert_all_pools_full(llm.engine)


def test_a_sequence_over_two_pools_replays_and_other_steps_run_op_by_op(
    tiny_llama_dir, alone_tokens,
):
    """The pools of one process are views of one cache: the decodes of a sequence whose
    KV spans two instances replay a graph like a local one's, with the tokens of one
    instance holding it all. Steps with a prompt and batches beyond the largest graph
    run op by op, with the same outputs."""
    llm = tiny_cluster(tiny_llama_dir, 2, 8, max_lend_fraction=1.0, dtype="float32", device="cpu")
    seen = watch(with_graphs(llm, max_batch=2))
    g = torch.Generator().manual_seed(2)
    long = torch.randint(0, 320, (40,), generator=g).tolist()  # 10 of the 8 blocks each
    _, most = run_watching_owners(llm.engine, [long], SamplingParams(max_tokens=8, **GREEDY))
    out = llm.generate([long], SamplingParams(max_tokens=8, **GREEDY),
                       use_tqdm=False)
    assert most == 2 and out[0].outputs[0].token_ids == alone_tokens([long], 8)[0]
    # Per run: the last prompt chunk (op by op), then 7 decodes across both pools.
    assert seen == 2 * ([None] + [GraphKey(JOINED, 1, 16)] * 7)
    assert_all_pools_full(llm.engine)

    one = LLM(str(tiny_llama_dir), dtype="float32", device="cpu", kv_cache_memory="2MiB",
              block_size=BLOCK)
    seen = watch(with_graphs(one, max_batch=2))
    short = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    got = one.generate(short,
                       SamplingParams(max_tokens=8, **GREEDY), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == alone_tokens(short, 8)
    assert seen == [None] * 8  # the prompts, then 3 decodes: beyond the largest graph (2)
    assert one.engine.runner.graphs.replays == 0


# On the CPU Dynamo steps around each C++ kernel call, and says so.
@pytest.mark.filterwarnings("ignore:Dynamo:UserWarning")
def test_compiled_padded_steps_give_the_op_by_op_tokens_and_logprobs(tiny_llama_dir):
    """With torch.compile (``enable_torch_compile``) each padded shape is compiled once
    and its steps run the compiled code: the same greedy tokens and log-probs as op by
    op, for batches of 1 and 3 (padded to 4), and a shape seen again is not compiled
    again."""
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 320, (n,), generator=g).tolist() for n in (6, 21, 11)]
    reference = LLM(str(tiny_llama_dir), dtype="float32", device="cpu", kv_cache_memory="2MiB",
                    block_size=BLOCK)
    want = [generate(reference, prompts[:1], 8), generate(reference, prompts, 8)]
    llm = LLM(str(tiny_llama_dir), dtype="float32", device="cpu", kv_cache_memory="2MiB",
              block_size=BLOCK)
    graphs = with_graphs(llm, torch_compile=True)
    limits, step = [], graphs._step

    def watched(static):  # the limits Dynamo reads when a new shape compiles
        limits.append((torch._dynamo.config.recompile_limit,
                       torch._dynamo.config.accumulated_recompile_limit))
        return step(static)

    graphs._step = watched
    counters.clear()
    assert_same(generate(llm, prompts[:1], 8), want[0])
    compiled = counters["stats"]["unique_graphs"]
    assert_same(generate(llm, prompts, 8), want[1])
    assert {(k.batch, k.width) for k in graphs.keys} == {(1, 16), (4, 16)}
    assert graphs.replays == 2 * 7 and compiled > 0
    assert counters["stats"]["unique_graphs"] > compiled  # the second shape compiled too
    again = counters["stats"]["unique_graphs"]
    assert_same(generate(llm, prompts, 8), want[1])
    assert counters["stats"]["unique_graphs"] == again
    # Dynamo's defaults (8 shapes a function, 256 in all) would leave the rest uncompiled.
    assert limits and set(limits) == {(MAX_COMPILED_SHAPES, MAX_COMPILED_SHAPES)}
    assert_all_pools_full(llm.engine)


def test_torch_compile_is_refused_without_a_gpu_or_with_enforce_eager(tiny_llama_dir):
    """torch.compile serves the CUDA graphs: asked for on the CPU or beside
    ``enforce_eager`` it is refused with why, before any weight is read."""
    with pytest.raises(ValueError, match="enable_torch_compile .* needs a CUDA device"):
        LLM(str(tiny_llama_dir), device="cpu", enable_torch_compile=True)
    with pytest.raises(ValueError, match="enforce_eager turns those off"):
        LLM(str(tiny_llama_dir), device="cpu", enable_torch_compile=True, enforce_eager=True)
