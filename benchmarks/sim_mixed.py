"""The mixed workload of ``mixed.py`` in the simulator: the same requests through the
same cluster code on a profile's clock, to set beside what ``mixed.py`` measures.

    . .venv/bin/activate && infinite-llm profile --model smollm2 --out cost.json
    python benchmarks/sim_mixed.py --cost-model cost.json --admission-output-reserve 1.0

Needs: the base install (`pip install -e .`) and a profile (`infinite-llm profile`); no
model.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mixed import workload  # noqa: E402
from pool_common import KV_BYTES_PER_TOKEN, print_table  # noqa: E402

from infinite_llm.config import CacheConfig, SchedulerConfig  # noqa: E402
from infinite_llm.core.cluster import Cluster  # noqa: E402
from infinite_llm.core.cost_model import CostModel  # noqa: E402
from infinite_llm.sim.clock import MeasuredClock  # noqa: E402
from infinite_llm.sim.simulator import MODES, Simulator, pooling_for, summary  # noqa: E402
from infinite_llm.workload.traces import TraceRequest  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cost-model", required=True)
    parser.add_argument("--instances", type=int, default=4)
    parser.add_argument("--tokens-each", type=int, default=1024)
    parser.add_argument("--short", type=int, default=48)
    parser.add_argument("--long", type=int, default=3)
    parser.add_argument("--long-len", type=int, default=700)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--admission-output-reserve", type=float, default=0.0)
    parser.add_argument("--parallel", action="store_true",
                        help="instances side by side (Ray): a step lasts as long as the slowest")
    args = parser.parse_args()
    prompts, _ = workload(args.short, args.long, args.long_len, args.output_tokens)
    trace = [TraceRequest(0.0, len(p), args.output_tokens) for p in prompts]
    cost = CostModel.load(args.cost_model)
    blocks = args.tokens_each // CacheConfig().block_size
    rows = []
    for mode, name in zip(MODES, ["isolated", "pooled", "planned"]):  # mixed.py's names
        cluster = Cluster(
            blocks, CacheConfig(KV_BYTES_PER_TOKEN["float32"] * args.tokens_each),
            SchedulerConfig(admission_output_reserve=args.admission_output_reserve),
            pooling_for(mode, args.cost_model), args.instances,
        )
        sim = Simulator(cluster, MeasuredClock(cost, args.parallel))
        numbers = summary(sim.run(trace))
        rows.append([name, sim.steps, cluster.num_preemptions, f"{sim.now:.1f}",
                     f"{numbers['output_throughput']:.1f}", f"{numbers['mean_ttft_ms']:.0f}",
                     f"{numbers['mean_tpot_ms']:.1f}", f"{numbers['mean_e2el_ms']:.0f}"])
    print_table(["mode", "steps", "preemptions", "simulated s", "output tok/s", "mean TTFT ms",
                 "mean TPOT ms", "mean E2E ms"], rows)


if __name__ == "__main__":
    main()
