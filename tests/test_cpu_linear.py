"""CPU linear layers keep nn.Linear's results, for every row count and dtype."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from infinite_llm.kernels.cpu import linear_packed_supported
from infinite_llm.model.cpu_linear import NATIVE_BF16_MIN_ROWS, CpuLinear, use_cpu_linears

pytestmark = pytest.mark.skipif(
    not linear_packed_supported(torch.float32), reason="needs the CPU kernels"
)


@pytest.mark.parametrize("rows", [1, 5, 6, 7, 64, 300])
def test_bfloat16_equals_a_gemm_with_float32_accumulation(rows):
    torch.manual_seed(rows)
    linear = nn.Linear(96, 200, bias=True).to(torch.bfloat16)
    x = torch.randn(rows, 96).to(torch.bfloat16)
    exact = (x.double() @ linear.weight.double().T + linear.bias.double()).to(torch.bfloat16)
    ours = CpuLinear(linear)(x)
    assert ours.dtype == torch.bfloat16
    # One rounding to bfloat16 at the end, as a float32-accumulating bf16 GEMM does.
    torch.testing.assert_close(ours.float(), exact.float(), rtol=8e-3, atol=1e-2)


@pytest.mark.parametrize("rows", [1, 5, 9, 64, 301])
def test_float32_equals_nn_linear(rows):
    torch.manual_seed(rows)
    linear = nn.Linear(96, 200, bias=True)
    x = torch.randn(rows, 96)
    torch.testing.assert_close(CpuLinear(linear)(x), linear(x), rtol=1e-5, atol=1e-5)


def test_leading_dimensions_are_kept():
    linear = nn.Linear(32, 48, bias=False)
    x = torch.randn(2, 3, 32)
    y = CpuLinear(linear)(x)
    assert y.shape == (2, 3, 48)
    torch.testing.assert_close(y, linear(x), rtol=1e-5, atol=1e-5)


def test_a_row_does_not_depend_on_the_rows_beside_it():
    # Decoding a sequence alone or in a batch of any size gives bitwise the same logits.
    torch.manual_seed(0)
    layer = CpuLinear(nn.Linear(576, 960))
    x = torch.randn(70, 576)
    batched = layer(x)
    for rows in (1, 2, 5, 6, 13):
        assert torch.equal(layer(x[:rows]), batched[:rows])
    assert torch.equal(layer(x[37:38])[0], batched[37])


def test_native_bfloat16_path_from_its_row_threshold():
    torch.manual_seed(1)
    linear = nn.Linear(64, 80).to(torch.bfloat16)
    layer = CpuLinear(linear, native_min_rows=NATIVE_BF16_MIN_ROWS)
    assert layer.weight is linear.weight
    x = torch.randn(NATIVE_BF16_MIN_ROWS, 64).to(torch.bfloat16)
    torch.testing.assert_close(layer(x), linear(x))
    torch.testing.assert_close(layer(x[:3]).float(), linear(x[:3]).float(), rtol=8e-3, atol=1e-2)


def test_swap_drops_untied_weights_and_keeps_tied_ones():
    embed = nn.Embedding(40, 8)
    model = nn.ModuleDict({"embed": embed, "proj": nn.Linear(8, 8), "head": nn.Linear(8, 40, bias=False)})
    model["head"].weight = embed.weight
    assert use_cpu_linears(model) == 2
    assert isinstance(model["proj"], CpuLinear) and model["proj"].weight is None
    assert model["embed"].weight is embed.weight  # the tied weight lives on in the embedding
    ids = torch.tensor([3, 17])
    torch.testing.assert_close(model["head"](embed(ids)), embed(ids) @ embed.weight.T, rtol=1e-5, atol=1e-5)
    assert "packed" not in model.state_dict()  # a cache of the weight, not a parameter


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 7, 64])
def test_a_gated_linear_returns_silu_of_gate_times_up(dtype, rows):
    torch.manual_seed(rows)
    linear = nn.Linear(96, 2 * 80, bias=False).to(dtype)
    x = torch.randn(2, rows, 96).to(dtype)
    layer = CpuLinear(linear, gated=True)
    assert layer.applies_silu_and_mul and layer.out_features == 80
    gate, up = nn.functional.linear(x.double(), linear.weight.double()).chunk(2, dim=-1)
    got = layer(x)
    assert got.shape == (2, rows, 80) and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), nn.functional.silu(gate) * up, rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="without bias"):
        CpuLinear(nn.Linear(96, 160, bias=True), gated=True)


def test_swap_fuses_the_named_gate_up_products_only():
    model = nn.ModuleDict({"gate_up_proj": nn.Linear(8, 32, bias=False), "o": nn.Linear(8, 32)})
    assert use_cpu_linears(model) == 2
    assert model["gate_up_proj"].applies_silu_and_mul
    assert not model["o"].applies_silu_and_mul and model["o"].out_features == 32
