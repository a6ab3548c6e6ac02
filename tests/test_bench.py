"""`infinite-llm bench`: the metric arithmetic on synthetic timestamps (exact values), the
datasets and arrivals, the result JSON under vLLM's keys, the offline runner and sweep
on a tiny model, and a real `bench serve` against our server."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys

import pytest

from infinite_llm.bench.datasets import Dataset
from infinite_llm.bench.results import RequestResult, report, table
from infinite_llm.workload.summary import Timing, meets, parse_goodput, percentile, summarize
from infinite_llm.workload.traces import arrival_times

# What `vllm bench serve --save-result` writes (vLLM 0.31's serve.py), less the keys of
# options we do not have (label).
VLLM_KEYS = {
    "date", "endpoint_type", "backend", "model_id", "tokenizer_id", "num_prompts",
    "request_rate", "burstiness", "max_concurrency", "duration", "completed", "failed",
    "total_input_tokens", "total_output_tokens", "request_throughput", "request_goodput",
    "output_throughput", "total_token_throughput", "input_lens", "output_lens", "ttfts",
    "itls", "start_times", "generated_texts", "errors", "max_output_tokens_per_s",
    "max_concurrent_requests",
    *(f"{stat}_{name}_ms" for stat in ("mean", "median", "std", "p99")
      for name in ("ttft", "tpot", "itl", "e2el")),
}

# Three requests: A three tokens, B two, C four tokens in two chunks (a stream's chunk
# may carry several).
SERVED = [Timing(0.0, [0.5, 0.6, 0.8], 10), Timing(1.0, [1.2, 1.5], 20),
          Timing(1.1, [2.1, 2.4], 5, output_tokens=4)]


def test_the_summary_is_exact_on_synthetic_timestamps():
    s = summarize(SERVED, duration_s=3.0, failed=1)
    assert (s["completed"], s["failed"], s["total_input_tokens"], s["total_output_tokens"]) == (
        3, 1, 35, 9)
    assert s["request_throughput"] == 1.0 and s["output_throughput"] == 3.0
    assert s["total_token_throughput"] == pytest.approx(44 / 3)
    # TTFT 500, 200, 1000 ms.
    assert s["mean_ttft_ms"] == pytest.approx(1700 / 3)
    assert s["median_ttft_ms"] == pytest.approx(500)
    assert s["std_ttft_ms"] == pytest.approx(329.9831645537222)
    # TPOT excludes the first token: 300 / 2, 300 / 1, 300 / 3 (C's four tokens).
    assert s["mean_tpot_ms"] == pytest.approx(550 / 3) and s["median_tpot_ms"] == pytest.approx(150)
    # ITL: every gap between output times: 100, 200, 300, 300.
    assert s["mean_itl_ms"] == pytest.approx(225) and s["median_itl_ms"] == pytest.approx(250)
    assert s["p99_itl_ms"] == pytest.approx(300)
    # E2E 800, 500, 1300: p99 between the two largest, 800 + 0.98 x 500.
    assert s["p99_e2el_ms"] == pytest.approx(1290)
    # Peaks in one-second buckets from the first arrival: A's 3 outputs in the first;
    # B and C both in flight during the second.
    assert (s["max_output_tokens_per_s"], s["max_concurrent_requests"]) == (3.0, 2)
    assert s["request_goodput"] is None
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([], 99) == 0.0
    with pytest.raises(ValueError, match="duration"):
        summarize(SERVED, 0)


def test_goodput_counts_the_requests_that_meet_every_slo():
    def goodput(*items: str) -> float:
        return summarize(SERVED, 3.0, slos=parse_goodput(list(items)))["request_goodput"]

    assert goodput("ttft:600") == pytest.approx(2 / 3)  # C's TTFT is 1000 ms
    assert goodput("tpot:120") == pytest.approx(1 / 3)  # only C's 100 ms
    assert goodput("ttft:600", "e2el:700") == pytest.approx(1 / 3)  # B alone: 200, 500
    assert goodput("ttft:1001", "tpot:301", "e2el:1301") == pytest.approx(1.0)
    # A bound is met when equalled (times exact in binary here).
    exact = Timing(0.0, [0.5, 1.0], 1)
    assert meets(exact, {"ttft": 500, "tpot": 500, "e2el": 1000})
    assert not meets(exact, {"ttft": 499.9})
    # A single output token has no TPOT to miss.
    alone = summarize([Timing(0.0, [0.3], 4)], 1.0, slos={"tpot": 1.0})
    assert alone["request_goodput"] == 1.0 and alone["mean_tpot_ms"] == 0.0
    for bad, says in (["ttfb:5"], "one of ttft"), (["ttft:x"], "milliseconds"), (
            ["tpot:-1"], "positive"):
        with pytest.raises(ValueError, match=says):
            parse_goodput(bad)


def test_percentiles_asked_for_are_reported_under_their_keys():
    s = summarize(SERVED, 3.0, percentiles=(50, 90, 99.9))
    assert s["p50_ttft_ms"] == pytest.approx(500) and s["p90_e2el_ms"] == pytest.approx(1200)
    assert "p99.9_itl_ms" in s and "p99_itl_ms" not in s


def test_arrivals_follow_the_rate_and_burstiness_and_the_seed():
    assert arrival_times(5, math.inf) == [0.0] * 5
    poisson = arrival_times(4000, rate=5.0, seed=3)
    assert poisson == sorted(poisson) and poisson[0] == 0.0 and poisson == arrival_times(
        4000, 5.0, seed=3)
    gaps = [b - a for a, b in zip(poisson, poisson[1:])]
    assert statistics.fmean(gaps) == pytest.approx(0.2, rel=0.05)
    assert statistics.pstdev(gaps) / statistics.fmean(gaps) == pytest.approx(1.0, rel=0.1)
    bursty = arrival_times(4000, rate=5.0, burstiness=0.25, seed=3)
    bursty_gaps = [b - a for a, b in zip(bursty, bursty[1:])]
    assert statistics.fmean(bursty_gaps) == pytest.approx(0.2, rel=0.1)
    cv = statistics.pstdev(bursty_gaps) / statistics.fmean(bursty_gaps)
    assert cv == pytest.approx(2.0, rel=0.15)  # gamma of shape k: 1 / sqrt(k)
    with pytest.raises(ValueError, match="positive"):
        arrival_times(3, 0.0)


def test_random_and_standard_datasets():
    d = Dataset("random", num_prompts=200, input_len=100, output_len=10, range_ratio=0.5, seed=4)
    requests, notes = d.requests()
    assert len(requests) == 200 and notes == []
    lengths = [len(r.prompt_token_ids) for r in requests]
    assert min(lengths) >= 50 and max(lengths) <= 150 and len(set(lengths)) > 50
    assert all(5 <= r.output_tokens <= 15 for r in requests)
    assert all(1000 <= t < 49000 for r in requests for t in r.prompt_token_ids)
    assert all(r.arrival_s == 0.0 for r in requests)  # rate inf: all at once
    assert d.requests()[0] == requests and Dataset(
        "random", num_prompts=200, input_len=100, output_len=10, range_ratio=0.5, seed=5
    ).requests()[0] != requests
    small_vocab, _ = Dataset("random", num_prompts=3, input_len=50).requests(vocab_size=320)
    assert all(32 <= t < 320 for r in small_vocab for t in r.prompt_token_ids)
    w1, _ = Dataset("w1").requests()
    assert (len(w1), sum(len(r.prompt_token_ids) for r in w1)) == (64, 18_715)
    assert {r.output_tokens for r in w1} == {128}
    w2, _ = Dataset("w2", num_prompts=3, request_rate=2.0).requests()
    assert [len(r.prompt_token_ids) for r in w2] == [4096] * 3 and w2[0].arrival_s == 0.0
    assert w2[1].arrival_s > 0
    with pytest.raises(ValueError, match="vocabulary has 320"):
        Dataset("w1").requests(vocab_size=320)


def test_the_papers_shapes_scaled_to_the_context():
    """A long shape: a few requests far beyond the rest, the longest fitted to the
    context, the others scaled with it; arrivals at the rate."""
    d = Dataset("shaped", num_prompts=300, shape="long-2", request_rate=4.0, seed=1)
    requests, notes = d.requests(max_model_len=8192)
    totals = sorted(len(r.prompt_token_ids) + r.output_tokens for r in requests)
    assert totals[-1] <= 8192 and totals[-1] > 8192 * 0.99
    assert totals[-1] > 5 * totals[len(totals) // 2]  # far beyond the median
    assert "fits the context (8192)" in notes[0]
    times = [r.arrival_s for r in requests]
    assert times == sorted(times) and times[0] == 0.0
    assert statistics.fmean(b - a for a, b in zip(times, times[1:])) == pytest.approx(0.25, rel=0.2)
    assert d.requests(8192)[0] == requests
    for kwargs, says in (({"name": "shaped", "num_prompts": 3}, "go together"),
                         ({"name": "shaped", "num_prompts": 3, "shape": "huge"}, "unknown shape")):
        with pytest.raises(ValueError, match=says):
            Dataset(**kwargs)


def test_a_trace_is_scaled_to_fit_the_context_and_replayed_on_its_own_times(tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(json.dumps({"timestamp": t, "input_length": i, "output_length": o})
                             + "\n" for t, i, o in ((1000, 300, 20), (1500, 10000, 100),
                                                    (4000, 50, 7))))
    fitted, notes = Dataset("trace", trace=str(trace)).requests(max_model_len=2048)
    assert max(len(r.prompt_token_ids) + r.output_tokens for r in fitted) <= 2048
    assert len(fitted[1].prompt_token_ids) == int(10000 * 2048 / 10100)
    assert "x 0.2028" in notes[0] and "fits the context (2048)" in notes[0]
    whole, notes = Dataset("trace", trace=str(trace)).requests(max_model_len=1 << 20)
    assert [len(r.prompt_token_ids) for r in whole] == [300, 10000, 50] and notes == []
    halved, _ = Dataset("trace", trace=str(trace), length_scale=0.5, num_prompts=2).requests()
    assert [(len(r.prompt_token_ids), r.output_tokens) for r in halved] == [(150, 10), (5000, 50)]
    replay, notes = Dataset("trace", trace=str(trace), fixed_schedule=True).requests(1 << 20)
    assert [r.arrival_s for r in replay] == [0.0, 0.5, 3.0] and "own times" in notes[-1]
    paced, _ = Dataset("trace", trace=str(trace), request_rate=100.0).requests(1 << 20)
    assert paced[0].arrival_s == 0.0 and paced[2].arrival_s < 0.5
    for kwargs, says in (({"name": "trace"}, "go together"),
                         ({"name": "random", "fixed_schedule": True, "num_prompts": 2},
                          "needs --dataset trace"),
                         ({"name": "random"}, "needs --num-prompts"),
                         ({"name": "sharegpt"}, "unknown dataset")):
        with pytest.raises(ValueError, match=says):
            Dataset(**kwargs)


def test_the_result_has_vllms_keys_and_ours():
    results = [
        RequestResult(0.0, 10, [0.5, 0.6, 0.8], None, "abc", remote_kv_share=0.0,
                      migration_stall_s=0.0),
        RequestResult(1.0, 20, [1.2, 1.5], 2, "de", remote_kv_share=0.5, migration_stall_s=0.004),
        RequestResult(1.1, 5, error="HTTP 400: too long"),
    ]
    config = {"endpoint_type": "openai", "backend": "openai", "model_id": "m",
              "tokenizer_id": "m", "num_prompts": 3, "request_rate": math.inf,
              "burstiness": 1.0, "max_concurrency": None}
    result = report(results, 2.0, config, slos={"ttft": 300})
    assert VLLM_KEYS <= set(result)
    assert (result["completed"], result["failed"], result["request_goodput"]) == (2, 1, 0.5)
    assert result["output_lens"] == [3, 2, 0] and result["errors"] == ["", "", "HTTP 400: too long"]
    assert result["ttfts"] == [0.5, pytest.approx(0.2), 0.0]
    assert result["itls"][0] == [pytest.approx(0.1), pytest.approx(0.2)]
    assert result["mean_remote_kv_share"] == 0.25 and result["max_migration_stall_ms"] == 4.0
    assert result["remote_kv_shares"] == [0.0, 0.5, None]
    json.loads(json.dumps(result))  # writable as it is
    shown = table(result)
    for line in ("Successful requests:", "Failed requests:", "Request goodput (req/s):",
                 "Mean TTFT (ms):", "P99 ITL (ms):", "Mean remote KV share (%):"):
        assert line in shown
    assert "goodput" not in table(report(results, 2.0, config))


class _FakeEngine:
    """Adds and steps like LLMEngine: each step gives every running request one token."""

    def __init__(self) -> None:
        from infinite_llm.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput

        self.kinds = CompletionOutput, RequestMetrics, RequestOutput
        self.running: dict[str, list[int]] = {}  # id -> [wanted, got]
        self.most_running = 0

    def add_request(self, prompt, params):
        if len(prompt) > 100:
            raise ValueError("too long for this cluster")
        rid = f"r{len(self.running)}-{id(prompt)}"
        self.running[rid] = [params.max_tokens, 0]
        self.most_running = max(self.most_running, len(self.running))
        return type("Added", (), {"request_id": rid})

    def step(self):
        CompletionOutput, RequestMetrics, RequestOutput = self.kinds
        outputs = []
        for rid, counts in list(self.running.items()):
            counts[1] += 1
            done = counts[1] == counts[0]
            outputs.append(RequestOutput(
                rid, None, [], [CompletionOutput(0, "x" * counts[1], [7] * counts[1],
                                                 "length" if done else None)], done,
                metrics=RequestMetrics(0.25, 0.001, 0) if done else None))
            if done:
                del self.running[rid]
        return outputs


def test_the_offline_runner_keeps_arrivals_and_the_concurrency_limit():
    from infinite_llm.bench import offline
    from infinite_llm.bench.datasets import BenchRequest

    requests = [BenchRequest([1] * 10, 3, 0.0), BenchRequest([1] * 10, 2, 0.0),
                BenchRequest([1] * 500, 2, 0.0), BenchRequest([1] * 10, 4, 0.05)]
    engine = _FakeEngine()
    results, duration = offline.run(engine, requests, max_concurrency=1, progress=False)
    assert engine.most_running == 1
    assert [len(r.token_times) for r in results] == [3, 2, 0, 4]
    assert "too long" in results[2].error and not results[2].ok
    assert results[3].sent_s >= 0.05 and results[1].sent_s >= results[0].token_times[-1]
    assert all(r.remote_kv_share == 0.25 and r.migration_stall_s == 0.001
               for r in results if r.ok)
    assert duration >= results[3].token_times[-1]
    engine = _FakeEngine()
    offline.run(engine, requests, progress=False)
    assert engine.most_running == 2  # the first two at once, the last after they ended


def test_the_offline_runner_times_a_request_from_its_arrival_not_the_next_step():
    """A request arriving during a step waits for the step's end: that wait is latency
    the engine causes, so it counts in the TTFT as under a server (and the simulator)."""
    import time as clock

    from infinite_llm.bench import offline
    from infinite_llm.bench.datasets import BenchRequest

    class SlowSteps(_FakeEngine):
        def step(self):
            clock.sleep(0.2)
            return super().step()

    requests = [BenchRequest([1] * 10, 3, 0.0), BenchRequest([1] * 10, 2, 0.05)]
    results, _ = offline.run(SlowSteps(), requests, progress=False)
    assert results[1].sent_s == 0.05
    assert results[1].token_times[0] - results[1].sent_s >= 0.15 + 0.2  # the wait + its step
    # Under a concurrency limit a request is sent when a slot frees, not when it arrived.
    results, _ = offline.run(SlowSteps(), requests, max_concurrency=1, progress=False)
    assert results[1].sent_s == results[0].token_times[-1]


def _cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "infinite_llm.cli", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_bench_offline_runs_a_trace_through_pooled_instances(tiny_llama_dir, tmp_path):
    """One request longer than an instance holds: it runs on pooled KV, and its share
    of remote KV says so; every request gets exactly its tokens."""
    trace = tmp_path / "t.csv"
    trace.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n"
                     "0.0,40,8\n0.05,300,6\n0.1,24,5\n0.1,60,4\n")
    out = tmp_path / "r.json"
    # 2 instances of 64 blocks of 4 tokens: 256 tokens each.
    done = _cli("bench", "offline", "--model", str(tiny_llama_dir), "--dataset", "trace",
                "--trace", str(trace), "--fixed-schedule", "--instances", "2",
                "--kv-cache-memory", str(64 * 4 * 768), "--block-size", "4",
                "--goodput", "e2el:60000", "--result-filename", str(out), "--disable-tqdm")
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert VLLM_KEYS <= set(result)
    assert (result["completed"], result["failed"]) == (4, 0)
    assert result["output_lens"] == [8, 6, 5, 4] and result["input_lens"] == [40, 300, 24, 60]
    assert result["start_times"][1] >= 0.05 and result["request_goodput"] > 0
    shares = result["remote_kv_shares"]
    assert shares[1] > 0.1 and shares[0] == 0.0  # only the long one spans two instances
    assert "Serving Benchmark Result" in done.stdout and "Mean remote KV share" in done.stdout
    # Isolated instances refuse it, clearly, and serve the rest.
    done = _cli("bench", "offline", "--model", str(tiny_llama_dir), "--dataset", "trace",
                "--trace", str(trace), "--instances", "2", "--no-kv-pooling",
                "--kv-cache-memory", str(64 * 4 * 768), "--block-size", "4",
                "--result-filename", str(out), "--disable-tqdm")
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert (result["completed"], result["failed"]) == (3, 1)
    assert "more than" in result["errors"][1] and "1 request(s) failed" in done.stdout


def test_bench_refuses_bad_options_before_any_model_loads(tmp_path):
    for args, says in ((["--goodput", "ttfb:5"], "one of ttft"),
                       (["--metric-percentiles", "x"], "metric-percentiles"),
                       (["--max-concurrency", "0"], "max-concurrency"),
                       (["--fixed-schedule"], "needs --dataset trace")):
        done = _cli("bench", "offline", "--model", str(tmp_path / "nothing"), "--dataset", "random",
                    "--num-prompts", "2", *args)
        assert done.returncode == 2 and says in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr


def test_bench_sweep_writes_rows_and_plots(tiny_llama_dir, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "sweep.json"
    done = _cli("bench", "sweep", "--model", str(tiny_llama_dir), "--dataset", "random",
                "--num-prompts", "6", "--random-input-len", "30", "--random-output-len", "4",
                "--instance-counts", "1", "2", "--modes", "isolated", "pooled",
                "--request-rates", "50", "inf", "--kv-cache-memory", str(64 * 4 * 768),
                "--block-size", "4", "--result-filename", str(out),
                "--plot-prefix", str(tmp_path / "sweep"), "--disable-tqdm")
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())
    assert [(r["instances"], r["mode"], r["request_rate"]) for r in rows] == [
        (n, m, rate) for n in (1, 2) for m in ("isolated", "pooled") for rate in (50, math.inf)]
    assert all(r["completed"] == 6 and r["total_output_tokens"] == 24 for r in rows)
    longest = {(r["instances"], r["mode"]): r["longest_request_tokens"] for r in rows}
    assert longest[2, "pooled"] > longest[2, "isolated"] == longest[1, "pooled"]
    for name in ("throughput", "latency", "context", "distributions"):
        assert (tmp_path / f"sweep_{name}.png").stat().st_size > 1000


def test_bench_serve_against_our_server(tiny_llama_dir, tmp_path):
    """A short real run over HTTP: the JSON loads with vLLM's keys, every request got
    its tokens (the stream's usage says how many), and our usage's KV placement came
    through: the long request's KV was partly remote."""
    pytest.importorskip("fastapi")
    from test_server_cli import ServerProcess

    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(json.dumps({"timestamp": t, "input_length": i, "output_length": o})
                             + "\n" for t, i, o in ((0, 40, 8), (50, 300, 6), (100, 24, 5))))
    out = tmp_path / "serve.json"
    server = ServerProcess(str(tiny_llama_dir), "--instances", "2", "--kv-cache-memory",
                           str(64 * 4 * 768), "--block-size", "4", "--served-model-name", "tiny")
    try:
        # The same server twice: both runs, then side by side.
        done = _cli("bench", "serve", "--base-url", server.url, server.url, "--dataset", "trace",
                    "--trace", str(trace), "--request-rate", "20", "--vocab-size", "320",
                    "--max-concurrency", "2", "--goodput", "ttft:60000",
                    "--metric-percentiles", "50,99", "--result-filename", str(out),
                    "--disable-tqdm", timeout=300)
        assert done.returncode == 0, done.stderr
        first, result = json.loads(out.read_text())
        assert first["input_lens"] == result["input_lens"] and first["completed"] == 3
        assert "mean TTFT ms" in done.stdout and done.stdout.count(server.url) >= 3
        assert VLLM_KEYS <= set(result) and "p50_ttft_ms" in result
        assert (result["model_id"], result["completed"], result["failed"]) == ("tiny", 3, 0)
        assert result["output_lens"] == [8, 6, 5] and result["input_lens"] == [40, 300, 24]
        assert result["request_goodput"] == pytest.approx(result["request_throughput"])
        shares = result["remote_kv_shares"]
        assert shares[1] > 0.1 and shares[0] == 0.0
        assert all(s == 0.0 for s in result["migration_stalls_ms"])  # nothing migrated
        server.wait_idle(within=5.0)
    finally:
        server.kill()


def test_a_finished_output_says_where_its_kv_lived(tiny_llama_dir):
    from infinite_llm import LLM, SamplingParams

    llm = LLM(str(tiny_llama_dir), instances=2, kv_cache_memory=64 * 4 * 768, block_size=4)
    long, short = [5] * 300, [6] * 20
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    outs = llm.generate([long, short], params, use_tqdm=False)
    assert outs[0].metrics.remote_kv_share > 0.1 and outs[1].metrics.remote_kv_share == 0.0
    assert outs[0].metrics.migration_stall_s == 0.0 and outs[0].metrics.num_preemptions == 0
    # n samples of one prompt: their mean share.
    two = llm.generate([short], SamplingParams(n=2, max_tokens=3, temperature=0, ignore_eos=True),
                       use_tqdm=False)
    assert two[0].metrics.remote_kv_share == 0.0 and len(two[0].outputs) == 2
    llm.shutdown()
