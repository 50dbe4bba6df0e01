"""Run a scenario described in a TOML file: peers, rounds, and who drops when.

    python -m scenarios.run scenarios/examples/basic.toml [--out report.json] [--check]

The file (every key but ``peers`` is optional)::

    name = "twenty peers, three drops"   # default: the file name
    description = "free text"
    transport = "sim"        # "sim" (in-memory simulator) or "websockets" (127.0.0.1)
    peers = 20               # number of peers n, >= 2 (websockets: at most 200)
    dim = 100                # vector length, >= 1
    threshold = 11           # n/2 < threshold <= n; default floor(n/2) + 1
    graph = "complete"       # "complete" or "sparse" (SecAgg+)
    mode = "masking"         # "masking", "paillier" (complete graph only) or "hybrid"
    rounds = 2               # >= 1
    seed = 1                 # >= 0: inputs (and the simulator's randomness) derive from it
    fan_in = 8               # accumulation tree fan-in, >= 2 (default 8; websockets 3)
    phase_timeout = 5.0      # seconds per phase deadline (virtual in the simulator;
                             # default 10, websockets 5)
    expect = "ok"            # optional check of every round: "ok" or "aborted"

    [drops]                  # peer index (0..n-1) -> phase; applies to every round
    3 = "share_keys"
    7 = "masked_input"

    [[round_drops]]          # optional, per round (0 is the first round): replaces
    round = 1                # [drops] for that round; its own optional expect
    drops = { 5 = "relay", 9 = "unmasking" }
    expect = "ok"

Phases: ``advertise_keys`` (never registers), ``share_keys``, ``masked_input``
(dies before sending its masked input), ``relay`` (dies holding its children's
partial sums), ``consistency_check`` (= ``unmasking``: there is no R3 under the
honest-but-curious model), ``unmasking`` (dies after its input is in). Over
websockets each is a crash at the matching peer state; see :mod:`scenarios.common`
(a peer scripted as a relay that turns out to be a leaf is crashed after its sum
left). Inputs of round r are uniform in [-1, 1), drawn from ``(seed, r)``.

Modes: ``masking`` (pairwise and self masks), ``hybrid`` (masked vectors, also
Paillier-encrypted; the same phases) and ``paillier`` (inputs Paillier-encrypted
under the server's key; complete graph only). A paillier round has no share
exchange and no unmasking: a ``share_keys`` peer dies when the roster arrives
(it never contributes), and ``consistency_check`` / ``unmasking`` peers are not
killed at all: the runner says so and they contribute normally.

Validation is strict: an unknown key, a wrong type, an out-of-range peer index,
an unknown phase or mode, paillier mode on the sparse graph, a threshold outside
(n/2, n] or malformed TOML is reported in one line naming the key, e.g.
``scenario.toml: drops."25": peer index out of range 0..19``, with exit status 2.

For each round the script prints the status, the contributors, the dropped peers
with the reason (and what the script did to them) and whether the aggregate is
exact (within n / scale of the contributors' plaintext sum), and it writes a JSON
report (``--out``, default ``results/scenarios/<file name>.json``). Exit status: 0
when every round met its expectation and every ok round is exact, 1 otherwise, 2
for an invalid scenario.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from scenarios.common import (
    MODES,
    PHASES,
    Mode,
    RoundReport,
    default_threshold,
    make_inputs,
    phase_applies,
    run_network_rounds,
    run_sim_round,
)
from secagg.graph import GraphKind

TRANSPORTS = ("sim", "websockets")
GRAPHS = ("complete", "sparse")
STATUSES = ("ok", "aborted")
MAX_PEERS = {"sim": 99_999, "websockets": 200}
MAX_DIM = 10_000_000
MAX_ROUNDS = 1000
TOP_KEYS = ("name", "description", "transport", "peers", "dim", "threshold", "graph",
            "mode", "rounds", "seed", "fan_in", "phase_timeout", "expect", "drops", "round_drops")
ROUND_KEYS = ("round", "drops", "expect")
DEFAULT_FAN_IN = {"sim": 8, "websockets": 3}
DEFAULT_TIMEOUT = {"sim": 10.0, "websockets": 5.0}


class ScenarioError(Exception):
    """An invalid scenario: ``key`` names where, ``message`` what is wrong."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key
        self.message = message


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    transport: str
    peers: int
    dim: int
    threshold: int
    graph: str
    rounds: int
    seed: int
    fan_in: int
    phase_timeout: float
    expect: str | None
    drops: dict[int, str]
    round_drops: dict[int, dict[int, str]] = field(default_factory=dict)
    round_expect: dict[int, str] = field(default_factory=dict)
    mode: str = "masking"

    def drops_for(self, round_number: int) -> dict[int, str]:
        return dict(self.round_drops.get(round_number, self.drops))

    def expect_for(self, round_number: int) -> str | None:
        return self.round_expect.get(round_number, self.expect)

    def inapplicable_drops(self, round_number: int) -> dict[int, str]:
        """Scripted drops that this scenario's mode never carries out."""
        return {u: phase for u, phase in self.drops_for(round_number).items()
                if not phase_applies(phase, self.mode)}

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "description": self.description, "transport": self.transport,
            "peers": self.peers, "dim": self.dim, "threshold": self.threshold,
            "graph": self.graph, "mode": self.mode, "rounds": self.rounds, "seed": self.seed,
            "fan_in": self.fan_in, "phase_timeout": self.phase_timeout, "expect": self.expect,
            "drops": {str(k): v for k, v in self.drops.items()},
            "round_drops": [{"round": r, "drops": {str(k): v for k, v in d.items()},
                             **({"expect": self.round_expect[r]}
                                if r in self.round_expect else {})}
                            for r, d in sorted(self.round_drops.items())],
        }


