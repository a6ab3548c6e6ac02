"""Device specs, model shapes and the roofline step-cost model. The expected numbers are
worked out by hand here from the data sheets and the Llama-2 configs, not by calling the
formulas under test."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

import pytest

from infinite_llm.sim import hardware
from infinite_llm.sim.hardware import (
    DEVICES,
    MODELS,
    DeviceSpec,
    device_spec,
    model_shape,
)
from infinite_llm.sim.roofline import Roofline

# A100 SXM 80GB at the stated typical efficiencies (compute 0.6, memory 0.8).
A100_FLOPS = 312e12 * 0.6  # 187.2e12 FLOP/s
A100_BYTES = 2.039e12 * 0.8  # 1.6312e12 B/s
# llama2-7b: 6,738,415,616 parameters in float16.
LLAMA7_WEIGHT_BYTES = 2 * 6_738_415_616
# A token multiplies every layer's projections and MLP (32 x (4 x 4096^2 + 3 x 4096 x 11008)
# = 6,476,005,376 weights) and the lm_head (32000 x 4096 = 131,072,000 weights).
LLAMA7_FLOPS_PER_TOKEN = 2 * (6_476_005_376 + 131_072_000)
LLAMA7_KV_BYTES = 2 * 32 * 32 * 128 * 2  # 524,288 per token


def a100_7b(gpus: int = 1, overhead_s: float = 0.0) -> Roofline:
    return Roofline(model_shape("llama2-7b"), device_spec("a100-80g"), gpus, overhead_s)


def test_llama2_shapes_match_their_published_sizes():
    assert model_shape("llama2-7b").params == pytest.approx(6.74e9, rel=0.01)
    assert model_shape("llama2-13b").params == pytest.approx(13.0e9, rel=0.01)
    assert model_shape("llama2-70b").params == pytest.approx(69.0e9, rel=0.01)
    seven = model_shape("llama2-7b")
    assert seven.weight_bytes == LLAMA7_WEIGHT_BYTES
    assert seven.matmul_flops_per_token == LLAMA7_FLOPS_PER_TOKEN
    assert seven.kv_bytes_per_token == LLAMA7_KV_BYTES
    assert seven.attention_flops_per_pair == 4 * 32 * 32 * 128
    seventy = model_shape("llama2-70b")
    assert (seventy.heads, seventy.kv_heads, seventy.head_dim) == (64, 8, 128)
    assert seventy.kv_bytes_per_token == 327_680  # 2 * 80 * 8 * 128 * 2


def test_a_small_decode_is_memory_bound_and_a_big_one_compute_bound():
    roof = a100_7b()
    # Batch 1 at context 100: reading the weights (13.48 GB at 1.63 TB/s) dominates.
    weights_s = 13.477e9 / A100_BYTES  # about 8.26 ms
    one = roof.step_time(tokens=1, pairs=100, keys=100, sequences=1)
    assert one == pytest.approx(weights_s, rel=0.01)
    # Batch 4096 at context 16: 4096 x 13.21 GFLOP at 187.2 TFLOP/s, about 0.289 s, plus
    # reading 65,536 keys' K and V (34.4 GB, about 21 ms).
    big = roof.step_time(tokens=4096, pairs=65_536, keys=65_536, sequences=4096)
    linear_s = 4096 * 13.214e9 / A100_FLOPS
    attention_s = 65_536 * 524_288 / A100_BYTES
    assert big == pytest.approx(linear_s + attention_s, rel=0.01)
    assert big > 30 * weights_s
    double = roof.step_time(tokens=8192, pairs=131_072, keys=131_072, sequences=8192)
    assert double / big == pytest.approx(2.0, rel=0.01)


def test_a_prefill_chunk_scores_its_pairs_but_reads_only_its_keys():
    # 512 tokens after 1000: 512 x 1000 + 512 x 513 / 2 = 643,328 pairs, 1512 keys read.
    step = a100_7b().step_time(tokens=512, pairs=643_328, keys=1512, sequences=1)
    linear_s = 512 * 13.214e9 / A100_FLOPS  # about 36.1 ms, above the 8.26 ms weight read
    attention_s = 643_328 * 4 * 32 * 32 * 128 / A100_FLOPS  # 1.80 ms, above 0.49 ms of KV
    assert step == pytest.approx(linear_s + attention_s, rel=1e-3)


def test_more_gpus_halve_a_big_step_and_add_all_reduces():
    kwargs = {"tokens": 4096, "pairs": 65_536, "keys": 65_536, "sequences": 4096}
    one = a100_7b(1).step_time(**kwargs)
    two = a100_7b(2).step_time(**kwargs)
    # 2 all-reduces per layer x 32 layers, each 5 us + 2 (1/2) x 4096 x 4096 x 2 bytes
    # over 300 GB/s of NVLink: 64 x (5e-6 + 1.1185e-4) s, about 7.48 ms.
    allreduce_s = 64 * (5e-6 + 33_554_432 / 300e9)
    assert two == pytest.approx(one / 2 + allreduce_s, rel=1e-3)
    assert two < 0.6 * one
    assert a100_7b(2).allreduce_s(4096) == pytest.approx(allreduce_s, rel=1e-6)
    assert a100_7b(1).allreduce_s(4096) == 0.0


def test_sixteen_gpus_span_two_nodes_and_all_reduce_over_the_network():
    tokens = 1024
    eight = a100_7b(8).allreduce_s(tokens)
    sixteen = a100_7b(16).allreduce_s(tokens)
    token_bytes = 4096 * 2
    assert eight == pytest.approx(64 * (5e-6 + 2 * 7 / 8 * tokens * token_bytes / 300e9))
    assert sixteen == pytest.approx(64 * (1e-5 + 2 * 15 / 16 * tokens * token_bytes / 25e9))
    # Per byte: a token's extra cost is about 12x more over 25 GB/s than over 300 GB/s.
    per_token_8 = a100_7b(8).allreduce_s(2 * tokens) - eight
    per_token_16 = a100_7b(16).allreduce_s(2 * tokens) - sixteen
    assert per_token_16 > 10 * per_token_8
    step = {"tokens": tokens, "pairs": tokens * 100, "keys": tokens * 100, "sequences": tokens}
    assert a100_7b(16).step_time(**step) > a100_7b(8).step_time(**step) / 2


def test_a_remote_exchange_costs_more_across_nodes():
    roof = a100_7b()
    # Out: (32 + 2 x 32) x 128 x 2 = 24,576 bytes; back: 32 x 129 x 4 = 16,512 bytes.
    exchanged = 24_576 + 16_512
    within = 32 * (2 * 5e-6 + exchanged / 300e9)
    across = 32 * (2 * 1e-5 + exchanged / 25e9)
    assert roof.exchange_s(same_node=True) == pytest.approx(within)
    assert roof.exchange_s(same_node=False) == pytest.approx(across)
    assert across > within
    base = roof.step_time(1, 100, 100, 1)
    assert roof.step_time(1, 100, 100, 1, remote_pairs=3) == pytest.approx(base + 3 * within)
    assert roof.step_time(1, 100, 100, 1, remote_pairs=3, remote_same_node=False) == (
        pytest.approx(base + 3 * across))


def test_overhead_is_added_to_every_step_and_an_empty_step_costs_nothing():
    assert a100_7b(overhead_s=0.001).step_time(1, 100, 100, 1) == pytest.approx(
        a100_7b().step_time(1, 100, 100, 1) + 0.001)
    assert a100_7b(4, overhead_s=0.001).step_time(0, 0, 0, 0) == 0.0
    with pytest.raises(ValueError, match="tokens"):
        a100_7b().step_time(-1, 0, 0, 0)
    with pytest.raises(ValueError, match="gpus_per_instance"):
        a100_7b(0)


def test_kv_capacity_is_what_the_weights_leave():
    # 0.9 x 80 GB = 72 GB, less 13.48 GB of weights, in 524,288-byte tokens: about 111.6k.
    capacity = a100_7b().kv_capacity_tokens()
    assert capacity == int((72e9 - LLAMA7_WEIGHT_BYTES) // LLAMA7_KV_BYTES)
    assert 110_000 < capacity < 113_000
    assert a100_7b().kv_capacity_tokens(activation_reserve_bytes=524_288 * 1000) == (
        capacity - 1000)
    # Two GPUs hold the weights once: 144 GB - 13.48 GB.
    assert a100_7b(2).kv_capacity_tokens() == int((144e9 - LLAMA7_WEIGHT_BYTES) // 524_288)


def test_llama2_70b_does_not_fit_on_one_a100():
    seventy = Roofline(model_shape("llama2-70b"), device_spec("a100-80g"))
    weight_bytes = 2 * 68_976_648_192  # 137.95 GB in float16
    with pytest.raises(ValueError) as info:
        seventy.kv_capacity_tokens()
    assert str(weight_bytes) in str(info.value)
    assert "72000000000" in str(info.value)
    # Two GPUs (144 GB usable) hold it, with little room left.
    two = Roofline(model_shape("llama2-70b"), device_spec("a100-80g"), 2)
    assert two.kv_capacity_tokens() == int((144e9 - weight_bytes) // 327_680)


def write_config(folder: Path, **config: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


LLAMA_LIKE = {"num_hidden_layers": 3, "hidden_size": 96, "num_attention_heads": 6,
              "intermediate_size": 160, "vocab_size": 320, "torch_dtype": "bfloat16"}


def test_a_hugging_face_config_gives_a_shape(tmp_path: Path):
    folder = write_config(tmp_path / "tiny", **LLAMA_LIKE)
    by_dir = model_shape(str(folder))
    by_file = model_shape(str(folder / "config.json"))
    assert by_dir == by_file
    assert by_dir.name == "tiny"
    assert (by_dir.layers, by_dir.hidden, by_dir.heads) == (3, 96, 6)
    assert by_dir.kv_heads == 6  # defaults to the query heads
    assert by_dir.head_dim == 16  # hidden // heads
    assert by_dir.dtype_bytes == 2
    # Embeddings and lm_head 2 x 320 x 96; per layer 4 x 96^2 + 3 x 96 x 160 + 2 x 96;
    # the final norm 96.
    assert by_dir.params == 2 * 320 * 96 + 3 * (36_864 + 46_080 + 192) + 96

    explicit = write_config(tmp_path / "gqa", **LLAMA_LIKE, num_key_value_heads=2,
                            head_dim=32)
    gqa = model_shape(str(explicit))
    assert (gqa.kv_heads, gqa.head_dim) == (2, 32)
    assert gqa.kv_bytes_per_token == 2 * 3 * 2 * 32 * 2
    wide = write_config(tmp_path / "f32", **{**LLAMA_LIKE, "torch_dtype": "float32"})
    assert model_shape(str(wide)).dtype_bytes == 4
    plain = {k: v for k, v in LLAMA_LIKE.items() if k != "torch_dtype"}
    assert model_shape(str(write_config(tmp_path / "plain", **plain))).dtype_bytes == 2


def test_a_config_missing_a_key_is_refused_by_name(tmp_path: Path):
    config = {k: v for k, v in LLAMA_LIKE.items() if k != "intermediate_size"}
    folder = write_config(tmp_path / "broken", **config)
    with pytest.raises(ValueError, match="intermediate_size") as info:
        model_shape(str(folder))
    assert str(folder / "config.json") in str(info.value)


def test_unknown_names_list_the_choices(tmp_path: Path):
    assert set(DEVICES) == {"a100-80g", "h100-80g", "h200"}
    assert set(MODELS) == {"llama2-7b", "llama2-13b", "llama2-70b"}
    with pytest.raises(ValueError, match="a100-80g, h100-80g, h200"):
        device_spec("tpu-v9")
    with pytest.raises(ValueError, match="llama2-13b") as info:
        model_shape("gpt-5")
    assert "llama2-70b" in str(info.value)
    with pytest.raises(ValueError, match="llama2-7b"):
        model_shape(str(tmp_path / "nothing-here"))


def test_every_packaged_device_loads_and_validates():
    expected = {  # name: (memory bytes, dense BF16 FLOP/s, HBM B/s, NVLink B/s one way)
        "a100-80g": (80e9, 312e12, 2.039e12, 300e9),
        "h100-80g": (80e9, 989e12, 3.35e12, 450e9),
        "h200": (141e9, 989e12, 4.8e12, 450e9),
    }
    for name in DEVICES:
        spec = device_spec(name)
        assert spec.name == name
        assert (spec.memory_bytes, spec.peak_flops, spec.memory_bytes_per_s,
                spec.intra_node_bytes_per_s) == expected[name]
        assert spec.gpus_per_node == 8
        assert 0 < spec.compute_efficiency <= 1 and 0 < spec.memory_efficiency <= 1
        assert "not measured" in spec.source


def test_bad_device_values_are_refused_by_field_and_file(tmp_path: Path, monkeypatch):
    good = json.loads((files("infinite_llm.sim") / "devices" / "h200.json")
                      .read_text())
    with pytest.raises(ValueError, match="memory_efficiency"):
        DeviceSpec(**{**good, "memory_efficiency": 1.5})
    with pytest.raises(ValueError, match="peak_flops"):
        DeviceSpec(**{**good, "peak_flops": 0})
    (tmp_path / "devices").mkdir()
    (tmp_path / "devices" / "bad.json").write_text(
        json.dumps({**good, "name": "bad", "compute_efficiency": 0}))
    monkeypatch.setattr(hardware, "_packaged", lambda folder: tmp_path / folder)
    monkeypatch.setattr(hardware, "DEVICES", ("bad",))
    with pytest.raises(ValueError, match=r"devices/bad\.json.*compute_efficiency"):
        device_spec("bad")


@pytest.mark.parametrize("gpus", [1, 2, 16])
def test_the_linear_cost_model_is_the_no_overlap_bound_of_decode_steps(gpus: int):
    roof = a100_7b(gpus, overhead_s=0.002)
    model = roof.cost_model()
    assert model.source == {"roofline": "a100-80g", "model": "llama2-7b",
                            "gpus_per_instance": gpus}
    assert model.per_remote_s == roof.exchange_s(same_node=False)
    for batch in (1, 8, 64, 256, 1024, 4096):
        for context in (16, 1000, 4000):
            pairs = batch * context
            exact = roof.step_time(batch, pairs, pairs, batch, remote_pairs=2,
                                   remote_same_node=False)
            linear = model.step_time(batch, pairs, remote_pairs=2)
            assert exact <= linear * (1 + 1e-12) <= 2 * exact
    # Batch 1 on one GPU: the bound adds one token's compute, 70.6 us, to the 8.26 ms read.
    one = a100_7b().cost_model()
    assert one.step_time(1, 0) - a100_7b().step_time(1, 0, 0, 1) == pytest.approx(
        13.214e9 / A100_FLOPS, rel=1e-3)
