"""The greedy planner (the paper's policy): between steps, move KV off instances whose
batch is held down by memory onto instances with memory to spare, when the cost model
predicts the cluster decodes faster for it. No torch.

    debtors    instances with requests waiting for blocks, smallest batch first
    creditors  instances with blocks to spare, most free first (the model weighs what
               their own queues would have used them for)
    for each debtor: its longest running request's blocks at home; the creditor with
               the most free blocks; the cost model picks how many blocks to move
               (none, a quarter, half, all that fit); re-sort; repeat while the
               predicted cluster throughput improves
    rehome     waiting requests (no KV yet) that their home cannot admit go to an
               instance with room and an empty queue, from the same model

Moving m blocks off a debtor frees room for its waiting requests (a larger batch: more
output per step) at the price of attention over those blocks crossing to the creditor
(a remote pair each layer). The view is the gManager's ledger, possibly stale: a target
that refuses the reservation is simply planned again next period.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from infinite_llm.core.cost_model import CostModel


@dataclass(frozen=True)
class InstanceLoad:
    """One instance as the planner sees it."""

    instance_id: int
    free: int  # blocks, as the ledger last heard
    lendable: int  # of those, what it may take for other instances (the lending rule)
    running: int  # requests decoding there
    context_tokens: int  # KV its running requests attend to
    waiting_blocks: tuple[int, ...] = ()  # blocks each waiting request needs, in order
    remote_pairs: int = 0  # (request, remote owner) pairs of its running requests
    waiting_ids: tuple[str, ...] = ()  # the waiting requests, as waiting_blocks
    # Blocks its running requests will still take if each runs to max_tokens: room a
    # creditor keeps for them (at least the block of headroom each).
    growth: int = 0


@dataclass(frozen=True)
class Candidate:
    """A running request's run of blocks at its home, movable elsewhere."""

    request_id: str
    home: int
    first_block: int
    blocks: int


@dataclass(frozen=True)
class MoveOrder:
    request_id: str
    first_block: int
    count: int
    target: int


@dataclass(frozen=True)
class RehomeOrder:
    """A waiting request (no KV yet) goes to ``target``'s queue."""

    request_id: str
    target: int


def admitted(load: InstanceLoad, room: int) -> int:
    """How many of the waiting requests, in order, fit ``room`` free blocks (leaving one
    block of headroom per running request, as admission does)."""
    room -= load.running
    count = 0
    for need in load.waiting_blocks:
        if need > room:
            break
        room -= need
        count += 1
    return count


def predicted_rate(cost: CostModel, loads: list[InstanceLoad], block_size: int) -> float:
    """Output tokens per second of the cluster's next steps: each instance decodes its
    running requests plus those its free blocks admit."""
    rate = 0.0
    for load in loads:
        batch = load.running + admitted(load, load.free)
        context = load.context_tokens + block_size * sum(
            load.waiting_blocks[: admitted(load, load.free)]
        )
        rate += cost.decode_rate(batch, context, load.remote_pairs)
    return rate


