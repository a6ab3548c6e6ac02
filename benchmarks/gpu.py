"""The GPU path's figures in one run: what issue 16 asks a GPU machine to show.

1. copy: the device's own copy bandwidth (a large device-to-device copy, bytes read plus
   bytes written over its time): the ceiling the decode kernel is measured against.
2. decode kernel: the Triton MicroAttention decode (``kernels/triton_attention``) over
   paged blocks at SmolLM2's attention shape (9 query heads over 3 KV heads of 64, block
   size 16, blocks in random order), for each context and batch: the KV bytes it must
   read over its time, and that as a share of the copy bandwidth; with its defaults,
   then with each of ``VARIANTS`` of its knobs (the kernel's earlier form among them).
   Enough layers' caches are cycled through that they do not fit the L2 cache, and on a
   GPU the calls are captured in a CUDA graph, so the time is the kernels' and not
   Python's. Each case's
   first sequence is checked against PyTorch's float32 attention over the same blocks.
3. LAT: batch-1 decode ms/token of a random model of SmolLM2's shape through ``LLM``
   (docs/WORKLOADS.md's LAT: 256 tokens against 1, one 32-token prompt), its decode
   steps replayed from CUDA graphs (the default), op by op (``enforce_eager``), and
   compiled by torch.compile before their capture (``enable_torch_compile``); with each
   the first run's seconds, which capture (and compile) its shapes; with graphs, also
   one batch-1 step's graph replayed alone (the device's part of LAT: the rest is the
   host's).
4. W1: the W1 workload through the same engines, output tokens and requests a second;
   with torch.compile only given ``--w1-compile`` (each of its batch and table sizes
   compiles once: minutes), and then timed on a second pass.
5. spread: one long prompt on ``--spread-instances`` instances whose pools are each too
   small for it (its KV spans them all) against one instance that holds it alone: the
   greedy tokens must be equal.

On a GPU machine (bfloat16, the full sizes; each row printed as it is measured, and
``--json`` rewritten, so a run cut short keeps what it measured; the table last):

    PYTHONPATH=src python benchmarks/gpu.py --json gpu.json

Without one, ``--small`` runs every part at toy sizes on the CPU, the kernels under
Triton's interpreter (what ``tests/test_gpu_benchmark.py`` does): a check that the script
works, not a measurement.

Needs: torch, triton (the ``gpu`` extra; on a CPU ``TRITON_INTERPRET=1``, which
``--small`` sets) and transformers (to save the random model).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Callable

SMALL = "--small" in sys.argv
if SMALL:  # read when the Triton kernels are defined: before they are imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hf_baseline import lat_decode_ms  # noqa: E402
from pool_common import print_table, run, save_random_smollm2_shape  # noqa: E402

from infinite_llm import LLM, SamplingParams  # noqa: E402
from infinite_llm.bench.workloads import get_workload  # noqa: E402
from infinite_llm.kernels import triton_attention  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, LAYERS = 9, 3, 64, 30  # SmolLM2-135M
L2_BYTES = 60 * 2**20  # an H100/H200's L2: the caches cycled through are several times it


@dataclass
class Row:
    part: str
    case: str
    value: float
    unit: str
    note: str = ""


class Report:
    """The rows so far: each printed when measured and the json rewritten with it."""

    def __init__(self, path: str | None, header: dict[str, str]) -> None:
        self.path, self.header, self.rows = path, header, []

    def add(self, row: Row) -> None:
        self.rows.append(row)
        print(f"[{row.part}] {row.case}: {row.value:,.3f} {row.unit} {row.note}", flush=True)
        if self.path:
            with open(self.path, "w") as f:
                json.dump({**self.header, "rows": [asdict(r) for r in self.rows]}, f, indent=1)

    def table(self) -> None:
        print_table(["part", "case", "value", "unit", "note"],
                    [[r.part, r.case, f"{r.value:,.3f}", r.unit, r.note] for r in self.rows])


def device_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of one call of ``fn``. On a GPU the call is captured once in a CUDA
    graph and its replays timed with events (no Python or launch gaps); on the CPU,
    wall time."""
    fn()  # compiles the kernels, warms the allocator
    if device.type != "cuda":
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)
    torch.cuda.synchronize(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    times = []
    for _ in range(repeats):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) / 1000)
    return statistics.median(times)


