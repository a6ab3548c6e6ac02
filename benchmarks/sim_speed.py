"""How fast the simulator runs: one simulated hour of a 32-instance cluster (A100-80GB,
LLaMA2-7B, one GPU each) under a Poisson trace of thousands of requests, in each mode,
with steady decodes fast-forwarded and (``--also-stepped``) without.

    python benchmarks/sim_speed.py [--instances 32] [--rate 2] [--duration 3600]

Needs: the base install (`pip install -e .`); no model.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pool_common import print_table  # noqa: E402

from infinite_llm.sim.scenario import Scenario  # noqa: E402
from infinite_llm.sim.simulator import Simulator, summary  # noqa: E402
from infinite_llm.workload.traces import Lognormal, synthetic  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=32)
    parser.add_argument("--device", default="a100-80g")
    parser.add_argument("--model", default="llama2-7b")
    parser.add_argument("--rate", type=float, default=2.0, help="requests per second")
    parser.add_argument("--duration", type=float, default=3600.0, help="simulated seconds")
    parser.add_argument("--input-len", type=float, nargs=2, default=[6.5, 1.0])
    parser.add_argument("--output-len", type=float, nargs=2, default=[5.0, 0.7])
    parser.add_argument("--modes", nargs="+", default=["isolated", "pooled", "planner"])
    parser.add_argument("--also-stepped", action="store_true",
                        help="also run each mode without fast-forward (slower)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    count = int(args.rate * args.duration)
    trace = synthetic(count, args.rate, Lognormal(*args.input_len, high=32_000),
                      Lognormal(*args.output_len, high=4_000), seed=args.seed)
    rows = []
    for mode in args.modes:
        for fast in (True, False) if args.also_stepped else (True,):
            cluster, clock = Scenario(mode, args.instances, args.device, args.model).build()
            sim = Simulator(cluster, clock, fast_forward=fast)
            start = time.perf_counter()
            records = sim.run(trace)
            wall = time.perf_counter() - start
            numbers = summary(records)
            rows.append([mode, "yes" if fast else "no", len(records), numbers["completed"],
                         f"{sim.now:.0f}", sim.steps, sim.fast_forwarded, f"{wall:.1f}",
                         f"{sim.now / wall:.0f}", f"{numbers['output_throughput']:.0f}"])
            print(f"{mode} (fast-forward {fast}): {wall:.1f} s", file=sys.stderr, flush=True)
    print_table(["mode", "fast-forward", "requests", "completed", "simulated s", "steps",
                 "fast-forwarded", "wall s", "simulated s per wall s", "output tok/s"], rows)


if __name__ == "__main__":
    main()
