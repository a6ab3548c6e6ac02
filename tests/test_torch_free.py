"""The bookkeeping runs without torch: the same code the simulator will drive."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_the_bookkeeping_runs_a_whole_workload_where_torch_cannot_be_imported():
    script = Path(__file__).with_name("torch_free_workload.py")
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=True
    )
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["torch_loaded"] is False
    assert summary["ended"]  # every request ended: none silently lost
    assert summary["reasons"] == ["abort", "length", "stop"]
    assert summary["stop_kinds"] == ["eos", "string", "token"]
    assert summary["most_debt"] > 0  # requests borrowed blocks from other instances
    assert summary["preemptions"] > 0
    assert summary["moved_blocks"] > 0  # live migrations switched (DGFM's included)
    assert summary["pools_full"]
    # The runner's copies were let go through the plans alone.
    assert summary["runner_tables"] == 0 and summary["runner_known"] == 0
