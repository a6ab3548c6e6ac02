"""The bookkeeping of a cluster's instances and the gManager between them.

Each instance has its own block pool, rManager and scheduler; the gManager keeps the
debt ledger from their heartbeats. A cluster step is every instance scheduling its own
requests; a runner then computes the chunks (in this process, or on one Ray actor per
instance), with DistAttention reaching each rBlock on its owner. No tensors here: the
runner owns each instance's KV tensors.
The gManager is a plain ``GManager`` in this process unless one is given: the Ray
backend gives a proxy to its gManager actor, with the same methods.
With ``PoolingConfig(enabled=False)`` the instances never lend: N isolated replicas.
"""

from __future__ import annotations

from dataclasses import dataclass

from infinite_llm.config import CacheConfig, PoolingConfig, SchedulerConfig
from infinite_llm.engine.request import Request, RequestStatus
from infinite_llm.engine.scheduler import Scheduler, SchedulerOutput
from infinite_llm.memory.block_pool import BlockPool
from infinite_llm.memory.gmanager import GManager, Ledger
from infinite_llm.memory.rmanager import RManager
from infinite_llm.transport.local import LocalTransport


@dataclass
class Instance:
    """One replica's memory bookkeeping and scheduling."""

    instance_id: int
    rmanager: RManager
    scheduler: Scheduler


