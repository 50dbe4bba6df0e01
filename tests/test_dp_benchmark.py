"""benchmarks/dp.py --quick runs and prints a well-formed JSON line."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_dp_benchmark_quick() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dp.py"), "--quick",
                           "--repeat", "2"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert [r["params"]["d"] for r in records] == [10_000]
    r = records[0]
    assert r["bench"] == "dp" and r["params"]["padded_dim"] == 16_384 and r["params"]["k"] == 10
    for key in ("seconds", "masking_seconds", "online_seconds", "ratio", "online_ratio"):
        assert math.isfinite(r[key]) and r[key] > 0, key
    assert r["ratio"] == r["seconds"] / r["masking_seconds"]
    assert r["target_ratio"] == 1.0 and r["meets_target"] is (r["ratio"] <= 1.0)
    assert set(r["stages"]) == {"rotate", "round", "noise"}
