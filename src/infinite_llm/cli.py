"""Command line: ``infinite-llm generate``, ``serve``, ``profile``, ``simulate`` and
``bench``."""

from __future__ import annotations

import argparse
import json
import logging
import re
import socket
import sys
from pathlib import Path

from infinite_llm.config import (
    BACKENDS,
    ServerConfig,
    format_memory_size,
    option_default,
    parse_memory_size,
)
from infinite_llm import __version__
from infinite_llm.bench.datasets import DATASETS
from infinite_llm.engine.errors import RequestTooLarge
from infinite_llm.sim.simulator import MODES

_MODEL_HELP = "built-in name (smollm2), a .gguf file or a Hugging Face model directory"


def _add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """The engine's options as flags; every default is ``EngineConfig``'s."""
    group = parser.add_argument_group("engine")
    group.add_argument(
        "--dtype", default=option_default("dtype"), choices=["auto", "float32", "bfloat16", "float16"],
        help="weights and KV cache dtype; auto is float32 on CPU, bfloat16 on GPU "
        "(default: %(default)s)",
    )
    group.add_argument(
        "--device", default=option_default("device"),
        help="auto (a GPU if there is one), cpu, cuda or cuda:N; with --backend ray, each "
        "instance actor gets a GPU of its own when the Ray cluster has enough "
        "(default: %(default)s)",
    )
    group.add_argument(
        "--enforce-eager", action="store_true", default=option_default("enforce_eager"),
        help="on a GPU, run every step op by op: no decode step replayed from a CUDA graph",
    )
    group.add_argument(
        "--enable-torch-compile", action="store_true",
        default=option_default("enable_torch_compile"),
        help="on a GPU, compile each decode step with torch.compile before capturing its "
        "CUDA graph (each batch and table size compiles once, when first needed)",
    )
    group.add_argument(
        "--kv-cache-memory", default=format_memory_size(option_default("kv_cache_memory")),
        help="KV cache budget of each instance, bytes or e.g. 256MiB (default: %(default)s)",
    )
    group.add_argument(
        "--host-kv-cache-memory", default=option_default("host_kv_cache_memory"),
        help="KV blocks each instance also keeps in host memory, used after every "
        "instance's device memory and recalled first when it frees, bytes or e.g. 1GiB "
        "(default: none)",
    )
    group.add_argument(
        "--block-size", type=int, default=option_default("block_size"),
        help="tokens per KV block (default: %(default)s)",
    )
    group.add_argument(
        "--max-model-len", type=int, default=option_default("max_model_len"),
        help="maximum prompt + output tokens of one request (default: the model's context)",
    )
    group.add_argument(
        "--max-num-batched-tokens", type=int, default=option_default("max_num_batched_tokens"),
        help="token budget of one engine step (default: %(default)s)",
    )
    group.add_argument(
        "--max-num-seqs", type=int, default=option_default("max_num_seqs"),
        help="requests running at once (default: %(default)s)",
    )
    group.add_argument(
        "--admission-output-reserve", type=float,
        default=option_default("admission_output_reserve"),
        help="admit only while this share of every request's remaining max_tokens still "
        "fits (0: a block of headroom each, as vLLM; 1: no preemption of requests that "
        "run to max_tokens) (default: %(default)s)",
    )
    group.add_argument(
        "--seed", type=int, default=option_default("seed"), help="engine seed (default: %(default)s)"
    )
    group.add_argument(
        "--instances", type=int, default=option_default("instances"),
        help="model replicas, each with its own KV pool (default: %(default)s)",
    )
    group.add_argument(
        "--no-kv-pooling", dest="kv_pooling", action="store_false",
        default=option_default("kv_pooling"),
        help="isolated instances: none lends KV blocks to another",
    )
    group.add_argument(
        "--max-lend-fraction", type=float, default=option_default("max_lend_fraction"),
        help="share of its pool an instance may lend (default: %(default)s)",
    )
    group.add_argument(
        "--planner-period", type=int, default=option_default("planner_period"),
        help="run the greedy planner (live KV migration) every this many steps; needs "
        "--cost-model (default: %(default)s, off)",
    )
    group.add_argument(
        "--cost-model", default=option_default("cost_model"),
        help="the fit `infinite-llm profile` wrote, for the planner",
    )
    group.add_argument(
        "--dgfm-period", type=int, default=option_default("dgfm_period"),
        help="defragment the debt graph (recalls, cycle cancellation) every this many "
        "steps (default: %(default)s, off)",
    )
    group.add_argument(
        "--migration-tokens-per-step", type=int,
        default=option_default("migration_tokens_per_step"),
        help="KV tokens live migration copies per step, cluster-wide (default: %(default)s)",
    )
    group.add_argument(
        "--backend", choices=list(BACKENDS), default=option_default("backend"),
        help="local: all instances in this process; ray: one Ray actor per instance "
        "(pip install infinite-llm[ray]; see docs/MULTINODE.md) (default: %(default)s)",
    )
    group.add_argument(
        "--ray-address", default=option_default("ray_address"),
        help="Ray cluster to join with --backend ray, e.g. auto (default: start a private "
        "local Ray on 127.0.0.1)",
    )
    group.add_argument(
        "--heartbeat-timeout-s", type=float, default=option_default("heartbeat_timeout_s"),
        help="with --backend ray: seconds an actor has to answer a heartbeat "
        "(default: %(default)s)",
    )
    group.add_argument(
        "--max-missed-heartbeats", type=int, default=option_default("max_missed_heartbeats"),
        help="with --backend ray: heartbeats missed in a row before an actor is declared "
        "dead (default: %(default)s)",
    )
    group.add_argument(
        "--step-timeout-factor", type=float, default=option_default("step_timeout_factor"),
        help="with --backend ray: an actor still computing a step after this many times "
        "its expected time is stuck, killed and recovered as dead (default: %(default)s)",
    )
    group.add_argument(
        "--step-timeout-min-s", type=float, default=option_default("step_timeout_min_s"),
        help="with --backend ray: the least time a step is given before that "
        "(default: %(default)s)",
    )


