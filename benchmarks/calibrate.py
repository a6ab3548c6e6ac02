"""Calibration: one workload run for real on this machine (SmolLM2, in process or on Ray)
and simulated on the same cluster configuration with a profile's clock; prints each of
``vllm bench serve``'s means measured, simulated and the error.

    . .venv/bin/activate
    infinite-llm profile --model smollm2 --dtype float32 --out cost.json \
        --batches 1 4 16 --contexts 64 512 2048 --steps 8 --kv-cache-memory 2GiB
    python benchmarks/calibrate.py --cost-model cost.json --workload w1
    python benchmarks/calibrate.py --cost-model cost.json --workload trace \
        --trace splitwise_conv.csv --num-prompts 60 --length-scale 0.1 \
        --request-rate 1

Workloads: w1 and w2 (docs/WORKLOADS.md, all at once), mixed (``mixed.py``'s, all at
once), trace (a Mooncake .jsonl or Vidur .csv file, e.g. the Azure conversation trace
``splitwise_conv.csv`` of microsoft/vidur: its first ``--num-prompts`` requests,
lengths times ``--length-scale``, arriving at their own times or, with
``--request-rate``, as a Poisson process).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mixed import workload as mixed_workload  # noqa: E402
from pool_common import KV_BYTES_PER_TOKEN, print_table, smollm2  # noqa: E402
from workloads import get_workload  # noqa: E402

from infinite_llm import SamplingParams  # noqa: E402
from infinite_llm.engine.engine import LLMEngine  # noqa: E402
from infinite_llm.sim.scenario import Scenario  # noqa: E402
from infinite_llm.sim.simulator import MODES, RequestRecord, Simulator, pooling_for, summary  # noqa: E402
from infinite_llm.workload.traces import TraceRequest, read_trace  # noqa: E402

METRICS = ("duration", "request_throughput", "output_throughput", "mean_ttft_ms",
           "mean_tpot_ms", "mean_itl_ms", "mean_e2el_ms")


def requests_of(args) -> list[tuple[float, list[int], int]]:
    """(arrival s, prompt token ids, output tokens) of the chosen workload."""
    rng = random.Random(args.seed)
    if args.workload in ("w1", "w2"):
        w = get_workload(args.workload.upper())
        return [(0.0, p, n) for p, n in zip(w.prompts, w.output_lens)]
    if args.workload == "mixed":
        prompts, outputs = mixed_workload(48, 3, 700, 64)
        return [(0.0, p, n) for p, n in zip(prompts, outputs)]
    trace = read_trace(args.trace)[: args.num_prompts]
    t, out = 0.0, []
    for r in trace:
        n_in = max(1, round(r.input_tokens * args.length_scale))
        n_out = max(1, round(r.output_tokens * args.length_scale))
        arrival = r.arrival_s - trace[0].arrival_s
        if args.request_rate:
            arrival, t = t, t + rng.expovariate(args.request_rate)
        out.append((arrival, [rng.randrange(1000, 49000) for _ in range(n_in)], n_out))
    return out


def replay(
    engine: LLMEngine, requests: list[tuple[float, list[int], int]]
) -> tuple[list[RequestRecord], int]:
    """Submit each request at its arrival time (wall clock from the start), step the
    engine, and note when each output token comes. Returns the records and the steps."""
    records = [RequestRecord(f"r{i}", a, len(p), n) for i, (a, p, n) in enumerate(requests)]
    by_id, pending = {}, sorted(range(len(requests)), key=lambda i: requests[i][0])
    start, steps = time.perf_counter(), 0
    while pending or engine.has_unfinished_requests():
        now = time.perf_counter() - start
        while pending and requests[pending[0]][0] <= now:
            i = pending.pop(0)
            arrival, prompt, n = requests[i]
            params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
            by_id[engine.add_request(prompt, params).request_id] = records[i]
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, requests[pending[0]][0] - now))
            continue
        outputs = engine.step()
        steps += 1
        now = time.perf_counter() - start
        for out in outputs:
            record = by_id[out.request_id]
            record.token_times += [now] * (len(out.outputs[0].token_ids) - len(record.token_times))
    return records, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cost-model", required=True)
    parser.add_argument("--workload", choices=["w1", "w2", "mixed", "trace"], default="w1")
    parser.add_argument("--trace")
    parser.add_argument("--num-prompts", type=int, default=60)
    parser.add_argument("--length-scale", type=float, default=1.0)
    parser.add_argument("--request-rate", type=float, default=None)
    parser.add_argument("--instances", type=int, default=4)
    parser.add_argument("--tokens-each", type=int, default=4096, help="KV tokens per instance")
    parser.add_argument("--mode", choices=MODES[:3], default="pooled")
    parser.add_argument("--backend", choices=["local", "ray"], default="local")
    parser.add_argument("--admission-output-reserve", type=float, default=0.0)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1,
                        help="real runs (one engine, one after another); measured = median")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.workload == "trace" and not args.trace:
        parser.error("--workload trace needs --trace FILE")
    requests = requests_of(args)
    pooling = pooling_for(args.mode, args.cost_model)
    llm = smollm2(args.instances, args.tokens_each, pooling.enabled, dtype=args.dtype,
                  backend=args.backend, planner_period=pooling.planner_period,
                  cost_model=pooling.cost_model, dgfm_period=pooling.dgfm_period,
                  admission_output_reserve=args.admission_output_reserve)
    try:
        engine = llm.engine
        replay(engine, [(0.0, requests[0][1][:32], 2)])  # warm-up
        blocks, block_size = engine.cluster.blocks_per_instance, engine.cluster.block_size
        runs = [replay(engine, requests) for _ in range(args.repeats)]
    finally:
        llm.shutdown()
    cluster, clock = Scenario(
        args.mode, args.instances, cost_model=args.cost_model, kv_tokens=blocks * block_size,
        # On Ray the actors compute side by side (the profile's points are one actor's
        # share there): each priced apart, the slowest sets the step.
        block_size=block_size, parallel=args.backend == "ray",
        admission_output_reserve=args.admission_output_reserve,
    ).build()
    sim = Simulator(cluster, clock)
    simulated = sim.run([TraceRequest(a, len(p), n) for a, p, n in requests])
    got = summary(simulated)
    measured = [summary(records) for records, _ in runs]
    want = {m: statistics.median(run[m] for run in measured) for m in METRICS}
    rows = [[m, f"{want[m]:.2f}", f"{min(r[m] for r in measured):.2f}-"
             f"{max(r[m] for r in measured):.2f}", f"{got[m]:.2f}",
             f"{100 * (got[m] - want[m]) / want[m]:+.1f}%" if want[m] else "-"]
            for m in METRICS]
    steps = "/".join(str(n) for _, n in runs)
    rows.append(["steps", steps, "", sim.steps, ""])
    print(f"{args.workload}: {len(requests)} requests, {args.instances} instances "
          f"({args.backend}) of {blocks * block_size} KV tokens, {args.mode}; "
          f"KV {KV_BYTES_PER_TOKEN[args.dtype]} bytes a token")
    print_table(["metric", f"measured (median of {args.repeats})", "range", "simulated",
                 "error"], rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"measured": measured, "simulated": got, "args": vars(args)}, f, indent=2)


if __name__ == "__main__":
    main()
