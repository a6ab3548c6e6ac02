"""benchmarks/gpu.py, the GPU machine's one prepared script, runs end to end at toy sizes
on the CPU (the Triton kernels under the interpreter), so a session lent a GPU spends its
minutes measuring rather than debugging the script."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

# Looked up, not imported: the script runs in a process of its own.
pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("triton", "transformers")),
    reason="needs triton and transformers (the test extra)")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


def test_the_gpu_script_runs_every_part_at_toy_sizes(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--small", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    rows = json.loads(out.read_text())["rows"]
    by_part: dict[str, list[dict]] = {}
    for row in rows:
        by_part.setdefault(row["part"], []).append(row)
    assert set(by_part) == {"copy", "decode kernel", "decode kernel, variant", "LAT", "W1",
                            "spread"}
    assert len(by_part["decode kernel"]) == 4  # 2 contexts x 2 batches
    assert len(by_part["decode kernel, variant"]) == 4 * 5  # each of gpu.py's VARIANTS
    assert all(r["value"] > 0 for part in ("copy", "decode kernel", "decode kernel, variant",
                                           "LAT", "W1") for r in by_part[part])
    (spread,) = by_part["spread"]
    assert spread["value"] == 1.0 and spread["note"].startswith("4 owners"), spread
    # Each row printed when measured (a run cut short keeps them), the table last.
    printed = [line for line in done.stdout.splitlines() if line.startswith("[")]
    assert [line.split("]")[0][1:] for line in printed] == [r["part"] for r in rows]
    assert "spread" in done.stdout.splitlines()[-1]