# The flags above, by the option each sets (LLM's keyword arguments).
_ENGINE_FLAGS = (
    "dtype", "device", "enforce_eager", "enable_torch_compile", "kv_cache_memory",
    "host_kv_cache_memory", "block_size",
    "max_model_len", "max_num_batched_tokens", "max_num_seqs", "admission_output_reserve",
    "seed", "instances",
    "kv_pooling", "max_lend_fraction", "planner_period", "cost_model", "dgfm_period",
    "migration_tokens_per_step", "backend", "ray_address", "heartbeat_timeout_s",
    "max_missed_heartbeats", "step_timeout_factor", "step_timeout_min_s",
)


def _add_server_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server")
    group.add_argument(
        "--host", default=ServerConfig.host, help="address to bind (default: %(default)s)"
    )
    group.add_argument(
        "--port", type=int, default=ServerConfig.port, help="port to bind (default: %(default)s)"
    )
    group.add_argument(
        "--served-model-name", nargs="+", default=None,
        help="model name(s) clients ask for; the first is reported (default: MODEL)",
    )
    group.add_argument(
        "--api-key", default=None,
        help="require 'Authorization: Bearer KEY' on /v1, /tokenize and /detokenize",
    )
    group.add_argument(
        "--max-body-size", default=format_memory_size(ServerConfig.max_body_bytes),
        help="larger request bodies get 413, bytes or e.g. 1MiB (default: %(default)s)",
    )
    group.add_argument(
        "--drain-timeout", type=float, default=ServerConfig.drain_timeout,
        help="seconds SIGTERM waits for in-flight requests before aborting them "
        "(default: %(default)s)",
    )
    limits = parser.add_argument_group("what one request may ask for (a 400 beyond)")
    limits.add_argument(
        "--max-prompt-chars", type=int, default=ServerConfig.max_prompt_chars,
        help="characters of a text prompt or conversation (default: as many as the context "
        "could hold, each token the vocabulary's longest)",
    )
    limits.add_argument(
        "--max-completions-per-request", type=int,
        default=ServerConfig.max_completions_per_request,
        help="prompts x n (default: %(default)s)",
    )
    limits.add_argument(
        "--max-output-tokens-per-request", type=int,
        default=ServerConfig.max_output_tokens_per_request,
        help="max_tokens summed over a request's completions (default: %(default)s)",
    )
    limits.add_argument(
        "--max-stop-strings", type=int, default=ServerConfig.max_stop_strings,
        help="stop strings a request may give (default: %(default)s)",
    )
    limits.add_argument(
        "--max-stop-string-chars", type=int, default=ServerConfig.max_stop_string_chars,
        help="characters of one stop string (default: %(default)s)",
    )
    group.add_argument(
        "--max-connections", type=int, default=ServerConfig.max_connections,
        help="connections open at once; more get 503 (default: %(default)s)",
    )
    group.add_argument(
        "--timeout-keep-alive", type=float, default=ServerConfig.timeout_keep_alive,
        help="seconds an idle keep-alive connection stays open (default: %(default)s)",
    )
    group.add_argument(
        "--request-read-timeout", type=float, default=ServerConfig.request_read_timeout,
        help="seconds a client may take to send a whole request body; then 408 "
        "(default: %(default)s)",
    )
    group.add_argument(
        "--uvicorn-log-level", default=ServerConfig.log_level,
        choices=["critical", "error", "warning", "info", "debug", "trace"],
        help="uvicorn's log level (default: %(default)s)",
    )