def replay_ms(graph: torch.cuda.CUDAGraph, repeats: int = 50) -> float:
    """Milliseconds of one replay of a captured graph, by events around ``repeats``."""
    graph.replay()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / repeats


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int) -> float:
    """Bytes a second of a device-to-device copy, counting bytes read and written."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    seconds = device_seconds(lambda: dst.copy_(src), device, repeats)
    return 2 * src.numel() * 4 / seconds


# The decode kernel's knobs tried beside its defaults: one block a step without
# tensor-core products (the kernel's form before tiles), and each tile of blocks.
VARIANTS = [dict(tile_blocks=1, use_dot=False)] + [
    dict(tile_blocks=t, use_dot=True) for t in (1, 2, 4, 8)]


def decode_case(device: torch.device, dtype: torch.dtype, context: int, batch: int,
                block_size: int, repeats: int, **knobs) -> tuple[float, float, float]:
    """(seconds a layer, KV bytes a layer, relative error of sequence 0) of the Triton
    decode over ``batch`` sequences of ``context`` tokens each (``knobs``: the kernel's,
    its defaults where not given)."""
    width = -(-context // block_size)
    elem = torch.finfo(dtype).bits // 8
    layer_bytes = 2 * batch * context * KV_HEADS * HEAD_DIM * elem
    layers = 1
    if device.type == "cuda":
        layers = max(1, min(LAYERS, math.ceil(4 * L2_BYTES / layer_bytes)))
    g = torch.Generator(device=device).manual_seed(context + batch)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dtype)

    caches = [(randn(batch * width, block_size, KV_HEADS, HEAD_DIM),
               randn(batch * width, block_size, KV_HEADS, HEAD_DIM)) for _ in range(layers)]
    table = torch.randperm(batch * width, generator=g, device=device).view(batch, width)
    table = table.to(torch.int32)
    kv_len = torch.full((batch,), context, dtype=torch.int32, device=device)
    q = randn(batch, 1, HEADS, HEAD_DIM)
    scale = HEAD_DIM**-0.5

    def decode(k, v):
        return triton_attention.paged_attention(q, k, v, table, None, kv_len, None, scale,
                                                **knobs)

    def step():
        for k, v in caches:
            decode(k, v)

    seconds = device_seconds(step, device, repeats) / layers
    # Sequence 0 against PyTorch in float32 over the same blocks, gathered.
    k, v = caches[0]
    out, _ = decode(k, v)
    keys = k[table[0].long()].reshape(-1, KV_HEADS, HEAD_DIM)[:context].float()
    values = v[table[0].long()].reshape(-1, KV_HEADS, HEAD_DIM)[:context].float()
    group = HEADS // KV_HEADS
    keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
    scores = torch.einsum("hd,thd->ht", q[0, 0].float(), keys) * scale
    ref = torch.einsum("ht,thd->hd", torch.softmax(scores, -1), values)
    error = float((out[0, 0].float() - ref).norm() / ref.norm())
    return seconds, layer_bytes, error


def kv_bytes_per_token(model_dir: str, dtype: str) -> int:
    config = json.load(open(os.path.join(model_dir, "config.json")))
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    elem = 2 if dtype in ("bfloat16", "float16") else 4
    return config["num_hidden_layers"] * 2 * config["num_key_value_heads"] * head_dim * elem


def engine(model_dir: str, device: str, dtype: str, tokens_each: int, instances: int = 1,
           **kw) -> LLM:
    return LLM(model_dir, device=device, dtype=dtype, instances=instances,
               kv_cache_memory=tokens_each * kv_bytes_per_token(model_dir, dtype),
               max_lend_fraction=1.0, **kw)


def within_vocab(prompts: list[list[int]], vocab: int) -> list[list[int]]:
    return [[t % vocab for t in p] for p in prompts]


def lat_ms(llm: LLM, vocab: int, output_len: int) -> tuple[float, float]:
    """(batch-1 decode ms/token: (t(N tokens) - t(1 token)) / (N - 1), median of 3 pairs;
    seconds of the first run, which captures or compiles the shapes it meets)."""
    lat = get_workload("LAT")
    prompt = within_vocab(lat.prompts, vocab)

    def seconds(n: int) -> float:
        start = time.perf_counter()
        llm.generate(prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True),
                     use_tqdm=False)
        return time.perf_counter() - start

    first = seconds(output_len)  # warm-up
    return statistics.median(lat_decode_ms(seconds(output_len), seconds(1), output_len)
                             for _ in range(3)), first


def w1_rates(llm: LLM, vocab: int, requests: int | None, warm_whole: bool = False
             ) -> tuple[float, float]:
    """(output tokens, requests) a second of W1 (its first ``requests`` where given);
    ``warm_whole``: the whole workload runs once first (every shape met before timing)."""
    w1 = get_workload("W1")
    prompts = within_vocab(w1.prompts, vocab)[:requests]
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
              for n in w1.output_lens[: len(prompts)]]
    warm = len(prompts) if warm_whole else 2
    llm.generate(prompts[:warm], params[:warm], use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    assert tokens == sum(p.max_tokens for p in params), "a W1 request stopped short"
    return tokens / seconds, len(prompts) / seconds


def spread_check(model_dir: str, device: str, dtype: str, prompt_len: int, instances: int,
                 output_len: int) -> tuple[bool, int, float, float]:
    """(greedy tokens equal, most owners, seconds all-local, seconds spread) of one
    prompt whose KV spans ``instances`` pools, against one pool that holds it alone."""
    import numpy as np

    vocab = json.load(open(os.path.join(model_dir, "config.json")))["vocab_size"]
    prompt = np.random.default_rng(3).integers(0, vocab, size=prompt_len).tolist()
    need = prompt_len + output_len
    each = -(-need // instances) + 32  # all the pools together hold it, fewer do not
    assert each * (instances - 1) < need, "the spread case must need every instance"
    alone = engine(model_dir, device, dtype, need + 64)
    local = run(alone.engine, [prompt], [output_len])
    alone.shutdown()
    del alone
    pooled = engine(model_dir, device, dtype, each, instances=instances)
    spread = run(pooled.engine, [prompt], [output_len])
    pooled.shutdown()
    assert not local.refused and not spread.refused, (local.refused, spread.refused)
    return (local.outputs == spread.outputs, spread.most_owners, local.seconds, spread.seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true",
                        help="toy sizes on the CPU (kernels under Triton's interpreter): "
                             "checks the script, measures nothing")
    parser.add_argument("--device", default=None, help="default: cuda, or cpu with --small")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 (float32 with --small)")
    parser.add_argument("--contexts", type=int, nargs="+", default=None,
                        help="decode kernel contexts (default 8192 32768 131072)")
    parser.add_argument("--batches", type=int, nargs="+", default=None,
                        help="decode kernel batches (default 1 64)")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--spread-tokens", type=int, default=None,
                        help="the spread prompt's length (default 131072)")
    parser.add_argument("--spread-instances", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 20)")
    parser.add_argument("--parts", nargs="+", default=["copy", "decode", "lat", "w1", "spread"],
                        choices=["copy", "decode", "lat", "w1", "spread"])
    parser.add_argument("--no-variants", dest="variants", action="store_false",
                        help="time the decode kernel with its defaults only, not also "
                             "with each of VARIANTS")
    parser.add_argument("--w1-compile", action="store_true",
                        help="W1 with torch.compile too (compiles every shape W1 meets)")
    parser.add_argument("--json", default=None, help="write the rows here too")
    args = parser.parse_args()
    small = args.small
    device = torch.device(args.device or ("cpu" if small else "cuda"))
    dtype_name = args.dtype or ("float32" if small else "bfloat16")
    dtype = getattr(torch, dtype_name)
    contexts = args.contexts or ([64, 200] if small else [8192, 32768, 131072])
    batches = args.batches or ([1, 2] if small else [1, 64])
    repeats = args.repeats or (2 if small else 20)
    spread_tokens = args.spread_tokens or (400 if small else 131072)

    what = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or platform.machine())
    print(f"device {what}; torch {torch.__version__}; {dtype_name}", flush=True)
    report = Report(args.json, {"device": what, "torch": torch.__version__, "dtype": dtype_name})

    copy = None
    if "copy" in args.parts or "decode" in args.parts:
        copy = copy_bandwidth(device, (2**24 if small else 2**31), repeats)
        report.add(Row("copy", f"{(2**24 if small else 2**31) >> 20} MiB", copy / 1e9, "GB/s"))
    if "decode" in args.parts:
        for context, batch in ((c, b) for c in contexts for b in batches):
            # The defaults (what the engine launches), then each variant of the knobs.
            for knobs in [{}] + (VARIANTS if args.variants else []):
                seconds, nbytes, error = decode_case(device, dtype, context, batch,
                                                     args.block_size, repeats, **knobs)
                assert error < (2e-2 if dtype != torch.float32 else 1e-4), (knobs, error)
                case = f"context {context}, batch {batch}" + (f", {knobs}" if knobs else "")
                report.add(Row("decode kernel, variant" if knobs else "decode kernel", case,
                               nbytes / seconds / 1e9, "GB/s",
                               f"{seconds * 1e6:.1f} us a layer, "
                               f"{nbytes / seconds / copy:.0%} of copy, error {error:.1e}"))
    if {"lat", "w1", "spread"} & set(args.parts):
        with tempfile.TemporaryDirectory() as model_dir:
            overrides = {} if not small else dict(
                vocab_size=320, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
                num_attention_heads=6, num_key_value_heads=2)
            save_random_smollm2_shape(model_dir, max_position_embeddings=max(
                8192, 2 ** math.ceil(math.log2(spread_tokens + 1024))), **overrides)
            vocab = json.load(open(os.path.join(model_dir, "config.json")))["vocab_size"]
            # torch.compile last: its compiles take the longest, and where a run is cut
            # short the other rows are in. Graphs need a GPU: the CPU runs op by op.
            first, last = ["CUDA graphs", "op by op"], [COMPILED]
            if device.type != "cuda":
                first, last = ["op by op"], []
            if {"lat", "w1"} & set(args.parts):
                engines(report, args, model_dir, device, dtype_name, vocab, first)
            if "spread" in args.parts:
                equal, owners, t_local, t_spread = spread_check(
                    model_dir, str(device), dtype_name, spread_tokens, args.spread_instances,
                    8 if small else 16)
                report.add(Row("spread", f"{spread_tokens} tokens over "
                               f"{args.spread_instances} instances", float(equal),
                               "tokens equal (1 = yes)",
                               f"{owners} owners; {t_local:.2f} s all-local, "
                               f"{t_spread:.2f} s spread"))
            if {"lat", "w1"} & set(args.parts):
                engines(report, args, model_dir, device, dtype_name, vocab, last)

    report.table()
    if any(r.part == "spread" and r.value != 1.0 for r in report.rows):
        sys.exit("spread: the tokens of the KV spread over instances differ from all-local")


# The ways an engine runs its decode steps: how each is named, and its options.
COMPILED = "torch.compile + CUDA graphs"
MODES = {
    "CUDA graphs": {},
    "op by op": {"enforce_eager": True},
    COMPILED: {"enable_torch_compile": True},
}


def engines(report: Report, args: argparse.Namespace, model_dir: str, device: torch.device,
            dtype_name: str, vocab: int, modes: list[str]) -> None:
    """LAT and W1 rows for each of ``modes``; where torch.compile fails, its row says how
    and the rest stands."""
    small = args.small
    for how in modes:
        options = MODES[how]
        compiled = how == COMPILED
        llm = None
        try:
            llm = engine(model_dir, str(device), dtype_name, 4096 if small else 262144,
                         **options)
            if "lat" in args.parts:
                ms, first = lat_ms(llm, vocab, 16 if small else 256)
                report.add(Row("LAT", f"batch 1, 32-token prompt, {how}", ms, "ms/token",
                               f"first run {first:.1f} s"))
                graphs = llm.engine.runner.graphs
                if graphs is not None and graphs.capture:
                    # The device's part of LAT: its widest batch-1 step replayed alone.
                    key = max((k for k in graphs.keys if k.batch == 1), key=lambda k: k.width)
                    report.add(Row("LAT", f"one step's graph alone (batch 1, {key.width} "
                                   f"blocks), {how}", replay_ms(graphs.graph(key)), "ms/step",
                                   "device time: the rest of LAT is the host's"))
            if "w1" in args.parts and (args.w1_compile or not compiled):
                tok_s, req_s = w1_rates(llm, vocab, 4 if small else None, warm_whole=compiled)
                report.add(Row("W1", f"{'4' if small else '64'} requests, {how}", tok_s,
                               "output tok/s", f"{req_s:.2f} req/s"))
        except Exception as error:  # noqa: BLE001 - the other modes' rows still stand
            if not compiled:
                raise
            traceback.print_exc()
            report.add(Row("LAT", f"batch 1, 32-token prompt, {how}", math.nan, "ms/token",
                           f"failed: {type(error).__name__}: {str(error)[:200]}"))
        finally:
            if llm is not None:
                llm.shutdown()
            del llm


if __name__ == "__main__":
    main()
