"""Standard benchmark workloads W1, W2 and LAT, built exactly as docs/WORKLOADS.md says.

Every engine is benchmarked on these same random-token prompts so that figures compare
across engines and over time; the order of the NumPy draws is therefore part of the
definition and must not change.

Check the totals against the table in docs/WORKLOADS.md:

    . .venv/bin/activate && python -m infinite_llm.bench.workloads
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from infinite_llm.bench.datasets import HIGH_TOKEN_ID, LOW_TOKEN_ID


@dataclass(frozen=True)
class Workload:
    """A named list of requests: prompt token ids and the exact output length of each."""

    name: str
    prompts: list[list[int]]
    output_lens: list[int]
    standard: bool = True  # False for the --quick slices, which are not comparable figures

    @property
    def num_requests(self) -> int:
        return len(self.prompts)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def output_tokens(self) -> int:
        return sum(self.output_lens)

    @property
    def label(self) -> str:
        """Name as printed in result tables; quick slices are flagged so nobody quotes them."""
        return self.name if self.standard else f"{self.name}(quick)"


def _draw_prompt(rng: np.random.Generator, length: int) -> list[int]:
    """One prompt of `length` token ids uniform over [1000, 49000)."""
    return rng.integers(LOW_TOKEN_ID, HIGH_TOKEN_ID, size=length).tolist()


def build_w1() -> Workload:
    """W1 "chat": 64 prompts of 64..512 tokens, 128 output tokens each."""
    rng = np.random.default_rng(0)
    lens = rng.integers(64, 513, size=64)
    prompts = [_draw_prompt(rng, int(length)) for length in lens]
    return Workload("W1", prompts, [128] * len(prompts))


def build_w2() -> Workload:
    """W2 "long": 8 prompts of 4096 tokens, 64 output tokens each."""
    rng = np.random.default_rng(1)
    prompts = [_draw_prompt(rng, 4096) for _ in range(8)]
    return Workload("W2", prompts, [64] * len(prompts))


def build_lat(output_len: int = 256) -> Workload:
    """LAT "batch-1": one 32-token prompt; decode ms/token comes from 256 vs 1 output tokens."""
    rng = np.random.default_rng(2)
    return Workload("LAT", [_draw_prompt(rng, 32)], [output_len])


def quick_slice(workload: Workload) -> Workload:
    """A small slice of a workload for smoke tests (first 8 of W1, 2 of W2, LAT with 32 tokens).

    Marked non-standard so its figures are never mistaken for the real workload's.
    """
    if workload.name == "W1":
        n, lens = 8, workload.output_lens[:8]
    elif workload.name == "W2":
        n, lens = 2, workload.output_lens[:2]
    elif workload.name == "LAT":
        n, lens = 1, [32]
    else:
        raise ValueError(f"unknown workload {workload.name}")
    return Workload(workload.name, workload.prompts[:n], lens, standard=False)


BUILDERS = {"W1": build_w1, "W2": build_w2, "LAT": build_lat}


def get_workload(name: str, quick: bool = False) -> Workload:
    """Build a standard workload by name, optionally cut down to its quick slice."""
    workload = BUILDERS[name]()
    return quick_slice(workload) if quick else workload


def _describe(workload: Workload) -> str:
    lens = [len(p) for p in workload.prompts]
    return (
        f"{workload.label}: {workload.num_requests} requests, "
        f"{workload.prompt_tokens:,} prompt tokens (min {min(lens)}, max {max(lens)}), "
        f"{workload.output_tokens:,} output tokens"
    )


def _check_w1(workload: Workload) -> None:
    """Assert W1 matches the totals in docs/WORKLOADS.md, which proves the draw order is right."""
    lens = [len(p) for p in workload.prompts]
    assert workload.num_requests == 64, workload.num_requests
    assert workload.prompt_tokens == 18_715, workload.prompt_tokens
    assert (min(lens), max(lens)) == (65, 511), (min(lens), max(lens))
    assert workload.output_tokens == 8_192, workload.output_tokens


if __name__ == "__main__":
    for name in BUILDERS:
        print(_describe(get_workload(name)))
    _check_w1(build_w1())
    w2 = build_w2()
    assert (w2.num_requests, w2.prompt_tokens, w2.output_tokens) == (8, 32_768, 512)
    print("W1 and W2 totals match docs/WORKLOADS.md")
    for name in BUILDERS:
        print("  quick slice ->", _describe(get_workload(name, quick=True)))