def _add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument(
        "--max-tokens", type=int, default=256, help="tokens to generate at most (default: %(default)s)"
    )
    group.add_argument(
        "--temperature", type=float, default=0.0,
        help="0 is greedy (default: %(default)s)",
    )
    group.add_argument("--top-p", type=float, default=1.0, help="nucleus mass (default: %(default)s)")
    group.add_argument("--top-k", type=int, default=-1, help="-1 disables (default: %(default)s)")
    group.add_argument(
        "--sample-seed", type=int, default=None, help="seed of this request's sampling"
    )
    group.add_argument(
        "--stop", action="append", default=None, help="stop string (repeatable)"
    )
    group.add_argument(
        "--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token"
    )


def _add_dataset_flags(parser: argparse.ArgumentParser, seed: bool = True) -> None:
    """What a benchmark sends, as ``vllm bench serve`` names it where it has a name."""
    group = parser.add_argument_group("dataset")
    group.add_argument("--dataset", default="random", choices=DATASETS,
                       help="random token ids, a trace's lengths, one of the paper's trace "
                       "shapes, or a standard workload (docs/WORKLOADS.md) (default: %(default)s)")
    group.add_argument("--shape", help="with --dataset shaped: short-1..3 or long-1..6 "
                       "(lognormal lengths; see docs/SIMULATION.md)")
    group.add_argument("--trace", help="with --dataset trace: a Mooncake .jsonl or a "
                       "Vidur-style .csv (arrived_at, num_prefill_tokens, num_decode_tokens)")
    group.add_argument("--num-prompts", type=int, default=None,
                       help="requests to send (default: all of w1, w2 or the trace)")
    group.add_argument("--random-input-len", type=int, default=1024)
    group.add_argument("--random-output-len", type=int, default=128)
    group.add_argument("--random-range-ratio", type=float, default=0.0,
                       help="random lengths uniform within this share of the above")
    group.add_argument("--length-scale", type=float, default=None,
                       help="trace lengths times this (default: what fits the longest "
                       "request into the context, at most 1; printed)")
    group.add_argument("--request-rate", type=float, default=float("inf"),
                       help="requests per second, Poisson (default: inf, all at once)")
    group.add_argument("--burstiness", type=float, default=1.0,
                       help="gamma shape of the gaps between requests: 1 is Poisson, below "
                       "1 burstier, above more regular (default: %(default)s)")
    group.add_argument("--fixed-schedule", action="store_true",
                       help="send at the trace's own times (--dataset trace)")
    if seed:
        group.add_argument("--seed", type=int, default=0, help="of the prompts and arrivals")
    run = parser.add_argument_group("run")
    run.add_argument("--max-concurrency", type=int, default=None,
                     help="requests in flight at most (default: no limit)")
    run.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                     help="generate every requested token (default: on, as vLLM does for "
                     "random prompts)")
    run.add_argument("--goodput", nargs="+", default=[], metavar="METRIC:MS",
                     help="SLOs a good request meets, e.g. ttft:500 tpot:50 e2el:5000")
    run.add_argument("--metric-percentiles", default="99",
                     help="comma-separated percentiles reported (default: %(default)s)")
    run.add_argument("--result-filename", help="write the result JSON (vLLM's keys) here")
    run.add_argument("--disable-tqdm", action="store_true", help="no progress bar")


