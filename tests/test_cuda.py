"""The engine on a CUDA GPU: exact greedy tokens against transformers, KV pooled over
instances on the GPU, and the Ray backend placing its actors on GPUs. Skipped on
machines without one (CI has none); run on a GPU machine with ``pytest -m cuda``."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from infinite_llm import LLM, SamplingParams

from test_cluster import BLOCK, GREEDY, TINY_BLOCK_BYTES, run_watching_owners
from test_hf_equivalence import hf_greedy, paged_logits, random_prompts, relative_error

transformers = pytest.importorskip("transformers")

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    return tiny_llama_dir, hf.eval()


def on_gpu(llm: LLM) -> bool:
    runner = llm.engine.runner
    weights = {p.device.type for p in runner.model.parameters()}
    caches = {c.k.device.type for c in runner.kv_caches.values()}
    return weights == caches == {"cuda"}


def test_auto_device_is_the_gpu_in_bfloat16(tiny):
    path, _ = tiny
    llm = LLM(str(path), kv_cache_memory="4MiB", block_size=4)
    assert on_gpu(llm)
    assert next(llm.engine.runner.model.parameters()).dtype is torch.bfloat16
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=5, **GREEDY), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 5


def test_logits_on_the_gpu_match_transformers_in_chunks(tiny):
    path, hf = tiny
    llm = LLM(str(path), device="cuda", dtype="float32", kv_cache_memory="4MiB", block_size=4)
    assert on_gpu(llm)
    sequences = random_prompts(5, 1, 60, 320, seed=1)
    for seq, ours in zip(sequences, paged_logits(llm, sequences, chunk=7)):
        with torch.no_grad():
            ref = hf(torch.tensor([seq])).logits[0]
        assert relative_error(ours.cpu(), ref) < 1e-4


@pytest.mark.parametrize("batch", [1, 16])
def test_greedy_on_the_gpu_matches_transformers(tiny, batch):
    path, hf = tiny
    llm = LLM(
        str(path), device="cuda", dtype="float32", kv_cache_memory="4MiB", block_size=4,
        max_num_batched_tokens=16,
    )
    prompts = random_prompts(batch, 2, 70, 320, seed=batch)
    outputs = llm.generate(prompts, SamplingParams(max_tokens=20, **GREEDY), use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == hf_greedy(hf, prompt, 20)
    rm = llm.engine.cluster.instances[0].rmanager
    assert rm.num_free == rm.capacity


def test_seeded_sampling_on_the_gpu_is_reproducible(tiny):
    path, _ = tiny
    llm = LLM(str(path), device="cuda", dtype="float32", kv_cache_memory="4MiB", block_size=4)
    params = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=11, ignore_eos=True)
    prompt = random_prompts(1, 10, 11, 320, seed=4)[0]
    first = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    again = llm.generate([prompt, prompt[:5]], params, use_tqdm=False)[0].outputs[0].token_ids
    assert first == again


def test_sampling_on_the_gpu_follows_the_seeds(tiny):
    """Random rows are sampled on the GPU: a request's own seed gives the tokens it gets
    on the CPU (its noise is drawn there), the engine's seed the same tokens again."""
    path, _ = tiny
    prompt = random_prompts(1, 10, 11, 320, seed=6)[0]
    seeded = SamplingParams(max_tokens=16, temperature=0.8, top_k=50, top_p=0.9, seed=11,
                            ignore_eos=True)
    unseeded = SamplingParams(max_tokens=16, temperature=0.8, ignore_eos=True)

    def tokens(device, params):
        llm = LLM(str(path), device=device, dtype="float32", kv_cache_memory="4MiB", block_size=4)
        return llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids

    assert tokens("cuda", seeded) == tokens("cpu", seeded)
    assert tokens("cuda", unseeded) == tokens("cuda", unseeded)


def test_decode_steps_from_cuda_graphs_match_op_by_op_and_transformers(tiny):
    """Greedy tokens and log-probs with decode steps replayed from CUDA graphs (batches
    of 1-7 padded to 1, 2, 4, 8) equal op by op (``enforce_eager``) and transformers."""
    path, hf = tiny
    kw = dict(device="cuda", dtype="float32", kv_cache_memory="4MiB", block_size=4)
    graphs, eager = LLM(str(path), **kw), LLM(str(path), enforce_eager=True, **kw)
    assert graphs.engine.runner.graphs is not None and eager.engine.runner.graphs is None
    params = SamplingParams(max_tokens=20, logprobs=2, **GREEDY)
    for count in (1, 3, 7):
        prompts = random_prompts(count, 2, 70, 320, seed=30 + count)
        got = graphs.generate(prompts, params, use_tqdm=False)
        want = eager.generate(prompts, params, use_tqdm=False)
        for prompt, a, b in zip(prompts, got, want):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids == hf_greedy(hf, prompt, 20)
            for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
                assert x.keys() == y.keys() and all(abs(x[t] - y[t]) < 1e-4 for t in x)
    used = graphs.engine.runner.graphs
    assert used.replays >= 3 * 19 and {k.batch for k in used.keys} == {1, 2, 4, 8}
    rm = graphs.engine.cluster.instances[0].rmanager
    assert rm.num_free == rm.capacity


