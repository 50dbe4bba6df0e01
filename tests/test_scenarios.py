"""The scenario scripts: the demo (every mode, both transports), the dropout study
(--quick, both transports; a hybrid-mode run; its rate grid, notes and plots), the
FedAvg plot, the scenario-file runner (every example, and bad files rejected in one
line), and every script's ``--help``."""

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
        for rate in config["rates"][str(n)]:
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
    if transport == "sim":
        # The default grid straddles the cliff at every n, and the notes say why rounds
        # aborted in words and numbers, not placeholders.
        for n in config["peers"]:
            drops = {c["drops"] for c in cells if c["n"] == n}
            survivable = n - (n // 2 + 1)
            assert {survivable, survivable + 1} <= drops, (n, drops)
        aborted = [c for c in cells if c["aborted"]]
        assert aborted and all(c["abort_reasons"] for c in aborted)
        for cell in aborted:
            for reason in cell["abort_reasons"]:
                assert "#" not in reason and re.search(r"\d", reason), reason
        assert "threshold is" in proc.stdout and "#" not in proc.stdout

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
    # A deadline with room for eight Paillier encryptions on a busy 2-core machine.
    (report,) = run_network_rounds([inputs], 5, [{1: "share_keys", 2: "unmasking"}],
                                   phase_timeout=5.0, mode="paillier")
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


# ------------------------------------------------------------- help


SCRIPTS = ["demo", "dropouts", "fedavg_torch", "run"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_scenario_help_names_the_module(script: str) -> None:
    if script == "fedavg_torch":
        pytest.importorskip("torch")
    proc = run_module(f"scenarios.{script}", "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: python -m scenarios.{script} "), proc.stdout
    assert "`" not in proc.stdout


# ------------------------------------------------------------- dropout study: pieces


def test_merge_reasons() -> None:
    from scenarios.dropouts import merge_reasons

    assert merge_reasons([]) == []
    assert merge_reasons(["U2 has 0 peers, below the threshold 11"] * 3) == \
        ["U2 has 0 peers, below the threshold 11"]
    assert merge_reasons(["only 9 masked inputs reached the root, threshold is 11",
                          "only 10 masked inputs reached the root, threshold is 11",
                          "U2 has 3 peers, below the threshold 11"]) == \
        ["only 9–10 masked inputs reached the root, threshold is 11",
         "U2 has 3 peers, below the threshold 11"]
    self_mask = "cannot unmask: too few live holders of shares of the self mask of {} (11 needed)"
    assert merge_reasons([self_mask.format("'peer-00000'"),
                          self_mask.format("'peer-00001'")]) == \
        [self_mask.format("'peer-00000' or 'peer-00001'")]
    assert merge_reasons([self_mask.format(f"'peer-0000{i}'") for i in range(4)]) == \
        [self_mask.format("'peer-00000' and 3 others")]


@pytest.mark.parametrize("transport", ["sim", "websockets"])
def test_default_rates_straddle_the_cliff(transport: str) -> None:
    from scenarios.dropouts import DEFAULTS, QUICK, drop_count, rate_grid

    for settings in (DEFAULTS[transport], {**DEFAULTS[transport], **QUICK[transport]}):
        for n in settings["peers"]:
            grid = rate_grid(n, settings["rates"], settings["cliff"])
            drops = [drop_count(rate, n) for rate in grid]
            assert drops == sorted(set(drops)) and drops[0] == 0, (n, grid)
            survivable = n - (n // 2 + 1)
            if settings["cliff"]:
                # The last drop count that succeeds and the first that does not.
                assert survivable in drops and survivable + 1 in drops, (n, grid)
    assert rate_grid(20, [0.0, 0.2], cliff=False) == [0.0, 0.2]
    assert rate_grid(20, [0.0, 0.45, 0.2], cliff=True) == [0.0, 0.2, 0.45, 0.5]


def _synthetic_study(peers: tuple[int, ...]) -> tuple[list[dict[str, Any]],
                                                      list[dict[str, Any]], list[str]]:
    """Cells and runs shaped like the study's, where a round succeeds iff drops <= n - t."""
    from scenarios.dropouts import BASELINE, PHASE_CHOICES, drop_count, rate_grid

    phases = [p for p in PHASE_CHOICES if p not in ("advertise_keys", "consistency_check")]
    cells, runs = [], []
    for n in peers:
        t = n // 2 + 1
        for rate in rate_grid(n, [0.0, 0.2, 0.4, 0.6], cliff=True):
            drops = drop_count(rate, n)
            for phase in ([BASELINE] if drops == 0 else phases):
                ok = drops <= n - t
                cells.append({"n": n, "rate": rate, "phase": phase, "drops": drops,
                              "success_rate": 1.0 if ok else 0.0})
                runs.append({"n": n, "rate": rate, "phase": phase,
                             "status": "ok" if ok else "aborted",
                             "wall_seconds": 0.01 * n * (1 + drops / n),
                             "max_peer_bytes_sent": 200.0 * n, "server_bytes_in": 600.0 * n})
    return cells, runs, phases


def _renderer(fig: Any) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if not isinstance(fig.canvas, FigureCanvasAgg):  # a figure closed by pyplot
        FigureCanvasAgg(fig)
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def _texts_fit(fig: Any) -> None:
    """Every panel (with its title, labels, tick labels, legend) and the figure's title
    lie inside the figure: nothing is cut off."""
    renderer = _renderer(fig)
    box = fig.bbox
    extents = [ax.get_tightbbox(renderer) for ax in fig.axes]
    if fig.get_suptitle():
        extents.append(fig._suptitle.get_window_extent(renderer))
    for extent in extents:
        assert extent.x0 >= box.x0 - 1 and extent.x1 <= box.x1 + 1 and \
            extent.y0 >= box.y0 - 1 and extent.y1 <= box.y1 + 1, (extent, box)


def _no_point_under_legend(ax: Any, legend: Any) -> None:
    area = legend.get_window_extent(_renderer(ax.figure))
    for line in ax.lines:
        for x, y in line.get_transform().transform(line.get_xydata()):
            assert not area.contains(x, y), (line.get_label(), x, y)


def test_success_plot_shows_the_cliff() -> None:
    from scenarios.dropouts import CLIFF_LABEL, plot_success

    cells, _runs, phases = _synthetic_study((10, 20, 50))
    fig = plot_success(cells, phases, "sim")
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["n = 10, t = 6", "n = 20, t = 11",
                                               "n = 50, t = 26"]
    for ax, n in zip(axes, (10, 20, 50), strict=True):
        assert ax.get_xlabel() and not ax.texts  # no label drawn over the curves
        curves = [line for line in ax.lines if line.get_label() in phases]
        assert len(curves) == len(phases)
        survivable = n - (n // 2 + 1)
        for line in curves:
            assert line.get_drawstyle() == "steps-post"
            points = dict(zip(line.get_xdata(), line.get_ydata(), strict=True))
            assert points[survivable / n] == 1.0 and points[(survivable + 1) / n] == 0.0
        (cliff,) = [line for line in ax.lines if line.get_label() == CLIFF_LABEL]
        assert list(cliff.get_xdata()) == [survivable / n] * 2
    legend = axes[0].get_legend()
    assert CLIFF_LABEL in [text.get_text() for text in legend.get_texts()]
    _no_point_under_legend(axes[0], legend)
    _texts_fit(fig)


def test_success_plot_of_one_n_fits() -> None:
    """One panel (e.g. --quick over websockets, n = 8, rates 0 and 0.25): the title
    still fits, and the cliff line is inside the panel although no rate reached it."""
    from scenarios.dropouts import CLIFF_LABEL, plot_success

    cells, _runs, phases = _synthetic_study((8,))
    cells = [cell for cell in cells if cell["drops"] <= 2]
    fig = plot_success(cells, phases, "websockets, complete graph, masking mode")
    (ax,) = fig.axes
    (cliff,) = [line for line in ax.lines if line.get_label() == CLIFF_LABEL]
    low, high = ax.get_xlim()
    assert low < cliff.get_xdata()[0] == 3 / 8 < high
    _texts_fit(fig)


def test_time_and_bytes_plots_label_their_axes() -> None:
    from scenarios.dropouts import AVERAGED, plot_bytes, plot_time

    _cells, runs, phases = _synthetic_study((10, 20, 30))
    fig = plot_time(runs, phases, "websockets, complete graph, masking mode")
    (ax,) = fig.axes
    assert ax.get_yscale() == "linear"  # less than a decade: no log axis labelled 1.2×10^0
    assert list(ax.get_xticks()) == [10, 20, 30]
    assert [label.get_text() for label in ax.get_xticklabels()] == ["10", "20", "30"]
    assert ax.get_ylabel() and AVERAGED in ax.get_title()
    _no_point_under_legend(ax, ax.get_legend())
    _texts_fit(fig)
    fig = plot_bytes(runs, phases, "websockets, complete graph, masking mode")
    assert AVERAGED in fig.get_suptitle()
    for ax in fig.axes:
        assert list(ax.get_xticks()) == [10, 20, 30] and ax.get_ylabel()
    _no_point_under_legend(fig.axes[0], fig.axes[0].get_legend())
    _texts_fit(fig)


def test_fedavg_plot_keeps_every_point_visible(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from scenarios.fedavg_torch import plot

    errors = [8e-16, 0.0, 0.0, 0.0, 9e-16, 0.0, 1e-15, 0.0]
    rounds = [{"round": r, "secure_accuracy": 0.5 + 0.05 * r,
               "plaintext_accuracy": 0.5 + 0.05 * r, "max_param_diff": 0.0,
               "aggregate_error": errors[r], "aggregate_error_bound": 8e-14}
              for r in range(8)]
    report = {"rounds": rounds, "initial_accuracy": 0.04, "config": {"peers": 12}}
    fig = plot(report, tmp_path / "accuracy.png")
    assert (tmp_path / "accuracy.png").read_bytes().startswith(PNG_SIGNATURE)
    left, right = fig.axes
    assert left.get_ylabel() and right.get_ylabel()
    for ax in (left, right):
        _no_point_under_legend(ax, ax.get_legend())
    _texts_fit(fig)
