"""Request traces: when each request arrives and how long its prompt and output are.

Read as they come from public traces (Mooncake JSON lines, Vidur-style CSV) or drawn
from stated distributions; the simulator and the benchmark client take the same
``TraceRequest`` lists. No torch, no numpy.
"""

from __future__ import annotations

import csv
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TraceRequest:
    """One request of a trace: its arrival (seconds from the start), prompt and output
    lengths in tokens."""

    arrival_s: float
    input_tokens: int
    output_tokens: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.arrival_s) and self.arrival_s >= 0):
            raise ValueError(f"arrival must be a finite time >= 0 s, got {self.arrival_s!r}")
        if self.input_tokens < 1 or self.output_tokens < 1:
            raise ValueError(
                f"a request needs at least one prompt and one output token, got "
                f"{self.input_tokens} and {self.output_tokens}"
            )


def read_trace(path: str | Path) -> list[TraceRequest]:
    """A trace file by its suffix: ``.jsonl`` (Mooncake) or ``.csv`` (Vidur-style)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return read_mooncake(path)
    if path.suffix == ".csv":
        return read_vidur_csv(path)
    raise ValueError(f"{path}: a trace is .jsonl (Mooncake) or .csv (Vidur-style)")


def read_mooncake(path: str | Path) -> list[TraceRequest]:
    """Mooncake JSON lines: ``timestamp`` (ms from the start), ``input_length``,
    ``output_length``; other keys (``hash_ids``) are not needed here."""
    requests = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                requests.append(TraceRequest(
                    row["timestamp"] / 1000, int(row["input_length"]), int(row["output_length"])
                ))
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(f"{path}:{number}: not a Mooncake trace line ({error!r})") from None
    return sorted(requests, key=lambda r: r.arrival_s)


def read_vidur_csv(path: str | Path) -> list[TraceRequest]:
    """Vidur-style CSV with the columns ``arrived_at`` (s), ``num_prefill_tokens``,
    ``num_decode_tokens`` (others are not needed here)."""
    requests = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        for number, row in enumerate(reader, 2):
            try:
                requests.append(TraceRequest(
                    float(row["arrived_at"]), int(float(row["num_prefill_tokens"])),
                    int(float(row["num_decode_tokens"])),
                ))
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(f"{path}:{number}: not a Vidur trace row ({error!r})") from None
    return sorted(requests, key=lambda r: r.arrival_s)


@dataclass(frozen=True)
class Lognormal:
    """Lengths drawn as round(exp(N(mu, sigma))), clipped to [low, high]."""

    mu: float
    sigma: float
    low: int = 1
    high: int = 1 << 30

    def draw(self, rng: random.Random) -> int:
        return min(self.high, max(self.low, round(rng.lognormvariate(self.mu, self.sigma))))


def synthetic(
    num_requests: int,
    rate: float,
    inputs: Lognormal,
    outputs: Lognormal,
    seed: int = 0,
    burstiness: float = 1.0,
) -> list[TraceRequest]:
    """``num_requests`` requests with lognormal lengths arriving at ``rate`` per second
    (``inf``: all at once); gaps are gamma-distributed with shape ``burstiness``
    (1: Poisson arrivals, below 1 burstier, above 1 more regular), as vLLM's benchmark."""
    _check_arrivals(num_requests, rate, burstiness)
    rng = random.Random(seed)
    t, requests = 0.0, []
    for _ in range(num_requests):
        requests.append(TraceRequest(t, inputs.draw(rng), outputs.draw(rng)))
        t += _gap(rng, rate, burstiness)
    return requests


def arrival_times(num_requests: int, rate: float, burstiness: float = 1.0,
                  seed: int = 0) -> list[float]:
    """When ``num_requests`` requests arrive at ``rate`` per second (``inf``: all at 0),
    the first at 0; gaps gamma-distributed with shape ``burstiness`` as in ``synthetic``."""
    _check_arrivals(num_requests, rate, burstiness)
    rng = random.Random(seed)
    t, times = 0.0, []
    for _ in range(num_requests):
        times.append(t)
        t += _gap(rng, rate, burstiness)
    return times


def _check_arrivals(num_requests: int, rate: float, burstiness: float) -> None:
    if num_requests < 0:
        raise ValueError(f"num_requests must be >= 0, got {num_requests}")
    if not rate > 0 or not (burstiness > 0 and math.isfinite(burstiness)):
        raise ValueError(f"rate and burstiness must be positive, got {rate} and {burstiness}")


def _gap(rng: random.Random, rate: float, burstiness: float) -> float:
    """One gap between arrivals: gamma with mean 1 / rate and shape ``burstiness``."""
    if not math.isfinite(rate):
        return 0.0
    return rng.gammavariate(burstiness, 1.0 / (rate * burstiness))


@dataclass(frozen=True)
class Shape:
    """A trace's lengths: most prompts from ``inputs``; a ``long_share`` of them from
    ``long_inputs`` (a few requests far beyond one instance)."""

    inputs: Lognormal
    outputs: Lognormal
    long_inputs: Lognormal | None = None
    long_share: float = 0.0


# The paper's nine traces as shapes, our reconstruction (its exact traces are not
# published): three short ones with contexts of 1-60K tokens whose spread rises (median
# 4K, sigma 0.5 / 1.0 / 1.5), and six long ones where 2% of requests reach 100K-2,000K.
PAPER_SHAPES: dict[str, Shape] = {
    **{f"short-{i}": Shape(Lognormal(math.log(4000), sigma, high=60_000),
                           Lognormal(math.log(250), 0.7, high=2000))
       for i, sigma in enumerate((0.5, 1.0, 1.5), start=1)},
    **{f"long-{i}": Shape(Lognormal(math.log(4000), 1.0, high=60_000),
                          Lognormal(math.log(250), 0.7, high=2000),
                          Lognormal(math.log(top / 3), 0.5, low=top // 10, high=top), 0.02)
       for i, top in enumerate((100_000, 200_000, 500_000, 1_000_000, 1_500_000, 2_000_000),
                               start=1)},
}


def shaped(shape: Shape, num_requests: int, rate: float, seed: int = 0,
           burstiness: float = 1.0) -> list[TraceRequest]:
    """``synthetic`` with ``shape``'s lengths (its long prompts mixed in at random)."""
    trace = synthetic(num_requests, rate, shape.inputs, shape.outputs, seed, burstiness)
    if shape.long_inputs is None:
        return trace
    rng = random.Random(seed + 1)
    return [TraceRequest(r.arrival_s, shape.long_inputs.draw(rng), r.output_tokens)
            if rng.random() < shape.long_share else r for r in trace]
