"""scenarios.fedavg_dp --quick: distributed DP (every round a real protocol round in
secagg.sim) tracks central DP, local DP falls far below."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("dp_accounting")

pytestmark = pytest.mark.slow  # one FedAvg run per variant and noise level, ~20-30 s

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def interpolate(points: list[tuple[float, float]], eps: float) -> float | None:
    """Accuracy at ``eps`` on the piecewise-linear (in log eps) curve; None outside it."""
    points = sorted(points)
    for (e0, a0), (e1, a1) in pairwise(points):
        if e0 <= eps <= e1:
            t = (math.log(eps) - math.log(e0)) / (math.log(e1) - math.log(e0))
            return a0 + t * (a1 - a0)
    return None


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("fedavg_dp")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "scenarios.fedavg_dp", "--quick", "--out",
                           str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data: dict[str, Any] = json.loads((out / "report.json").read_text())
    assert Path(data["files"]["plot"]).read_bytes().startswith(PNG_SIGNATURE)
    assert Path(data["files"]["plot"]).parent == out  # --quick never overwrites docs/
    return data


def by_variant(report: dict[str, Any], variant: str) -> dict[float, dict[str, Any]]:
    return {r["noise_multiplier"]: r for r in report["runs"] if r["variant"] == variant}


def test_report_shape(report: dict[str, Any]) -> None:
    cfg = report["config"]
    assert cfg["clients"] >= 100 and cfg["samples_per_client"] >= 100
    zs = cfg["noise_multipliers"]
    for variant in ("central", "distributed", "local"):
        rows = by_variant(report, variant)
        assert sorted(rows) == sorted(zs)
        assert all(0.0 <= r["accuracy"] <= 1.0 and r["epsilon"] > 0 for r in rows.values())
        eps = [rows[z]["epsilon"] for z in sorted(zs)]
        assert all(a > b for a, b in pairwise(eps))  # more noise, less eps
    # Better than chance without DP; the heaviest central noise costs accuracy.
    assert report["no_dp_accuracy"] > 1.0 / cfg["classes"] + 0.3
    assert by_variant(report, "central")[max(zs)]["accuracy"] < report["no_dp_accuracy"]


def test_distributed_runs_every_round_through_the_protocol(report: dict[str, Any]) -> None:
    cfg, t = report["config"], report["threshold"]
    n, rounds, seeds = cfg["clients"], cfg["rounds"], cfg["seeds"]
    sim = report["distributed_protocol"]
    assert sim["runner"].startswith("secagg.sim.run_round")
    assert sim["graph"] in ("complete", "sparse") and isinstance(sim["encode_frames"], bool)
    rows = by_variant(report, "distributed")
    assert sim["rounds_run"] == len(rows) * seeds * rounds
    for z, row in rows.items():
        assert row["protocol"] is not None, row  # the run went through the protocol
        assert len(row["protocol"]) == len(row["contributors"]) == seeds
        for proto, counts in zip(row["protocol"], row["contributors"], strict=True):
            assert proto["rounds"] == len(counts) == rounds
            assert proto["mechanism"] == "skellam" and proto["delta"] == cfg["delta"]
            # ~10 % drop every round, and never below the threshold.
            assert all(t <= m < n for m in counts), counts
            assert 0.8 < sum(counts) / (n * rounds) < 0.97, counts
            # The server reports the noise of m contributors' shares: m/t sigma^2.
            for m, over, achieved in zip(counts, proto["noise_variance_over_target"],
                                         proto["achieved_noise_multiplier"], strict=True):
                assert over == pytest.approx(m / t)
                assert achieved == pytest.approx(z * math.sqrt(m / t))
            noise = [s / m for s, m in zip(proto["noise_stddev"], counts, strict=True)]
            assert row["noise_std_of_mean"] == pytest.approx(sum(noise) / rounds)
        # Accounted with that noise (m/t > 1 times the target): less epsilon than central.
        assert row["epsilon"] < by_variant(report, "central")[z]["epsilon"]
    for variant in ("central", "local"):
        assert all(row["protocol"] is None for row in by_variant(report, variant).values())
    # The same clients drop in every variant and at every noise level.
    assert len({json.dumps(r["contributors"]) for r in report["runs"]}) == 1


def test_distributed_tracks_central_at_equal_epsilon(report: dict[str, Any]) -> None:
    central = [(r["epsilon"], r["accuracy"]) for r in by_variant(report, "central").values()]
    compared = 0
    for row in by_variant(report, "distributed").values():
        expected = interpolate(central, row["epsilon"])
        if expected is None:
            continue  # outside the central curve: no extrapolation
        compared += 1
        # One seed per point in --quick: accuracy varies by ~0.02 from the noise draw alone.
        assert abs(row["accuracy"] - expected) < 0.06, (row, expected)
    assert compared >= 2


def test_local_is_far_below_central_at_equal_epsilon(report: dict[str, Any]) -> None:
    central, local = by_variant(report, "central"), by_variant(report, "local")
    gaps = []
    for z, row in central.items():
        assert local[z]["epsilon"] == pytest.approx(row["epsilon"])  # same z, same epsilon
        gaps.append(row["accuracy"] - local[z]["accuracy"])
    assert min(gaps) > 0.03 and max(gaps) > 0.2, gaps
