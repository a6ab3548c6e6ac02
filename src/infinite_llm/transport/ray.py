"""The Ray backend: one actor per instance, one named actor for the gManager.

What runs where:

- each ``InstanceActor`` holds a model replica and its instance's KV tensors, on a GPU of
  its own when the Ray cluster has one per instance (a share of one when it has fewer,
  the CPU when it has none), and joins a torch.distributed group with the other
  instance actors: NCCL when each has a GPU of its own, gloo otherwise (GPU tensors
  staged through the CPU, since two ranks of one NCCL group cannot share a GPU);
- the gManager (debt ledger, creditor directory) is a named actor,
  ``gmanager-<uuid hex>`` in the Ray namespace ``infinite_llm`` (``ray_gmanager.py``);
- the driver keeps the requests, the schedulers and the rManagers, and samples.

A step is SPMD: the driver hands every instance actor the same step plan in one actor
call each; each runs the layers of the chunks whose home it is, and at every layer all
of them trade queries, new k/v and partials in all-to-alls (``attention/exchange.py``).
They return the logits of the chunks that sample; the driver samples. Each actor keeps
its own copy of the block tables (``KVTables``) and the plan carries only what changed,
so what an actor receives per step does not grow with anyone's context: the plan is
pickled once, put in Ray's object store once, and every actor reads that one object.

Control messages are actor calls, and a step makes few: a heartbeat ping and an
``execute`` per instance actor, then one ``apply_all`` to the gManager carrying every
instance's heartbeat (none when no count moved). Only a step that must borrow adds
gManager calls: ``candidates`` per allocation that borrows, ``lendable_elsewhere`` per
admission the home's own free blocks cannot cover. The rManagers stay in the driver,
where a borrow (``lend``, ``reclaim``) is a local call that cannot deadlock between
actors, and a dead actor's blocks are known without asking it.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta

import ray
import torch
import torch.distributed as dist

from infinite_llm.attention.dist import DistAttention
from infinite_llm.attention.exchange import Exchanged, Shapes
from infinite_llm.attention.kv_cache import KVCache
from infinite_llm.attention.plan import NO_ATTENTION, KVLayout, on_device
from infinite_llm.attention.tables import KVTables
from infinite_llm.config import EngineConfig, GraphConfig, PoolingConfig, RayConfig
from infinite_llm.core.step import (
    BlockMove,
    InstanceFailure,
    StepPlan,
    StepResult,
    decode_plan,
    encode_plan,
)
from infinite_llm.engine.builder import assemble, blocks_per_instance, graphs_on, sampler_for
from infinite_llm.engine.decode_graphs import DecodeGraphs
from infinite_llm.engine.device import torch_dtype
from infinite_llm.engine.engine import LLMEngine
from infinite_llm.engine.host_memory import keep_freed_host_memory, trim_host_memory
from infinite_llm.engine.model_runner import (
    StepInputs,
    build_model,
    graph_logits,
    sample_logits,
)
from infinite_llm.engine.sampler import Sampler
from infinite_llm.model.checkpoint import Checkpoint, load_checkpoint
from infinite_llm.transport.collective import Exchange, backend_for
from infinite_llm.transport.ray_gmanager import RemoteGManager

logger = logging.getLogger(__name__)

# Survivors blocked on a dead peer give up after this long (gloo's default is 30 min).
COLLECTIVE_TIMEOUT_S = 20


class InstanceActor:
    """One instance: its model replica, its KV tensors, its rank in the tensor group
    (instances alive, in id order: rank = position of its id)."""

    def __init__(
        self, instance_id: int, model: str, dtype: torch.dtype, device: str, own_gpu: bool,
        num_blocks: int, block_size: int, threads: int, graphs: GraphConfig | None = None,
    ) -> None:
        torch.set_num_threads(threads)
        self.rank = instance_id
        # Ray shows an actor only the GPU it was given: "cuda" is that one (NCCL wants
        # its index).
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.backend = backend_for(self.device, own_gpu)
        if self.device.type == "cpu":
            keep_freed_host_memory()
        self.model = build_model(load_checkpoint(model), dtype, self.device)
        config = self.model.config
        self.kv_cache = KVCache(config, num_blocks, block_size, dtype, self.device)
        if self.device.type == "cpu":
            trim_host_memory()  # what loading freed goes back (only what steps free is kept)
        self.scale = config.head_dim**-0.5
        self.shapes = Shapes(config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        self.layout = KVLayout.for_model(config, block_size, dtype, self.device)
        self.tables = KVTables()
        self.alive: list[int] = []
        self.exchange: Exchange | None = None
        # A step none of whose sequences crosses an instance is this actor's alone: on a
        # GPU its decodes replay CUDA graphs, as in process (``engine/decode_graphs.py``).
        self.graphs = DecodeGraphs.on_gpu(self.model, {self.rank: self.kv_cache}, self.scale,
                                          graphs)

    def endpoint(self) -> str:
        """host:port where a new tensor group can meet (asked of the lowest alive instance)."""
        host = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((host, 0))
            return f"{host}:{s.getsockname()[1]}"

    def join(self, address: str, alive: list[int]) -> int:
        """(Re)form the tensor group of the ``alive`` instances. The block tables start
        empty: after a failure the driver resends every table whole."""
        if dist.is_initialized():
            dist.destroy_process_group()
        self.tables.clear()
        self.alive = sorted(alive)
        rank = self.alive.index(self.rank)
        dist.init_process_group(
            self.backend, init_method=f"tcp://{address}", rank=rank,
            world_size=len(self.alive), timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
            device_id=self.device if self.backend == "nccl" else None,
        )
        self.exchange = Exchange(rank, len(self.alive), self.device, self.backend,
                                 instances=self.alive)
        return self.rank

    def placement(self) -> tuple[str, str]:
        """(device, tensor-group backend) of this actor, as it sees them."""
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return f"{self.device} ({name})", self.backend

    def ready(self) -> int:
        return self.rank

    @ray.method(concurrency_group="control")
    def heartbeat(self) -> bool:
        """Answered on a thread of its own, even while a step runs: silence means the
        process itself is stopped or gone, not busy. Says whether its step is waiting on
        peers in an exchange (rather than computing)."""
        return self.exchange is not None and self.exchange.waiting

    def exchange_latency(self, floats_per_peer: int, repeats: int) -> float:
        """Seconds per all-to-all of ``floats_per_peer`` to every peer (every instance must
        call this at once): the per-layer cost of one DistAttention exchange."""
        send = [
            torch.zeros(0 if j == self.rank else floats_per_peer, device=self.device)
            for j in self.alive
        ]
        sizes = [0 if j == self.rank else floats_per_peer for j in self.alive]
        self.exchange(send, sizes)
        start = time.perf_counter()
        for _ in range(repeats):
            self.exchange(send, sizes)
        return (time.perf_counter() - start) / repeats

    @torch.inference_mode()
    def execute(self, encoded: bytes) -> tuple[torch.Tensor | None, float, int]:
        """Apply the plan's table changes and moves, run my chunks of it: the logits of
        those that sample (in plan order), the seconds the moves took here and the
        bytes they brought here."""
        plan = decode_plan(encoded)
        self.tables.apply(plan)
        start, received = time.perf_counter(), 0
        if plan.moves:
            received = self._move(plan.moves)
        return self._compute(plan), time.perf_counter() - start if plan.moves else 0.0, received

    def _compute(self, plan: StepPlan) -> torch.Tensor | None:
        mine = [c for c in plan.chunks if c.home == self.rank]
        crosses = any(
            owner != c.home for c in plan.chunks for owner in self.tables[c.request_id].by_owner
        )
        pools = {self.rank: self.kv_cache}
        if not crosses:
            if not mine:
                return None
            step = StepInputs.build(mine, self.tables, self.layout, move=False)
            if (logits := graph_logits(self.graphs, step, mine)) is not None:
                return logits.cpu()
            step = on_device(step, self.device)
            attend = DistAttention(step.attention, pools, self.scale)
            return self._logits(self.model(step.input_ids, step.positions, attend), mine)
        # Every instance derives every home's share of the step, so each knows what the
        # exchanges will carry.
        inputs = {}
        for home in self.alive:
            chunks = [c for c in plan.chunks if c.home == home]
            if chunks:
                inputs[home] = StepInputs.build(chunks, self.tables, self.layout)
        plans = {home: inputs[home].attention if home in inputs else NO_ATTENTION
                 for home in self.alive}
        remote = Exchanged(self.rank, self.kv_cache, plans, self.exchange, self.shapes, self.scale)
        attend = DistAttention(plans[self.rank], pools, self.scale, remote)
        if not mine:
            for layer in range(self.model.config.num_hidden_layers):
                attend.serve(layer)
            return None
        own = inputs[self.rank]
        return self._logits(self.model(own.input_ids, own.positions, attend), mine)

    def _move(self, moves: tuple[BlockMove, ...]) -> int:
        """A step's migration copies, before it computes anything: every actor sends the
        blocks it is the source of to their targets in one all-to-all over the tensor
        group (sizes known to all from the plan), and writes what it receives. Returns
        the bytes received."""
        position = {peer: n for n, peer in enumerate(self.alive)}
        width = self.kv_cache.floats_per_block()
        send: list[list[torch.Tensor]] = [[] for _ in self.alive]
        sizes = [0] * len(self.alive)
        for move in moves:
            if move.src == self.rank:
                send[position[move.dst]].append(self.kv_cache.read_blocks(move.src_blocks))
            if move.dst == self.rank:
                sizes[position[move.src]] += width * len(move.dst_blocks)
        received = self.exchange(
            [torch.cat(parts) if parts else torch.empty(0) for parts in send], sizes
        )
        offsets = [0] * len(self.alive)
        for move in moves:
            if move.dst == self.rank:
                n, buf = width * len(move.dst_blocks), received[position[move.src]]
                start = offsets[position[move.src]]
                self.kv_cache.write_blocks(move.dst_blocks, buf[start : start + n])
                offsets[position[move.src]] += n
        return sum(t.nbytes for t in received)

    def _logits(self, hidden: torch.Tensor, chunks) -> torch.Tensor | None:
        """The sampling chunks' logits, on the CPU: the driver samples and may have no GPU."""
        if not any(c.sample for c in chunks):
            return None
        return sample_logits(self.model, hidden, chunks).cpu()

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


