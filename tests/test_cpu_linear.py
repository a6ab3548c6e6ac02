"""CPU linear layers keep nn.Linear's results on every path they pick."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from infinite_llm.model.cpu_linear import (
    KERNEL_MAX_ROWS,
    UPCAST_MIN_ROWS,
    CpuLinear,
    has_native_bf16,
    use_cpu_linears,
)


@pytest.mark.parametrize("rows", [1, KERNEL_MAX_ROWS, KERNEL_MAX_ROWS + 1, UPCAST_MIN_ROWS, 300])
def test_bfloat16_paths_equal_a_gemm_with_float32_accumulation(rows):
    torch.manual_seed(rows)
    linear = nn.Linear(96, 200, bias=True).to(torch.bfloat16)
    fast = CpuLinear(linear, use_kernel=True, upcast=True)
    x = torch.randn(rows, 96).to(torch.bfloat16)
    exact = (x.double() @ linear.weight.double().T + linear.bias.double()).to(torch.bfloat16)
    ours = fast(x)
    assert ours.dtype == torch.bfloat16
    # One rounding to bfloat16 at the end, as a float32-accumulating bf16 GEMM does.
    torch.testing.assert_close(ours.float(), exact.float(), rtol=8e-3, atol=1e-2)


@pytest.mark.parametrize("rows", [1, 5, KERNEL_MAX_ROWS + 1, 64])
def test_float32_paths_equal_nn_linear(rows):
    torch.manual_seed(rows)
    linear = nn.Linear(96, 200, bias=True)
    x = torch.randn(rows, 96)
    torch.testing.assert_close(CpuLinear(linear, True, False)(x), linear(x), rtol=1e-5, atol=1e-5)


def test_swap_keeps_tied_weights():
    model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 8)))
    model[1][0].weight = model[0].weight
    swapped = use_cpu_linears(model)
    assert swapped in (0, 2)  # 0 only where neither the kernel nor the upcast applies
    if swapped:
        assert isinstance(model[0], CpuLinear) and model[1][0].weight is model[0].weight
    bf16 = nn.Sequential(nn.Linear(8, 8)).to(torch.bfloat16)
    if not has_native_bf16():
        assert use_cpu_linears(bf16) == 1 and bf16[0].upcast