def _add_bench_parsers(commands) -> None:
    bench = commands.add_parser(
        "bench", help="benchmark a server, the engine, or a sweep of cluster shapes",
        description="Benchmarks reported under vllm bench serve's keys. See docs/BENCHMARKS.md.",
    )
    kinds = bench.add_subparsers(dest="bench_command", required=True)
    serve = kinds.add_parser(
        "serve", help="send a dataset to an OpenAI-compatible server (ours or a peer's)",
        description="Stream completions from any OpenAI-compatible server at the dataset's "
        "times; TTFT, TPOT, ITL and E2E latency, throughput and goodput.",
    )
    serve.add_argument("--base-url", required=True, nargs="+",
                       help="e.g. http://127.0.0.1:8000; several: each in turn with the same "
                       "requests, then side by side (the result file holds a list)")
    serve.add_argument("--model", default=None,
                       help="the model name to ask for (default: the first the server lists)")
    serve.add_argument("--api-key", default=None)
    serve.add_argument("--timeout", type=float, default=None,
                       help="seconds one request may take (default: no limit)")
    serve.add_argument("--return-token-ids", action=argparse.BooleanOptionalAction,
                       default=True, help="ask for each chunk's token ids (vLLM's and our "
                       "extension): every token timed as it comes (default: on)")
    serve.add_argument("--vocab-size", type=int, default=None,
                       help="random token ids stay below it: give the model's vocabulary "
                       "when it is smaller than 49,000 (default: ids from [1000, 49000))")
    _add_dataset_flags(serve)
    offline = kinds.add_parser(
        "offline", help="the same, through the engine in this process (no HTTP)",
        description="Run a dataset through the engine in this process at its times.",
    )
    offline.add_argument("--model", default="smollm2", help=f"{_MODEL_HELP} (default: %(default)s)")
    _add_dataset_flags(offline, seed=False)
    _add_engine_flags(offline)
    sweep = kinds.add_parser(
        "sweep", help="a dataset over instance counts, pooling modes and request rates",
        description="Run a dataset offline on every (instances, mode, request rate), a "
        "fresh engine each; a table, a JSON of the rows and PNG plots.",
    )
    sweep.add_argument("--model", default="smollm2", help=f"{_MODEL_HELP} (default: %(default)s)")
    sweep.add_argument("--instance-counts", type=int, nargs="+", default=[1, 2, 4])
    sweep.add_argument("--modes", nargs="+", default=["isolated", "pooled"],
                       choices=["isolated", "pooled", "planner"],
                       help="planner needs --cost-model (default: %(default)s)")
    sweep.add_argument("--request-rates", type=float, nargs="+", default=[float("inf")])
    sweep.add_argument("--plot-prefix", help="write PREFIX_throughput.png, _latency.png, "
                       "_context.png and _distributions.png")
    _add_dataset_flags(sweep, seed=False)
    _add_engine_flags(sweep)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="infinite-llm",
        description="LLM serving that treats the KV memory of a cluster as one pool.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser(
        "generate", help="generate from one prompt, streaming tokens to the terminal",
        description="Generate from one prompt, streaming the text as it is produced.",
    )
    generate.add_argument("prompt", help="the prompt text")
    generate.add_argument(
        "--model", default="smollm2", help=f"{_MODEL_HELP} (default: %(default)s)"
    )
    generate.add_argument(
        "--chat", action="store_true",
        help="treat the prompt as a user message and apply the model's chat template",
    )
    generate.add_argument("--system", default=None, help="system message for --chat")
    _add_engine_flags(generate)
    _add_sampling_flags(generate)

    serve = commands.add_parser(
        "serve", help="serve the OpenAI-compatible HTTP API",
        description="Serve MODEL over an OpenAI-compatible HTTP API (/v1/completions, "
        "/v1/chat/completions, /v1/models, /health, /metrics, /v1/cluster, /tokenize, "
        "/detokenize). SIGTERM drains in-flight requests before exiting.",
    )
    serve.add_argument("model", help=_MODEL_HELP)
    _add_engine_flags(serve)
    _add_server_flags(serve)

    profile = commands.add_parser(
        "profile", help="measure what a step costs here and write the cost model",
        description="Time decode steps over a grid of batch sizes and context lengths, "
        "and prefill steps of one prompt each, on one instance and fit T = fixed + "
        "per_token * b + per_context_token * S + per_sequence * n; the JSON file is what "
        "the planner and the simulator load.",
    )
    profile.add_argument(
        "--model", default="smollm2", help=f"{_MODEL_HELP} (default: %(default)s)"
    )
    profile.add_argument("--out", required=True, help="where to write the fit (JSON)")
    profile.add_argument(
        "--batches", type=int, nargs="+", default=[1, 4, 16],
        help="requests decoding at once (default: %(default)s)",
    )
    profile.add_argument(
        "--contexts", type=int, nargs="+", default=[64, 512, 2048],
        help="prompt tokens of each request (default: %(default)s)",
    )
    profile.add_argument(
        "--prefills", type=int, nargs="*", default=[128, 512, 2048],
        help="prompt lengths whose prefill steps are timed (default: %(default)s)",
    )
    profile.add_argument(
        "--prefill-prompts", type=int, nargs="+", default=[1, 8],
        help="prompts prefilled together in each prefill step (default: %(default)s)",
    )
    profile.add_argument(
        "--mixed-chunks", type=int, nargs="*", default=[],
        help="prompt lengths timed beside each decode point's requests (a prompt's chunk "
             "beside decodes; default: none)",
    )
    profile.add_argument(
        "--steps", type=int, default=8, help="steps timed per point (default: %(default)s)"
    )
    profile.add_argument(
        "--rounds", type=int, default=1,
        help="times the whole grid is measured, one round after another; each point is "
        "the median of its rounds, for a machine whose speed drifts (default: %(default)s)",
    )
    _add_engine_flags(profile)

    _add_bench_parsers(commands)

    simulate = commands.add_parser(
        "simulate", help="run a trace through the cluster code on simulated time",
        description="Drive the real schedulers, rManagers, gManager, planner, migration "
        "and DGFM with a trace, each step priced by a profile's cost model instead of "
        "run; prints vllm bench serve's numbers. See docs/SIMULATION.md.",
    )
    simulate.add_argument("--model", help="with a GPU --device: a built-in shape "
                          "(llama2-7b, llama2-13b, llama2-70b) or a Hugging Face config.json "
                          "(or its directory)")
    simulate.add_argument("--device", default="cpu", help="cpu (this machine, timed by "
                          "--cost-model) or a GPU: a100-80g, h100-80g, h200 (a roofline from "
                          "data-sheet numbers)")
    simulate.add_argument("--gpus-per-instance", type=int, default=1,
                          help="tensor parallelism of each instance (GPU devices)")
    simulate.add_argument("--cost-model", help="the fit `infinite-llm profile` wrote: the "
                          "clock on --device cpu; on a GPU device, its measured engine time "
                          "per step is added to every step")
    simulate.add_argument("--instances", type=int, default=4)
    simulate.add_argument("--kv-tokens", type=int, help="KV tokens of each instance's pool "
                          "(GPU devices: what --memory-utilization of memory leaves after "
                          "the weights)")
    simulate.add_argument("--memory-utilization", type=float, default=0.9)
    simulate.add_argument("--block-size", type=int, default=16)
    simulate.add_argument("--mode", choices=MODES, default="pooled",
                          help="isolated instances (vLLM-multi), on-demand pooling, the "
                          "planner, or single: one instance over every GPU (vLLM-single)")
    simulate.add_argument("--parallel", action="store_true",
                          help="on cpu: instances side by side (as on Ray), the slowest sets "
                          "a step (GPU instances always are)")
    simulate.add_argument("--trace", help="Mooncake .jsonl or Vidur-style .csv; without it, "
                          "a synthetic trace from the flags below")
    simulate.add_argument("--num-prompts", type=int, default=200)
    simulate.add_argument("--request-rate", type=float, default=float("inf"),
                          help="requests per second (default: all at once)")
    simulate.add_argument("--burstiness", type=float, default=1.0,
                          help="gamma shape of the gaps (1: Poisson)")
    simulate.add_argument("--input-len", type=float, nargs=2, default=[5.0, 1.0],
                          metavar=("MU", "SIGMA"), help="lognormal prompt lengths")
    simulate.add_argument("--output-len", type=float, nargs=2, default=[4.5, 0.5],
                          metavar=("MU", "SIGMA"), help="lognormal output lengths")
    simulate.add_argument("--duration", type=float, help="only requests arriving before (s)")
    simulate.add_argument("--admission-output-reserve", type=float, default=0.0)
    simulate.add_argument("--seed", type=int, default=0)
    simulate.add_argument("--goodput", nargs="+", default=[], metavar="METRIC:MS",
                          help="SLOs a good request meets, e.g. ttft:500 tpot:50 e2el:5000")
    simulate.add_argument("--json", help="write the summary here too")
    simulate.add_argument("--requests-csv", help="one row per request: times and latencies")
    simulate.add_argument("--utilization-csv",
                          help="each instance's queues and blocks, every --sample-interval")
    simulate.add_argument("--chrome-trace",
                          help="steps, migrations, pools and requests for chrome://tracing")
    simulate.add_argument("--plot", help="a PNG of throughput, blocks and queues over time")
    simulate.add_argument("--no-fast-forward", action="store_true",
                          help="schedule every step, steady decodes too (same result, slower)")
    simulate.add_argument("--sample-interval", type=float, default=1.0,
                          help="simulated seconds between utilisation samples")
    return parser