# ------------------------------------------------------------------ parsing

_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
               dict: "a table", list: "an array"}


def _describe(value: Any) -> str:
    kind = _TYPE_NAMES.get(type(value), type(value).__name__)
    if isinstance(value, dict | list):
        return kind
    text = json.dumps(value) if isinstance(value, str | bool) else repr(value)
    return f"{kind} ({text[:40]})"


def _key(*parts: str | int) -> str:
    """A TOML-style key path: drops."25", round_drops[1].drops."3"."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", part):
            out += f".{part}" if out else part
        else:
            quoted = json.dumps(part)
            out += f".{quoted}" if out else quoted
    return out


def _get_int(data: Mapping[str, Any], key: str, default: int | None, low: int, high: int,
             path: str | None = None) -> int:
    where = path or key
    if key not in data:
        if default is None:
            raise ScenarioError(where, "missing (required)")
        return default
    value = data[key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise ScenarioError(where, f"expected an integer, got {_describe(value)}")
    if not low <= value <= high:
        raise ScenarioError(where, f"{value} out of range {low}..{high}")
    return value


def _get_str(data: Mapping[str, Any], key: str, default: str | None,
             choices: Sequence[str] | None = None, path: str | None = None) -> str | None:
    where = path or key
    if key not in data:
        return default
    value = data[key]
    if not isinstance(value, str):
        raise ScenarioError(where, f"expected a string, got {_describe(value)}")
    if choices is not None and value not in choices:
        raise ScenarioError(where, f"unknown value {json.dumps(value)}; expected one of "
                                   f"{', '.join(choices)}")
    return value


def _check_keys(data: Mapping[str, Any], allowed: Sequence[str], prefix: str | int = "") -> None:
    for key in data:
        if key not in allowed:
            path = _key(*((prefix,) if prefix != "" else ()), key)
            raise ScenarioError(path, f"unknown key (allowed: {', '.join(allowed)})")


def _parse_drops(value: Any, n: int, *path: str | int) -> dict[int, str]:
    if not isinstance(value, dict):
        raise ScenarioError(_key(*path), f"expected a table of peer index = phase, got "
                                         f"{_describe(value)}")
    drops: dict[int, str] = {}
    for raw, phase in value.items():
        where = _key(*path, raw)
        if not re.fullmatch(r"-?\d+", raw.strip()):
            raise ScenarioError(where, "peer index must be an integer")
        index = int(raw)
        if not 0 <= index < n:
            raise ScenarioError(where, f"peer index out of range 0..{n - 1}")
        if index in drops:
            raise ScenarioError(where, f"peer {index} is given twice")
        if not isinstance(phase, str):
            raise ScenarioError(where, f"expected a phase name, got {_describe(phase)}")
        if phase not in PHASES:
            raise ScenarioError(where, f"unknown phase {json.dumps(phase)}; phases are "
                                       f"{', '.join(PHASES)}")
        drops[index] = phase
    return dict(sorted(drops.items()))


def parse_scenario(data: Mapping[str, Any], default_name: str) -> Scenario:
    """Validate a decoded TOML document; raise ScenarioError naming the bad key."""
    _check_keys(data, TOP_KEYS)
    name = _get_str(data, "name", default_name) or default_name
    description = _get_str(data, "description", "") or ""
    transport = cast(str, _get_str(data, "transport", "sim", TRANSPORTS))
    n = _get_int(data, "peers", None, 2, MAX_PEERS[transport])
    dim = _get_int(data, "dim", 100, 1, MAX_DIM)
    threshold = default_threshold(n)
    if "threshold" in data:
        threshold = _get_int(data, "threshold", None, 1, n)
        if 2 * threshold <= n:
            raise ScenarioError("threshold", f"{threshold} must be more than peers/2 = "
                                              f"{n / 2:g} (at least {n // 2 + 1})")
    graph = cast(str, _get_str(data, "graph", "complete", GRAPHS))
    mode = cast(str, _get_str(data, "mode", "masking", MODES))
    if mode == "paillier" and graph != "complete":
        raise ScenarioError("mode", f'"paillier" needs graph = "complete", not '
                                    f'{json.dumps(graph)} (no masks, so no neighbour graph)')
    rounds = _get_int(data, "rounds", 1, 1, MAX_ROUNDS)
    seed = _get_int(data, "seed", 0, 0, 2**63 - 1)
    fan_in = _get_int(data, "fan_in", DEFAULT_FAN_IN[transport], 2, 1024)
    timeout = DEFAULT_TIMEOUT[transport]
    if "phase_timeout" in data:
        value = data["phase_timeout"]
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ScenarioError("phase_timeout", f"expected a number, got {_describe(value)}")
        if not 0 < value <= 3600:
            raise ScenarioError("phase_timeout", f"{value} out of range (0, 3600] seconds")
        timeout = float(value)
    expect = _get_str(data, "expect", None, STATUSES)
    drops = _parse_drops(data.get("drops", {}), n, "drops")

    round_drops: dict[int, dict[int, str]] = {}
    round_expect: dict[int, str] = {}
    entries = data.get("round_drops", [])
    if not isinstance(entries, list):
        raise ScenarioError("round_drops", "expected an array of tables ([[round_drops]]), "
                                           f"got {_describe(entries)}")
    for i, entry in enumerate(entries):
        where = _key("round_drops", i)
        if not isinstance(entry, dict):
            raise ScenarioError(where, f"expected a table, got {_describe(entry)}")
        for key in entry:
            if key not in ROUND_KEYS:
                raise ScenarioError(_key("round_drops", i, key),
                                    f"unknown key (allowed: {', '.join(ROUND_KEYS)})")
        r = _get_int(entry, "round", None, 0, rounds - 1, path=_key("round_drops", i, "round"))
        if r in round_drops:
            raise ScenarioError(_key("round_drops", i, "round"), f"round {r} is given twice")
        if "drops" not in entry:
            raise ScenarioError(_key("round_drops", i, "drops"), "missing (required)")
        round_drops[r] = _parse_drops(entry["drops"], n, "round_drops", i, "drops")
        round_status = _get_str(entry, "expect", None, STATUSES,
                                path=_key("round_drops", i, "expect"))
        if round_status is not None:
            round_expect[r] = round_status
    return Scenario(name=name, description=description, transport=transport, peers=n,
                    dim=dim, threshold=threshold, graph=graph, rounds=rounds, seed=seed,
                    fan_in=fan_in, phase_timeout=timeout, expect=expect, drops=drops,
                    round_drops=round_drops, round_expect=round_expect, mode=mode)


def load_scenario(path: Path) -> Scenario:
    """Read and validate a scenario file; ScenarioError on any problem."""
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ScenarioError("", f"cannot read the file: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ScenarioError("", "not UTF-8 text") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError("", f"invalid TOML: {exc}") from None
    return parse_scenario(data, path.stem)


# ------------------------------------------------------------------ running


def round_inputs(scenario: Scenario, round_number: int) -> np.ndarray:
    return make_inputs(scenario.peers, scenario.dim,
                       seed=int(np.random.SeedSequence([scenario.seed, round_number])
                                .generate_state(1)[0]))


def run_scenario(scenario: Scenario) -> list[RoundReport]:
    inputs = [round_inputs(scenario, r) for r in range(scenario.rounds)]
    drops = [scenario.drops_for(r) for r in range(scenario.rounds)]
    graph = cast(GraphKind, scenario.graph)
    mode = cast(Mode, scenario.mode)
    if scenario.transport == "sim":
        return [run_sim_round(x, scenario.threshold, d, graph=graph,
                              seed=scenario.seed + r, fan_in=scenario.fan_in,
                              phase_timeout=scenario.phase_timeout, round_number=r,
                              mode=mode)
                for r, (x, d) in enumerate(zip(inputs, drops, strict=True))]
    return run_network_rounds(inputs, scenario.threshold, drops, graph=graph,
                              fan_in=scenario.fan_in, phase_timeout=scenario.phase_timeout,
                              mode=mode)


def ranges(indices: Sequence[int]) -> str:
    """[0, 1, 2, 4, 6, 7] -> "0-2, 4, 6-7"."""
    parts: list[str] = []
    values = sorted(indices)
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        parts.append(str(values[i]) if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    return ", ".join(parts) if parts else "none"


def check_round(report: RoundReport, expected: str | None) -> list[str]:
    """What is wrong with a round (empty when nothing is)."""
    problems: list[str] = []
    if expected is not None and report.status != expected:
        problems.append(f"expected {expected}, got {report.status}")
    if report.ok and report.exact is not True:
        problems.append("the aggregate is not exact")
    if report.unexpected_contributors:
        problems.append(f"peers scripted to die before sending their input were counted: "
                        f"{ranges(report.unexpected_contributors)}")
    return problems


def print_round(report: RoundReport, expected: str | None, problems: Sequence[str],
                inapplicable: Mapping[int, str] | None = None) -> None:
    header = f"round {report.round}: {report.status}"
    if report.reason:
        header += f" ({report.reason})"
    header += f" in {report.wall_seconds:.3f} s"
    if expected is not None:
        header += f"; expected {expected}: " + ("yes" if report.status == expected else "NO")
    print(header)
    print(f"  contributors ({len(report.contributors)}): {ranges(report.contributors)}")
    if inapplicable:
        print(f"  not applicable in {report.mode} mode (no such phase; these peers contribute "
              "normally): " + ", ".join(f"{i} ({phase})" for i, phase in inapplicable.items()))
    if report.dropped:
        print(f"  dropped ({len(report.dropped)}):")
        scripted = report.killed if report.killed is not None else report.scheduled
        for index, reason in report.dropped.items():
            note = f" (scripted: {scripted[index]})" if index in scripted else ""
            print(f"    {index}: {reason}{note}")
    unaccounted = [i for i in (report.killed or report.scheduled)
                   if i not in report.dropped and i not in (inapplicable or {})]
    if unaccounted:
        what = report.killed if report.killed is not None else report.scheduled
        print("  scripted but not listed as dropped: " +
              ", ".join(f"{i} ({what[i]})" for i in unaccounted))
    if report.ok:
        verdict = "exact" if report.exact else "NOT EXACT"
        print(f"  aggregate {verdict}: max |error| {report.max_error:.3g} "
              f"(bound n/scale = {report.tolerance:.3g})")
    print(f"  bytes: busiest peer sent {report.max_peer_bytes_sent}, server received "
          f"{report.server_bytes_in}; U1..U4 = " +
          "/".join(str(report.stats.get(k, "-")) for k in ("u1", "u2", "u3", "u4")))
    for problem in problems:
        print(f"  PROBLEM: {problem}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scenarios.run",
                                     description="run a secagg scenario file (TOML)")
    parser.add_argument("scenario", type=Path, help="the scenario file (.toml)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON report path (default results/scenarios/<name>.json)")
    parser.add_argument("--check", action="store_true",
                        help="only validate the file and print the parsed scenario")
    args = parser.parse_args(argv)
    path: Path = args.scenario
    try:
        scenario = load_scenario(path)
    except ScenarioError as exc:
        print(f"{path.name}: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(json.dumps(scenario.to_json(), indent=1))
        return 0

    logging.basicConfig(level=logging.CRITICAL)
    print(f"scenario {scenario.name!r}: {scenario.transport}, {scenario.peers} peers, "
          f"dim {scenario.dim}, threshold {scenario.threshold}, {scenario.graph} graph, "
          f"{scenario.mode} mode, "
          f"{scenario.rounds} round{'s' if scenario.rounds != 1 else ''}, fan-in "
          f"{scenario.fan_in}, phase timeout {scenario.phase_timeout:g} s")
    if scenario.description:
        print(f"  {scenario.description}")
    started = time.perf_counter()
    try:
        reports = run_scenario(scenario)
    except Exception as exc:  # a library failure: one line, no traceback
        print(f"{path.name}: the run failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - started

    rounds_json: list[dict[str, Any]] = []
    failed = False
    for report in reports:
        expected = scenario.expect_for(report.round)
        problems = check_round(report, expected)
        failed = failed or bool(problems)
        inapplicable = scenario.inapplicable_drops(report.round)
        print_round(report, expected, problems, inapplicable)
        rounds_json.append({**report.to_json(), "expect": expected, "problems": problems,
                            "not_applicable": {str(k): v for k, v in inapplicable.items()}})
    out: Path = args.out or Path("results/scenarios") / f"{path.stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"scenario": scenario.to_json(), "file": str(path),
                               "elapsed_seconds": elapsed, "passed": not failed,
                               "rounds": rounds_json}, indent=1) + "\n")
    print(f"{len(reports)} round{'s' if len(reports) != 1 else ''} in {elapsed:.2f} s; "
          f"{'all as expected' if not failed else 'PROBLEMS found'}; wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
