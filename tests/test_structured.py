"""Structured outputs: every completion is JSON valid under its schema (a tiny random
model, whose tokens only the grammar keeps in line, and SmolLM2), other requests in the
same steps are untouched, and a schema that cannot be followed is refused up front."""

from __future__ import annotations

import json

import pytest

from infinite_llm import LLM, SamplingParams, StructuredOutput

jsonschema = pytest.importorskip("jsonschema")

# Bounded everywhere, so that even random weights reach the end of the JSON.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                   "maxItems": 3},
        "member": {"type": "boolean"},
    },
    "required": ["name", "age", "colors", "member"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tiny_with_tokenizer(smollm2_path, tmp_path_factory):
    """A random tiny Llama over SmolLM2's vocabulary, with its tokenizer and EOS."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import TINY
    from infinite_llm.model.checkpoint import load_checkpoint

    smol = load_checkpoint(str(smollm2_path))
    eos = smol.config.eos_token_ids[0]
    path = tmp_path_factory.mktemp("tiny-tok")
    torch.manual_seed(5)
    config = LlamaConfig(**{**TINY, "vocab_size": smol.config.vocab_size},
                         bos_token_id=None, eos_token_id=eos)
    LlamaForCausalLM(config).save_pretrained(path)
    (path / "tokenizer.json").write_text(smol.tokenizer.backend.to_str())
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": smol.tokenizer.eos_token}))
    return path


def constrained(**kwargs) -> SamplingParams:
    return SamplingParams(structured_output=StructuredOutput(json_schema=SCHEMA), **kwargs)


def test_a_structured_output_is_json_or_a_schema_and_not_both():
    with pytest.raises(ValueError, match="either json_object or a json_schema"):
        StructuredOutput()
    with pytest.raises(ValueError, match="either json_object or a json_schema"):
        StructuredOutput(json_schema=SCHEMA, json_object=True)
    with pytest.raises(ValueError, match="json_schema is not valid JSON"):
        StructuredOutput(json_schema="{nope")
    assert StructuredOutput(json_schema=json.dumps(SCHEMA)).schema == SCHEMA
    assert StructuredOutput(json_object=True).schema == {"type": "object"}
    with pytest.raises(ValueError, match="ignore_eos cannot be combined"):
        constrained(ignore_eos=True)


def test_every_sample_of_a_random_model_is_valid_under_the_schema(tiny_with_tokenizer):
    llm = LLM(str(tiny_with_tokenizer), dtype="float32", device="cpu", instances=3,
              kv_cache_memory="2MiB", max_lend_fraction=1.0)
    free = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12] * 20]
    alone = [o.outputs[0].token_ids for o in llm.generate(prompts, free, use_tqdm=False)]
    params = [constrained(max_tokens=400, temperature=1.0, seed=s, n=4) for s in range(3)]
    # Constrained and free requests in the same steps.
    outs = llm.generate(prompts + prompts, params + [free] * 3, use_tqdm=False)
    texts = [c.text for o in outs[:3] for c in o.outputs]
    assert len(texts) == 12
    for text, out in zip(texts, [c for o in outs[:3] for c in o.outputs]):
        assert out.finish_reason == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len(set(texts)) > 1  # sampled, not one forced text
    assert [o.outputs[0].token_ids for o in outs[3:]] == alone
    json_object = llm.generate(prompts, SamplingParams(
        max_tokens=60, temperature=0, structured_output=StructuredOutput(json_object=True)),
        use_tqdm=False)
    for out in json_object:  # any object; it may be cut at max_tokens, but starts as one
        assert out.outputs[0].text.startswith("{")
        if out.outputs[0].finish_reason == "stop":
            assert isinstance(json.loads(out.outputs[0].text), dict)
    assert llm.engine.snapshot().pools_full


def test_a_schema_that_cannot_be_followed_is_refused_and_nothing_is_held(tiny_with_tokenizer,
                                                                          tiny_llama_dir):
    llm = LLM(str(tiny_with_tokenizer), dtype="float32", device="cpu", kv_cache_memory="2MiB")
    bad = SamplingParams(structured_output=StructuredOutput(json_schema={"type": "nonsense"}))
    with pytest.raises(ValueError, match="json_schema cannot be followed: Invalid type"):
        llm.generate([[1, 2, 3]], bad, use_tqdm=False)
    assert llm.engine.snapshot().pools_full and not llm.engine.requests
    no_tokenizer = LLM(str(tiny_llama_dir), dtype="float32", device="cpu",
                       kv_cache_memory="2MiB")
    with pytest.raises(ValueError, match="structured outputs need a tokenizer"):
        no_tokenizer.generate([[1, 2, 3]], constrained(), use_tqdm=False)


def test_smollm2_answers_in_the_schema(smollm2_path):
    llm = LLM("smollm2", dtype="float32", kv_cache_memory="64MiB")
    _, prompt = llm.chat_prompt([{"role": "user", "content":
                                  "Describe a person as JSON with name, age, colors, member."}])
    outs = llm.generate([prompt], constrained(max_tokens=200, temperature=0.7, seed=1, n=3),
                        use_tqdm=False)
    for choice in outs[0].outputs:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.text), SCHEMA)


def test_a_request_announced_again_keeps_its_place_in_the_grammar(smollm2_path):
    """After an instance fails, the plans announce every surviving request again; the
    sampler (in the driver) must not start a structured request's JSON over."""
    import torch

    from infinite_llm.core.step import Chunk, NewRequest, StepPlan
    from infinite_llm.engine.sampler import Sampler
    from infinite_llm.engine.structured import Grammars
    from infinite_llm.model.checkpoint import load_checkpoint

    smol = load_checkpoint(str(smollm2_path))
    vocab = smol.config.vocab_size
    sampler = Sampler(0, Grammars(smol.tokenizer, vocab, smol.config.eos_token_ids))
    announce = StepPlan(new_requests=(NewRequest("r", constrained(max_tokens=300,
                                                                   temperature=1.0, seed=4)),))
    chunk = Chunk("r", 0, (1,), 0, True)
    generator = torch.Generator().manual_seed(0)
    tokens = []
    sampler.apply(announce)
    for step in range(300):
        if step in (3, 9):
            sampler.apply(announce)  # as after a failure
        token = sampler.sample(torch.randn(1, vocab, generator=generator), [chunk]).tokens["r"]
        tokens.append(token.token_id)
        if token.token_id in smol.config.eos_token_ids:
            break
    text = smol.tokenizer.decode(tokens)
    jsonschema.validate(json.loads(text), SCHEMA)