class RayRunner:
    """The engine's runner on Ray: step plans out, logits back, sampling here.

    Made in two steps: ``RayRunner(config, device, instances)`` joins (or starts) Ray and
    decides where the instances go (``device``); ``start`` then starts the gManager
    actor (``gmanager``, for the cluster to use) and the instance actors."""

    def __init__(self, config: RayConfig, device: str, instances: int) -> None:
        self.config = config
        self.instances = instances
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            if config.address:
                ray.init(address=config.address)
            else:
                # A private local Ray on loopback only.
                ray.init(
                    include_dashboard=False, num_cpus=os.cpu_count(), _node_ip_address="127.0.0.1"
                )
        self.actors: dict[int, ray.actor.ActorHandle] = {}
        self.gmanager: RemoteGManager | None = None
        self.last_plan_bytes = 0  # what each actor received in the last step
        self._pace: deque[float] = deque(maxlen=64)  # recent steps' seconds per token
        try:
            self.device, self.gpus_per_actor = _placement(device, instances)
        except ValueError:
            self.shutdown()
            raise

    def start(
        self, model: str, dtype: torch.dtype, num_blocks: int, block_size: int,
        sampler: Sampler, pooling: PoolingConfig, graphs: GraphConfig | None = None,
    ) -> None:
        """``graphs``: on a GPU, how an actor's decode steps replay CUDA graphs (None: op
        by op, ``enforce_eager``)."""
        self.sampler = sampler
        self.gmanager = RemoteGManager.start(pooling)
        threads = max(1, (os.cpu_count() or 1) // self.instances)
        # Spread over the nodes of a multi-node cluster; one node takes them all otherwise.
        actor = ray.remote(
            num_cpus=0, num_gpus=self.gpus_per_actor, max_restarts=0, scheduling_strategy="SPREAD",
            concurrency_groups={"control": 1},  # heartbeats beside the one step thread
        )(InstanceActor)
        own_gpu = self.gpus_per_actor == 1
        self.actors = {
            i: actor.remote(
                i, model, dtype, str(self.device), own_gpu, num_blocks, block_size, threads,
                graphs,
            )
            for i in range(self.instances)
        }
        self._join()

    def _join(self) -> None:
        """Form the tensor group of the actors alive, meeting at the lowest one's node."""
        alive = sorted(self.actors)
        address = ray.get(self.actors[alive[0]].endpoint.remote())
        ray.get([a.join.remote(address, alive) for a in self.actors.values()])

    def _unresponsive(self) -> list[int]:
        """Actors that missed ``max_missed_heartbeats`` heartbeats in a row."""
        missed = {i: 0 for i in self.actors}
        pending = dict(self.actors)
        while pending:
            pings = {a.heartbeat.remote(): i for i, a in pending.items()}
            ready, _ = ray.wait(list(pings), num_returns=len(pings),
                                timeout=self.config.heartbeat_timeout_s)
            answered = {pings[r] for r in ready}
            for i in list(pending):
                if i in answered:
                    del pending[i]
                else:
                    missed[i] += 1
            if any(missed[i] >= self.config.max_missed_heartbeats for i in pending):
                break
        return [i for i in pending if missed[i] >= self.config.max_missed_heartbeats]

    def _fail(self, dead: list[int]) -> InstanceFailure:
        for i in dead:
            ray.kill(self.actors.pop(i), no_restart=True)
        if self.actors:
            self._join()  # the survivors' tables start empty
        return InstanceFailure(dead)

    def execute(self, plan: StepPlan) -> StepResult:
        self.sampler.apply(plan)  # in the driver: kept whatever becomes of the actors
        if not (plan.chunks or plan.tables or plan.finished or plan.preempted or plan.moves):
            return StepResult()
        try:
            stuck = self._unresponsive()
        except ray.exceptions.RayActorError:
            stuck = []  # a dead actor: the step below finds out which
        if stuck:
            raise self._fail(stuck)
        encoded = encode_plan(plan)
        self.last_plan_bytes = len(encoded)
        shared = ray.put(encoded)  # serialized once, read by every actor
        tokens = max(1, sum(c.num_tokens for c in plan.chunks))
        start = time.monotonic()
        refs = {i: a.execute.remote(shared) for i, a in self.actors.items()}
        results, dead, errors = self._collect(refs, self._deadline(tokens))
        if dead:
            # A survivor's exchange broke with the dead peer: part of the same failure.
            raise self._fail(dead)
        if errors:
            raise errors[0]
        self._pace.append((time.monotonic() - start) / tokens)
        logits_of: dict[str, torch.Tensor] = {}
        for home, (logits, _, _) in results.items():
            sampling = [c for c in plan.chunks if c.home == home and c.sample]
            for chunk, row in zip(sampling, logits if logits is not None else []):
                logits_of[chunk.request_id] = row
        moved = StepResult(
            move_s=max(move_s for _, move_s, _ in results.values()),
            moved_bytes=sum(n for _, _, n in results.values()),
        )
        sampled = [c for c in plan.chunks if c.sample]
        if not sampled:
            return moved
        logits = torch.stack([logits_of[c.request_id] for c in sampled])
        result = self.sampler.sample(logits, sampled)
        return replace(result, move_s=moved.move_s, moved_bytes=moved.moved_bytes)

    def _deadline(self, tokens: int) -> float:
        """Seconds a step of ``tokens`` may take before an actor still computing it is
        stuck: ``step_timeout_factor`` times its tokens at the slowest recent pace, at
        least ``step_timeout_min_s``; none before a step has finished (the first ones
        load and warm up, and nothing says yet how long a step takes)."""
        if not self._pace:
            return math.inf
        expected = tokens * max(self._pace)
        return max(self.config.step_timeout_min_s, self.config.step_timeout_factor * expected)

    def _collect(
        self, refs: dict[int, ray.ObjectRef], deadline_s: float,
    ) -> tuple[dict, list[int], list]:
        """Every actor's answer to one step: (results, the dead, errors). No wait is
        unbounded: while answers are due, the actors still working are pinged every
        ``heartbeat_timeout_s`` (they answer on a thread of their own while they
        compute). One that misses ``max_missed_heartbeats`` in a row is stopped or hung,
        and one still computing (not waiting on peers in an exchange) after
        ``deadline_s``, while a peer has finished or waits on it, is stuck: either is
        killed and counted dead, and its peers, blocked in an exchange with it, fail
        their step soon after (their errors then belong to that failure)."""
        results, dead, errors, killed = {}, [], [], set()
        pending = {ref: i for i, ref in refs.items()}
        missed = dict.fromkeys(refs, 0)
        timeout = self.config.heartbeat_timeout_s
        start = time.monotonic()
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=timeout)
            for ref in ready:
                i = pending.pop(ref)
                try:
                    results[i] = ray.get(ref)
                except ray.exceptions.RayActorError:
                    dead.append(i)
                except ray.exceptions.RayTaskError as error:
                    errors.append(error)  # an exchange broke with a dead peer, or a bug
            working = [i for i in pending.values() if i in self.actors and i not in killed]
            if not working:
                continue
            pings = {self.actors[i].heartbeat.remote(): i for i in working}
            answered, _ = ray.wait(list(pings), num_returns=len(pings), timeout=timeout)
            waiting = {}  # instance -> whether it waits on peers (those that answered)
            for ref in answered:
                try:
                    waiting[pings[ref]] = ray.get(ref)
                except ray.exceptions.RayActorError:
                    pass  # died since: its step's answer says so
            # Past the deadline, an actor still computing is stuck only where a peer shows
            # the step is not simply slow everywhere: it finished, or it waits in an
            # exchange (on NCCL the exchange returns at once and every actor may look
            # busy; then the collective's own timeout speaks).
            late = (time.monotonic() - start > deadline_s
                    and (bool(results) or bool(errors) or any(waiting.values())))
            for i in working:
                missed[i] = 0 if i in waiting else missed[i] + 1
                if missed[i] >= self.config.max_missed_heartbeats:
                    logger.warning("instance %d did not answer %d heartbeats in a row during "
                                   "a step: killed as stuck", i, missed[i])
                elif late and waiting.get(i) is False:
                    logger.warning("instance %d was still computing a step %.1f s after it "
                                   "began (deadline %.1f s): killed as stuck", i,
                                   time.monotonic() - start, deadline_s)
                else:
                    continue
                ray.kill(self.actors[i], no_restart=True)  # its step ends as dead
                killed.add(i)
        return results, dead, errors

    def exchange_latency(self, floats_per_peer: int, repeats: int = 200) -> float:
        """Mean seconds of one all-to-all among the actors (see InstanceActor)."""
        times = ray.get(
            [a.exchange_latency.remote(floats_per_peer, repeats) for a in self.actors.values()]
        )
        return max(times)

    def kill(self, instance_id: int) -> None:
        """Kill one instance's actor (an operator taking it down, or a fault test)."""
        ray.kill(self.actors[instance_id], no_restart=True)

    def shutdown(self) -> None:
        """Kill the actors (the gManager's too), and the Ray this runner started, if it did."""
        for a in self.actors.values():
            ray.kill(a, no_restart=True)
        self.actors = {}
        if ray.is_initialized() and self.gmanager is not None:
            self.gmanager.kill()
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()


