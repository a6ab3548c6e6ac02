"""Exact outputs against Hugging Face transformers on the same weights (fp32)."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

from infinite_llm import LLM, SamplingParams
from infinite_llm.core.step import Chunk, StepPlan
from infinite_llm.memory.rblock import BlockTable

transformers = pytest.importorskip("transformers")

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away,",
    "1, 2, 3, 4, 5,",
    "Translate to French: I love reading books.",
    "<|im_start|>user\nWhat is the speed of light?<|im_end|>\n<|im_start|>assistant\n",
    "List three primary colors:\n-",
    "import numpy as np\nx = np.arange(10)\nprint(",
]


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


@torch.no_grad()
def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding with transformers' forward and its KV cache, never stopping at EOS."""
    # transformers 5 calls the KV cache ``cache`` (``past_key_values`` before, and
    # deprecated there until 5.40).
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(torch.tensor([prompt_ids]), use_cache=True)
    tokens = []
    for _ in range(max_new_tokens):
        tokens.append(int(out.logits[0, -1].argmax()))
        out = model(torch.tensor([[tokens[-1]]]), use_cache=True, **{name: getattr(out, name)})
    return tokens


def random_prompts(count: int, low: int, high: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (count,), generator=g).tolist()
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    return tiny_llama_dir, hf.eval()


def place_blocks(llm: LLM, sequences: list[list[int]], owner_of) -> list[BlockTable]:
    """A block table per sequence whose logical block j lives on instance owner_of(i, j),
    taken straight from the owners' pools (the placement under test, not the policy)."""
    engine = llm.engine
    tables = []
    for i, seq in enumerate(sequences):
        table = BlockTable()
        for j in range(-(-len(seq) // engine.cluster.block_size)):
            owner = owner_of(i, j)
            table.append(owner, engine.cluster.instances[owner].rmanager.pool.allocate(1))
        tables.append(table)
    return tables


def paged_logits(
    llm: LLM, sequences: list[list[int]], chunk: int, owner_of=lambda i, j: 0
) -> list[torch.Tensor]:
    """Logits of every position, computed by the runner in chunks of ``chunk`` tokens,
    all sequences sharing each step (prefill chunks and single tokens mixed in one batch),
    with each sequence's KV blocks placed on instances by ``owner_of``."""
    engine = llm.engine
    runner = engine.runner
    tables = place_blocks(llm, sequences, owner_of)
    ids = tuple(str(i) for i in range(len(sequences)))
    runner.tables.apply(StepPlan(tables=tuple(t.take_update(i) for i, t in zip(ids, tables))))
    done = [0] * len(sequences)
    hidden: list[list[torch.Tensor]] = [[] for _ in sequences]
    step = 0
    while any(d < len(s) for d, s in zip(done, sequences)):
        chunks = []
        for i, seq in enumerate(sequences):
            # Sequence i takes chunks of (chunk - i) tokens, at least 1: mixed sizes per step.
            n = min(max(1, chunk - i - step % 2), len(seq) - done[i])
            if n > 0:
                chunks.append(Chunk(ids[i], 0, tuple(seq[done[i]:done[i] + n]), done[i], True))
        out = runner.forward(tuple(chunks))
        offset = 0
        for c in chunks:
            i = int(c.request_id)
            hidden[i].append(out[offset:offset + len(c.token_ids)])
            offset += len(c.token_ids)
            done[i] += len(c.token_ids)
        step += 1
    runner.tables.apply(StepPlan(finished=ids))
    for table in tables:
        for rb in table.rblocks:
            engine.cluster.instances[rb.owner].rmanager.pool.free(list(rb.block_ids))
    return [llm.engine.runner.model.compute_logits(torch.cat(h)) for h in hidden]


def test_tiny_llama_logits_match_transformers_in_chunks(tiny):
    path, hf = tiny
    llm = LLM(str(path), kv_cache_memory="4MiB", block_size=4)
    sequences = random_prompts(5, 1, 60, 320, seed=1)
    for seq, ours in zip(sequences, paged_logits(llm, sequences, chunk=7)):
        with torch.no_grad():
            ref = hf(torch.tensor([seq])).logits[0]
        assert relative_error(ours, ref) < 1e-4


def test_prefill_kernel_and_padded_path_give_the_same_logits(tiny):
    # Whole prompts (one chunk from token 0) of several lengths in one step: the prefill
    # kernel reads them unpadded from the flat rows; the padded batches bucket them.
    path, _ = tiny
    llm = LLM(str(path), kv_cache_memory="4MiB", block_size=4)
    runner = llm.engine.runner
    if not runner.layout.prefill_kernel:
        pytest.skip("the prefill kernel is not available here")
    sequences = random_prompts(6, 2, 90, 320, seed=3)
    with_kernel = paged_logits(llm, sequences, chunk=100)
    runner.layout = dataclasses.replace(runner.layout, prefill_kernel=False)
    padded = paged_logits(llm, sequences, chunk=100)
    for a, b in zip(with_kernel, padded):
        assert relative_error(a, b) < 1e-5


@pytest.mark.parametrize("batch", [1, 16])
def test_tiny_llama_greedy_matches_transformers(tiny, batch):
    """Prompts longer than the 16-token step budget prefill in several chunks."""
    path, hf = tiny
    llm = LLM(str(path), kv_cache_memory="4MiB", block_size=4, max_num_batched_tokens=16)
    prompts = random_prompts(batch, 2, 70, 320, seed=batch)
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        assert output.prompt_token_ids == prompt
        assert output.outputs[0].token_ids == hf_greedy(hf, prompt, 20)
        assert output.outputs[0].finish_reason == "length"
    llm.engine.check_integrity()
    rm = llm.engine.cluster.instances[0].rmanager
    assert rm.num_free == rm.capacity


@pytest.mark.parametrize("overrides", [
    dict(tie_word_embeddings=True, num_key_value_heads=6),
    dict(rope_parameters=dict(
        rope_type="llama3", rope_theta=50000.0, factor=8.0, low_freq_factor=1.0,
        high_freq_factor=4.0, original_max_position_embeddings=64,
    )),
])
def test_tiny_llama_variants_match_transformers(tmp_path, overrides):
    from conftest import save_tiny_llama

    path = save_tiny_llama(tmp_path / "m", seed=3, **overrides)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(str(path), kv_cache_memory="4MiB", block_size=8, max_num_batched_tokens=32)
    prompts = random_prompts(4, 40, 120, 320, seed=5)
    outputs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0), use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == hf_greedy(hf, prompt, 12)


def test_smollm2_greedy_matches_transformers(smollm2_llm, hf_smollm2):
    tokenizer, hf = hf_smollm2
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    outputs = smollm2_llm.generate(PROMPTS, params, use_tqdm=False)
    for prompt, output in zip(PROMPTS, outputs):
        ids = tokenizer(prompt)["input_ids"]
        assert output.prompt_token_ids == ids
        assert output.outputs[0].token_ids == hf_greedy(hf, ids, 32), prompt
        assert output.outputs[0].text == tokenizer.decode(output.outputs[0].token_ids, skip_special_tokens=True)


def test_smollm2_logits_match_transformers(smollm2_llm, hf_smollm2):
    tokenizer, hf = hf_smollm2
    sequences = [tokenizer(p)["input_ids"] for p in PROMPTS[:3]]
    for seq, ours in zip(sequences, paged_logits(smollm2_llm, sequences, chunk=5)):
        with torch.no_grad():
            ref = hf(torch.tensor([seq])).logits[0]
        assert relative_error(ours, ref) < 1e-4
