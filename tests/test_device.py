"""Device and dtype choice: names resolved once, clear errors for a GPU that is not there,
and the Ray placement rule (a GPU per actor, or equal shares of fewer)."""

from __future__ import annotations

import pytest
import torch

from infinite_llm import LLM
from infinite_llm.attention.plan import on_device
from infinite_llm.engine.device import torch_device, torch_dtype
from infinite_llm.transport.collective import backend_for


def test_auto_is_the_cpu_without_a_gpu_and_float32_there():
    if torch.cuda.is_available():
        assert torch_device("auto") == torch.device("cuda")
    else:
        assert torch_device("auto") == torch.device("cpu")
    assert torch_dtype("auto", "cpu") is torch.float32
    assert torch_dtype("auto", "cuda") is torch.bfloat16
    assert torch_dtype("float32", "cuda") is torch.float32


@pytest.mark.parametrize("name", ["tpu", "gpu", "cuda:x", ""])
def test_unknown_devices_are_refused(name):
    with pytest.raises(ValueError, match="unknown device"):
        torch_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_gpu_that_is_not_there_fails_before_loading(tmp_path):
    with pytest.raises(ValueError, match="sees no CUDA GPU"):
        torch_device("cuda:0")
    # Not even the (missing) model is opened: the device is checked first.
    with pytest.raises(ValueError, match="sees no CUDA GPU"):
        LLM(str(tmp_path / "no-such-model"), device="cuda")


def test_on_device_keeps_cpu_steps_as_they_are():
    step = (torch.arange(3), [torch.zeros(2)], "x")
    assert on_device(step, torch.device("cpu")) is step


def test_nccl_only_for_gpus_of_their_own():
    assert backend_for(torch.device("cuda"), own_gpu=True) == "nccl"
    assert backend_for(torch.device("cuda"), own_gpu=False) == "gloo"
    assert backend_for(torch.device("cpu"), own_gpu=False) == "gloo"


@pytest.mark.parametrize("instances, gpus, share", [
    (2, 4, 1), (2, 2, 1), (2, 1, 0.5), (3, 1, 0.3333), (3, 2, 0.5), (5, 2, 0.3333),
])
def test_ray_actors_get_a_gpu_each_or_equal_shares(instances, gpus, share):
    from infinite_llm.transport.ray import gpu_share

    assert gpu_share(instances, gpus) == share
    # The busiest GPU holds no more than one whole GPU's worth of actors.
    per_gpu = -(-instances // gpus)
    assert per_gpu * gpu_share(instances, gpus) <= 1