def build_ray(config: EngineConfig, load: Callable[[], Checkpoint]) -> LLMEngine:
    """One Ray actor per instance (model replica + KV tensors), the gManager a named
    actor, the bookkeeping and sampling in this process. Ray is joined (or started)
    first, to see which devices it offers; anything started is stopped on failure."""
    ray_runner = RayRunner(config.parallel.ray, config.device, config.parallel.instances)
    try:
        graphs = graphs_on(config, ray_runner.device)
        dtype = torch_dtype(config.dtype, ray_runner.device)
        checkpoint = load()
        tiers = blocks_per_instance(config, checkpoint, dtype, ray_runner.device)
        ray_runner.start(
            config.model, dtype, tiers.total, config.cache.block_size,
            sampler_for(config, checkpoint),
            config.pooling,
            graphs,
        )
        engine = assemble(config, checkpoint, tiers, ray_runner, ray_runner.gmanager)
        # A lost gManager is rebuilt from what the rManagers hold.
        ray_runner.gmanager.restore = engine.cluster.ledger_reports
        return engine
    except BaseException:
        ray_runner.shutdown()
        raise


def _placement(device: str, instances: int) -> tuple[torch.device, float]:
    """Where the instance actors go: (device each sees, GPUs each asks Ray for). ``auto``
    means a GPU when the Ray cluster has any; with fewer GPUs than instances, actors
    share them in equal fractions (whole GPUs go one per actor)."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if device == "auto":
        device = "cuda" if gpus else "cpu"
    if device == "cpu":
        return torch.device("cpu"), 0
    if device != "cuda":
        raise ValueError(
            f"device {device!r}: with backend='ray' use auto, cpu or cuda (Ray gives each "
            "instance actor its own GPU, which it sees as 'cuda')"
        )
    if not gpus:
        raise ValueError("device 'cuda' asked for, but the Ray cluster has no GPU")
    return torch.device("cuda"), gpu_share(instances, gpus)


def gpu_share(instances: int, gpus: int) -> float:
    """GPUs each instance actor asks for: 1 when there are enough, else an equal share of
    the busiest GPU (Ray counts resources in steps of 1e-4, so round down)."""
    per_gpu = math.ceil(instances / gpus)
    return 1 if per_gpu == 1 else math.floor(10_000 / per_gpu) / 10_000
