"""The cluster on Ray: one actor per instance, tensors exchanged over torch.distributed.

The test starts a private local Ray on 127.0.0.1 and stops it at the end.
"""

from __future__ import annotations

import pytest

from infinite_llm import LLM, SamplingParams

from test_cluster import BLOCK, GREEDY, TINY_BLOCK_BYTES, run_watching_owners
from test_hf_equivalence import random_prompts

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()


def cluster(path, instances, backend):
    return LLM(
        str(path),
        kv_cache_memory=10 * TINY_BLOCK_BYTES,
        block_size=BLOCK,
        instances=instances,
        backend=backend,
        max_lend_fraction=1.0,
        max_num_batched_tokens=32,
    )


@pytest.mark.parametrize("instances", [2, 3])
def test_ray_actors_give_the_in_process_outputs(tiny_llama_dir, local_ray, instances):
    """Same placement (the bookkeeping is the same code), so the same tokens, including
    a request whose KV spans every actor and several that borrow mid-decode."""
    long_len = 40 * instances - 24
    prompts = [random_prompts(1, long_len, long_len + 1, 320, seed=instances)[0]]
    prompts += random_prompts(5, 3, 30, 320, seed=20 + instances)
    params = SamplingParams(max_tokens=12, **GREEDY)
    local = cluster(tiny_llama_dir, instances, "local")
    want, _ = run_watching_owners(local.engine, prompts, params)
    remote = cluster(tiny_llama_dir, instances, "ray")
    try:
        got, most = run_watching_owners(remote.engine, prompts, params)
        assert most == instances  # the long request's KV spanned every actor
        assert got == want
        for inst in remote.engine.cluster.instances:
            assert inst.rmanager.num_free == inst.rmanager.capacity
    finally:
        remote.engine.runner.shutdown()
