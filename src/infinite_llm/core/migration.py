"""Live KV migration: a run of one request's blocks moves to another instance (or, from
host memory, into device memory) while the request keeps decoding. A protocol over
block ids, no torch:

    start    reserve the blocks on the target (its rManager answers: the gManager's view
             may be stale, and a refusal is simply re-planned later); from now on they
             count as used there, so the ledger balances throughout
    copy     each step, blocks whose KV is final (every slot computed) are copied, within
             a per-step budget of tokens, by the runners before they compute the step
    switch   when what is left fits the step's budget, the rest (the blocks still being
             written included) is copied in the same plan that switches the table, so
             the step's new k, v go to the new blocks; the old ones go back to their owner
    abort    the request ended or was preempted, an instance died, or the lease ran out:
             the reserved blocks go back and the table never changed

Moves are carried by the step plan (``StepPlan.moves``) and run before the step's
compute, so a block freed by a switch is read before anyone can write into it.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass

from infinite_llm.core.dgfm import Leg
from infinite_llm.core.instance import Instance
from infinite_llm.core.request import Request, RequestStatus
from infinite_llm.core.snapshot import MigrationEvent
from infinite_llm.core.step import BlockMove
from infinite_llm.memory.block_pool import Tier, Tiers


@dataclass
class Migration:
    """Blocks ``first_block .. first_block + count`` of ``request``, all on ``source``,
    moving to ``target`` into ``reserved``."""

    request: Request
    source: int
    target: int
    first_block: int
    source_ids: list[int]
    reserved: list[int]
    deadline: int  # the step after which the lease has run out
    copied: int = 0  # blocks of the range copied so far (a prefix of it)
    kind: str = "migrate"  # or "recall": DGFM bringing blocks home or up from host memory

    @property
    def count(self) -> int:
        return len(self.source_ids)


RECENT_EVENTS = 32


class Migrator:
    """The migrations in flight, advanced once per step within ``tokens_per_step``."""

    def __init__(
        self, instances: list[Instance], block_size: int, tokens_per_step: int,
        lease_steps: int, tiers: Tiers | None = None,
    ) -> None:
        self.instances = instances
        self.block_size = block_size
        self.tiers = tiers or Tiers(instances[0].rmanager.capacity)
        # Blocks copied per step, cluster-wide: the budget in tokens, at least one block.
        self.blocks_per_step = max(1, tokens_per_step // block_size)
        self.lease_steps = lease_steps
        self.active: dict[str, Migration] = {}  # by request id: one at a time per request
        self.cycles: list[list[Leg]] = []  # debt cycles to cancel in the next plan
        self.step = 0
        self.moved_blocks = 0  # switched into place, since the start
        self.aborted = 0
        self.recalls = 0  # migrations started by DGFM to bring blocks home
        self.cancelled_cycles = 0
        # Blocks copied out of / into each instance (aborted migrations' copies included).
        self.copied_out: Counter[int] = Counter()
        self.copied_in: Counter[int] = Counter()
        # The latest migrations switched or given up and cycle legs cancelled, newest last.
        self.events: deque[MigrationEvent] = deque(maxlen=RECENT_EVENTS)

    def start(self, request: Request, first_block: int, count: int, target: int,
              kind: str = "migrate") -> bool:
        """Reserve ``count`` device blocks on ``target`` for blocks ``first_block ..`` of
        ``request`` (all on one other instance, or in host memory on ``target``). False
        when ``target`` refuses. A ``kind`` "recall" is DGFM's, counted in ``recalls``."""
        table = request.block_table
        if request.request_id in self.active:
            raise ValueError(f"request {request.request_id!r} is already migrating")
        if count < 1 or first_block < 0 or first_block + count > table.num_blocks:
            raise ValueError(
                f"blocks {first_block}..{first_block + count} are not in the table of "
                f"{table.num_blocks} blocks of request {request.request_id!r}"
            )
        runs = table.rblocks_between(first_block, first_block + count)
        if len({rb.owner for rb in runs}) != 1:
            raise ValueError("a migration moves blocks of one source instance")
        source = runs[0].owner
        up = all(self.tiers.of(b) is Tier.HOST for rb in runs for b in rb.block_ids)
        if source == target and not up:
            raise ValueError(f"blocks {first_block}.. already live on instance {target}")
        home = self.instances[request.home].rmanager
        reserved = home.reserve(request.request_id, target, count)
        if reserved is None:
            return False
        source_ids = [i for rb in runs for i in rb.block_ids]
        self.active[request.request_id] = Migration(
            request, source, target, first_block, source_ids, reserved,
            deadline=self.step + self.lease_steps, kind=kind,
        )
        self.recalls += kind == "recall"
        return True

    def advance(self) -> list[BlockMove]:
        """This step's copies, switching every migration whose rest fits the budget; runs
        after the instances scheduled (so a switch is seen by this step's chunks)."""
        self.step += 1
        moves = [move for legs in self.cycles for move in self._cancel(legs)]
        self.cycles = []
        budget = self.blocks_per_step
        for m in list(self.active.values()):
            if self.step > m.deadline:
                self.abort(m.request.request_id)
                continue
            if budget <= 0:
                break
            left = m.count - m.copied
            if left <= budget:
                moves.append(self._copy(m, m.count))
                budget -= left
                self._switch(m)
                continue
            # Blocks whose every slot is computed hold final KV: they may go now.
            final_kv = m.request.num_computed_tokens // self.block_size - m.first_block
            final = min(max(m.copied, min(m.count, final_kv)), m.copied + budget)
            if final > m.copied:
                budget -= final - m.copied
                moves.append(self._copy(m, final))
        return moves

    def _copy(self, m: Migration, end: int) -> BlockMove:
        move = self._counted(BlockMove(
            m.request.request_id, m.source, tuple(m.source_ids[m.copied:end]),
            m.target, tuple(m.reserved[m.copied:end]),
        ))
        m.copied = end
        return move

    def _counted(self, move: BlockMove) -> BlockMove:
        self.copied_out[move.src] += len(move.src_blocks)
        self.copied_in[move.dst] += len(move.dst_blocks)
        return move

    def _switch(self, m: Migration) -> None:
        table = m.request.block_table
        left = table.replace(m.first_block, m.target, m.reserved)
        self.instances[m.request.home].rmanager.free_moved(m.request.request_id, left)
        self.moved_blocks += m.count
        del self.active[m.request.request_id]
        self._event(m.kind, "moved", m.request.request_id, m.source, m.target, m.count)

    def _event(self, kind: str, outcome: str, request_id: str, source: int, target: int,
               blocks: int) -> None:
        self.events.append(MigrationEvent(self.step, kind, outcome, request_id, source,
                                          target, blocks))

    def cancel_cycle(self, legs: list[Leg]) -> None:
        """Cancel a debt cycle in the next plan (``dgfm.plan_cancellation``'s legs)."""
        self.cycles.append(legs)

    def _cancel(self, legs: list[Leg]) -> list[BlockMove]:
        """Leg i's blocks on its creditor come home into the blocks there that held the
        previous leg's request: copies, table switches and the rManagers' counts, all at
        once. A leg that changed since it was planned drops the whole cycle."""
        for leg in legs:
            runs = leg.request.block_table.rblocks_between(
                leg.first_block, leg.first_block + len(leg.blocks)
            )
            if (leg.request.status is not RequestStatus.RUNNING
                    or leg.request.request_id in self.active
                    or [(rb.owner, rb.block_ids) for rb in runs] != [(leg.creditor, leg.blocks)]):
                return []
        moves = []
        for i, leg in enumerate(legs):
            before = legs[i - 1]  # its blocks are on this leg's debtor
            home = self.instances[leg.debtor].rmanager
            moves.append(self._counted(BlockMove(
                leg.request.request_id, leg.creditor, leg.blocks, leg.debtor, before.blocks
            )))
            home.take_over(before.debtor, before.request.request_id, list(before.blocks))
            home.settle(leg.creditor, len(leg.blocks))
        for leg, before in zip(legs, [legs[-1], *legs[:-1]]):
            leg.request.block_table.replace(leg.first_block, leg.debtor, before.blocks)
        self.moved_blocks += sum(len(leg.blocks) for leg in legs)
        self.cancelled_cycles += 1
        for leg in legs:
            self._event("cycle", "moved", leg.request.request_id, leg.creditor, leg.debtor,
                        len(leg.blocks))
        return moves

    def abort(self, request_id: str, dead: frozenset[int] = frozenset()) -> None:
        """Give the reserved blocks back; the table never changed."""
        m = self.active.pop(request_id, None)
        if m is None:
            return
        home = self.instances[m.request.home].rmanager
        home.unreserve(request_id, m.target, m.reserved, target_alive=m.target not in dead)
        self.aborted += 1
        self._event(m.kind, "aborted", request_id, m.source, m.target, m.count)

    def reserved(self) -> list[tuple[int, list[int]]]:
        """(target, ids) of every reservation in flight, for the integrity check."""
        return [(m.target, m.reserved) for m in self.active.values()]
