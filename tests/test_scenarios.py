"""The scenario scripts: the demo (every mode, both transports), the dropout study
(--quick, both transports; a hybrid-mode run) and the scenario-file runner (every
example, and bad files rejected in one line)."""

from __future__ import annotations

import json
import os
import re
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


# ------------------------------------------------------------- demo


def _demo_vectors(stdout: str) -> tuple[list[float], list[float]]:
    def vector(label: str) -> list[float]:
        match = re.search(rf"^{label}\s*: \[([^\]]*)\]", stdout, re.MULTILINE)
        assert match, stdout
        return [float(v) for v in match.group(1).split()]
    return vector("secure aggregate"), vector("plaintext sum")


@pytest.mark.parametrize("transport", ["sim", "network"])
@pytest.mark.parametrize("mode", ["masking", "paillier", "hybrid"])
def test_demo(mode: str, transport: str) -> None:
    proc = run_module("scenarios.demo", "--mode", mode,
                      *(("--sim",) if transport == "sim" else ()))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "round status: ok" in out and f"{mode} mode" in out
    aggregate, expected = _demo_vectors(out)
    assert len(aggregate) == len(expected) == 6
    assert max(abs(a - b) for a, b in zip(aggregate, expected, strict=True)) < 1e-6
    assert "max |difference|" in out
    contributors = re.search(r"^contributors \((\d+)\): (.*)$", out, re.MULTILINE)
    assert contributors, out
    names = contributors.group(2).split(", ")
    assert len(names) == int(contributors.group(1))
    skipped = [line for line in out.splitlines() if "do not apply" in line]
    if mode == "paillier":
        # No share exchange, no unmasking: said once, and both peers contribute.
        assert len(skipped) == 1, out
        assert "during the share exchange" in skipped[0] and "during unmasking" in skipped[0]
        assert sum(1 for name in names if name.endswith(("-01", "-00001"))) == 1
        assert sum(1 for name in names if name.endswith(("-04", "-00004"))) == 1
        assert len(names) == 10 and out.count("  dropped ") == 2
        assert "no_share_report" not in out and "unmask_share_missing" not in out
    else:
        assert skipped == [], out
        assert len(names) == 9 and out.count("  dropped ") == 4
        assert "no_share_report" in out and "unmask_share_missing" in out


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


def test_hybrid_dropout_study(tmp_path: Path) -> None:
    out = tmp_path / "study"
    proc = run_module("scenarios.dropouts", "--mode", "hybrid", "--peers", "8", "--rates",
                      "0,0.25", "--phases", "share_keys,masked_input,relay,unmasking",
                      "--seeds", "1", "--dim", "4", "--jobs", "1", "--no-plots",
                      "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "hybrid mode" in proc.stdout
    report: dict[str, Any] = json.loads((out / "report.json").read_text())
    assert report["config"]["mode"] == "hybrid"
    runs = report["runs"]
    assert len(runs) == 5
    for run in runs:
        assert run["mode"] == "hybrid" and run["transport"] == "sim"
        assert run["status"] == "ok", run  # 2 of 8 drop, t = 5
        assert run["exact"] is True and run["max_error"] <= run["tolerance"] * (1 + 1e-9)
        assert run["unexpected_contributors"] == []
        assert run["effective_drops"] == run["drops"]  # every phase applies
    unmasking = [run for run in runs if run["phase"] == "unmasking"]
    assert unmasking and all(len(run["contributors"]) == 8 for run in unmasking)
    assert all(cell["expected"] == "ok" for cell in report["cells"])


def test_paillier_sparse_refused(tmp_path: Path) -> None:
    proc = run_module("scenarios.dropouts", "--mode", "paillier", "--graph", "sparse",
                      "--quick", "--out", str(tmp_path / "study"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "paillier" in lines[0] and "complete" in lines[0], proc.stderr
    assert not (tmp_path / "study").exists()


def test_mode_phases() -> None:
    from scenarios.common import check_mode, inapplicable_phases, phase_applies

    assert inapplicable_phases("masking") == inapplicable_phases("hybrid") == ()
    assert inapplicable_phases("paillier") == ("consistency_check", "unmasking")
    assert phase_applies("share_keys", "paillier")  # dies on the roster
    assert not phase_applies("unmasking", "paillier")
    assert check_mode("hybrid", "sparse") == "hybrid"
    with pytest.raises(ValueError, match="complete graph"):
        check_mode("paillier", "sparse")
    with pytest.raises(ValueError, match="unknown mode"):
        check_mode("rsa")


def test_paillier_network_drops() -> None:
    """Over websockets, paillier mode: a share_keys peer dies on the roster, an
    unmasking peer is never killed and contributes."""
    from scenarios.common import make_inputs, run_network_rounds

    inputs = make_inputs(8, 3, seed=4)
    (report,) = run_network_rounds([inputs], 5, [{1: "share_keys", 2: "unmasking"}],
                                   phase_timeout=1.0, mode="paillier")
    assert report.mode == "paillier" and report.status == "ok", report
    assert report.exact is True
    assert 1 not in report.contributors and 1 in report.dropped
    assert 2 in report.contributors and 2 not in report.dropped
    assert report.killed == {1: "share_keys"}
    assert report.to_json()["mode"] == "paillier"


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
    assert {"basic", "sparse_200", "websockets", "too_many_drops", "hybrid"} <= names


@pytest.mark.parametrize("path", _example_files(), ids=lambda p: p.stem)
def test_example_scenario(path: Path, tmp_path: Path) -> None:
    import tomllib

    spec = tomllib.loads(path.read_text())
    mode = spec.get("mode", "masking")
    out = tmp_path / "report.json"
    proc = run_module("scenarios.run", str(path), "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["passed"] is True
    assert report["scenario"]["mode"] == mode and f"{mode} mode" in proc.stdout
    rounds = report["rounds"]
    assert len(rounds) == spec.get("rounds", 1)
    assert [r["round"] for r in rounds] == list(range(len(rounds)))
    for r in rounds:
        assert r["problems"] == [] and r["mode"] == mode
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
                if mode == "paillier":  # no unmasking: the peer is never killed
                    assert index not in r["dropped"] and index in r["not_applicable"]
                else:
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
    "bad_mode": (VALID + 'mode = "rsa"\n',
                 'mode: unknown value "rsa"; expected one of masking, paillier, hybrid'),
    "bad_mode_type": (VALID + "mode = 2\n", "mode: expected a string, got an integer"),
    "paillier_sparse": (VALID.replace('graph = "complete"', 'graph = "sparse"') +
                        'mode = "paillier"\n', 'mode: "paillier" needs graph = "complete"'),
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
    assert scenario.mode == "masking" and scenario.to_json()["mode"] == "masking"


def test_parse_paillier_scenario() -> None:
    import tomllib

    from scenarios.run import parse_scenario

    scenario = parse_scenario(tomllib.loads(
        VALID + 'mode = "paillier"\n[drops]\n3 = "share_keys"\n4 = "unmasking"\n'
        '5 = "consistency_check"\n'), "t")
    assert scenario.mode == "paillier"
    assert scenario.inapplicable_drops(0) == {4: "unmasking", 5: "consistency_check"}
