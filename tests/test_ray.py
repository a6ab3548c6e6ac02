"""The cluster on Ray: one actor per instance, tensors exchanged over torch.distributed.

The test starts a private local Ray on 127.0.0.1 and stops it at the end.
"""

from __future__ import annotations

import time

import pytest
import torch

from infinite_llm import LLM, SamplingParams

from test_cluster import BLOCK, GREEDY, TINY_BLOCK_BYTES, assert_all_pools_full, run_watching_owners
from test_hf_equivalence import random_prompts

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()


# The fault test also runs with the actors on a GPU where there is one (pytest -m cuda).
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[
        pytest.mark.cuda,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    ]),
]


def cluster(path, instances, backend, device="cpu", **kwargs):
    return LLM(
        str(path),
        device=device,
        dtype="float32",
        kv_cache_memory=10 * TINY_BLOCK_BYTES,
        block_size=BLOCK,
        instances=instances,
        backend=backend,
        max_lend_fraction=1.0,
        max_num_batched_tokens=32,
        **kwargs,
    )


def tables_kept(llm) -> dict[int, int]:
    """Block tables each instance actor keeps, read inside the actor."""
    actors = llm.engine.runner.actors
    counts = [a.__ray_call__.remote(lambda actor: len(actor.tables)) for a in actors.values()]
    return dict(zip(actors, ray.get(counts)))


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
        # The actors keep block tables only for requests that have not ended: the plan
        # after the last step tells them to let go of the rest.
        assert sum(tables_kept(remote).values()) > 0
        remote.engine.step()
        assert tables_kept(remote) == {i: 0 for i in range(instances)}
    finally:
        remote.engine.runner.shutdown()


def test_what_each_actor_receives_per_decode_step_does_not_grow_with_context(
    tiny_llama_dir, local_ray
):
    """Actors keep their own block tables and receive only changes: a decode step of a
    request of 900 tokens sends each actor what one of 40 tokens does."""
    llm = LLM(
        str(tiny_llama_dir), dtype="float32", kv_cache_memory=160 * TINY_BLOCK_BYTES,
        block_size=BLOCK, instances=2, backend="ray", max_lend_fraction=1.0,
        max_num_batched_tokens=512,
    )
    engine = llm.engine
    try:
        sent = {}
        for length in (40, 900):
            engine.add_request(random_prompts(1, length, length + 1, 320, seed=length)[0],
                               SamplingParams(max_tokens=24, **GREEDY))
            decode = []
            while engine.has_unfinished_requests():
                engine.step()
                request = next(iter(engine.requests.values()), None)
                if request is not None and request.num_computed_tokens > length:
                    decode.append(engine.runner.last_plan_bytes)
            sent[length] = decode
        assert len(sent[900]) >= 20
        # Every decode step of the long request (one spanning both actors, new blocks
        # every 4 tokens included) is as small as the short one's largest.
        assert max(sent[900]) <= max(sent[40]) + 16, sent
    finally:
        llm.shutdown()


def test_an_actors_own_decode_steps_replay_its_graphs_and_crossing_ones_exchange(
    tiny_llama_dir, local_ray
):
    """Each actor runs the decodes of a step none of whose sequences crosses from its
    graphs' padded buffers (on the CPU eagerly, ``capture=False``; a GPU captures them,
    tests/test_cuda.py), and a step where one crosses through the exchange: the greedy
    tokens and log-probs of the in-process engine, op by op."""
    from infinite_llm.engine.decode_graphs import DecodeGraphs
    from test_decode_graphs import assert_same, generate

    def with_graphs(actor):
        actor.graphs = DecodeGraphs(actor.model, {actor.rank: actor.kv_cache}, actor.scale,
                                    8, capture=False)

    long_len = 40 * 2 - 24
    spanning = [random_prompts(1, long_len, long_len + 1, 320, seed=2)[0]]
    short = random_prompts(5, 3, 30, 320, seed=22)
    params = SamplingParams(max_tokens=12, **GREEDY)
    local = cluster(tiny_llama_dir, 2, "local")
    want = generate(local, short)
    want_spanning, _ = run_watching_owners(local.engine, spanning + short, params)
    remote = cluster(tiny_llama_dir, 2, "ray")
    actors = remote.engine.runner.actors
    try:
        ray.get([a.__ray_call__.remote(with_graphs) for a in actors.values()])
        assert_same(generate(remote, short), want)
        replays = ray.get([a.__ray_call__.remote(lambda a: a.graphs.replays)
                           for a in actors.values()])
        assert all(n >= 10 for n in replays), replays  # each actor's decodes, 11 steps
        got, most = run_watching_owners(remote.engine, spanning + short, params)
        assert most == 2 and got == want_spanning
        assert_all_pools_full(remote.engine)
    finally:
        remote.engine.runner.shutdown()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fault", ["killed", "stopped", "stopped mid-step", "hung mid-step"])
