"""The simulator's first pieces: trace readers and generator, and the real cluster on
simulated time (the same schedule as the engine's, the same result for the same seed)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from infinite_llm import SamplingParams
from infinite_llm.core.cost_model import CostModel
from infinite_llm.sim.clock import MeasuredClock
from infinite_llm.sim.simulator import Simulator, summary
from infinite_llm.workload.traces import (
    Lognormal,
    TraceRequest,
    read_trace,
    synthetic,
)

from test_cluster import tiny_cluster
from test_hf_equivalence import random_prompts

TRACES = Path(__file__).parents[2] / "shared" / "traces"
COST = CostModel(0.010, 0.001, 1e-6)


def test_traces_are_read_as_they_come_and_bad_lines_say_where(tmp_path):
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text('{"timestamp": 1500, "input_length": 40, "output_length": 7, "hash_ids": [1]}\n'
                     '{"timestamp": 0, "input_length": 9, "output_length": 2}\n')
    assert read_trace(jsonl) == [TraceRequest(0.0, 9, 2), TraceRequest(1.5, 40, 7)]
    csv = tmp_path / "t.csv"
    csv.write_text("arrived_at,num_prefill_tokens,num_decode_tokens,extra\n0.25,100,20,x\n")
    assert read_trace(csv) == [TraceRequest(0.25, 100, 20)]
    csv.write_text("arrived_at,num_prefill_tokens\n0.25,100\n")
    with pytest.raises(ValueError, match=r"t.csv:2: not a Vidur trace row"):
        read_trace(csv)
    jsonl.write_text('{"timestamp": 0, "input_length": 0, "output_length": 2}\n')
    with pytest.raises(ValueError, match=r"t.jsonl:1: .*at least one prompt"):
        read_trace(jsonl)
    with pytest.raises(ValueError, match="a trace is .jsonl"):
        read_trace(tmp_path / "t.txt")


@pytest.mark.skipif(not TRACES.is_dir(), reason="the development traces are not here")
def test_the_public_traces_read_whole():
    mooncake = read_trace(TRACES / "mooncake_conversation_trace.jsonl")
    azure = read_trace(TRACES / "splitwise_conv.csv")
    assert (len(mooncake), len(azure)) == (12031, 19366)
    assert max(r.input_tokens for r in mooncake) == 126195
    assert max(r.input_tokens for r in azure) == 14050


def test_synthetic_traces_follow_their_parameters_and_their_seed():
    inputs, outputs = Lognormal(6.0, 0.5, high=2000), Lognormal(4.0, 0.3)
    a = synthetic(4000, rate=5.0, inputs=inputs, outputs=outputs, seed=1)
    assert a == synthetic(4000, rate=5.0, inputs=inputs, outputs=outputs, seed=1)
    assert a != synthetic(4000, rate=5.0, inputs=inputs, outputs=outputs, seed=2)
    gaps = [y.arrival_s - x.arrival_s for x, y in zip(a, a[1:])]
    mean = sum(gaps) / len(gaps)
    cv = math.sqrt(sum((g - mean) ** 2 for g in gaps) / len(gaps)) / mean
    assert mean == pytest.approx(0.2, rel=0.05) and cv == pytest.approx(1.0, rel=0.1)  # Poisson
    bursty = synthetic(4000, 5.0, inputs, outputs, seed=1, burstiness=0.25)
    gaps = [y.arrival_s - x.arrival_s for x, y in zip(bursty, bursty[1:])]
    mean = sum(gaps) / len(gaps)
    cv = math.sqrt(sum((g - mean) ** 2 for g in gaps) / len(gaps)) / mean
    assert cv == pytest.approx(2.0, rel=0.15)  # gamma of shape k: cv = 1 / sqrt(k)
    median = sorted(r.input_tokens for r in a)[len(a) // 2]
    assert median == pytest.approx(math.exp(6.0), rel=0.05)
    assert max(r.input_tokens for r in a) <= 2000
    assert all(r.arrival_s == 0 for r in synthetic(5, math.inf, inputs, outputs))


def test_the_simulator_runs_the_engines_schedule(tiny_llama_dir):
    """The same requests, all at once, through the real engine and through the
    simulator on an engine's cluster: the same steps, preemptions and moves, because it
    is the same code."""
    prompts = random_prompts(12, 4, 60, 320, seed=4)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    options = dict(max_lend_fraction=1.0, dgfm_period=3, migration_tokens_per_step=8)
    real = tiny_cluster(tiny_llama_dir, 3, 10, **options).engine
    for prompt in prompts:
        real.add_request(prompt, params)
    steps = 0
    while real.has_unfinished_requests():
        real.step()
        steps += 1
    simulated = tiny_cluster(tiny_llama_dir, 3, 10, **options).engine.cluster
    sim = Simulator(simulated, MeasuredClock(COST, parallel=False))
    records = sim.run([TraceRequest(0.0, len(p), 12) for p in prompts])
    assert all(r.finished for r in records)
    want = real.snapshot()
    got = simulated.snapshot()
    assert sim.steps == steps
    assert got.num_preemptions == want.num_preemptions > 0
    assert got.migration.moved_blocks == want.migration.moved_blocks
    assert got.computed_tokens == want.computed_tokens
    assert got.pools_full


def test_a_simulation_is_deterministic_and_its_clock_adds_up():
    from infinite_llm.config import CacheConfig, PoolingConfig, SchedulerConfig
    from infinite_llm.core.cluster import Cluster

    trace = synthetic(60, 4.0, Lognormal(4.0, 0.8, high=300), Lognormal(3.0, 0.5, high=60),
                      seed=7)

    def once(parallel):
        cluster = Cluster(32, CacheConfig(1, 16), SchedulerConfig(), PoolingConfig(), 4)
        sim = Simulator(cluster, MeasuredClock(COST, parallel))
        return sim.run(trace + [TraceRequest(1.0, 4000, 10)]), sim

    records, sim = once(parallel=False)
    assert records == once(parallel=False)[0]
    # Its home's 32 blocks + half of each other pool: 80 blocks of 16 tokens.
    assert records[-1].refused and "at most 1280" in records[-1].refused
    served = records[:-1]
    assert all(r.finished and r.token_times[0] >= r.arrival_s for r in served)
    assert all(t2 >= t1 for r in served for t1, t2 in zip(r.token_times, r.token_times[1:]))
    assert sim.now == max(r.token_times[-1] for r in served)
    # Side by side, a step lasts as long as the slowest instance's share: never longer
    # than one forward of everything.
    assert once(parallel=True)[1].now < sim.now
    numbers = summary(records)
    assert (numbers["completed"], numbers["failed"]) == (60, 1)
    assert numbers["total_output_tokens"] == sum(r.output_tokens for r in served)
    assert numbers["duration"] == sim.now - min(r.arrival_s for r in records)


def test_side_by_side_a_step_pays_one_exchange_however_many_sequences_cross():
    """On Ray every actor joins one all-to-all a layer when any sequence's KV crosses:
    the measured clock adds ``per_remote_s`` once to the slowest instance's share, in
    process it stays a term of the one forward."""
    from dataclasses import replace

    from infinite_llm.sim.clock import StepLoad

    cost = replace(COST, per_remote_s=0.050)
    side = MeasuredClock(cost, parallel=True)
    local = [StepLoad(tokens=4, sequences=4, decodes=4, pairs=4000),
             StepLoad(tokens=2, sequences=2, decodes=2, pairs=900)]
    slowest = cost.step_time(4, 4000, 0, 4, 4)
    assert side.price(local) == pytest.approx(slowest)
    one = [replace(local[0], near=1), local[1]]
    many = [replace(local[0], near=3), replace(local[1], near=2)]
    assert side.price(one) == side.price(many) == pytest.approx(slowest + 0.050)
    assert MeasuredClock(cost, parallel=False).price(many) == pytest.approx(
        cost.step_time(6, 4900, 5, 6, 6))



def test_side_by_side_an_instance_computing_while_the_others_idle_runs_at_the_alone_speed():
    """Ray actors sharing one machine: a step in which one computes and the others idle
    costs the profile's ``alone`` share of the price (by its tokens' kinds); with a
    neighbour computing, or a sequence crossing (both join the exchange), the price
    stays; in one process there are no neighbours to idle."""
    from dataclasses import replace

    from infinite_llm.sim.clock import StepLoad

    cost = replace(COST, alone=(0.8, 0.9), per_remote_s=0.050)
    side = MeasuredClock(cost, parallel=True)
    decoding = StepLoad(tokens=4, sequences=4, decodes=4, pairs=4000)
    mixed = StepLoad(tokens=104, sequences=5, decodes=4, pairs=9000)
    assert side.price([decoding]) == pytest.approx(0.8 * cost.step_time(4, 4000))
    # A prompt of 100 tokens beside 4 decodes: tokens' shares of the two factors.
    assert side.price([mixed, StepLoad(pairs=300, keys=300)]) == pytest.approx(
        (4 * 0.8 + 100 * 0.9) / 104 * cost.step_time(104, 9000, 0, 5, 4))
    assert side.price([decoding, replace(decoding, pairs=10)]) == pytest.approx(
        cost.step_time(4, 4000))
    assert side.price([replace(decoding, near=1), StepLoad(pairs=50, keys=50)]) == (
        pytest.approx(cost.step_time(4, 4000) + 0.050))
    assert MeasuredClock(cost, parallel=False).price([decoding]) == pytest.approx(
        cost.step_time(4, 4000))

def test_simulate_on_the_command_line_is_deterministic_and_reads_traces(tmp_path):
    import json
    import subprocess
    import sys

    cost = tmp_path / "cost.json"
    COST.save(cost)

    def simulate(*extra):
        out = tmp_path / "out.json"
        done = subprocess.run(
            [sys.executable, "-m", "infinite_llm.cli", "simulate", "--cost-model", str(cost),
             "--instances", "3", "--kv-tokens", "512", "--json", str(out), *extra],
            capture_output=True, text=True, timeout=120,
        )
        assert done.returncode == 0, done.stderr
        assert "output_throughput" in done.stdout
        return json.loads(out.read_text())

    synthetic_run = ["--num-prompts", "80", "--request-rate", "5", "--seed", "3", "--mode",
                     "planner"]
    first = simulate(*synthetic_run)
    assert first == simulate(*synthetic_run)
    assert first["completed"] + first["failed"] == 80 and first["completed"] > 70
    assert first != simulate(*synthetic_run[:-2], "--mode", "isolated")
    trace = tmp_path / "t.csv"
    trace.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n0,100,8\n0.5,900,4\n"
                     "1.0,5000,4\n")
    got = simulate("--trace", str(trace), "--mode", "pooled")
    # 5,004 tokens exceed what one request can hold (512 + 2 x 256): refused, not lost.
    assert (got["completed"], got["failed"], got["total_output_tokens"]) == (2, 1, 12)


def test_a_run_leaves_its_steps_pools_and_requests_in_files(tmp_path):
    import csv
    import json
    import subprocess
    import sys

    from infinite_llm.config import CacheConfig, PoolingConfig, SchedulerConfig
    from infinite_llm.core.cluster import Cluster
    from infinite_llm.sim.timeline import (
        Timeline,
        chrome_trace,
        write_requests_csv,
        write_utilization_csv,
    )

    trace = synthetic(40, 8.0, Lognormal(5.0, 0.6, high=900), Lognormal(3.0, 0.5, high=60),
                      seed=2) + [TraceRequest(0.5, 5000, 4)]
    cluster = Cluster(48, CacheConfig(1, 16), SchedulerConfig(), PoolingConfig(), 3)
    sim, timeline = Simulator(cluster, MeasuredClock(COST, True)), Timeline(interval_s=0.5)
    records = sim.run(trace, timeline=timeline)
    assert len(timeline.steps) == sim.steps and timeline.steps[-1].end_s == sim.now
    assert sum(s.tokens for s in timeline.steps) == cluster.snapshot().computed_tokens
    assert all(a.end_s <= b.start_s for a, b in zip(timeline.steps, timeline.steps[1:]))
    # One sample per instance at most every 0.5 s, and each adds up to the pool.
    times = sorted({x.time_s for x in timeline.samples})
    assert len(timeline.samples) == 3 * len(times)
    assert all(b - a >= 0.5 for a, b in zip(times, times[1:]))
    assert all(x.used_blocks + x.lent_blocks + x.free_blocks == 48 for x in timeline.samples)
    assert any(x.lent_blocks for x in timeline.samples)  # 3 pools of 48: some borrowing

    write_requests_csv(records, tmp_path / "r.csv")
    rows = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert [r["request_id"] for r in rows] == [r.request_id for r in records]
    refused = [r for r in rows if r["refused"]]
    assert len(refused) == 1 and refused[0]["ttft_ms"] == "" and "at most" in refused[0]["refused"]
    served = [(row, rec) for row, rec in zip(rows, records) if rec.finished]
    for row, rec in served:
        assert float(row["ttft_ms"]) == pytest.approx((rec.token_times[0] - rec.arrival_s) * 1e3)
        assert float(row["e2el_ms"]) == pytest.approx((rec.token_times[-1] - rec.arrival_s) * 1e3)
    # Where each request's KV lived when it finished: some of it borrowed here.
    shares = [float(row["remote_kv_share"]) for row, _ in served]
    assert all(0 <= x < 1 for x in shares) and any(x > 0 for x in shares)
    write_utilization_csv(timeline, tmp_path / "u.csv")
    assert len(list(csv.DictReader((tmp_path / "u.csv").open()))) == len(timeline.samples)

    events = chrome_trace(timeline, records)["traceEvents"]
    steps = [e for e in events if e.get("name") == "step"]
    assert len(steps) == sim.steps
    assert sum(e["dur"] for e in steps) == pytest.approx(
        sum(s.end_s - s.start_s for s in timeline.steps) * 1e6)
    phases = [e["ph"] for e in events if e.get("cat") == "request"]
    assert phases.count("b") == phases.count("e") == len(served)

    # The command line writes them all, and a picture.
    cost = tmp_path / "cost.json"
    COST.save(cost)
    out = {name: tmp_path / name for name in ("r2.csv", "u2.csv", "t.json", "p.png")}
    done = subprocess.run(
        [sys.executable, "-m", "infinite_llm.cli", "simulate", "--cost-model", str(cost),
         "--instances", "2", "--kv-tokens", "512", "--num-prompts", "20", "--request-rate", "4",
         "--requests-csv", str(out["r2.csv"]), "--utilization-csv", str(out["u2.csv"]),
         "--chrome-trace", str(out["t.json"]), "--plot", str(out["p.png"])],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert len(list(csv.DictReader(out["r2.csv"].open()))) == 20
    assert json.loads(out["t.json"].read_text())["traceEvents"]
    assert out["p.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out["u2.csv"].read_text().startswith("time_s,instance,running,waiting")


def test_gpu_scenarios_price_steps_by_the_roofline_and_size_pools_from_memory():
    from infinite_llm.core.step import Chunk, StepPlan
    from infinite_llm.sim.roofline import Roofline
    from infinite_llm.sim.hardware import device_spec, model_shape
    from infinite_llm.sim.scenario import Scenario
    from infinite_llm.sim.clock import RooflineClock, step_s

    multi = Scenario("isolated", 16, "a100-80g", "llama2-7b")
    cluster, clock = multi.build()
    assert isinstance(clock, RooflineClock)
    roofline = Roofline(model_shape("llama2-7b"), device_spec("a100-80g"))
    # 90% of 80 GB less 13.5 GB of weights, at 512 KiB a token: about 111k tokens each.
    assert cluster.blocks_per_instance * 16 == roofline.kv_capacity_tokens() // 16 * 16
    assert 105_000 < cluster.blocks_per_instance * 16 < 115_000
    assert cluster.max_request_tokens == cluster.blocks_per_instance * 16  # no borrowing
    single, _ = Scenario("single", 16, "a100-80g", "llama2-7b").build()
    assert len(single.instances) == 1  # one instance over 16 GPUs, the weights once
    assert single.max_request_tokens > 16 * cluster.max_request_tokens
    pooled, _ = Scenario("pooled", 16, "a100-80g", "llama2-7b").build()
    assert pooled.max_request_tokens > 8 * cluster.max_request_tokens

    # The clock: each instance's own tokens priced by the roofline, and the attention
    # over the KV it holds (its debtors' queries too); the slowest sets the step. A
    # remote owner on the home's node (8 one-GPU instances a node) costs an NVLink
    # exchange, one on another node the network's.
    from types import SimpleNamespace

    def request(*spans):  # (owner, first block, blocks) runs of 16-token blocks
        return SimpleNamespace(block_table=SimpleNamespace(spans=lambda: list(spans)))

    view = SimpleNamespace(block_size=16, requests={
        "a": request((0, 0, 19)),  # all at home
        "b": request((0, 0, 20), (1, 20, 12)),  # keys 0-319 at home, 320-500 on 1
        "c": request((2, 0, 4), (9, 4, 3)),  # keys 0-63 at home, 64-99 on 9 (next node)
        "d": request((3, 0, 5)),
    })
    plan = StepPlan(chunks=(
        Chunk("a", 0, (0,), 300, True), Chunk("b", 0, (0,), 500, True),
        Chunk("c", 2, (0,) * 100, 0, True), Chunk("d", 3, (0,) * 50, 20, False),
    ))
    # A prefill of 100 from 0: query q scores min(q + 1, 64) keys on 2, the rest on 9.
    on2, on9 = 64 * 65 // 2 + 36 * 64, 36 * 37 // 2
    assert on2 + on9 == 100 * 101 // 2
    times = [
        roofline.step_time(2, 301 + 320, 301 + 320, 2) + roofline.exchange_s(True),
        roofline.step_time(0, 181, 181, 0),
        roofline.step_time(100, on2, 64, 1) + roofline.exchange_s(False),
        roofline.step_time(50, 50 * 20 + 50 * 51 // 2, 70, 1),
        roofline.step_time(0, on9, 36, 0),
    ]
    assert roofline.exchange_s(False) > roofline.exchange_s(True) > 0
    assert roofline.step_time(0, 181, 181, 0) > 0  # serving attention costs its reads
    assert step_s(clock, plan, view) == pytest.approx(max(times))
    assert step_s(clock, StepPlan(chunks=plan.chunks[:2]), view) == pytest.approx(
        max(times[:2]))
    assert step_s(clock, StepPlan(chunks=()), view) == 0.0
    # Repeats of the two decodes add a key to the owner of each one's newest block.
    loads = clock.loads(StepPlan(chunks=plan.chunks[:2]), view)
    assert clock.price(loads, 3) == pytest.approx(max(
        roofline.step_time(2, 301 + 320 + 3, 301 + 320 + 3, 2) + roofline.exchange_s(True),
        roofline.step_time(0, 184, 184, 0)))

    with pytest.raises(ValueError, match="give --cost-model"):
        Scenario("pooled", 2, kv_tokens=512)
    with pytest.raises(ValueError, match="give --model"):
        Scenario("pooled", 2, "h100-80g")
    with pytest.raises(ValueError, match="tensor parallelism"):
        Scenario("single", 2, cost_model="x.json", kv_tokens=512)
    with pytest.raises(ValueError, match="does not fit"):
        Scenario("isolated", 2, "a100-80g", "llama2-70b").build()


def test_a_request_beyond_one_gpu_is_refused_by_vllm_multi_and_served_pooled(tmp_path):
    from infinite_llm.sim.scenario import Scenario

    trace = [TraceRequest(0.0, 1000, 20), TraceRequest(0.1, 300_000, 10),
             TraceRequest(0.2, 2000, 30)]
    done = {}
    for mode in ("isolated", "pooled", "planner", "single"):
        cluster, clock = Scenario(mode, 8, "a100-80g", "llama2-7b").build()
        records = Simulator(cluster, clock).run(trace)
        done[mode] = [r.finished for r in records]
        assert cluster.snapshot().pools_full
    assert done["isolated"] == [True, False, True]
    assert done["pooled"] == done["planner"] == done["single"] == [True, True, True]
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "infinite_llm.cli", "simulate", "--model", "llama2-13b",
         "--device", "h100-80g", "--instances", "4", "--gpus-per-instance", "2",
         "--num-prompts", "30", "--request-rate", "10", "--mode", "planner"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "4 x 2 h100-80g, llama2-13b" in out.stdout and "not counted" in out.stdout
    assert "completed  30" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "infinite_llm.cli", "simulate", "--device",
                          "a100-80g", "--model", "gpt-9"], capture_output=True, text=True)
    assert bad.returncode == 2 and "llama2-7b" in bad.stderr


@pytest.mark.parametrize("mode, dgfm", [("isolated", 0), ("pooled", 0), ("pooled", 5),
                                        ("planner", 0)])
def test_fast_forward_gives_what_stepping_one_by_one_gives(mode, dgfm):
    from dataclasses import replace

    from infinite_llm.config import CacheConfig, SchedulerConfig
    from infinite_llm.core.cluster import Cluster
    from infinite_llm.sim.scenario import Scenario
    from infinite_llm.sim.timeline import Timeline

    # Bursts with quiet gaps (steady decodes to skip), prompts that borrow, a long one.
    trace = synthetic(120, 3.0, Lognormal(5.5, 0.9, high=3000), Lognormal(4.0, 0.8, high=300),
                      seed=11, burstiness=0.3) + [TraceRequest(5.0, 2500, 200)]

    def run(fast):
        cluster, clock = Scenario(mode, 3, "a100-80g", "llama2-7b", kv_tokens=1536).build()
        if dgfm:  # (the planner's mode runs DGFM every 8 steps already)
            pooling = replace(cluster.pooling, dgfm_period=dgfm)
            cluster = Cluster(96, CacheConfig(block_size=16), SchedulerConfig(), pooling, 3)
        sim, timeline = Simulator(cluster, clock, fast_forward=fast), Timeline(0.25)
        records = sim.run(trace, timeline=timeline)
        return sim, records, timeline, cluster.snapshot()

    slow, fast = run(False), run(True)
    assert fast[0].fast_forwarded > fast[0].steps // 3  # many steps were skipped
    assert slow[0].fast_forwarded == 0
    assert fast[0].steps == slow[0].steps and fast[0].now == slow[0].now
    assert fast[1] == slow[1]  # every request's token times, to the last bit
    assert fast[2].steps == slow[2].steps and fast[2].samples == slow[2].samples
    assert fast[3] == slow[3]  # counters, locality, migrations, ledger, pools
    assert fast[3].pools_full
