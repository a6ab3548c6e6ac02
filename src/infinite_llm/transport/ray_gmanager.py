"""The gManager on Ray: a named actor, and the proxy the cluster holds in its place.

With ``backend="ray"`` the one ``GManager`` of a cluster lives in its own actor, named
``gmanager-<uuid hex>`` in the Ray namespace ``infinite_llm`` (one per ``LLM``, so two
engines sharing a Ray cluster never meet): any process of the cluster can find it with
``ray.get_actor(name, namespace="infinite_llm")``. It is placed on the driver's node when
it can be, so a control call stays a local round trip (~1 ms), and it is not detached:
Ray ends it with the driver that created it, if ``RayRunner.shutdown`` did not first.

``RemoteGManager`` has the methods of ``GManager`` that the cluster and the rManagers
call, each one actor call; they hold it where the in-process backend holds a plain
``GManager``, and never know which. The ledger is soft state: when the actor dies or
stops answering, a new one is started and rebuilt from a full report of every live
rManager (``restore``, which the engine's builder points at the cluster), and the call
is made again; requests go on unchanged. Only when that fails too (or nothing can
restore it) does the engine end with ``GManagerLost`` rather than letting a step hang.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from infinite_llm.config import PoolingConfig
from infinite_llm.memory.gmanager import GManager, Ledger
from infinite_llm.memory.rmanager import Heartbeat

logger = logging.getLogger(__name__)
NAMESPACE = "infinite_llm"
# A gManager call is a dict update or a pass over a short list: an answer this late means
# the actor's process or node is gone even if Ray has not said so yet.
GMANAGER_TIMEOUT_S = 60


class GManagerLost(RuntimeError):
    """The gManager actor died or stopped answering: the debt ledger is gone, and the
    engine cannot go on without it."""


def _start_actor(pooling: PoolingConfig) -> tuple[str, Any]:
    """A new named gManager actor, on the driver's node when it can be."""
    name = f"gmanager-{uuid.uuid4().hex}"
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    actor = (
        ray.remote(GManager)
        .options(name=name, namespace=NAMESPACE, num_cpus=0, max_restarts=0,
                 scheduling_strategy=here)
        .remote(config=pooling)
    )
    return name, actor


class RemoteGManager:
    """A ``GManager`` in a named Ray actor: the same methods, each ``ray.get`` of one call.
    ``restore``: (instance, capacity, full heartbeat) of every live instance, to rebuild
    a new actor's ledger from when this one is lost."""

    def __init__(self, actor: Any, name: str, pooling: PoolingConfig) -> None:
        self.actor = actor
        self.name = name
        self.pooling = pooling
        self.restore: Callable[[], list[tuple[int, int, Heartbeat]]] | None = None
        self.restarts = 0

    @classmethod
    def start(cls, pooling: PoolingConfig) -> RemoteGManager:
        """Create this cluster's gManager actor (empty: the cluster registers instances)."""
        name, actor = _start_actor(pooling)
        return cls(actor, name, pooling)

    def _call(self, method: str, *args: Any) -> Any:
        try:
            return self._get(method, *args)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as error:
            if self.restore is None:
                raise self._lost(method, "nothing can rebuild its ledger") from error
            lost = self.name
            try:
                self._restart()
                answer = self._get(method, *args)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as again:
                raise self._lost(method, "and a new one failed too") from again
            logger.warning("the gManager actor %r was lost (%s); %r took its place, its "
                           "ledger rebuilt from every live instance", lost, error, self.name)
            return answer

    def _get(self, method: str, *args: Any) -> Any:
        return ray.get(getattr(self.actor, method).remote(*args), timeout=GMANAGER_TIMEOUT_S)

    def _restart(self) -> None:
        """A new actor, its ledger rebuilt from the rManagers' full reports."""
        try:
            ray.kill(self.actor, no_restart=True)  # one that only stopped answering
        except Exception:  # noqa: BLE001 - it is gone either way
            pass
        reports = self.restore()
        self.name, self.actor = _start_actor(self.pooling)
        self.restarts += 1
        ray.get([self.actor.register.remote(iid, capacity) for iid, capacity, _ in reports],
                timeout=GMANAGER_TIMEOUT_S)
        self._get("apply_all", [beat for _, _, beat in reports])

    def _lost(self, method: str, why: str) -> GManagerLost:
        return GManagerLost(
            f"the gManager actor {self.name!r} (Ray namespace {NAMESPACE!r}) died or did "
            f"not answer {method}() within {GMANAGER_TIMEOUT_S} s, {why}; the debt "
            "ledger is lost, so this engine cannot go on: shut it down and start a new one"
        )

    def register(self, instance_id: int, capacity: int) -> None:
        self._call("register", instance_id, capacity)

    def remove(self, instance_id: int) -> None:
        self._call("remove", instance_id)

    def apply(self, heartbeat: Heartbeat) -> None:
        self._call("apply", heartbeat)

    def apply_all(self, heartbeats: list[Heartbeat]) -> None:
        self._call("apply_all", heartbeats)

    def candidates(self, debtor_id: int, need: int) -> list[int]:
        return self._call("candidates", debtor_id, need)

    def lendable_elsewhere(self, debtor_id: int) -> int:
        return self._call("lendable_elsewhere", debtor_id)

    def max_request_blocks(self) -> int:
        return self._call("max_request_blocks")

    def ledger(self) -> Ledger:
        return self._call("ledger")

    def kill(self) -> None:
        """End the actor (shutdown; an actor already dead is fine)."""
        ray.kill(self.actor, no_restart=True)