def test_a_dead_actor_mid_decode_loses_no_request(tiny_llama_dir, local_ray, fault, device):
    """Instance 1 dies (killed between decode steps, so Ray reports it) or stops (its
    process SIGSTOPped, between steps or in the middle of one while its peers wait on it
    in an exchange: it answers no heartbeat, so the driver declares it dead after 2
    missed ones and kills it, and the peers' broken exchange is part of that failure) or
    hangs in the middle of a step while it still answers heartbeats (computing, not
    waiting on its peers, past the step's deadline: killed as stuck):
    requests with KV or home there start over on the survivors (greedy tokens as
    undisturbed) or, too large for them, end with an error; nothing is lost, nothing
    hangs, survivors' pools are full, the ledger forgets instance 1, and the engine
    serves on."""
    import os
    import signal
    import threading
    prompts = random_prompts(4, 5, 25, 320, seed=7)
    prompts.append(random_prompts(1, 90, 91, 320, seed=8)[0])  # needs all 3 instances
    params = SamplingParams(max_tokens=10, **GREEDY)
    local = cluster(tiny_llama_dir, 3, "local", device)
    want, _ = run_watching_owners(local.engine, prompts, params)

    remote = cluster(
        tiny_llama_dir, 3, "ray", device,
        heartbeat_timeout_s=0.5, max_missed_heartbeats=2, step_timeout_min_s=2.0,
    )
    engine = remote.engine
    try:
        ids = [engine.add_request(p, params).request_id for p in prompts]
        outputs = {}
        for step in range(400):
            if not engine.has_unfinished_requests():
                break
            if step == 6:
                assert any(1 in r.block_table.owners() for r in engine.requests.values())
                actor = engine.runner.actors[1]
                pid = ray.get(actor.__ray_call__.remote(lambda actor: os.getpid()))
                if fault == "killed":
                    engine.runner.kill(1)
                elif fault == "stopped":
                    os.kill(pid, signal.SIGSTOP)
                elif fault == "stopped mid-step":
                    # Its next step takes 3 s; stopped 1 s into it, its peers waiting.
                    def slow(actor):
                        compute = actor._compute
                        actor._compute = lambda plan: (time.sleep(3), compute(plan))[1]

                    ray.get(actor.__ray_call__.remote(slow))
                    threading.Timer(1.0, os.kill, (pid, signal.SIGSTOP)).start()
                else:
                    # Its next step never ends, while it answers every heartbeat.
                    def hang(actor):
                        actor._compute = lambda plan: time.sleep(3600)

                    ray.get(actor.__ray_call__.remote(hang))
                began = time.monotonic()
            if step == 7 and fault != "killed":
                assert time.monotonic() - began < 20, "the stuck instance was not noticed"
            for out in engine.step():
                if out.finished:
                    outputs[out.request_id] = out
            engine.check_integrity()
        assert not engine.has_unfinished_requests()
        assert sorted(outputs) == sorted(ids)  # every request ended, none silently lost
        errors = 0
        for rid, expected in zip(ids, want):
            out = outputs[rid]
            if out.outputs[0].finish_reason == "error":
                errors += 1
                assert "instance 1 died" in out.error and "surviving instances" in out.error
            else:
                assert out.outputs[0].token_ids == expected
        assert errors == 1  # only the request that needed all three instances
        ledger = engine.cluster.ledger()
        assert 1 not in ledger.instances and ledger.total_debt == 0
        for inst in engine.cluster.alive_instances:
            assert inst.rmanager.num_free == inst.rmanager.capacity
        # And it serves on.
        again = remote.generate(prompts[:2], params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in again] == want[:2]
    finally:
        engine.runner.shutdown()


