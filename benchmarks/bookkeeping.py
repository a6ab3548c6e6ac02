"""What the driver pays per decode step for bookkeeping, by context length: no model, a
fake runner that returns a token for every request that samples.

    . .venv/bin/activate && python benchmarks/bookkeeping.py
    python benchmarks/bookkeeping.py --cases 4K 64K --steps 32

Each case fills a cluster of 4 instances (pooling on, every instance may lend its whole
pool) with its requests, prefills them, then times ``--steps`` decode steps of
``LLMEngine.step`` (schedule, the fake runner, update, outputs, heartbeat). The plan
columns are what the Ray backend sends every instance actor per step (``encode_plan``,
the very bytes ``RayRunner`` puts in Ray's object store) and how long encoding takes,
inside the step time. Then ``--steps`` more decode steps in which the fake runner
also builds the step's model inputs and attention plan from its own copy of the block
tables, as the CPU runner does (``StepInputs.build``): the "runner" column, timed apart
so that its memory traffic does not blur the driver's figures.

Needs: the base install (`pip install -e .`); no model.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from infinite_llm.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    ParallelConfig,
    PoolingConfig,
    SchedulerConfig,
)
from infinite_llm.core.cluster import Cluster
from infinite_llm.core.sampling_params import SamplingParams
from infinite_llm.attention.plan import KVLayout
from infinite_llm.attention.tables import KVTables
from infinite_llm.core.step import SampledToken, StepPlan, StepResult, encode_plan
from infinite_llm.engine.engine import LLMEngine
from infinite_llm.engine.model_runner import StepInputs

INSTANCES = 4
BLOCK = 16
# case name -> (requests, context tokens each)
CASES = {
    "4K": (1, 4096),
    "64K": (1, 65536),
    "1M": (1, 1 << 20),
    "4M": (1, 4 << 20),
    "256x4K": (256, 4096),
}
MODEL = ModelConfig(
    vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=2, num_key_value_heads=2, head_dim=32,
)


class FakeRunner:
    """Samples token 1 for every chunk that reaches its request's end, after encoding the
    plan as the Ray backend does for its actors, and building the step's inputs from its
    own copy of the block tables as the CPU runner does."""

    def __init__(self) -> None:
        self.tables = KVTables()
        # The CPU runner's layout: paged decode and prefill kernels.
        self.layout = KVLayout(BLOCK, torch.float32, decode_kernel=True, prefill_kernel=True)
        self.build_inputs = False
        self.plan_bytes = 0
        self.encode_seconds = 0.0
        self.runner_seconds = 0.0

    def execute(self, plan: StepPlan) -> StepResult:
        start = time.perf_counter()
        self.plan_bytes = len(encode_plan(plan))
        self.encode_seconds = time.perf_counter() - start
        start = time.perf_counter()
        self.tables.apply(plan)
        if self.build_inputs:
            StepInputs.build(plan.chunks, self.tables, self.layout)
        self.runner_seconds = time.perf_counter() - start
        return StepResult({c.request_id: SampledToken(1) for c in plan.chunks if c.sample})

    def shutdown(self) -> None:
        pass


def engine_for(requests: int, tokens: int, steps: int) -> tuple[LLMEngine, FakeRunner]:
    blocks_each = -(-requests * (tokens + 2 * steps + BLOCK) // BLOCK) // INSTANCES + 8
    config = EngineConfig(
        "fake",
        cache=CacheConfig(blocks_each * BLOCK * MODEL.kv_bytes_per_token * 4, BLOCK),
        scheduler=SchedulerConfig(65536, 256, tokens + 2 * steps + 8),
        pooling=PoolingConfig(max_lend_fraction=1.0),
        parallel=ParallelConfig(instances=INSTANCES),
        check_integrity=False,
    )
    cluster = Cluster(
        blocks_each, config.cache, config.scheduler, config.pooling, INSTANCES
    )
    runner = FakeRunner()
    return LLMEngine(config, MODEL, None, cluster, runner), runner


def run_case(name: str, steps: int) -> dict[str, float]:
    requests, tokens = CASES[name]
    engine, runner = engine_for(requests, tokens, steps)
    params = SamplingParams(max_tokens=2 * steps + 4, temperature=0, ignore_eos=True)
    prompt = [7] * (tokens - 1)
    for _ in range(requests):
        engine.add_request(prompt, params)
    # Prefill until every request has sampled its first token.
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.requests.values()):
        engine.step()
    times, bytes_, pickling, runner_times = [], [], [], []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start - runner.runner_seconds)
        bytes_.append(runner.plan_bytes)
        pickling.append(runner.encode_seconds)
    runner.build_inputs = True
    for _ in range(steps):
        engine.step()
        runner_times.append(runner.runner_seconds)
    owners = max(len(r.block_table.owners()) for r in engine.requests.values())
    return {
        "mean_ms": 1e3 * statistics.fmean(times),
        "median_ms": 1e3 * statistics.median(times),
        "max_ms": 1e3 * max(times),
        "owners": owners,
        "plan_kb": statistics.fmean(bytes_) / 1e3,
        "encode_ms": 1e3 * statistics.fmean(pickling),
        "runner_ms": 1e3 * statistics.fmean(runner_times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--steps", type=int, default=64, help="decode steps timed per case")
    args = parser.parse_args()
    print(f"{'case':>8} {'owners':>6} {'mean ms':>8} {'median':>8} {'max':>8} "
          f"{'plan kB':>9} {'encode ms':>9} {'runner ms':>9}")
    for name in args.cases:
        r = run_case(name, args.steps)
        print(f"{name:>8} {r['owners']:>6} {r['mean_ms']:>8.3f} {r['median_ms']:>8.3f} "
              f"{r['max_ms']:>8.3f} {r['plan_kb']:>9.2f} {r['encode_ms']:>9.3f} "
              f"{r['runner_ms']:>9.3f}", flush=True)


if __name__ == "__main__":
    main()
