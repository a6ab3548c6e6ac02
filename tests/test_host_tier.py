"""The host-memory tier: blocks an instance keeps in host memory, used after every
instance's device memory, recalled into device memory first when it frees; admission
and the capacity error count both tiers. Greedy tokens never change."""

from __future__ import annotations

import pytest

from infinite_llm import SamplingParams
from infinite_llm.config import PoolingConfig
from infinite_llm.core.dgfm import plan_recalls
from infinite_llm.core.request import Request, RequestStatus
from infinite_llm.memory.block_pool import BlockPool, OutOfBlocks, Tier, Tiers
from infinite_llm.memory.gmanager import GManager
from infinite_llm.memory.rblock import BlockTable
from infinite_llm.memory.rmanager import RManager
from infinite_llm.core.sampling_params import SamplingParams as CoreParams

from test_cluster import BLOCK, GREEDY, TINY_BLOCK_BYTES, assert_all_pools_full, tiny_cluster
from test_hf_equivalence import random_prompts


def test_pool_hands_out_device_blocks_before_host_ones():
    pool = BlockPool(Tiers(3, 2))
    assert pool.allocate(4) == [0, 1, 2, 3]
    assert (pool.free_in(Tier.DEVICE), pool.free_in(Tier.HOST)) == (0, 1)
    with pytest.raises(OutOfBlocks):
        pool.allocate(1, Tier.DEVICE)
    pool.free([3, 1])
    assert pool.free_ids() == [1, 4, 3]  # device first; each tier in the order freed
    assert pool.allocate(1, Tier.HOST) == [4]
    pool.check_integrity()


def managers(tiers: Tiers, n: int = 2, config=PoolingConfig(max_lend_fraction=1.0)):
    gm = GManager(1, config)
    found: dict[int, RManager] = {}
    for i in range(n):
        gm.register(i, tiers.total)
        found[i] = RManager(i, BlockPool(tiers), config, gm, lambda j, m, *a: getattr(found[j], m)(*a))
    return found, gm


def test_a_request_takes_device_memory_anywhere_before_host_memory():
    ms, gm = managers(Tiers(4, 3))
    table = BlockTable()
    assert ms[0].allocate("r", table, 6)  # own device 4, then the peer's device
    for m in ms.values():
        gm.apply(m.heartbeat())
    assert [(rb.owner, rb.block_ids) for rb in table.rblocks] == [(0, (0, 1, 2, 3)), (1, (0, 1))]
    assert ms[0].allocate("r", table, 5)  # the peer's last device blocks, then own host
    assert [(rb.owner, rb.block_ids) for rb in table.rblocks][-2:] == [(1, (0, 1, 2, 3)), (0, (4, 5, 6))]
    assert ms[0].allocate("r", table, 2)  # then the peer's host memory
    assert [(rb.owner, rb.block_ids) for rb in table.rblocks][-1] == (1, (4, 5))
    assert not ms[0].allocate("r", table, 2)  # one host block left in the cluster
    assert ms[0].reserve("r", 1, 1) is None  # migrations only go into device memory
    ms[0].release("r", table)
    for m in ms.values():
        m.check_integrity()
        assert m.num_free == 7


def _running(request_id, home, runs, arrival=0):
    request = Request(request_id, [1] * 4, CoreParams(max_tokens=1), 1, home=home)
    request.arrival, request.status = arrival, RequestStatus.RUNNING
    for owner, ids in runs:
        request.block_table.append(owner, ids)
    return request


def test_recall_brings_host_blocks_up_before_remote_ones_come_home():
    tiers = Tiers(8, 8)
    old = _running("old", 0, [(0, [0, 1]), (1, [2, 3, 4])], arrival=0)
    new = _running("new", 0, [(0, [2, 9, 10, 3])], arrival=1)  # blocks 9, 10 in host memory
    recalls = plan_recalls([old, new], {0: 4, 1: 0}, set(), tiers)
    assert [(r.request.request_id, r.first_block, r.count, r.target) for r in recalls] == [
        ("new", 1, 2, 0), ("old", 2, 2, 0)
    ]
    only_host = plan_recalls([old, new], {0: 4, 1: 0}, set(), tiers, remote=False)
    assert [(r.request.request_id, r.first_block, r.count) for r in only_host] == [("new", 1, 2)]
    # No device room at home: host blocks go where there is most; remote runs wait.
    elsewhere = plan_recalls([old, new], {0: 0, 1: 1, 2: 5}, set(), tiers)
    assert [(r.request.request_id, r.first_block, r.count, r.target) for r in elsewhere] == [
        ("new", 1, 2, 2)
    ]


