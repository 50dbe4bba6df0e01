"""Smoke test: the benchmark scripts run (``--quick``) and print well-formed JSON lines."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"

MASKING_KEYS = {"bench", "params", "seconds", "limit_seconds", "ratio", "target_ratio",
                "meets_target"}
SIM_KEYS = {"bench", "params", "seconds", "status", "exact", "max_abs_error", "error_bound",
            "u1", "u2", "u3", "degree", "events", "virtual_seconds", "max_peer_bytes_sent",
            "server_bytes_in", "server_bytes_in_vectors"}
SIM_MEMORY_KEYS = {"peak_total_bytes", "server_retained_peak_bytes", "server_vector_bytes",
                   "server_transient_peak_bytes", "server_peak_bytes_bound"}


def run_script(name: str, *args: str) -> list[dict[str, Any]]:
    proc = subprocess.run([sys.executable, str(BENCHMARKS / name), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert lines, f"{name} printed nothing; stderr: {proc.stderr}"
    records = [json.loads(line) for line in lines]
    assert all(isinstance(r, dict) for r in records)
    return records


def positive(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_masking_quick() -> None:
    records = run_script("masking.py", "--quick", "--repeat", "5")
    assert [(r["params"]["d"], r["params"]["k"]) for r in records] == [(10_000, 2), (10_000, 10)]
    for r in records:
        assert r.keys() >= MASKING_KEYS
        assert r["bench"] == "masking"
        assert r["params"]["dtype"] == "uint32"
        assert positive(r["seconds"]) and positive(r["limit_seconds"])
        assert positive(r["ratio"])
        assert r["ratio"] == pytest.approx(r["seconds"] / r["limit_seconds"])
        assert r["target_ratio"] == 1.5
        assert r["meets_target"] is (r["ratio"] <= 1.5)


def check_sim_record(r: dict[str, Any], d: int) -> None:
    assert r.keys() >= SIM_KEYS
    assert r["bench"] == "sim_scale"
    n = r["params"]["n"]
    assert r["params"]["d"] == d
    assert positive(r["seconds"])
    assert r["status"] == "ok", r.get("reason")
    assert r["exact"] is True
    assert 0 <= r["max_abs_error"] < r["error_bound"]
    dropped = sum(r["params"]["dropouts"].values())
    assert dropped == round(0.1 * n)
    assert r["u1"] == n
    assert n - dropped <= r["u3"] <= r["u2"] <= r["u1"]
    assert 2 <= r["degree"] <= n - 1
    assert r["events"] > 0 and r["virtual_seconds"] > 0
    assert positive(r["max_peer_bytes_sent"])
    # At least the one aggregate vector reaches the server.
    assert r["server_bytes_in"] >= 4 * d
    assert r["server_bytes_in_vectors"] == pytest.approx(r["server_bytes_in"] / (4 * d))


def test_sim_scale_quick() -> None:
    records = run_script("sim_scale.py", "--quick")
    assert [r["params"]["n"] for r in records] == [20, 60]
    for r in records:
        check_sim_record(r, d=1000)
        assert r["params"]["mode"] == "timing"


def test_sim_scale_quick_memory() -> None:
    records = run_script("sim_scale.py", "--quick", "--memory", "--n", "20")
    assert [r["params"]["n"] for r in records] == [20]
    for r in records:
        check_sim_record(r, d=1000)
        assert r["params"]["mode"] == "memory"
        assert r.keys() >= SIM_MEMORY_KEYS
        assert all(positive(r[key]) for key in SIM_MEMORY_KEYS)
        # The server holds O(d) vector data: the aggregate and the decoded float64 sum.
        assert r["server_vector_bytes"] >= 4 * 1000
        assert r["server_peak_bytes_bound"] < r["peak_total_bytes"]


PAILLIER_KEYS = {
    "paillier_encrypt": {"ours_per_value_us", "phe_per_value_us", "speedup_vs_phe",
                         "speedup_from_packing", "speedup_from_short_exponent", "slots",
                         "setup_seconds", "target_speedup", "floor_speedup", "meets_target"},
    "paillier_bytes": {"bytes_per_value", "ratio", "target_ratio", "meets_target"},
    "paillier_relay_add": {"seconds", "per_ciphertext_add_us"},
    "paillier_decrypt": {"seconds", "exact"},
}


def test_paillier_quick() -> None:
    records = run_script("paillier.py", "--quick")
    by_bench = {r["bench"]: r for r in records if r["bench"] in PAILLIER_KEYS}
    assert by_bench.keys() == PAILLIER_KEYS.keys()
    for bench, keys in PAILLIER_KEYS.items():
        r = by_bench[bench]
        assert r.keys() >= keys | {"bench", "params"}
        assert r["params"]["d"] == 1000 and r["params"]["key_bits"] == 2048
    encrypt = by_bench["paillier_encrypt"]
    # Positive, not "meets the target": a slow machine must not fail the suite.
    assert positive(encrypt["speedup_vs_phe"])
    assert encrypt["meets_target"] is (encrypt["speedup_vs_phe"] >= encrypt["target_speedup"])
    assert encrypt["params"]["exponent_bits"] == 256
    assert by_bench["paillier_bytes"]["ratio"] == pytest.approx(
        by_bench["paillier_bytes"]["bytes_per_value"] / 4)
    assert by_bench["paillier_decrypt"]["exact"] is True


RATIO_KEYS = {"bench", "params", "raw_seconds", "ratio", "target_ratio", "meets_target", "parts",
              "cpu_ratio", "status", "exact", "u2", "u3", "counts"}


def test_sim_round_quick() -> None:
    (r,) = run_script("sim_round.py", "--quick", "--repeat", "1")
    assert r.keys() >= RATIO_KEYS | {"seconds"}
    assert r["bench"] == "sim_round"
    assert r["params"]["n"] == 12 and r["params"]["d"] == 2000
    assert r["status"] == "ok" and r["exact"] is True
    # Everyone took part in R1; the scripted 30 % died before their masked input.
    assert r["u2"] == 12 and r["u3"] == 12 - round(0.3 * 12)
    assert positive(r["seconds"]) and positive(r["raw_seconds"])
    assert r["ratio"] == pytest.approx(r["seconds"] / r["raw_seconds"])
    assert r["raw_seconds"] == pytest.approx(sum(r["parts"].values()))
    assert r["meets_target"] is (r["ratio"] <= r["target_ratio"] == 1.5)
    contributors, dropped = r["u3"], r["u2"] - r["u3"]
    assert r["counts"]["server_agreements"] == dropped * contributors
    assert r["counts"]["mask_expansions"] == contributors * 12 + contributors * (dropped + 1)


def test_server_unmask_quick() -> None:
    (r,) = run_script("server_unmask.py", "--quick")
    assert r.keys() >= RATIO_KEYS | {"server_seconds", "server_cpu_seconds", "round_seconds"}
    assert r["bench"] == "server_unmask"
    assert r["params"]["n"] == 20
    assert r["status"] == "ok" and r["exact"] is True
    assert positive(r["server_seconds"]) and positive(r["raw_seconds"])
    # The server is a part of the round.
    assert r["server_seconds"] < r["round_seconds"]
    assert r["ratio"] == pytest.approx(r["server_seconds"] / r["raw_seconds"])
    assert r["meets_target"] is (r["ratio"] <= r["target_ratio"] == 1.3)
    contributors, dropped = r["u3"], r["u2"] - r["u3"]
    assert r["counts"]["agreements"] == dropped * contributors
    assert r["counts"]["mask_expansions"] == dropped * contributors + contributors


SCALE_KEYS = {"bench", "params", "round", "seconds", "registration_seconds",
              "after_registration_seconds", "phase_seconds", "target_seconds", "meets_target",
              "server_peak_rss_bytes", "status", "exact", "max_abs_error", "error_bound",
              "contributors", "crashed", "dropped", "peer_statuses"}


def test_scale_small() -> None:
    records = run_script("scale.py", "--peers", "12", "--dim", "50", "--workers", "2",
                         "--rounds", "2")
    *rounds, summary = records
    assert [r["round"] for r in rounds] == [0, 1]
    for r in rounds:
        assert r.keys() >= SCALE_KEYS
        assert r["bench"] == "scale"
        assert r["params"]["n"] == 12 and r["params"]["d"] == 50
        assert r["params"]["workers"] == 2 and r["params"]["graph"] == "sparse"
        assert r["status"] == "ok", r.get("reason")
        assert r["exact"] is True
        assert 0 <= r["max_abs_error"] <= r["error_bound"]
        # One victim a round (10 % of 12); in advertised it dies before registering, and
        # registration closes without waiting for it.
        assert r["crashed"] == 1 and r["u1"] in (11, 12)
        assert r["u1"] - 1 <= r["contributors"] <= r["u1"]
        assert r["registration_seconds"] < 10
        assert positive(r["floor"]["seconds"]) and positive(r["floor"]["counts"]["link"])
        assert r["ratio_to_floor"] > 0 and positive(r["cpu_seconds"]["workers"])
        # Every survivor's contribute() ended ok; the victim's was cut short.
        assert r["peer_statuses"].get("ok") == 11
        assert positive(r["seconds"]) and positive(r["server_peak_rss_bytes"])
        assert r["registration_seconds"] + r["after_registration_seconds"] == pytest.approx(
            r["seconds"], abs=1e-3)
        assert r["meets_target"] is (r["after_registration_seconds"] <= r["target_seconds"])
    assert [r["target_seconds"] for r in rounds] == [15, 8]
    assert summary["summary"] is True and summary["rounds_completed"] == 2
    assert summary["all_exact"] is True
    assert summary["meets_targets"] is all(r["meets_target"] for r in rounds)