def test_the_gmanager_is_a_named_actor_for_the_life_of_the_llm(tiny_llama_dir, local_ray):
    """The ledger lives in the named gManager actor: found by name while the LLM runs, it
    holds what the driver reads and what the rManagers' counts say, balanced while a
    request's KV spans both instances and empty of debt after it; gone after shutdown."""
    from infinite_llm.transport.ray_gmanager import NAMESPACE

    prompt = random_prompts(1, 60, 61, 320, seed=3)[0]  # 17 blocks: more than one instance
    engine = cluster(tiny_llama_dir, 2, "ray").engine
    name = engine.runner.gmanager.name
    try:
        actor = ray.get_actor(name, namespace=NAMESPACE)
        request = engine.add_request(prompt, SamplingParams(max_tokens=8, **GREEDY))
        most_debt = 0
        while engine.has_unfinished_requests():
            engine.step()
            driver = engine.cluster.ledger()
            ledger = ray.get(actor.ledger.remote())
            assert ledger == driver
            ledger.check_balanced()
            for inst in engine.cluster.instances:
                entry, rm = ledger.instances[inst.instance_id], inst.rmanager
                assert (entry.free, entry.lent_to, entry.borrowed_from) == (
                    rm.num_free, rm.lent_to, rm.borrowed_from
                )
            if len(request.block_table.owners()) == 2:
                most_debt = max(most_debt, ledger.total_debt)
        assert most_debt > 0
        assert ray.get(actor.ledger.remote()).total_debt == 0
    finally:
        engine.runner.shutdown()
    deadline = time.monotonic() + 10
    while _named(name) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _named(name), "the gManager actor outlived the shutdown"


def _named(name: str) -> bool:
    from infinite_llm.transport.ray_gmanager import NAMESPACE

    try:
        ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return False
    return True


def test_a_dead_gmanager_comes_back_with_its_ledger_and_requests_go_on(
    tiny_llama_dir, local_ray
):
    """The gManager actor killed mid-decode while requests borrow: a new one starts,
    its ledger rebuilt from every rManager's full report, and every request finishes
    with the tokens it would have had; the ledger is balanced throughout and empty of
    debt at the end."""
    from infinite_llm.transport.ray_gmanager import NAMESPACE

    prompts = random_prompts(3, 40, 70, 320, seed=11)  # each spans both instances
    params = SamplingParams(max_tokens=12, **GREEDY)
    want, _ = run_watching_owners(cluster(tiny_llama_dir, 2, "local").engine, prompts, params)
    engine = cluster(tiny_llama_dir, 2, "ray").engine
    first = engine.runner.gmanager.name
    try:
        ids = [engine.add_request(p, params).request_id for p in prompts]
        outputs, killed = {}, False
        while engine.has_unfinished_requests():
            if not killed and engine.cluster.ledger().total_debt > 0:
                ray.kill(ray.get_actor(first, namespace=NAMESPACE), no_restart=True)
                killed = True
            for out in engine.step():
                if out.finished:
                    outputs[out.request_id] = out
            engine.cluster.ledger().check_balanced()
        assert killed and engine.runner.gmanager.restarts == 1
        assert engine.runner.gmanager.name != first
        assert [outputs[i].outputs[0].token_ids for i in ids] == want
        ledger = engine.cluster.ledger()
        assert ledger.total_debt == 0 and all(
            e.free == e.capacity for e in ledger.instances.values())
    finally:
        engine.runner.shutdown()


