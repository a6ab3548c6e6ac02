"""What live migration costs a decode step, by its per-step token budget.

SmolLM2 on 3 instances; one long request whose KV spans instances 0 and 1 decodes
beside short requests. With a budget, a migration is always in flight: 16 blocks of
the long request's run away from home move to the other instance, then back, and so on. The same decode steps
are timed with budgets of 0 (no migration), 16, 32 and 64 tokens per step, alternating
budgets within one process so that the machine's drift hits them all alike.

    . .venv/bin/activate && python benchmarks/migration.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pool_common import print_table, random_prompt, smollm2  # noqa: E402

from infinite_llm import SamplingParams  # noqa: E402


def timed_steps(llm, budget: int, steps: int, long_len: int, short: int) -> tuple[list[float], int]:
    """Decode step times with migrations of ``budget`` tokens per step in flight."""
    engine = llm.engine
    cluster = engine.cluster
    cluster.migrator.blocks_per_step = max(1, budget // cluster.block_size)
    rng = np.random.default_rng(1)
    params = SamplingParams(max_tokens=steps + 8, temperature=0, ignore_eos=True)
    long = engine.add_request(random_prompt(rng, long_len), params)
    for _ in range(short):
        engine.add_request(random_prompt(rng, 64), params)
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.requests.values()):
        engine.step()
    times, moved = [], cluster.migrator.moved_blocks
    for _ in range(steps):
        if budget and long.request_id not in cluster.migrator.active:
            away = [rb for rb in long.block_table.rblocks if rb.owner != long.home]
            if away:  # 16 blocks (256 tokens) of its run away from home, to the third
                run = away[0]
                cluster.migrate(long.request_id, run.first_block, min(16, run.num_blocks),
                                target=3 - run.owner)
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    for request_id in list(engine.requests):
        engine.abort_request(request_id)
    return times, cluster.migrator.moved_blocks - moved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", type=int, nargs="+", default=[0, 16, 32, 64])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--long-len", type=int, default=1600)
    parser.add_argument("--short", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    llm = smollm2(3, 1024, pooling=True, dtype=args.dtype, max_lend_fraction=1.0)
    timed_steps(llm, 0, 4, args.long_len, args.short)  # warm-up
    results = {b: ([], 0) for b in args.budgets}
    for _ in range(args.rounds):
        for budget in args.budgets:
            times, moved = timed_steps(llm, budget, args.steps, args.long_len, args.short)
            results[budget] = (results[budget][0] + times, results[budget][1] + moved)
    base = statistics.median(results[args.budgets[0]][0])
    rows = []
    for budget, (times, moved) in results.items():
        median = statistics.median(times)
        rows.append([budget, len(times), moved, f"{median * 1e3:.2f}",
                     f"{statistics.fmean(times) * 1e3:.2f}", f"{median / base:.3f}"])
    print(f"SmolLM2 {args.dtype}, 3 instances x 1024 KV tokens; a {args.long_len}-token request "
          f"spanning two + {args.short} short ones, decoding")
    print_table(["tokens/step", "steps", "blocks moved", "median ms", "mean ms",
                 f"vs {args.budgets[0]}"], rows)


if __name__ == "__main__":
    main()