def host_cluster(path, instances, device_blocks, host_blocks, **kw):
    return tiny_cluster(
        path, instances, device_blocks, host_kv_cache_memory=host_blocks * TINY_BLOCK_BYTES,
        max_lend_fraction=1.0, **kw,
    )


def host_blocks_held(engine) -> int:
    tiers = engine.cluster.tiers
    return sum(
        tiers.of(b) is Tier.HOST
        for r in engine.requests.values() for rb in r.block_table.rblocks for b in rb.block_ids
    )


def test_a_request_beyond_every_device_pool_but_within_host_memory_is_served_exactly(
    tiny_llama_dir, alone_tokens
):
    llm = host_cluster(tiny_llama_dir, 2, 8, 8)  # 16 device + 16 host blocks of 4 tokens
    engine = llm.engine
    assert engine.capacity_tokens == 32 * BLOCK
    prompt = random_prompts(1, 100, 101, 320, seed=11)[0]  # 100 + 12 tokens: 28 blocks
    request = engine.add_request(prompt, SamplingParams(max_tokens=12, **GREEDY))
    most = 0
    while engine.has_unfinished_requests():
        engine.step()
        engine.check_integrity()
        most = max(most, host_blocks_held(engine))
    assert most == 28 - 16
    assert request.output_token_ids == alone_tokens([prompt], 12)[0]
    assert_all_pools_full(engine)


def test_a_request_beyond_both_tiers_is_refused_at_once_with_both_numbers(tiny_llama_dir):
    llm = host_cluster(tiny_llama_dir, 2, 8, 4)
    engine = llm.engine
    prompt = random_prompts(1, 100, 101, 320, seed=11)[0]
    with pytest.raises(ValueError) as error:
        engine.add_request(prompt, SamplingParams(max_tokens=12, **GREEDY))
    message = str(error.value)
    assert "needs KV cache for 112 tokens" in message
    assert f"{24 * BLOCK} tokens: {16 * BLOCK} in device memory + {8 * BLOCK} in host memory" in message
    assert not engine.requests and not engine.has_unfinished_requests()
    assert_all_pools_full(engine)


@pytest.mark.parametrize("pooling", [True, False])
def test_host_blocks_come_up_into_device_memory_when_it_frees(
    tiny_llama_dir, alone_tokens, pooling
):
    """A short request fills device memory; the long one beside it spills into host
    memory, and its host blocks are recalled into device memory once the short one
    ends, while it keeps decoding."""
    llm = host_cluster(tiny_llama_dir, 1, 10, 10, kv_pooling=pooling,
                       migration_tokens_per_step=8)
    engine = llm.engine
    short, long = random_prompts(2, 20, 56, 320, seed=4)
    short, long = short[:20], long + long[:4]  # 20 + 4 tokens: 6 blocks; 60 + 24: 21 blocks
    engine.add_request(short, SamplingParams(max_tokens=4, **GREEDY))
    request = engine.add_request(long, SamplingParams(max_tokens=24, **GREEDY))
    held = []
    while engine.has_unfinished_requests():
        engine.step()
        engine.check_integrity()
        held.append((len(engine.requests), host_blocks_held(engine), request.block_table.num_blocks))
    spilled = max(h for _, h, _ in held)
    alone = [(h, n) for k, h, n in held if k == 1]
    # Alone, it ends with every device block in use and only the rest on the host.
    assert alone[0][0] == spilled > alone[-1][0] == alone[-1][1] - 10
    assert engine.cluster.migrator.recalls >= 1
    assert engine.cluster.migrator.moved_blocks >= 1
    assert request.output_token_ids == alone_tokens([long], 24)[0]
    assert_all_pools_full(engine)


def test_host_tier_option_is_validated():
    from infinite_llm.config import EngineConfig

    config = EngineConfig.from_options("m", host_kv_cache_memory="1MiB")
    assert config.cache.host_kv_cache_memory == 1 << 20
    assert EngineConfig.from_options("m", host_kv_cache_memory=0).cache.host_kv_cache_memory == 0
    with pytest.raises(ValueError, match="host_kv_cache_memory"):
        EngineConfig.from_options("m", host_kv_cache_memory=-1)