def test_a_gmanager_that_cannot_be_rebuilt_ends_the_engine_with_a_clear_error(
    tiny_llama_dir, local_ray
):
    """Where nothing can rebuild the ledger, the next step that needs it raises
    GManagerLost (naming the actor) instead of hanging."""
    from infinite_llm.transport.ray_gmanager import NAMESPACE, GManagerLost

    engine = cluster(tiny_llama_dir, 2, "ray").engine
    engine.runner.gmanager.restore = None
    name = engine.runner.gmanager.name
    try:
        engine.add_request(random_prompts(1, 20, 21, 320, seed=5)[0], SamplingParams(max_tokens=4))
        engine.step()
        ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
        with pytest.raises(GManagerLost, match=name):
            for _ in range(20):  # the request's blocks go back within these: a heartbeat
                engine.step()
    finally:
        engine.runner.shutdown()


def ray_processes() -> set[int]:
    import subprocess

    found = subprocess.run(["pgrep", "-f", "raylet|gcs_server"], capture_output=True, text=True)
    return {int(pid) for pid in found.stdout.split()}


def test_serve_on_ray_answers_and_leaves_no_process(tiny_llama_dir):
    """`infinite-llm serve --backend ray` (its own private Ray on 127.0.0.1) serves the
    same tokens as in process; after SIGTERM neither it nor any Ray process remains."""
    import signal

    from test_server_cli import ServerProcess

    before = ray_processes()
    prompt = random_prompts(1, 60, 61, 320, seed=3)[0]  # spans both instances
    local = cluster(tiny_llama_dir, 2, "local")
    want = local.generate([prompt], SamplingParams(max_tokens=8, **GREEDY), use_tqdm=False)
    server = ServerProcess(
        str(tiny_llama_dir), "--backend", "ray", "--device", "cpu", "--instances", "2",
        "--block-size", str(BLOCK),
        "--kv-cache-memory", str(10 * TINY_BLOCK_BYTES), "--max-lend-fraction", "1.0",
        "--max-num-batched-tokens", "32", start_timeout=240,
    )
    try:
        body = {"model": str(tiny_llama_dir), "prompt": prompt, "max_tokens": 8,
                "temperature": 0, "ignore_eos": True, "return_token_ids": True}
        reply = server.post("/v1/completions", json=body)
        assert reply.status_code == 200, reply.text
        assert server.get("/v1/models").status_code == 200
    finally:
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(timeout=60)
    deadline = time.monotonic() + 20
    while ray_processes() - before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not ray_processes() - before, "Ray processes outlived the server"
    assert reply.json()["choices"][0]["token_ids"] == want[0].outputs[0].token_ids


def test_survivors_with_a_gap_in_their_ids_still_exchange(tiny_llama_dir, local_ray):
    """After instance 1 of 0, 1, 2 dies, ranks no longer equal instance ids: a request
    whose KV spans instances 0 and 2 must still get the in-process tokens."""
    prompt = random_prompts(1, 60, 61, 320, seed=11)[0]  # 17 blocks: more than one instance
    params = SamplingParams(max_tokens=8, **GREEDY)
    want = cluster(tiny_llama_dir, 2, "local").generate([prompt], params, use_tqdm=False)
    remote = cluster(tiny_llama_dir, 3, "ray")
    engine = remote.engine
    try:
        engine.runner.kill(1)
        got, most = run_watching_owners(engine, [prompt], params)
        assert most == 2 and got == [want[0].outputs[0].token_ids]
        assert 1 not in engine.cluster.ledger().instances
        assert engine.runner.exchange_latency(64, repeats=3) > 0  # the survivors' group
    finally:
        engine.runner.shutdown()


def test_blocks_migrate_between_actors_mid_decode_and_tokens_do_not_change(
    tiny_llama_dir, local_ray, alone_tokens
):
    """A run of blocks moves from one actor to another while its request decodes (the
    blocks cross over the tensor group): the in-process tokens, pools full after."""
    llm = LLM(
        str(tiny_llama_dir), dtype="float32", kv_cache_memory=12 * TINY_BLOCK_BYTES,
        block_size=BLOCK, instances=3, backend="ray", max_lend_fraction=1.0,
        max_num_batched_tokens=32, migration_tokens_per_step=4,
    )
    engine = llm.engine
    try:
        prompt = random_prompts(1, 56, 57, 320, seed=5)[0]
        request = engine.add_request(prompt, SamplingParams(max_tokens=24, **GREEDY))
        while request.num_computed_tokens < 56:
            engine.step()
        (run,) = [rb for rb in request.block_table.rblocks if rb.owner != request.home]
        target = 3 - run.owner
        assert engine.cluster.migrate(request.request_id, run.first_block, run.num_blocks, target)
        while engine.has_unfinished_requests():
            engine.step()
            engine.check_integrity()
        assert engine.cluster.migrator.moved_blocks == run.num_blocks
        assert request.output_token_ids == alone_tokens([prompt], 24)[0]
        assert engine.snapshot().pools_full
    finally:
        llm.shutdown()