class GreedyPlanner:
    """``min_gain``: the relative rise of predicted throughput a move must bring (moves
    that only shift attention around are not worth their copies)."""

    def __init__(
        self, cost: CostModel, block_size: int, max_orders: int = 8, min_gain: float = 0.01
    ) -> None:
        self.cost = cost
        self.block_size = block_size
        self.max_orders = max_orders
        self.min_gain = min_gain

    def plan(self, loads: list[InstanceLoad], candidates: list[Candidate]) -> list[MoveOrder]:
        """The moves that raise the predicted cluster throughput, greedily."""
        loads = {load.instance_id: load for load in loads}
        pool = sorted(candidates, key=lambda c: (-c.blocks, c.request_id))
        orders: list[MoveOrder] = []
        while len(orders) < self.max_orders:
            best = self._best_move(loads, pool)
            if best is None:
                break
            order, new_loads = best
            orders.append(order)
            loads = new_loads
            pool = [c for c in pool if c.request_id != order.request_id]
        return orders

    def rehome(self, loads: list[InstanceLoad]) -> list[RehomeOrder]:
        """New homes for waiting requests, chosen from the same model: while an instance
        has requests its memory cannot admit and another has room and an empty queue,
        the first request that does not fit moves to the one with most free blocks, if
        the predicted cluster throughput rises. Free: a waiting request holds no KV."""
        loads = {load.instance_id: load for load in loads}
        orders: list[RehomeOrder] = []
        while len(orders) < self.max_orders:
            now = predicted_rate(self.cost, list(loads.values()), self.block_size)
            queued = sorted(
                (l for l in loads.values() if admitted(l, l.free) < len(l.waiting_blocks)),
                key=lambda l: (-(len(l.waiting_blocks) - admitted(l, l.free)), l.instance_id),
            )
            idle = sorted(
                (l for l in loads.values() if not l.waiting_blocks and self._room(l) > 0),
                key=lambda l: (-self._room(l), l.instance_id),
            )
            if not queued or not idle:
                break
            source, target = queued[0], idle[0]
            k = admitted(source, source.free)
            need = source.waiting_blocks[k]
            if need > self._room(target):
                break
            moved = dict(loads)
            moved[source.instance_id] = replace(
                source,
                waiting_blocks=source.waiting_blocks[:k] + source.waiting_blocks[k + 1:],
                waiting_ids=source.waiting_ids[:k] + source.waiting_ids[k + 1:],
            )
            moved[target.instance_id] = replace(
                target, waiting_blocks=(need,), waiting_ids=(source.waiting_ids[k],)
            )
            if predicted_rate(self.cost, list(moved.values()), self.block_size) <= now:
                break
            orders.append(RehomeOrder(source.waiting_ids[k], target.instance_id))
            # Settled there: it runs, and the target's queue is empty again.
            t = moved[target.instance_id]
            moved[target.instance_id] = replace(
                t, free=t.free - need, running=t.running + 1,
                context_tokens=t.context_tokens + need * self.block_size,
                waiting_blocks=(), waiting_ids=(),
            )
            loads = moved
        return orders

    def worth_borrowing(
        self, running: int, context_tokens: int, remote_pairs: int, tokens: int
    ) -> bool:
        """Whether admitting a request of ``tokens`` tokens with blocks borrowed (one
        more remote pair) raises the decode rate of an instance running ``running``
        requests over ``context_tokens``: the exchange it adds against the batch."""
        now = self.cost.decode_rate(running, context_tokens, remote_pairs)
        return self.cost.decode_rate(
            running + 1, context_tokens + tokens, remote_pairs + 1
        ) > now * (1 + self.min_gain)

    def borrow_beats_recompute(self, steps_left: int, victim_tokens: int) -> bool:
        """Whether a request growing into a borrowed block (one more remote pair in each
        of its ``steps_left`` steps) costs less than preempting a request of
        ``victim_tokens`` tokens, which are then computed again."""
        return self.cost.per_remote_s * steps_left <= self.cost.per_token_s * victim_tokens

    @staticmethod
    def _room(load: InstanceLoad) -> int:
        """Free blocks beyond what its running requests will grow into."""
        return load.free - max(load.running, load.growth)

    @staticmethod
    def _spare(load: InstanceLoad) -> int:
        """Blocks a creditor can take: what it may lend, keeping the room its running
        requests will grow into."""
        return min(load.lendable, GreedyPlanner._room(load))

    def _best_move(self, loads, pool):
        debtors = sorted(
            (l for l in loads.values() if admitted(l, l.free) < len(l.waiting_blocks)),
            key=lambda l: (l.running, l.instance_id),
        )
        creditors = sorted(
            (l for l in loads.values() if self._spare(l) > 0),
            key=lambda l: (-self._spare(l), l.instance_id),
        )
        now = predicted_rate(self.cost, list(loads.values()), self.block_size)
        for debtor in debtors:
            mine = [c for c in pool if c.home == debtor.instance_id]
            if not mine or not creditors:
                continue
            longest, creditor = mine[0], creditors[0]
            spare = self._spare(creditor)
            best = None
            for count in sorted({longest.blocks // 4, longest.blocks // 2, longest.blocks}):
                count = min(count, spare)
                if count <= 0:
                    continue
                moved = dict(loads)
                moved[debtor.instance_id] = replace(
                    debtor, free=debtor.free + count,
                    context_tokens=max(0, debtor.context_tokens - count * self.block_size),
                    remote_pairs=debtor.remote_pairs + 1,
                )
                # The creditor serves the pair's exchange every layer: it waits for it too.
                moved[creditor.instance_id] = replace(
                    creditor, free=creditor.free - count, lendable=creditor.lendable - count,
                    context_tokens=creditor.context_tokens + count * self.block_size,
                    remote_pairs=creditor.remote_pairs + 1,
                )
                rate = predicted_rate(self.cost, list(moved.values()), self.block_size)
                if rate > now * (1 + self.min_gain) and (best is None or rate > best[0]):
                    order = MoveOrder(longest.request_id, longest.first_block, count,
                                      creditor.instance_id)
                    best = (rate, order, moved)
            if best is not None:
                return best[1], best[2]
        return None