def test_decode_steps_compiled_by_torch_compile_match_op_by_op_and_transformers(tiny):
    """``enable_torch_compile``: the decode step is compiled before its graph is captured
    (one shape: batch 1, a table of 16 blocks), with the tokens and log-probs of op by op
    and transformers."""
    path, hf = tiny
    kw = dict(device="cuda", dtype="float32", kv_cache_memory="4MiB", block_size=4)
    compiled, eager = LLM(str(path), enable_torch_compile=True, **kw), LLM(
        str(path), enforce_eager=True, **kw)
    params = SamplingParams(max_tokens=16, logprobs=2, **GREEDY)
    counters.clear()
    for prompt in random_prompts(2, 8, 30, 320, seed=44):
        got, want = (llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
                     for llm in (compiled, eager))
        assert got.token_ids == want.token_ids == hf_greedy(hf, prompt, 16)
        for x, y in zip(got.logprobs, want.logprobs):
            assert x.keys() == y.keys() and all(abs(x[t] - y[t]) < 1e-4 for t in x)
    graphs = compiled.engine.runner.graphs
    assert counters["stats"]["unique_graphs"] > 0 and graphs.replays == 2 * 15
    assert [(k.batch, k.width) for k in graphs.keys] == [(1, 16)]


def test_a_decode_step_from_its_graph_never_synchronises_the_host(tiny):
    """Once captured, a decode step's graph path (inputs in, replay, logits out) makes
    no call that waits for the GPU: CUDA's sync debug mode raises on any."""
    path, _ = tiny
    llm = LLM(str(path), device="cuda", dtype="bfloat16", kv_cache_memory="4MiB", block_size=4)
    prompts = random_prompts(4, 2, 40, 320, seed=5)
    params = SamplingParams(max_tokens=12, **GREEDY)
    want = llm.generate(prompts, params, use_tqdm=False)  # captures the shapes
    graphs = llm.engine.runner.graphs
    replayed, logits = graphs.replays, graphs.logits

    def strict(*args):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return logits(*args)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    graphs.logits = strict
    got = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert graphs.replays - replayed == 11


def pooled(path, instances, backend="local", **kwargs) -> LLM:
    return LLM(
        str(path), kv_cache_memory=10 * TINY_BLOCK_BYTES, block_size=BLOCK,
        instances=instances, backend=backend, max_lend_fraction=1.0,
        max_num_batched_tokens=32, dtype="float32", **kwargs,
    )


def spanning_prompts(instances: int) -> list[list[int]]:
    long_len = 40 * instances - 24  # needs every instance's pool
    prompts = [random_prompts(1, long_len, long_len + 1, 320, seed=instances)[0]]
    return prompts + random_prompts(5, 3, 30, 320, seed=20 + instances)


def test_kv_pooled_over_gpu_instances_gives_the_cpu_tokens(tiny_llama_dir):
    prompts, params = spanning_prompts(3), SamplingParams(max_tokens=12, **GREEDY)
    want, _ = run_watching_owners(pooled(tiny_llama_dir, 3, device="cpu").engine, prompts, params)
    gpu = pooled(tiny_llama_dir, 3, device="cuda")
    assert on_gpu(gpu)
    got, most = run_watching_owners(gpu.engine, prompts, params)
    assert most == 3 and got == want


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1")
    yield ray
    ray.shutdown()


@pytest.mark.ray
def test_ray_actors_on_the_gpu_give_the_in_process_tokens(tiny_llama_dir, local_ray):
    """auto places the actors on the GPU (one each when Ray has enough GPUs, else equal
    shares with a gloo group staged through the CPU); tokens equal the in-process
    cluster's, with one request's KV spanning both actors."""
    ray = local_ray
    prompts, params = spanning_prompts(2), SamplingParams(max_tokens=12, **GREEDY)
    want, _ = run_watching_owners(pooled(tiny_llama_dir, 2, device="cuda").engine, prompts, params)
    remote = pooled(tiny_llama_dir, 2, backend="ray")
    runner = remote.engine.runner
    try:
        gpus = int(ray.cluster_resources()["GPU"])
        placements = ray.get([a.placement.remote() for a in runner.actors.values()])
        for device, backend in placements:
            assert device.startswith("cuda")
            assert backend == ("nccl" if gpus >= 2 else "gloo")
        got, most = run_watching_owners(remote.engine, prompts, params)
        assert most == 2 and got == want
        for inst in remote.engine.cluster.instances:
            assert inst.rmanager.num_free == inst.rmanager.capacity
    finally:
        runner.shutdown()


@pytest.mark.ray
def test_an_actor_with_a_gpu_of_its_own_joins_an_nccl_group(tiny_llama_dir, local_ray):
    """One instance per GPU: the actor's group is NCCL (a world of one on a one-GPU
    machine, so its all-to-all moves nothing but runs through NCCL); its decode steps
    replay CUDA graphs and give the in-process tokens."""
    ray = local_ray
    prompts, params = random_prompts(3, 5, 30, 320, seed=9), SamplingParams(max_tokens=8, **GREEDY)
    want, _ = run_watching_owners(pooled(tiny_llama_dir, 1, device="cuda").engine, prompts, params)
    remote = pooled(tiny_llama_dir, 1, backend="ray")
    runner = remote.engine.runner
    try:
        (placement,) = ray.get([a.placement.remote() for a in runner.actors.values()])
        assert placement[0].startswith("cuda") and placement[1] == "nccl"
        assert runner.exchange_latency(64, repeats=3) >= 0
        got, _ = run_watching_owners(remote.engine, prompts, params)
        assert got == want
        # Its decode steps (none crosses: one instance) replayed CUDA graphs.
        (replays,) = ray.get([a.__ray_call__.remote(lambda a: a.graphs.replays)
                              for a in runner.actors.values()])
        assert replays >= 7
    finally:
        runner.shutdown()
