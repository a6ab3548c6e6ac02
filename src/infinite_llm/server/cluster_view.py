"""The cluster as JSON for ``/v1/cluster``, from the engine's immutable snapshot.

The engine is not thread-safe, so only the engine thread takes snapshots (after every
step and every batch of commands); /metrics and /v1/cluster read the latest one.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from infinite_llm.core.snapshot import ClusterSnapshot


def cluster_json(view: ClusterSnapshot) -> dict[str, Any]:
    """Totals, every instance's blocks, every request's home and blocks per owner, and
    the gManager's debt ledger (JSON keys are strings), as of step ``steps``."""
    return {
        "steps": view.steps,
        "block_size": view.block_size,
        "max_request_tokens": view.max_request_tokens,
        "num_requests_running": view.running,
        "num_requests_waiting": view.waiting,
        "num_preemptions": view.num_preemptions,
        "kv_cache_usage": view.kv_cache_usage,
        "instances": [asdict(i) for i in view.instances],
        "migration": asdict(view.migration),
        "remote_share": view.remote_share,
        "requests": [
            {
                "request_id": r.request_id,
                "home": r.home,
                "status": r.status,
                "num_tokens": r.num_tokens,
                "num_computed_tokens": r.num_computed_tokens,
                "blocks": {str(owner): n for owner, n in r.blocks},
            }
            for r in view.requests
        ],
        "ledger": {
            "total_debt": view.ledger.total_debt,
            "instances": {
                str(iid): {
                    "capacity": entry.capacity,
                    "free": entry.free,
                    "lent_to": {str(k): v for k, v in entry.lent_to.items()},
                    "borrowed_from": {str(k): v for k, v in entry.borrowed_from.items()},
                }
                for iid, entry in view.ledger.instances.items()
            },
        },
    }
