"""One simulated deployment, stated once: which hardware (this machine through a
profile's cost model, or a GPU through a roofline), how many instances of how many
GPUs, how much KV each holds, and how they share it. ``build`` gives the real
``Cluster`` and the clock that prices its steps. No torch.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from infinite_llm.config import CacheConfig, SchedulerConfig
from infinite_llm.core.cluster import Cluster
from infinite_llm.core.cost_model import CostModel
from infinite_llm.sim.hardware import device_spec, model_shape
from infinite_llm.sim.roofline import Roofline
from infinite_llm.sim.clock import MeasuredClock, RooflineClock, StepClock
from infinite_llm.sim.simulator import pooling_for

CPU = "cpu"


@dataclass(frozen=True)
class Scenario:
    """``device`` "cpu": this machine, each step timed by ``cost_model`` (a profile's
    file; ``parallel``: instances side by side, as on Ray). Any other device: a GPU of
    the packaged table running ``model`` with ``gpus_per_instance``-way tensor
    parallelism, timed by a roofline; the engine time per step that ``cost_model``
    measured (if given) is added to every step. ``mode`` "single" is vLLM-single: one
    instance over all ``instances * gpus_per_instance`` GPUs. ``kv_tokens`` per
    instance; None on a GPU: what ``memory_utilization`` of its memory leaves after the
    weights."""

    mode: str
    instances: int
    device: str = CPU
    model: str | None = None
    gpus_per_instance: int = 1
    cost_model: str | None = None
    kv_tokens: int | None = None
    block_size: int = 16
    memory_utilization: float = 0.9
    parallel: bool = False
    admission_output_reserve: float = 0.0

    def __post_init__(self) -> None:
        if self.instances < 1:
            raise ValueError(f"instances must be at least 1, got {self.instances}")
        if self.device == CPU:
            if self.cost_model is None:
                raise ValueError("on --device cpu the clock is a profile: give --cost-model "
                                 "(infinite-llm profile writes one)")
            if self.kv_tokens is None:
                raise ValueError("on --device cpu give --kv-tokens (each instance's pool)")
            if self.mode == "single":
                raise ValueError("--mode single models tensor parallelism over GPUs: "
                                 "give a GPU --device")
        elif self.model is None:
            raise ValueError(f"on --device {self.device} give --model (a built-in shape or "
                             "a Hugging Face config.json)")
        if self.kv_tokens is not None and self.kv_tokens < self.block_size:
            raise ValueError(f"kv_tokens must hold a block ({self.block_size} tokens), "
                             f"got {self.kv_tokens}")

    @property
    def num_instances(self) -> int:
        return 1 if self.mode == "single" else self.instances

    def roofline(self) -> Roofline:
        """The GPU instance's step model (not on cpu)."""
        gpus = self.gpus_per_instance * (self.instances if self.mode == "single" else 1)
        engine_s = CostModel.load(self.cost_model).engine_s if self.cost_model else 0.0
        return Roofline(model_shape(self.model), device_spec(self.device), gpus, engine_s)

    def instance_kv_tokens(self) -> int:
        if self.kv_tokens is not None:
            return self.kv_tokens
        return self.roofline().kv_capacity_tokens(self.memory_utilization)

    def build(self) -> tuple[Cluster, StepClock]:
        cache = CacheConfig(block_size=self.block_size)
        scheduler = SchedulerConfig(admission_output_reserve=self.admission_output_reserve)
        blocks = self.instance_kv_tokens() // self.block_size
        if self.device == CPU:
            clock: StepClock = MeasuredClock(CostModel.load(self.cost_model), self.parallel)
            pooling = pooling_for(self.mode, self.cost_model)
            return Cluster(blocks, cache, scheduler, pooling, self.num_instances), clock
        roofline = self.roofline()
        with tempfile.TemporaryDirectory() as tmp:
            # The planner predicts with the roofline's linear model; it reads a file.
            path = Path(tmp) / "cost.json"
            roofline.cost_model().save(path)
            pooling = pooling_for(self.mode, str(path))
            cluster = Cluster(blocks, cache, scheduler, pooling, self.num_instances)
        return cluster, RooflineClock(roofline)
