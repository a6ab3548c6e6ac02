"""The real bookkeeping (cluster, schedulers, rManagers, gManager) through a workload
with borrowing, preemption, aborts, every kind of stop, live migrations and DGFM,
driven by a fake runner, with torch unimportable. Run as a script by
``test_torch_free.py``; prints a summary."""

from __future__ import annotations

import importlib.abc
import json
import random
import sys


class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"torch is blocked in this process ({name})")
        return None


sys.meta_path.insert(0, NoTorch())

from infinite_llm.attention.tables import KVTables  # noqa: E402
from infinite_llm.config import CacheConfig, PoolingConfig, SchedulerConfig  # noqa: E402
from infinite_llm.core.cluster import Cluster  # noqa: E402
from infinite_llm.core.request import Request  # noqa: E402
from infinite_llm.core.sampling_params import SamplingParams  # noqa: E402
from infinite_llm.core.step import SampledToken, StepPlan, StepResult  # noqa: E402

EOS, STOP_TOKEN, STOP_STRING_TOKEN = 49, 48, 47
BLOCK = 4


class FakeRunner:
    """Keeps the runners' copy of the block tables from the plans alone, checks it
    against the bookkeeping's tables for every chunk, and samples a token that depends
    only on the request and the position (as a greedy model would)."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.tables = KVTables()
        self.known: set[str] = set()

    def execute(self, plan: StepPlan) -> StepResult:
        for request_id in plan.finished:
            self.known.discard(request_id)
        self.known.update(n.request_id for n in plan.new_requests)
        self.tables.apply(plan)
        tokens = {}
        for chunk in plan.chunks:
            assert chunk.request_id in self.known, f"{chunk.request_id} was never announced"
            table = self.cluster.requests[chunk.request_id].block_table
            mirror = self.tables[chunk.request_id]
            assert mirror.num_blocks == table.num_blocks
            assert {o: list(ids) for o, ids in mirror.by_owner.items()} == {
                o: table.physical_ids(o) for o in table.owners()}
            assert mirror.num_blocks * BLOCK >= chunk.first_pos + chunk.num_tokens
            if chunk.sample:
                position = chunk.first_pos + chunk.num_tokens
                seed = sum(map(ord, chunk.request_id)) * 7919 + position * 104729
                tokens[chunk.request_id] = SampledToken(seed % 50)
        return StepResult(tokens)


def observe(request: Request, token: SampledToken) -> str | None:
    return "<stop>" if token.token_id == STOP_STRING_TOKEN else None


def main() -> None:
    rng = random.Random(0)
    cluster = Cluster(
        24, CacheConfig(1, BLOCK), SchedulerConfig(32, 8, 4096),
        PoolingConfig(max_lend_fraction=1.0, migration_tokens_per_step=8, dgfm_period=5),
        3, eos_token_ids=(EOS,),
    )
    runner = FakeRunner(cluster)
    ids = []
    for i in range(40):
        prompt = [rng.randrange(40) for _ in range(rng.choice([3, 9, 30, 120, 200]))]
        params = SamplingParams(
            max_tokens=rng.choice([4, 20, 90]), ignore_eos=i % 3 == 0,
            stop_token_ids=[STOP_TOKEN] if i % 2 else None,
        )
        ids.append(f"r{i}")
        cluster.add(Request(f"r{i}", prompt, params, params.max_tokens))
    reasons, kinds, most_debt, steps = {}, set(), 0, 0
    while cluster.has_work():
        steps += 1
        assert steps < 5000, "no progress"
        plan = cluster.schedule()
        for request in cluster.update(plan, runner.execute(plan), observe):
            if request.finished:
                reasons[request.request_id] = request.finish_reason
                if request.finish_reason == "stop":
                    kinds.add({str: "string", int: "token"}.get(type(request.stop_reason), "eos"))
        if steps % 7 == 0 and cluster.requests:  # a client goes away
            victim = rng.choice(sorted(cluster.requests))
            reasons[victim] = cluster.abort(victim).finish_reason
        if steps % 3 == 0:  # a run of some running request moves (or is refused)
            movable = [r for r in cluster.requests.values()
                       if r.status.value == "running" and r.request_id not in cluster.migrator.active
                       and r.block_table.num_blocks]
            if movable:
                request = rng.choice(movable)
                run = rng.choice(request.block_table.rblocks)
                target = rng.choice([i for i in range(3) if i != run.owner])
                cluster.migrate(request.request_id, run.first_block, run.num_blocks, target)
        cluster.check_integrity()
        most_debt = max(most_debt, cluster.ledger().total_debt)
    # The last plan tells the runners to forget whatever ended after it was made.
    runner.execute(cluster.schedule())
    snapshot = cluster.snapshot()
    print(json.dumps({
        "torch_loaded": "torch" in sys.modules,
        "steps": steps,
        "ended": sorted(reasons) == sorted(ids),
        "reasons": sorted(set(reasons.values())),
        "stop_kinds": sorted(kinds),
        "most_debt": most_debt,
        "preemptions": snapshot.num_preemptions,
        "moved_blocks": snapshot.migration.moved_blocks,
        "migrations_aborted": snapshot.migration.aborted,
        "pools_full": snapshot.pools_full,
        "runner_tables": len(runner.tables),
        "runner_known": len(runner.known),
    }))


if __name__ == "__main__":
    main()