def _build_llm(args: argparse.Namespace):
    from infinite_llm import LLM

    return LLM(args.model, **{name: getattr(args, name) for name in _ENGINE_FLAGS})


def _check_port_free(host: str, port: int) -> None:
    """Refuse a port another process holds now, before minutes of model loading (the
    server binds it again when it starts; this is a check, not a reservation)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as error:
            raise ValueError(f"cannot serve on {host}:{port}: {error.strerror or error} "
                             f"(is another server on port {port}? choose one with --port)"
                             ) from error


def _serve(args: argparse.Namespace) -> int:
    try:
        from infinite_llm.server import run_server
    except ImportError as error:
        raise SystemExit(
            "infinite-llm serve needs the server extra: "
            f"pip install 'infinite-llm[server]' ({error})"
        ) from error
    # Cheap checks first, so a typo or a busy port fails before the model loads.
    _check_port_free(args.host, args.port)
    config = ServerConfig(
        served_model_names=tuple(args.served_model_name or [args.model]),
        host=args.host,
        port=args.port,
        log_level=args.uvicorn_log_level,
        model_path=args.model,
        api_key=args.api_key,
        max_body_bytes=parse_memory_size(args.max_body_size),
        drain_timeout=args.drain_timeout,
        max_prompt_chars=args.max_prompt_chars,
        max_completions_per_request=args.max_completions_per_request,
        max_output_tokens_per_request=args.max_output_tokens_per_request,
        max_stop_strings=args.max_stop_strings,
        max_stop_string_chars=args.max_stop_string_chars,
        max_connections=args.max_connections,
        timeout_keep_alive=args.timeout_keep_alive,
        request_read_timeout=args.request_read_timeout,
    )
    return run_server(lambda: _build_llm(args), config)


def _generate(args: argparse.Namespace) -> int:
    from infinite_llm import SamplingParams

    params = SamplingParams(  # checked before the model loads
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.sample_seed,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
    )
    llm = _build_llm(args)
    prompt: str | list[int] = args.prompt
    if args.chat:
        messages = [{"role": "user", "content": args.prompt}]
        if args.system:
            messages.insert(0, {"role": "system", "content": args.system})
        _, prompt = llm.chat_prompt(messages)
    # Hold back text that could still turn out to begin a stop string.
    hold = max((len(s) for s in params.stop_strings), default=1) - 1
    printed = 0
    finish = None
    for output in llm.stream(prompt, params):
        completion = output.outputs[0]
        finish = completion.finish_reason
        ready = len(completion.text) if finish else max(printed, len(completion.text) - hold)
        sys.stdout.write(completion.text[printed:ready])
        sys.stdout.flush()
        printed = ready
    sys.stdout.write("\n")
    logging.getLogger("infinite_llm").info("finish reason: %s", finish)
    return 0


def _profile(args: argparse.Namespace) -> int:
    from infinite_llm.engine.profile import profile

    if min(args.batches) < 1 or min(args.contexts) < 1 or args.steps < 1 or (
        args.prefills and min(args.prefills) < 1
    ) or min(args.prefill_prompts) < 1 or args.rounds < 1 or min(args.mixed_chunks, default=1) < 1:
        raise ValueError("--batches, --contexts, --prefills, --prefill-prompts, "
                         "--mixed-chunks, --steps and --rounds must be positive")
    llm = _build_llm(args)
    try:
        model = profile(llm.engine, args.batches, args.contexts, args.steps, model=args.model,
                        prefills=args.prefills, prefill_prompts=args.prefill_prompts,
                        rounds=args.rounds, mixed_chunks=args.mixed_chunks)
    finally:
        llm.shutdown()
    model.save(args.out)
    print(f"{'batch':>6} {'decodes':>7} {'tokens':>7} {'context tokens':>15} {'step ms':>9} "
          f"{'line ms':>9}" + (f"  {'rounds ms':>19}" if args.rounds > 1 else ""))
    for p in model.points:
        fit = model.line(p.computed, p.context_tokens, sequences=p.batch) * 1e3
        spread = (f"  {min(p.round_s) * 1e3:>9.2f}-{max(p.round_s) * 1e3:<9.2f}"
                  if p.round_s else "")
        print(f"{p.batch:>6} {p.decoding:>7} {p.computed:>7} {p.context_tokens:>15} "
              f"{p.step_s * 1e3:>9.2f} {fit:>9.2f}{spread}")
    print(f"T = {model.fixed_s * 1e3:.3f} ms + {model.per_token_s * 1e3:.4f} ms/token "
          f"+ {model.per_context_token_s * 1e6:.4f} us/context token "
          f"+ {model.per_sequence_s * 1e3:.4f} ms/sequence "
          f"+ {model.per_remote_s * 1e3:.3f} ms/remote pair -> {args.out}")
    print(f"of a decode step, the engine's own work (outside the runner): "
          f"{model.engine_s * 1e3:.3f} ms")
    if probes := model.source.get("probe_s"):
        print("the probe (timed again beside later runs to tell this machine's speed then), "
              "decode/prefill a round: "
              + ", ".join(f"{d * 1e3:.1f}/{p * 1e3:.0f} ms" for d, p in probes))
    if busy := model.source.get("probe_together_s"):
        print("the probe with every instance busy: "
              + ", ".join(f"{d * 1e3:.1f}/{p * 1e3:.0f} ms" for d, p in busy)
              + f"; a step whose neighbours idle costs {model.alone[0]:.3f}x (decode), "
              f"{model.alone[1]:.3f}x (prompts)")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from infinite_llm.bench import results as results_
    from infinite_llm.bench.datasets import Dataset
    from infinite_llm.workload.summary import parse_goodput

    slos = parse_goodput(args.goodput)
    try:
        percentiles = [float(p) for p in args.metric_percentiles.split(",")]
    except ValueError:
        raise ValueError(
            f"--metric-percentiles {args.metric_percentiles!r}: e.g. 50,90,99") from None
    if not all(0 <= p <= 100 for p in percentiles):
        raise ValueError("--metric-percentiles are between 0 and 100")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError("--max-concurrency must be >= 1")
    dataset = Dataset(
        args.dataset, args.num_prompts, args.trace, args.random_input_len,
        args.random_output_len, args.random_range_ratio, args.length_scale,
        args.request_rate, args.burstiness, args.fixed_schedule, args.seed, args.shape,
    )
    progress = not args.disable_tqdm
    config = {"backend": "infinite-llm" if args.bench_command != "serve" else "openai",
              "dataset": args.dataset, "num_prompts": args.num_prompts,
              "request_rate": args.request_rate, "burstiness": args.burstiness,
              "max_concurrency": args.max_concurrency}
    if args.bench_command == "sweep":
        return _sweep(args, dataset, slos, progress)
    if args.bench_command == "serve":
        from infinite_llm.bench import client

        # Every server gets the same requests: a trace scaled to the smallest context.
        served = [client.server_model(url, args.api_key) for url in args.base_url]
        contexts = [n for _, n in served if n is not None]
        requests, notes = dataset.requests(min(contexts, default=None), args.vocab_size)
        for note in notes:
            print(note)
        runs = []
        for url, (listed, _) in zip(args.base_url, served):
            model = args.model or listed
            print(f"{url}: {model}")
            results, duration = client.run(url, model, requests, args.max_concurrency,
                                           args.ignore_eos, args.api_key, progress, args.timeout,
                                           args.return_token_ids)
            runs.append((results, duration, {**config, "endpoint_type": "openai", "base_url": url,
                                             "model_id": model, "tokenizer_id": model}))
    else:
        from infinite_llm.bench import offline

        llm = _build_llm(args)
        try:
            engine = llm.engine
            requests, notes = dataset.requests(engine.max_model_len,
                                               engine.model_config.vocab_size)
            for note in notes:
                print(note)
            results, duration = offline.run(engine, requests, args.max_concurrency,
                                            args.ignore_eos, progress)
        finally:
            llm.shutdown()
        runs = [(results, duration, {**config, "endpoint_type": "offline", "model_id": args.model,
                                     "tokenizer_id": args.model, "instances": args.instances,
                                     "kv_pooling": args.kv_pooling})]
    reports = []
    for results, duration, run_config in runs:
        reports.append(results_.report(results, duration, run_config, slos, percentiles))
        print(results_.table(reports[-1]))
        failed = [r.error for r in results if not r.ok]
        if failed:
            print(f"{len(failed)} request(s) failed; the first: {failed[0]}")
    if len(reports) > 1:
        print(results_.side_by_side(reports))
    if args.result_filename:
        results_.save(reports[0] if len(reports) == 1 else reports, args.result_filename)
    return 0


def _sweep(args: argparse.Namespace, dataset, slos, progress: bool) -> int:
    from infinite_llm import LLM
    from infinite_llm.bench.sweep import sweep
    from infinite_llm.sim.simulator import pooling_for

    if "planner" in args.modes and not args.cost_model:
        raise ValueError("--modes planner needs --cost-model (infinite-llm profile writes it)")
    if min(args.instance_counts) < 1 or not all(r > 0 for r in args.request_rates):
        raise ValueError("--instance-counts and --request-rates must be positive")

    def build(instances: int, mode: str):
        pooling = pooling_for(mode, args.cost_model)
        options = {name: getattr(args, name) for name in _ENGINE_FLAGS}
        options.update(instances=instances, kv_pooling=pooling.enabled,
                       planner_period=pooling.planner_period, dgfm_period=pooling.dgfm_period)
        return LLM(args.model, **options)

    header = (f"{'instances':>9} {'mode':>9} {'rate':>6} {'done':>5} {'failed':>6} "
              f"{'req/s':>7} {'out tok/s':>10} {'TTFT ms':>9} {'TPOT ms':>9} "
              f"{'E2E ms':>9} {'longest':>8}")
    print(header)

    def show(row):
        print(f"{row['instances']:>9} {row['mode']:>9} {row['request_rate']:>6g} "
              f"{row['completed']:>5} {row['failed']:>6} {row['request_throughput']:>7.2f} "
              f"{row['output_throughput']:>10.1f} {row['mean_ttft_ms']:>9.1f} "
              f"{row['mean_tpot_ms']:>9.1f} {row['mean_e2el_ms']:>9.1f} "
              f"{row['longest_request_tokens']:>8}")

    rows = sweep(build, dataset, args.instance_counts, args.modes, args.request_rates,
                 args.max_concurrency, args.ignore_eos, slos, progress, on_point=show)
    if args.result_filename:
        Path(args.result_filename).write_text(json.dumps(rows, indent=2) + "\n")
    if args.plot_prefix:
        from infinite_llm.plots import plot_sweep

        for path in plot_sweep(rows, args.plot_prefix, f"{args.model}, {args.dataset}"):
            print(f"wrote {path}")
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from infinite_llm.sim.scenario import CPU, Scenario
    from infinite_llm.sim.simulator import Simulator, summary
    from infinite_llm.sim.timeline import (
        Timeline,
        write_chrome_trace,
        write_requests_csv,
        write_utilization_csv,
    )
    from infinite_llm.workload.summary import parse_goodput
    from infinite_llm.workload.traces import Lognormal, read_trace, synthetic

    slos = parse_goodput(args.goodput)
    scenario = Scenario(
        args.mode, args.instances, args.device, args.model, args.gpus_per_instance,
        args.cost_model, args.kv_tokens, args.block_size, args.memory_utilization,
        args.parallel, args.admission_output_reserve,
    )
    if args.trace:
        trace = read_trace(args.trace)
    else:
        trace = synthetic(
            args.num_prompts, args.request_rate, Lognormal(*args.input_len),
            Lognormal(*args.output_len), seed=args.seed, burstiness=args.burstiness,
        )
    cluster, clock = scenario.build()
    if scenario.device != CPU:
        r = scenario.roofline()
        print(f"{scenario.num_instances} x {r.gpus_per_instance} {r.device.name}, "
              f"{r.model.name}: {cluster.blocks_per_instance * cluster.block_size} KV tokens "
              f"each, one request up to {cluster.max_request_tokens}; engine time per step "
              + (f"{r.overhead_s * 1e3:.3f} ms (from {args.cost_model})" if args.cost_model
                 else "not counted (give --cost-model from infinite-llm profile)"))
    sim = Simulator(cluster, clock, fast_forward=not args.no_fast_forward)
    wants_timeline = args.utilization_csv or args.chrome_trace or args.plot
    timeline = Timeline(args.sample_interval) if wants_timeline else None
    records = sim.run(trace, args.duration, timeline)
    numbers = {**summary(records, slos), "steps": sim.steps,
               "preemptions": cluster.num_preemptions}
    for key, value in numbers.items():
        if value is not None:
            print(f"{key:>24}  {value:.2f}" if isinstance(value, float) else f"{key:>24}  {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(numbers, indent=2) + "\n")
    if args.requests_csv:
        write_requests_csv(records, args.requests_csv)
    if timeline is not None and args.utilization_csv:
        write_utilization_csv(timeline, args.utilization_csv)
    if timeline is not None and args.chrome_trace:
        write_chrome_trace(timeline, records, args.chrome_trace)
    if timeline is not None and args.plot:
        from infinite_llm.plots import plot_timeline

        plot_timeline(timeline, args.plot, f"{args.mode}, {args.instances} instances")
    return 0


# The remedies of a refused request, named as flags (the engine names its arguments).
class _Flags(dict):
    """An option's name as this CLI's flag (``max_tokens``: ``--max-tokens``), for the
    remedies an error names (``RequestTooLarge.render``)."""

    def __missing__(self, name: str) -> str:
        return "leave out --no-kv-pooling" if name == "kv_pooling" else "--" + name.replace("_", "-")


_CLI_NAMES = _Flags()
# ServerConfig's fields that are flags under the same name.
_SERVER_FLAGS = (
    "api_key", "drain_timeout", "max_prompt_chars", "max_completions_per_request",
    "max_output_tokens_per_request", "max_stop_strings", "max_stop_string_chars",
    "max_connections", "timeout_keep_alive", "request_read_timeout",
)
# Options a message may name that are flags here under the same name (--max-tokens for
# max_tokens): those whose names cannot be plain words of a sentence.
_FLAG_NAMED = tuple(name for name in (*_ENGINE_FLAGS, *_SERVER_FLAGS, "max_tokens", "top_p",
                                      "top_k") if "_" in name)
_OPTION_NAME = re.compile(r"(?<![\w-])(" + "|".join(_FLAG_NAMED) + r")\b")


def _as_flags(message: str) -> str:
    """An error message from the engine with its option names as this CLI's flags."""
    return _OPTION_NAME.sub(lambda m: "--" + m.group(1).replace("_", "-"), message)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "generate":
            return _generate(args)
        if args.command == "serve":
            return _serve(args)
        if args.command == "profile":
            return _profile(args)
        if args.command == "simulate":
            return _simulate(args)
        if args.command == "bench":
            return _bench(args)
    except RequestTooLarge as error:
        parser.exit(2, f"infinite-llm: error: {error.render(_CLI_NAMES)}\n")
    except ValueError as error:
        parser.exit(2, f"infinite-llm: error: {_as_flags(str(error))}\n")
    except KeyboardInterrupt:  # Ctrl-C: the user knows; no traceback
        sys.stderr.write("\n")
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
