"""The bookkeeping of a cluster: its instances, the gManager between them, and the two
halves of every step around the runner: ``schedule`` (a ``StepPlan``) and ``update``
(progress, sampled tokens, stops, finishing, freeing, the heartbeat).

Each instance has its own block pool, rManager and scheduler; the gManager keeps the
debt ledger from their heartbeats (a plain ``GManager`` here, or on Ray a proxy to its
actor with the same methods). Where a request lives (``Placement``), how much KV each
instance has committed (``KVLoad``) and who gives way when blocks run out across
instances (``OldestFirst``) each have an owner of their own. With
``PoolingConfig(enabled=False)`` the instances never lend: N isolated replicas.
Pure bookkeeping: no torch, so the simulator drives this very code.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

from infinite_llm.config import CacheConfig, PoolingConfig, SchedulerConfig
from infinite_llm.core.instance import Instance
from infinite_llm.core.cost_model import CostModel
from infinite_llm.core.dgfm import debt_graph, plan_cancellation, plan_recalls
from infinite_llm.core.load import KVLoad
from infinite_llm.core.migration import Migrator
from infinite_llm.core.placement import LeastLoaded, Placement
from infinite_llm.core.planner import (
    Candidate,
    GreedyPlanner,
    InstanceLoad,
    MoveOrder,
    RehomeOrder,
)
from infinite_llm.core.preemption import OldestFirst
from infinite_llm.core.request import Request, RequestStatus
from infinite_llm.core.scheduler import Scheduler
from infinite_llm.core.snapshot import (
    ClusterSnapshot,
    InstanceSnapshot,
    MigrationSnapshot,
    RequestSnapshot,
)
from infinite_llm.core.step import NewRequest, SampledToken, StepPlan, StepResult
from infinite_llm.memory.block_pool import BlockPool, Tier, Tiers
from infinite_llm.memory.gmanager import GManager, Ledger, max_request_blocks
from infinite_llm.memory.rmanager import Heartbeat, RManager, lendable

logger = logging.getLogger(__name__)

# The engine's look at each sampled token before the cluster's own checks: detokenize,
# keep logprobs; returns the stop string that ends the request, if one did.
Observer = Callable[[Request, SampledToken], "str | None"]


class Cluster:
    def __init__(
        self,
        num_blocks: Tiers | int,
        cache: CacheConfig,
        scheduler: SchedulerConfig,
        pooling: PoolingConfig,
        num_instances: int,
        eos_token_ids: tuple[int, ...] = (),
        gmanager: GManager | None = None,
        placement: Placement | None = None,
    ) -> None:
        if num_instances < 1:
            raise ValueError(f"instances must be at least 1, got {num_instances}")
        tiers = Tiers(num_blocks) if isinstance(num_blocks, int) else num_blocks
        if tiers.device_blocks < 1:
            raise ValueError(
                f"kv_cache_memory={cache.kv_cache_memory} bytes holds no block of "
                f"{cache.block_size} tokens for this model"
            )
        self.block_size = cache.block_size
        self.tiers = tiers
        self.pooling = pooling
        self.eos_token_ids = eos_token_ids
        self.gmanager = gmanager if gmanager is not None else GManager(config=pooling)
        self.placement = placement if placement is not None else LeastLoaded()
        self.load = KVLoad()
        self.preemption = OldestFirst(self._preempt_elsewhere)
        self.planner = (
            GreedyPlanner(CostModel.load(pooling.cost_model), cache.block_size)
            if pooling.planner_period else None
        )
        self.instances: list[Instance] = []
        for i in range(num_instances):
            rmanager = RManager(i, BlockPool(tiers), pooling, self.gmanager, self._call)
            self.gmanager.register(i, tiers.total)
            sched = Scheduler(scheduler, rmanager, cache.block_size, self.preemption, self.planner)
            self.instances.append(Instance(i, rmanager, sched))
        self.migrator = Migrator(
            self.instances, cache.block_size, pooling.migration_tokens_per_step,
            pooling.migration_lease_steps, tiers,
        )
        # Depends only on which instances are registered: asked again when one leaves.
        self._max_request_blocks = self.gmanager.max_request_blocks()
        self.dead: set[int] = set()
        self.requests: dict[str, Request] = {}  # every unfinished request
        self._arrivals = 0
        self._steps = 0
        self._attended_block_steps = 0  # locality, summed over steps (see the snapshot)
        self._remote_block_steps = 0
        self._computed_tokens = 0  # tokens the runners computed (recomputes included)
        self._computed_at: Counter[int] = Counter()  # of those, by the request's home
        self._moved_bytes = 0  # what the runners reported the plans' moves cost
        self._stall_s = 0.0
        self._rehomed = 0
        # What the runners have not heard yet: requests added, requests ended, requests
        # preempted on another instance's behalf during this step's scheduling.
        self._new: dict[str, NewRequest] = {}
        self._finished: list[str] = []
        self._preempted: list[Request] = []

    def _call(self, instance_id: int, method: str, *args: Any) -> Any:
        """The transport verb between rManagers: they all live with the bookkeeping, so a
        lend or a reclaim is a direct call, whatever the backend."""
        return getattr(self.instances[instance_id].rmanager, method)(*args)

    # -- requests in and out -----------------------------------------------------------

    @property
    def blocks_per_instance(self) -> int:
        """Device blocks of each instance (``tiers`` has the host tier's too)."""
        return self.tiers.device_blocks

    @property
    def max_request_tokens(self) -> int:
        """The most KV one request can ever hold: its home's pool plus all it may borrow,
        both tiers counted."""
        return self._max_request_blocks * self.block_size

    @property
    def max_request_device_tokens(self) -> int:
        """Of ``max_request_tokens``, what device memory alone could hold."""
        device = {inst.instance_id: self.tiers.device_blocks for inst in self.alive_instances}
        return max_request_blocks(device, self.pooling) * self.block_size

    @property
    def alive_instances(self) -> list[Instance]:
        return [inst for inst in self.instances if inst.instance_id not in self.dead]

    def add(self, request: Request) -> None:
        """Queue a validated request on the home the placement policy picks."""
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        request.arrival = self._arrivals
        request.stall_mark = self._stall_s
        self._arrivals += 1
        self.requests[request.request_id] = request
        self._new[request.request_id] = NewRequest(request.request_id, request.params)
        self._enqueue(request)

    def _enqueue(self, request: Request) -> None:
        alive = [inst.instance_id for inst in self.alive_instances]
        request.home = self.placement.home(request, alive, self.load)
        self.load.add(request)
        self.instances[request.home].scheduler.add(request)

    def finish(self, request: Request, reason: str, stop_reason: str | int | None = None) -> None:
        """End a request on its home: every block, local and lent, goes back."""
        if request.finished:
            return
        self.migrator.abort(request.request_id)
        blocks = request.block_table.blocks_by_owner()
        held = sum(blocks.values())
        request.remote_kv_share = (held - blocks.get(request.home, 0)) / held if held else 0.0
        request.migration_stall_s = self._stall_s - request.stall_mark
        self.instances[request.home].scheduler.finish(request, reason, stop_reason)
        self.load.remove(request)
        self._forget(request)

    def abort(self, request_id: str) -> Request | None:
        """End a request now, its blocks freed and the gManager told; None if unknown."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        self.finish(request, "abort")
        self.heartbeat()
        return request

    def _forget(self, request: Request) -> None:
        del self.requests[request.request_id]
        # A request the runners never heard of needs no goodbye.
        if self._new.pop(request.request_id, None) is None:
            self._finished.append(request.request_id)

    def has_work(self) -> bool:
        return any(inst.scheduler.has_work() for inst in self.alive_instances)

    # -- the step ------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        """Every instance's batch, oldest work first (their borrowing sees each other's
        allocations at once, through the creditors' answers), as one plan with what
        the runners must learn first."""
        chunks, preempted = [], []
        for inst in self.preemption.order(self.alive_instances):
            batch = inst.scheduler.schedule()
            chunks += batch.chunks
            preempted += batch.preempted
        preempted += self._preempted
        self._preempted = []
        # A request preempted for an older one elsewhere may have been scheduled first.
        gone = {r.request_id for r in preempted}
        chunks = [c for c in chunks if c.request_id not in gone]
        for request_id in gone:
            self.migrator.abort(request_id)
        self._steps += 1
        if self.pooling.dgfm_period and self._steps % self.pooling.dgfm_period == 0:
            self.defragment()
        elif self._host_in_use():
            self.recall(host_only=True)
        if self.planner is not None and self._steps % self.pooling.planner_period == 0:
            self.replan()
        moves = self.migrator.advance()
        tables = []
        for chunk in chunks:
            request = self.requests[chunk.request_id]
            update = request.block_table.take_update(chunk.request_id)
            if update is not None:
                tables.append(update)
            blocks = request.block_table.blocks_by_owner()
            total = sum(blocks.values())
            self._attended_block_steps += total
            self._remote_block_steps += total - blocks.get(request.home, 0)
        plan = StepPlan(
            chunks=tuple(chunks),
            tables=tuple(tables),
            new_requests=tuple(self._new.values()),
            preempted=tuple(gone),
            finished=tuple(self._finished),
            moves=tuple(moves),
        )
        self._new, self._finished = {}, []
        return plan

    def migrate(self, request_id: str, first_block: int, count: int, target: int) -> bool:
        """Start moving blocks ``first_block ..`` (``count`` of them, all on one other
        instance) of a running request to ``target`` while it keeps decoding; the copies
        ride on the next plans and the table switches when they are done. False when the
        target refuses the reservation (its rManager's answer, not the gManager's view)."""
        request = self.requests.get(request_id)
        if request is None or request.status is not RequestStatus.RUNNING:
            raise ValueError(f"request {request_id!r} is not running")
        if target in self.dead or not 0 <= target < len(self.instances):
            raise ValueError(f"instance {target} is not a live instance")
        return self.migrator.start(request, first_block, count, target)

    def replan(self) -> list[MoveOrder | RehomeOrder]:
        """One pass of the greedy planner (``core/planner.py``) over the ledger's view:
        waiting requests their home cannot admit go to instances with room, then the
        moves it orders start as live migrations. A target that refuses is left for the
        next pass. Returns the orders carried out."""
        assert self.planner is not None, "the planner is off (planner_period = 0)"
        self.heartbeat()
        done: list[MoveOrder | RehomeOrder] = []
        if not any(inst.scheduler.waiting for inst in self.alive_instances):
            return done  # nobody waits: no debtor, nothing to rehome

        for rehome in self.planner.rehome(self._loads()[0]):
            request = self.requests[rehome.request_id]
            # The target's own count is the authority (the ledger may be stale).
            target = self.instances[rehome.target]
            room = target.rmanager.num_free - len(target.scheduler.running)
            if request.num_blocks_needed(self.block_size) > room:
                continue
            self.instances[request.home].scheduler.waiting.remove(request)
            self.load.remove(request)
            request.home = rehome.target
            self.load.add(request)
            self.instances[request.home].scheduler.add(request)
            self._rehomed += 1
            done.append(rehome)
        loads, candidates = self._loads()
        for order in self.planner.plan(loads, candidates):
            if self.migrator.start(self.requests[order.request_id], order.first_block,
                                   order.count, order.target):
                done.append(order)
        return done

    def _loads(self) -> tuple[list[InstanceLoad], list[Candidate]]:
        """The live instances as the planner sees them (free space from the ledger), and
        the runs of blocks it may move: each running request's first run at its home."""
        ledger = self.ledger()
        loads, candidates = [], []
        busy = set(self.migrator.active)
        for inst in self.alive_instances:
            running, waiting = inst.scheduler.running, inst.scheduler.waiting
            entry = ledger.instances[inst.instance_id]
            loads.append(InstanceLoad(
                inst.instance_id,
                free=entry.free,
                lendable=lendable(self.pooling, entry.capacity, entry.free,
                                  sum(entry.lent_to.values())),
                running=len(running),
                context_tokens=sum(r.num_tokens for r in running),
                waiting_blocks=tuple(r.num_blocks_needed(self.block_size) for r in waiting),
                remote_pairs=sum(len(r.block_table.owners()) - 1 for r in running),
                waiting_ids=tuple(r.request_id for r in waiting),
                growth=sum(
                    max(0, r.max_blocks(self.block_size) - r.block_table.num_blocks)
                    for r in running
                ),
            ))
            for r in running:
                if r.request_id in busy:
                    continue
                for rb in r.block_table.rblocks:
                    if rb.owner == r.home:
                        candidates.append(Candidate(r.request_id, r.home, rb.first_block,
                                                    rb.num_blocks))
                        break
        return loads, candidates

    def defragment(self) -> tuple[int, int]:
        """One DGFM pass (``core/dgfm.py``): debtors with free device blocks start taking
        their blocks home (from host memory first), then one debt cycle is cancelled in
        the next plan. Returns (recalls started, cycles planned)."""
        recalls = self.recall()
        self.heartbeat()
        running = [r for r in self.requests.values() if r.status is RequestStatus.RUNNING]
        legs = plan_cancellation(debt_graph(self.ledger()), running, set(self.migrator.active))
        if legs:
            self.migrator.cancel_cycle(legs)
        return recalls, int(bool(legs))

    def recall(self, host_only: bool = False) -> int:
        """Start migrations into free device memory: blocks in host memory first (into
        their home's, else wherever there is most), then (unless ``host_only``) blocks
        on creditors into their home's. Returns how many started."""
        busy = set(self.migrator.active)
        running = [r for r in self.requests.values() if r.status is RequestStatus.RUNNING]
        # Room a home may use: its free device blocks, less the room kept for growth.
        free = {
            inst.instance_id: inst.rmanager.pool.free_in(Tier.DEVICE) - inst.rmanager.keep
            for inst in self.alive_instances
        }
        started = 0
        for recall in plan_recalls(running, free, busy, self.tiers, remote=not host_only):
            started += self.migrator.start(recall.request, recall.first_block, recall.count,
                                           recall.target, kind="recall")
        return started

    def _host_in_use(self) -> bool:
        """Whether any live instance holds KV in its host tier."""
        host = self.tiers.host_blocks
        return bool(host) and any(
            inst.rmanager.pool.free_in(Tier.HOST) < host for inst in self.alive_instances
        )

    def _preempt_elsewhere(self, request: Request) -> None:
        """Preempt ``request`` for an older one on another instance, and tell the gManager
        at once: the older request borrows its freed blocks in this very step."""
        self.instances[request.home].scheduler.preempt(request)
        self._preempted.append(request)
        self.heartbeat()

    def update(
        self, plan: StepPlan, result: StepResult, observe: Observer | None = None
    ) -> list[Request]:
        """The step ran: advance progress, append each sampled token, finish on a stop
        string (``observe``), a stop token, EOS or max_tokens, then heartbeat. Returns
        the requests that got a token, in the result's order (finished ones included)."""
        for chunk in plan.chunks:
            request = self.requests[chunk.request_id]
            request.num_computed_tokens += chunk.num_tokens
            self._computed_tokens += chunk.num_tokens
            self._computed_at[request.home] += chunk.num_tokens
        self._moved_bytes += result.moved_bytes
        self._stall_s += result.move_s
        advanced = []
        for request_id, token in result.tokens.items():
            request = self.requests[request_id]
            request.output_token_ids.append(token.token_id)
            stop = observe(request, token) if observe is not None else None
            params = request.params
            if stop is not None:
                self.finish(request, "stop", stop)
            elif token.token_id in params.stop_token_ids:
                self.finish(request, "stop", token.token_id)
            elif not params.ignore_eos and token.token_id in self.eos_token_ids:
                self.finish(request, "stop", None)
            elif len(request.output_token_ids) >= request.max_tokens:
                self.finish(request, "length")
            advanced.append(request)
        self.heartbeat()
        return advanced

    def steady_steps(self, plan: StepPlan, token_id: int) -> int:
        """How many steps after ``plan`` (just updated) are sure to repeat it with only
        counters changing, were each of its requests to sample ``token_id``: ``plan``
        decoded one token of every running request and nothing else happened (nobody
        waits, nothing was added, ended, preempted or moved, no migration is under
        way, no host block is in use); none of them ends in those steps, nor needs a
        new block; no DGFM pass falls in them unless nobody owes anybody (then it has
        nothing to recall or cancel). The planner may: with nobody waiting it has no
        debtor and orders nothing. 0 when ``plan`` is not such a step."""
        if (plan.new_requests or plan.finished or plan.preempted or plan.moves
                or self.migrator.active or self._new or self._finished or self._preempted):
            return 0
        live = self.alive_instances
        if any(inst.scheduler.waiting for inst in live) or self._host_in_use():
            return 0
        if len(plan.chunks) != sum(len(inst.scheduler.running) for inst in live):
            return 0
        steps = None
        for chunk in plan.chunks:
            request = self.requests.get(chunk.request_id)
            if request is None or chunk.num_tokens != 1 or not chunk.sample:
                return 0
            params = request.params
            if token_id in params.stop_token_ids or (
                    not params.ignore_eos and token_id in self.eos_token_ids):
                return 0
            # Outputs before the one that ends it; steps before a block is needed (the
            # j-th next step computes the token at num_tokens - 2 + j).
            to_last = request.max_tokens - len(request.output_token_ids) - 1
            room = request.block_table.num_blocks * self.block_size - request.num_tokens + 1
            steps = min(to_last, room) if steps is None else min(steps, to_last, room)
        if steps is None:
            return 0
        period = self.pooling.dgfm_period
        if period and any(inst.rmanager.borrowed_from for inst in live):
            steps = min(steps, period - 1 - self._steps % period)
        return max(0, steps)

    def fast_forward(self, plan: StepPlan, steps: int, token_id: int) -> None:
        """Account ``steps`` repeats of the steady decode ``plan`` at once (see
        ``steady_steps``): each of its requests computes and samples ``token_id``
        ``steps`` times; the counters a step moves move as ``steps`` of them would."""
        if not 0 < steps <= self.steady_steps(plan, token_id):
            raise ValueError(f"{steps} steps are not all steady after this plan")
        self._steps += steps
        self.migrator.step += steps  # its clock, as each plan's advance() would move it
        for chunk in plan.chunks:
            request = self.requests[chunk.request_id]
            request.num_computed_tokens += steps
            self._computed_at[request.home] += steps
            request.output_token_ids.extend([token_id] * steps)
            blocks = request.block_table.blocks_by_owner()
            total = sum(blocks.values())
            self._attended_block_steps += steps * total
            self._remote_block_steps += steps * (total - blocks.get(request.home, 0))
        self._computed_tokens += steps * len(plan.chunks)

    def heartbeat(self) -> None:
        """Tell the gManager what changed on every live instance: one message for all of
        them (an actor call on Ray), none when nothing did. Sent at the end of every
        step and abort, so between them the ledger is current."""
        beats = [inst.rmanager.heartbeat() for inst in self.alive_instances]
        changed = [beat for beat in beats if not beat.is_empty]
        if changed:
            self.gmanager.apply_all(changed)

    def ledger_reports(self) -> list[tuple[int, int, Heartbeat]]:
        """(instance, capacity, everything its rManager holds) of every live instance:
        what a gManager that lost its ledger is rebuilt from (the ledger is soft state)."""
        return [(inst.instance_id, inst.rmanager.capacity, inst.rmanager.report())
                for inst in self.alive_instances]

    # -- failures ------------------------------------------------------------------------

    def fail_instances(self, dead: list[int], plan: StepPlan) -> list[Request]:
        """Instances died with their KV during ``plan``: every request that had its home
        or any rBlock there starts over from its tokens on the survivors, or ends with an
        error when they cannot hold it (returned). The runners may have lost the plan and
        their tables: the next plan says again what ended, announces every live request
        and resends every table whole."""
        self._finished += plan.finished
        # Copies of the failed step may not have run: migrations start over (reserved
        # blocks back), and a request whose table switched in that plan is recomputed.
        switched = {m.request_id for m in plan.moves} - set(self.migrator.active)
        for request_id in list(self.migrator.active):
            self.migrator.abort(request_id, frozenset(dead))
        failed = []
        for instance in dead:
            affected = self._remove_instance(instance, switched)
            switched = set()
            logger.warning(
                "instance %d died; %d request(s) had KV or their home there", instance, len(affected)
            )
            for request in affected:
                if self.alive_instances and request.max_total_tokens <= self.max_request_tokens:
                    self._enqueue(request)  # recomputed from its tokens on a survivor
                    continue
                request.status = RequestStatus.FINISHED
                request.finish_reason = "error"
                request.error = (
                    f"instance {instance} died holding this request's KV, and the surviving "
                    f"instances can hold at most {self.max_request_tokens} tokens for one "
                    f"request (it needs {request.max_total_tokens})"
                )
                self._forget(request)
                failed.append(request)
        for request in self.requests.values():
            request.block_table.resync()
            self._new[request.request_id] = NewRequest(request.request_id, request.params)
        return failed

    def _remove_instance(self, dead: int, also: set[str] = frozenset()) -> list[Request]:
        """Unqueue every request whose home or any rBlock was on ``dead``, and those in
        ``also`` (all blocks back, progress lost); take the instance out of the ledger."""
        affected = [
            r for r in self.requests.values()
            if r.home == dead or dead in r.block_table.owners() or r.request_id in also
        ]
        for request in affected:
            self.instances[request.home].scheduler.unqueue(request)
            self.load.remove(request)
        self.dead.add(dead)
        self.heartbeat()
        self.gmanager.remove(dead)
        self._max_request_blocks = self.gmanager.max_request_blocks()
        return affected

    # -- what it looks like from outside ----------------------------------------------------

    @property
    def num_preemptions(self) -> int:
        return sum(inst.scheduler.num_preemptions for inst in self.instances)

    def ledger(self) -> Ledger:
        """The gManager's ledger as of the last heartbeat; reading it changes nothing."""
        return self.gmanager.ledger()

    def snapshot(self) -> ClusterSnapshot:
        """An immutable picture: every instance's blocks, the ledger, every request's
        home and blocks per owner. Reading it changes nothing."""
        instances = tuple(
            InstanceSnapshot(
                instance_id=inst.instance_id,
                alive=inst.instance_id not in self.dead,
                capacity=inst.rmanager.capacity,
                free=inst.rmanager.num_free,
                used=inst.rmanager.num_used,
                lent=inst.rmanager.num_lent,
                borrowed=sum(inst.rmanager.borrowed_from.values()),
                running=len(inst.scheduler.running),
                waiting=len(inst.scheduler.waiting),
                preemptions=inst.scheduler.num_preemptions,
                host_capacity=self.tiers.host_blocks,
                host_free=inst.rmanager.pool.free_in(Tier.HOST),
                migrated_out=self.migrator.copied_out[inst.instance_id],
                migrated_in=self.migrator.copied_in[inst.instance_id],
                computed_tokens=self._computed_at[inst.instance_id],
            )
            for inst in self.instances
        )
        requests = tuple(
            RequestSnapshot(
                request_id=r.request_id,
                home=r.home,
                status=r.status.value,
                num_tokens=r.num_tokens,
                num_computed_tokens=r.num_computed_tokens,
                blocks=tuple(sorted(r.block_table.blocks_by_owner().items())),
            )
            for r in self.requests.values()
        )
        m = self.migrator
        migration = MigrationSnapshot(
            len(m.active), m.moved_blocks, m.aborted, m.recalls, m.cancelled_cycles,
            copied_blocks=sum(m.copied_in.values()), moved_bytes=self._moved_bytes,
            stall_s=self._stall_s, rehomed=self._rehomed, recent=tuple(m.events),
        )
        return ClusterSnapshot(
            self.block_size, self.max_request_tokens, instances, requests, self.ledger(),
            migration, self._attended_block_steps, self._remote_block_steps,
            self._computed_tokens, self._steps,
        )

    def check_integrity(self) -> None:
        """Every pool sound; every (owner, block) held by exactly one live request or free;
        each instance's used + lent equals what the requests' tables place on it; the
        ledger balances; the requests known are those queued on the live instances."""
        held: dict[int, list[int]] = {inst.instance_id: [] for inst in self.instances}
        for target, ids in self.migrator.reserved():
            held[target].extend(ids)
        queued = 0
        for inst in self.alive_instances:
            inst.rmanager.check_integrity()
            for request in [*inst.scheduler.running, *inst.scheduler.waiting]:
                queued += 1
                assert self.requests.get(request.request_id) is request, (
                    f"request {request.request_id!r} is queued but not known"
                )
                for rb in request.block_table.rblocks:
                    held[rb.owner].extend(rb.block_ids)
        assert queued == len(self.requests), "a known request is queued nowhere"
        for inst in self.alive_instances:
            ids = held[inst.instance_id]
            assert len(ids) == len(set(ids)), f"instance {inst.instance_id}: a block has two holders"
            rm = inst.rmanager
            assert len(ids) == rm.num_used + rm.num_lent, (
                f"instance {inst.instance_id}: tables hold {len(ids)} blocks, "
                f"used {rm.num_used} + lent {rm.num_lent}"
            )
        self.ledger().check_balanced()
