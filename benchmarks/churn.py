"""DGFM on a churn workload: requests of mixed lengths arrive and leave on a pooled
cluster; how much attended KV lives away from its request's home, with DGFM off and on.
Bookkeeping only (the real cluster, schedulers and managers; a fake runner), so the
figures are counts, the same on every machine.

    . .venv/bin/activate && python benchmarks/churn.py
    python benchmarks/churn.py --periods 0 2 4 8 --requests 400

Needs: the base install (`pip install -e .`); no model.
"""

from __future__ import annotations

import argparse
import random

from infinite_llm.config import CacheConfig, PoolingConfig, SchedulerConfig
from infinite_llm.core.cluster import Cluster
from infinite_llm.core.request import Request
from infinite_llm.core.sampling_params import SamplingParams
from infinite_llm.core.step import SampledToken, StepResult

BLOCK = 16


def run_churn(dgfm_period: int, requests: int = 200, instances: int = 4, blocks: int = 64,
              seed: int = 0) -> dict[str, float]:
    """Requests arrive a few per step (prompts of 16 to 1,200 tokens, 8 to 120 to
    generate) until ``requests`` have arrived; the run ends when all have finished."""
    rng = random.Random(seed)
    pooling = PoolingConfig(max_lend_fraction=1.0, migration_tokens_per_step=64,
                            dgfm_period=dgfm_period)
    cluster = Cluster(blocks, CacheConfig(1, BLOCK), SchedulerConfig(512, 32, 1 << 16),
                      pooling, instances)
    arrived = steps = 0
    while arrived < requests or cluster.has_work():
        for _ in range(rng.choice([0, 1, 1, 2])):
            if arrived < requests:
                prompt = rng.choice([16, 64, 200, 600, 1200])
                out = rng.randint(8, 120)
                cluster.add(Request(f"r{arrived}", [1] * prompt,
                                    SamplingParams(max_tokens=out), out))
                arrived += 1
        plan = cluster.schedule()
        tokens = {c.request_id: SampledToken(3) for c in plan.chunks if c.sample}
        cluster.update(plan, StepResult(tokens))
        steps += 1
    cluster.check_integrity()
    snap = cluster.snapshot()
    assert snap.pools_full
    return {
        "steps": steps,
        "attended": snap.attended_block_steps,
        "remote": snap.remote_block_steps,
        "share": snap.remote_share,
        "moved": snap.migration.moved_blocks,
        "recalls": snap.migration.recalls,
        "cycles": snap.migration.cancelled_cycles,
        "preemptions": snap.num_preemptions,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--periods", type=int, nargs="+", default=[0, 2, 4, 8],
                        help="DGFM every this many steps; 0: off")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    print(f"{'dgfm period':>11} {'seed':>4} {'steps':>6} {'attended block-steps':>21} "
          f"{'remote':>9} {'share':>6} {'moved':>6} {'recalls':>7} {'cycles':>6} {'preempt':>7}")
    for seed in args.seeds:
        for period in args.periods:
            r = run_churn(period, args.requests, seed=seed)
            print(f"{period:>11} {seed:>4} {r['steps']:>6} {r['attended']:>21} {r['remote']:>9} "
                  f"{r['share']:>6.3f} {r['moved']:>6} {r['recalls']:>7} {r['cycles']:>6} "
                  f"{r['preemptions']:>7}", flush=True)


if __name__ == "__main__":
    main()