class Cluster:
    def __init__(
        self,
        num_blocks: int,
        cache: CacheConfig,
        scheduler: SchedulerConfig,
        pooling: PoolingConfig,
        num_instances: int,
        gmanager: GManager | None = None,
    ) -> None:
        if num_instances < 1:
            raise ValueError(f"instances must be at least 1, got {num_instances}")
        if num_blocks < 1:
            raise ValueError(
                f"kv_cache_memory={cache.kv_cache_memory} bytes holds no block of "
                f"{cache.block_size} tokens for this model"
            )
        self.block_size = cache.block_size
        self.pooling = pooling
        self.gmanager = gmanager if gmanager is not None else GManager(config=pooling)
        self.transport = LocalTransport()
        self.instances: list[Instance] = []
        for i in range(num_instances):
            rmanager = RManager(i, BlockPool(num_blocks), pooling, self.gmanager, self.transport.call)
            self.transport.register(i, rmanager)
            self.gmanager.register(i, num_blocks)
            self.instances.append(
                Instance(
                    i,
                    rmanager,
                    Scheduler(scheduler, rmanager, cache.block_size, arbiter=self),
                )
            )
        # Depends only on which instances are registered: asked again when one leaves.
        self._max_request_blocks = self.gmanager.max_request_blocks()
        self._load = [0] * num_instances  # tokens of KV its unfinished requests may need
        self.dead: set[int] = set()
        self._arrivals = 0
        self._victims: list[Request] = []  # newer requests to preempt for stuck older ones
        self._stuck = False  # an older request could not grow this step

    @property
    def blocks_per_instance(self) -> int:
        return self.instances[0].rmanager.capacity

    @property
    def max_request_tokens(self) -> int:
        """The most KV one request can ever hold: its home's pool plus all it may borrow."""
        return self._max_request_blocks * self.block_size

    def add(self, request: Request) -> None:
        """Give the request a home, the least loaded instance, and queue it there."""
        alive = [i.instance_id for i in self.alive_instances]
        request.home = min(alive, key=lambda i: (self._load[i], i))
        request.arrival = self._arrivals
        self._arrivals += 1
        self._load[request.home] += request.max_total_tokens
        self.instances[request.home].scheduler.add(request)

    def schedule(self) -> SchedulerOutput:
        """Every instance's step plan, one after the other, oldest work first (their
        borrowing sees each other's allocations at once, through the creditors' answers)."""
        chunks, preempted = [], []
        # Preempt first the newer requests that stood in an older one's way last step, and
        # admit nothing new this step: the freed blocks are the older request's.
        self._stuck = bool(self._victims)
        for victim in self._victims:
            if victim.status is RequestStatus.RUNNING:
                self.instances[victim.home].scheduler.preempt(victim)
                preempted.append(victim.request_id)
        self._victims = []
        for inst in sorted(self.alive_instances, key=self._oldest):
            plan = inst.scheduler.schedule()
            chunks += plan.chunks
            preempted += plan.preempted
        return SchedulerOutput(chunks, preempted)

    @staticmethod
    def _oldest(inst: Instance) -> tuple[int, int]:
        """Instances whose oldest running request is older schedule first, so blocks go
        to the oldest work and it always advances; idle instances last."""
        running = inst.scheduler.running
        return (min(r.arrival for r in running) if running else 1 << 62, inst.instance_id)

    def defer_for(self, request: Request) -> bool:
        """The newest running request anywhere that is newer than ``request`` and holds
        blocks is preempted at the start of the next step; ``request`` waits for it.
        Without one, the caller preempts ``request`` itself."""
        self._stuck = True
        newer = [
            r
            for inst in self.alive_instances
            for r in inst.scheduler.running
            if r.arrival > request.arrival and r.block_table.num_blocks and r not in self._victims
        ]
        if not newer:
            return False
        self._victims.append(max(newer, key=lambda r: r.arrival))
        return True

    def admission_open(self) -> bool:
        return not self._stuck

    def update(self, plan: SchedulerOutput) -> None:
        """Advance the progress counters once the step has run."""
        for inst in self.instances:
            inst.scheduler.update(plan)

    @property
    def alive_instances(self) -> list[Instance]:
        return [inst for inst in self.instances if inst.instance_id not in self.dead]

    def remove_instance(self, dead: int) -> list[Request]:
        """An instance died with its KV: every request whose home or any rBlock was there
        gives all its blocks back and loses its progress; they are returned (unqueued) for
        the engine to re-add or fail. The dead instance leaves the ledger."""
        affected = []
        for inst in self.alive_instances:
            for request in [*inst.scheduler.running, *inst.scheduler.waiting]:
                if request.home == dead or dead in request.block_table.owners():
                    affected.append(request)
        for request in affected:
            scheduler = self.instances[request.home].scheduler
            scheduler.unqueue(request)
            self._load[request.home] -= request.max_total_tokens
        self.dead.add(dead)
        self.heartbeat()
        self.gmanager.remove(dead)
        self._max_request_blocks = self.gmanager.max_request_blocks()
        return affected

    def heartbeat(self) -> None:
        """Tell the gManager what changed on every live instance: one message for all of
        them (an actor call on Ray), none when nothing did. The engine sends one at the
        end of every step and abort, so between its calls the ledger is current."""
        beats = [inst.rmanager.heartbeat() for inst in self.alive_instances]
        changed = [beat for beat in beats if not beat.is_empty]
        if changed:
            self.gmanager.apply_all(changed)

    def finish(self, request: Request, reason: str, stop_reason: str | int | None = None) -> None:
        """End a request on its home: every block, local and lent, goes back."""
        if not request.finished:
            self._load[request.home] -= request.max_total_tokens
        self.instances[request.home].scheduler.finish(request, reason, stop_reason)

    def has_work(self) -> bool:
        return any(inst.scheduler.has_work() for inst in self.alive_instances)

    @property
    def num_preemptions(self) -> int:
        return sum(inst.scheduler.num_preemptions for inst in self.instances)

    def ledger(self) -> Ledger:
        """The gManager's ledger as of the last heartbeat; reading it changes nothing."""
        return self.gmanager.ledger()

    def check_integrity(self) -> None:
        """Every pool sound; every (owner, block) held by exactly one live request or free;
        each instance's used + lent equals what the requests' tables place on it; the
        ledger balances."""
        held: dict[int, list[int]] = {inst.instance_id: [] for inst in self.instances}
        for inst in self.alive_instances:
            inst.rmanager.check_integrity()
            for request in [*inst.scheduler.running, *inst.scheduler.waiting]:
                for rb in request.block_table.rblocks:
                    held[rb.owner].extend(rb.block_ids)
        for inst in self.alive_instances:
            ids = held[inst.instance_id]
            assert len(ids) == len(set(ids)), f"instance {inst.instance_id}: a block has two holders"
            rm = inst.rmanager
            assert len(ids) == rm.num_used + rm.num_lent, (
                f"instance {inst.instance_id}: tables hold {len(ids)} blocks, "
                f"used {rm.num_used} + lent {rm.num_lent}"
            )
        self.ledger().check_balanced()
