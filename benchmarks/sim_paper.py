"""The paper's evaluation, simulated: 32 A100-80GB GPUs serving LLaMA2-7B, 13B and 70B
(one GPU an instance for 7B and 13B, four for 70B) on the paper's nine trace shapes
(``workload.traces.PAPER_SHAPES``, our reconstruction), every request arriving at once
(offline throughput). Throughput of infinite-llm (the planner) against vLLM-multi
(isolated instances of the same size) on the short traces and against vLLM-single (one
instance over all 32 GPUs) on the long ones; the longest context each serves; and
DistAttention against RingAttention for one long request's decode. Prints markdown
tables; ``--plots DIR`` draws them.

    python benchmarks/sim_paper.py [--requests 600] [--plots docs/img]

Needs: the `[plot]` extra (matplotlib); no model.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from infinite_llm.sim.scenario import Scenario  # noqa: E402
from infinite_llm.sim.simulator import Simulator, summary  # noqa: E402
from infinite_llm.workload.traces import PAPER_SHAPES, shaped  # noqa: E402

MODELS = {"llama2-7b": 1, "llama2-13b": 1, "llama2-70b": 4}  # GPUs per instance
GPUS = 32
PAPER = {"short": "1.35-1.73x", "long": "1.4-3.4x", "context": "2-19x", "ring": "7.7-19.8x"}


def run(mode: str, model: str, gpus: int, trace) -> dict:
    cluster, clock = Scenario(mode, GPUS // gpus, "a100-80g", model,
                              gpus_per_instance=gpus).build()
    sim = Simulator(cluster, clock)
    numbers = summary(sim.run(trace))
    numbers["preemptions"] = cluster.num_preemptions
    numbers["max_context"] = cluster.max_request_tokens
    return numbers


def markdown(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--traces", nargs="+", default=list(PAPER_SHAPES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plots", help="a directory for the PNGs")
    args = parser.parse_args()
    throughput_rows, ratios = [], {}
    for model in args.models:
        gpus = MODELS[model]
        for name in args.traces:
            kind = name.split("-")[0]
            baseline = "isolated" if kind == "short" else "single"
            trace = shaped(PAPER_SHAPES[name], args.requests, float("inf"), seed=args.seed)
            start = time.perf_counter()
            ours, theirs = run("planner", model, gpus, trace), run(baseline, model, gpus, trace)
            print(f"{model} {name}: {time.perf_counter() - start:.0f} s", file=sys.stderr,
                  flush=True)
            ratio = ours["output_throughput"] / theirs["output_throughput"]
            ratios[(model, name)] = ratio
            throughput_rows.append([
                model, name, "vLLM-multi" if kind == "short" else "vLLM-single",
                f"{ours['output_throughput']:.0f}", f"{theirs['output_throughput']:.0f}",
                f"**{ratio:.2f}x**", f"{ours['preemptions']} / {theirs['preemptions']}",
                f"{ours['failed']} / {theirs['failed']}", PAPER[kind],
            ])
    print(markdown(["model", "trace", "baseline", "infinite-llm out tok/s",
                    "baseline out tok/s", "ratio", "preemptions (ours / theirs)",
                    "refused (ours / theirs)", "paper"], throughput_rows))

    context_rows = []
    for model in args.models:
        gpus = MODELS[model]
        tops = {mode: Scenario(mode, GPUS // gpus, "a100-80g", model,
                               gpus_per_instance=gpus).build()[0].max_request_tokens
                for mode in ("isolated", "planner", "single")}
        context_rows.append([model, f"{GPUS // gpus} x {gpus}", tops["isolated"],
                             tops["planner"], tops["single"],
                             f"**{tops['planner'] / tops['isolated']:.1f}x**", PAPER["context"]])
    print()
    print(markdown(["model", "instances x GPUs", "vLLM-multi", "infinite-llm", "vLLM-single",
                    "infinite-llm / vLLM-multi", "paper"], context_rows))

    ring_rows, curves = [], {}
    for model in args.models:
        gpus = MODELS[model]
        scenario = Scenario("planner", GPUS // gpus, "a100-80g", model, gpus_per_instance=gpus)
        roofline, each = scenario.roofline(), scenario.instance_kv_tokens()
        for context in (100_000, 250_000, 500_000, 1_000_000, 2_000_000):
            shards = -(-context // each)
            if shards > GPUS // gpus:
                continue
            dist = roofline.long_decode_attention_s(context, shards, ring=False)
            ring = roofline.long_decode_attention_s(context, shards, ring=True)
            curves.setdefault(model, []).append((context, ring / dist))
            ring_rows.append([model, context, shards, f"{dist * 1e3:.2f}", f"{ring * 1e3:.2f}",
                              f"**{ring / dist:.1f}x**", PAPER["ring"]])
    print()
    print(markdown(["model", "context", "instances holding it", "DistAttention ms",
                    "RingAttention ms", "speed-up", "paper"], ring_rows))
    if args.plots:
        plot(args.plots, ratios, curves)


def plot(folder: str, ratios: dict, curves: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(folder, exist_ok=True)
    models = sorted({m for m, _ in ratios}, key=list(MODELS).index)
    traces = [t for t in PAPER_SHAPES if any((m, t) in ratios for m in models)]
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(models)
    for i, model in enumerate(models):
        xs = [j + i * width for j in range(len(traces))]
        ax.bar(xs, [ratios.get((model, t), 0) for t in traces], width, label=model)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(traces))], traces)
    ax.set_ylabel("throughput / baseline")
    ax.set_title("infinite-llm vs vLLM-multi (short) and vLLM-single (long), 32 x A100 "
                 "(simulated)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "sim_paper_throughput.png"), dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for model, points in curves.items():
        ax.plot([c / 1000 for c, _ in points], [r for _, r in points], marker="o", label=model)
    ax.set_xlabel("context (K tokens)")
    ax.set_ylabel("RingAttention time / DistAttention time")
    ax.set_title("One long request's decode attention (simulated)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "sim_paper_ring.png"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
