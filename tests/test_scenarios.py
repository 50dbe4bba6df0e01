"""The scenario scripts: the dropout study (--quick, both transports) and the
scenario-file runner (every example, and bad files rejected in one line)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "scenarios" / "examples"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOTS = ("success_vs_rate.png", "time_vs_n.png", "bytes_vs_n.png")


def run_module(module: str, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


# ------------------------------------------------------------- dropout study


@pytest.mark.parametrize("transport", ["sim", "websockets"])
def test_quick_dropout_study(transport: str, tmp_path: Path) -> None:
    out = tmp_path / "study"
    proc = run_module("scenarios.dropouts", "--quick", "--transport", transport,
                      "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "secagg dropout study" in proc.stdout  # the summary table

    report: dict[str, Any] = json.loads((out / "report.json").read_text())
    config = report["config"]
    assert config["transport"] == transport and config["quick"] is True
    runs, cells = report["runs"], report["cells"]
    assert runs and cells
    assert all(run["status"] in ("ok", "aborted") for run in runs), \
        [run.get("reason") for run in runs if run["status"] == "error"]
    ok_runs = [run for run in runs if run["status"] == "ok"]
    assert ok_runs, "no round succeeded"
    for run in ok_runs:
        assert run["exact"] is True, run
        assert run["max_error"] <= run["tolerance"] * (1 + 1e-9) + 1e-12
        assert len(run["contributors"]) >= run["threshold"]
        assert run["max_peer_bytes_sent"] > 0 and run["server_bytes_in"] > 0
        assert run["unexpected_contributors"] == []
    for cell in cells:
        if cell["ok"]:
            assert cell["exact"] is True, cell
    # Every requested cell is present: a baseline per n, every phase at every rate > 0.
    phases = set(config["phases"])
    for n in config["peers"]:
        assert any(c["n"] == n and c["phase"] == "none" for c in cells)
        for rate in config["rates"]:
            if round(rate * n) > 0:
                assert {c["phase"] for c in cells if c["n"] == n and c["rate"] == rate} == phases
    # Without drops every round succeeds with every peer.
    for run in runs:
        if run["phase"] == "none":
            assert run["status"] == "ok" and len(run["contributors"]) == run["n"]
    # A peer scripted to drop never outlives the abort line: above n - t drops, no success.
    for cell in cells:
        if cell["drops"] > cell["n"] - cell["threshold"] and transport == "sim":
            assert cell["ok"] == 0, cell

    for name in PLOTS:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE), name
        assert len(data) > 1000
    assert sorted(Path(f).name for f in report["files"]) == sorted(("report.json", *PLOTS))


def test_dropout_study_rejects_bad_flags(tmp_path: Path) -> None:
    proc = run_module("scenarios.dropouts", "--rates", "0.1,2", "--out", str(tmp_path))
    assert proc.returncode == 2
    assert "rates" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_module("scenarios.dropouts", "--phases", "share_keys,sharing",
                      "--out", str(tmp_path))
    assert proc.returncode == 2 and "sharing" in proc.stderr


def test_drop_schedule() -> None:
    from scenarios.dropouts import Job, schedule

    def job(transport: str, phase: str, rate: float = 0.3) -> Job:
        return Job(transport=transport, n=20, rate=rate, phase=phase, seed=1,
                   graph="complete", dim=4, fan_in=3, phase_timeout=5.0)

    script, relays = schedule(job("sim", "masked_input"))
    assert len(script) == 6 and set(script.values()) == {"masked_input"} and relays == 0
    assert schedule(job("sim", "masked_input")) == (script, 0)  # deterministic
    assert schedule(job("sim", "none", rate=0.0)) == ({}, 0)
    # Over websockets, relays are whoever reaches R2 as a relay first: counted, not named.
    assert schedule(job("websockets", "relay")) == ({}, 6)
    script, relays = schedule(job("websockets", "random", rate=0.5))
    assert len(script) + relays == 10 and "relay" not in script.values()
    script, relays = schedule(job("sim", "random", rate=0.5))
    assert len(script) == 10 and set(script.values()) <= {"share_keys", "masked_input",
                                                          "relay", "unmasking"}


# ------------------------------------------------------------- scenario files


def _example_files() -> list[Path]:
    return sorted(EXAMPLES.glob("*.toml"))


def test_examples_present() -> None:
    names = {path.stem for path in _example_files()}
    assert {"basic", "sparse_200", "websockets", "too_many_drops"} <= names


@pytest.mark.parametrize("path", _example_files(), ids=lambda p: p.stem)
def test_example_scenario(path: Path, tmp_path: Path) -> None:
    import tomllib

    spec = tomllib.loads(path.read_text())
    out = tmp_path / "report.json"
    proc = run_module("scenarios.run", str(path), "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["passed"] is True
    rounds = report["rounds"]
    assert len(rounds) == spec.get("rounds", 1)
    assert [r["round"] for r in rounds] == list(range(len(rounds)))
    for r in rounds:
        assert r["problems"] == []
        if r["expect"] is not None:
            assert r["status"] == r["expect"]
        assert f"round {r['round']}: {r['status']}" in proc.stdout
        if r["status"] == "ok":
            assert r["exact"] is True and r["max_error"] <= r["tolerance"] * (1 + 1e-9)
            assert len(r["contributors"]) >= r["threshold"]
        else:
            assert r["contributors"] == [] and r["exact"] is None
        # Peers scripted to die before their masked input never count.
        for index, phase in r["scheduled"].items():
            if phase in ("advertise_keys", "share_keys", "masked_input"):
                assert int(index) not in r["contributors"]
                if r["status"] == "ok":
                    assert index in r["dropped"]
            if phase == "unmasking" and r["status"] == "ok":
                assert int(index) in r["contributors"]
                assert r["dropped"][index] == "unmask_share_missing"


def test_abort_example_aborts(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    proc = run_module("scenarios.run", str(EXAMPLES / "too_many_drops.toml"), "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (only,) = json.loads(out.read_text())["rounds"]
    assert only["status"] == "aborted" and "threshold" in only["reason"]


def test_unmet_expectation_fails(tmp_path: Path) -> None:
    scenario = tmp_path / "wrong.toml"
    scenario.write_text('peers = 6\ndim = 3\nexpect = "aborted"\n')
    proc = run_module("scenarios.run", str(scenario), "--out", str(tmp_path / "r.json"))
    assert proc.returncode == 1
    assert "expected aborted, got ok" in proc.stdout


VALID = """\
name = "t"
transport = "sim"
peers = 20
dim = 4
graph = "complete"
rounds = 2
"""

BAD_FILES = {
    "unknown_key": (VALID + "colour = 3\n", "colour: unknown key"),
    "unknown_round_key": (VALID + "[[round_drops]]\nround = 1\ndrops = {}\nwhen = 2\n",
                          "round_drops[0].when: unknown key"),
    "bad_phase": (VALID + '[drops]\n3 = "sharekeys"\n', 'drops."3": unknown phase "sharekeys"'),
    "bad_index": (VALID + '[drops]\n25 = "share_keys"\n',
                  'drops."25": peer index out of range 0..19'),
    "negative_index": (VALID + '[drops]\n"-1" = "relay"\n',
                       'drops."-1": peer index out of range 0..19'),
    "not_an_index": (VALID + '[drops]\nfirst = "relay"\n',
                     'drops.first: peer index must be an integer'),
    "bad_round_index": (VALID + '[[round_drops]]\nround = 1\ndrops = { 20 = "relay" }\n',
                        'round_drops[0].drops."20": peer index out of range 0..19'),
    "round_out_of_range": (VALID + "[[round_drops]]\nround = 2\ndrops = {}\n",
                           "round_drops[0].round: 2 out of range 0..1"),
    "bad_type": (VALID.replace("peers = 20", 'peers = "20"'),
                 'peers: expected an integer, got a string ("20")'),
    "bad_type_bool": (VALID.replace("dim = 4", "dim = true"), "dim: expected an integer"),
    "bad_phase_type": (VALID + "[drops]\n3 = 4\n", 'drops."3": expected a phase name'),
    "bad_transport": (VALID.replace('"sim"', '"carrier-pigeon"'),
                      'transport: unknown value "carrier-pigeon"'),
    "low_threshold": (VALID + "threshold = 10\n", "threshold: 10 must be more than peers/2"),
    "high_threshold": (VALID + "threshold = 21\n", "threshold: 21 out of range 1..20"),
    "missing_peers": (VALID.replace("peers = 20\n", ""), "peers: missing"),
    "malformed": (VALID + "drops = [\n", "invalid TOML"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_scenario_files(case: str, tmp_path: Path) -> None:
    text, message = BAD_FILES[case]
    scenario = tmp_path / "scenario.toml"
    scenario.write_text(text)
    proc = run_module("scenarios.run", str(scenario), "--out", str(tmp_path / "r.json"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("scenario.toml: "), lines[0]
    assert message in lines[0], lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "r.json").exists()


def test_missing_file(tmp_path: Path) -> None:
    proc = run_module("scenarios.run", str(tmp_path / "absent.toml"))
    assert proc.returncode == 2
    assert proc.stderr.startswith("absent.toml: cannot read the file")
    assert "Traceback" not in proc.stderr


def test_parse_round_overrides() -> None:
    import tomllib

    from scenarios.run import parse_scenario

    scenario = parse_scenario(tomllib.loads(
        VALID + 'expect = "ok"\n[drops]\n3 = "share_keys"\n'
        '[[round_drops]]\nround = 1\ndrops = { 5 = "relay" }\nexpect = "aborted"\n'), "t")
    assert scenario.threshold == 11
    assert scenario.drops_for(0) == {3: "share_keys"}
    assert scenario.drops_for(1) == {5: "relay"}
    assert (scenario.expect_for(0), scenario.expect_for(1)) == ("ok", "aborted")