def test_a_debt_cycle_cancelled_across_actors_changes_no_token(tiny_llama_dir, local_ray):
    """Two actors each hold a block of the other's request; DGFM swaps them back in one
    step (each sends before it writes): tokens and log-probabilities as alone."""
    from test_cluster import tiny_cluster
    from test_migration import assert_same_tokens_and_logprobs, run_a_cancelled_ring

    params = SamplingParams(max_tokens=6, logprobs=0, **GREEDY)
    prompts = random_prompts(2, 8, 9, 320, seed=22)
    alone = tiny_cluster(tiny_llama_dir, 1, 400).generate(prompts, params, use_tqdm=False)
    llm = tiny_cluster(
        tiny_llama_dir, 2, 4, max_lend_fraction=1.0, migration_tokens_per_step=64,
        backend="ray", dtype="float32",
    )
    try:
        assert_same_tokens_and_logprobs(run_a_cancelled_ring(llm, prompts, params), alone)
    finally:
        llm.shutdown()


def test_profile_on_ray_times_the_exchange_and_host_blocks_come_up_exactly(
    tiny_llama_dir, local_ray, monkeypatch
):
    """On Ray the cost model gets its exchange term (per_remote_s) from decode steps
    timed again with a request spread over both actors, its points are one actor's
    share of a step (a mixed point: the prompt's actor's), and the probe timed with both
    actors busy prices a step whose neighbour idles (``alone``); and a recall from an
    actor's host tier into its device blocks (a move whose source and target are one
    actor) changes no token."""
    from infinite_llm.engine import profile as profiling

    # The probe's shape, small enough for this tiny cache.
    monkeypatch.setattr(profiling, "PROBE_DECODE", (1, 8))
    monkeypatch.setattr(profiling, "PROBE_PREFILL", 8)
    remote = cluster(tiny_llama_dir, 2, "ray", host_kv_cache_memory=10 * TINY_BLOCK_BYTES)
    engine = remote.engine
    try:
        model = profiling.profile(engine, [1, 4], [8, 16], steps=2, mixed_chunks=[4])
        assert model.per_remote_s > 0 and model.source["backend"] == "ray"
        decode = [p for p in model.points if p.tokens is None]
        mixed = [p for p in model.points if p.tokens is not None]
        # The small batch spread (the larger ones' other actor has no room to take blocks).
        assert [p.spread_s is not None for p in decode][:2] == [True, True]
        # The actors run side by side: a point is the busiest one's share of the step.
        assert model.source["per_instance"] is True
        assert [p.batch for p in decode] == [1, 1, 2, 2]
        assert mixed and all(p.tokens == p.decoding + 4 and p.batch == p.decoding + 1
                             and p.decoding <= 2 for p in mixed)
        (alone,), (busy,) = model.source["probe_s"], model.source["probe_together_s"]
        assert model.alone == pytest.approx((alone[0] / busy[0], alone[1] / busy[1]))
        short = random_prompts(1, 20, 21, 320, seed=4)[0]
        long = random_prompts(1, 70, 71, 320, seed=5)[0]
        params = [SamplingParams(max_tokens=n, **GREEDY) for n in (4, 24)]
        want = cluster(tiny_llama_dir, 2, "local", host_kv_cache_memory=10 * TINY_BLOCK_BYTES
                       ).generate([short, long], params, use_tqdm=False)
        got = remote.generate([short, long], params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
        assert engine.cluster.migrator.recalls >= 1
        assert engine.snapshot().pools_full
    finally:
        engine.runner.shutdown()
