"""bfloat16 products through float32 keep bfloat16 numerics."""

from __future__ import annotations

import torch
from torch import nn

from infinite_llm.model.bf16_cpu import UPCAST_MIN_ROWS, UpcastLinear, upcast_bf16_linears


def test_upcast_linear_equals_a_bfloat16_gemm_with_float32_accumulation():
    torch.manual_seed(0)
    linear = nn.Linear(96, 200, bias=True).to(torch.bfloat16)
    upcast = UpcastLinear(linear)
    for rows in (1, UPCAST_MIN_ROWS, 300):
        x = torch.randn(rows, 96).to(torch.bfloat16)
        exact = (x.double() @ linear.weight.double().T + linear.bias.double()).to(torch.bfloat16)
        ours = upcast(x)
        assert ours.dtype == torch.bfloat16
        # One rounding to bfloat16 at the end, as a float32-accumulating bf16 GEMM does.
        torch.testing.assert_close(ours.float(), exact.float(), rtol=8e-3, atol=1e-2)


def test_swap_keeps_tied_weights_and_skips_float32():
    model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 8)))
    model[1][0].weight = model[0].weight
    assert upcast_bf16_linears(model) == 0  # float32 stays as it is
    model = model.to(torch.bfloat16)
    assert upcast_bf16_linears(model) == 2
    assert isinstance(model[0], UpcastLinear) and model[1][0].weight is model[0].weight
