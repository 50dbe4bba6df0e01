"""Integration: a real ``secagg-server`` process and real ``secagg-peer`` processes.

Peers run with ``-v``, which logs ``round R: STATE`` to stderr at every state
change; the test watches those lines and SIGKILLs chosen peers when they reach a
phase. A state is logged in the same step that queues the state's outgoing
frames, before any of them is written, so a peer whose last logged state is
``reported`` (or earlier) died before its masked input left it, whatever the
timing of the kill. Assertions depend only on that, never on speed.

Also the CLI contract (DESIGN.md section 7): bad arguments exit non-zero with one
line on stderr and no traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers_network import HOST, assert_exact_sum, make_inputs, peer_names, tolerance

N = 8
T = 5
DIM = 32
PHASE_TIMEOUT = 10.0
PROCESS_TIMEOUT = 90.0
BEFORE_INPUT = frozenset({"", "idle", "advertised", "sharing", "reported", "masking"})
STATE_LINE = re.compile(r"secagg\.peer\.cli INFO round (\d+): (\w+)\s*$")
LISTENING = re.compile(r"secagg-server listening on (ws://\S+)")
BIN = Path(sys.executable).parent


@dataclass
class Process:
    """A child process whose stderr is read line by line as it is written."""

    name: str
    proc: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)
    states: list[str] = field(default_factory=list)
    killed: bool = False
    reader: asyncio.Task[None] | None = None

    @property
    def state(self) -> str:
        """The last state read so far (the process may already be further)."""
        return self.states[-1] if self.states else ""

    def kill(self) -> None:
        """SIGKILL, once."""
        if not self.killed and self.proc.returncode is None:
            self.killed = True
            self.proc.send_signal(signal.SIGKILL)

    async def finish(self, timeout: float = PROCESS_TIMEOUT) -> int:
        returncode = await asyncio.wait_for(self.proc.wait(), timeout)
        if self.reader is not None:
            await asyncio.wait_for(self.reader, timeout)
        return returncode


LineHook = Callable[[Process, str], None]


async def spawn(name: str, args: list[str], hook: LineHook | None = None) -> Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *args, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    process = Process(name, proc)

    async def read() -> None:
        assert proc.stderr is not None
        while line := (await proc.stderr.readline()).decode(errors="replace"):
            process.lines.append(line.rstrip("\n"))
            match = STATE_LINE.search(line)
            if match and int(match.group(1)) == 0:
                process.states.append(match.group(2))
            if hook is not None:
                hook(process, line)

    process.reader = asyncio.create_task(read())
    return process


@dataclass
class Cluster:
    """A server process, its peers, and what the test kills."""

    tmp: Path
    n: int = N
    threshold: int = T
    fan_in: int = 8
    server_args: tuple[str, ...] = ()
    server: Process | None = None
    peers: dict[str, Process] = field(default_factory=dict)
    inputs: dict[str, np.ndarray] = field(default_factory=dict)
    out: Path = field(init=False)

    def __post_init__(self) -> None:
        self.out = self.tmp / "out"

    async def start(self, peer_hook: Callable[[Cluster, Process, str], None] | None = None,
                    peer_args: Callable[[str], list[str]] | None = None) -> None:
        url_found: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        def server_hook(process: Process, line: str) -> None:
            match = LISTENING.search(line)
            if match and not url_found.done():
                url_found.set_result(match.group(1))

        self.server = await spawn("server", [
            "-m", "server", "--host", HOST, "--port", "0", "--max-peers", str(self.n),
            "--threshold", str(self.threshold), "--dim", str(DIM),
            "--phase-timeout", str(PHASE_TIMEOUT), "--fan-in", str(self.fan_in),
            "--out", str(self.out), "-v", *self.server_args], server_hook)
        exited = asyncio.ensure_future(self.server.proc.wait())
        done, _ = await asyncio.wait([url_found, exited], timeout=30,
                                     return_when=asyncio.FIRST_COMPLETED)
        exited.cancel()
        assert url_found in done, "server did not start:\n" + "\n".join(self.server.lines)
        url = url_found.result()
        names = peer_names(self.n)
        self.inputs = make_inputs(names, DIM, seed=self.n)
        for name in names:
            path = self.tmp / f"{name}.npy"
            np.save(path, self.inputs[name])
            hook = None if peer_hook is None else \
                (lambda process, line: peer_hook(self, process, line))
            extra = peer_args(name) if peer_args is not None else []
            self.peers[name] = await spawn(name, [
                "-m", "peers", "--server", url, "--id", name, "--input", str(path), "-v",
                *extra], hook)

    async def wait(self) -> None:
        assert self.server is not None
        await self.server.finish()
        for peer in self.peers.values():
            await peer.finish()

    async def stop(self) -> None:
        for process in [*self.peers.values(), *([self.server] if self.server else [])]:
            if process.proc.returncode is None:
                process.proc.kill()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(process.proc.wait(), 10)
            if process.reader is not None:
                process.reader.cancel()
                with contextlib.suppress(BaseException):
                    await process.reader

    def record(self) -> dict[str, Any]:
        record: dict[str, Any] = json.loads((self.out / "round-0.json").read_text())
        return record

    def killed(self) -> dict[str, str]:
        """Killed peers and the last state each logged before it died.

        Only meaningful once the processes finished and their stderr was read to the end.
        """
        return {name: p.state for name, p in self.peers.items() if p.killed}

    def diagnostics(self) -> str:
        parts = []
        for process in [self.server, *self.peers.values()]:
            if process is not None:
                parts.append(f"--- {process.name} (rc={process.proc.returncode})")
                parts.extend(process.lines[-40:])
        return "\n".join(parts)


async def run_cluster(tmp_path: Path, hook: Callable[[Cluster, Process, str], None] | None,
                      **options: Any) -> Cluster:
    cluster = Cluster(tmp_path, **options)
    try:
        await cluster.start(hook)
        try:
            await cluster.wait()
        except TimeoutError:
            pytest.fail("processes did not finish:\n" + cluster.diagnostics())
    finally:
        await cluster.stop()
    return cluster


def kill_on(states: dict[str, str]) -> Callable[[Cluster, Process, str], None]:
    def hook(cluster: Cluster, process: Process, line: str) -> None:
        if process.state and states.get(process.name) == process.state:
            process.kill()
    return hook


def kill_first(state: str, count: int) -> Callable[[Cluster, Process, str], None]:
    chosen: list[str] = []

    def hook(cluster: Cluster, process: Process, line: str) -> None:
        if process.state == state and len(chosen) < count and process.name not in chosen:
            chosen.append(process.name)
            process.kill()
    return hook


def check_ok(cluster: Cluster) -> dict[str, Any]:
    record = cluster.record()
    assert record["status"] == "ok", (record, cluster.diagnostics())
    assert record["round"] == 0
    assert record["threshold"] == cluster.threshold
    contributors = record["contributors"]
    assert len(set(contributors)) == len(contributors) >= cluster.threshold
    aggregate = np.load(cluster.out / "round-0.npy", allow_pickle=False)
    assert aggregate.dtype == np.float64 and aggregate.shape == (DIM,)
    assert_exact_sum(aggregate, cluster.inputs, contributors, tolerance(cluster.n, DIM))
    killed = cluster.killed()
    for name, state in killed.items():
        assert cluster.peers[name].proc.returncode == -signal.SIGKILL
        if state in BEFORE_INPUT:
            assert name not in contributors, (name, state)
    for name in cluster.peers:
        if name not in contributors:
            assert record["dropped"].get(name), (name, record["dropped"])
    for name, peer in cluster.peers.items():
        if name not in killed:
            assert peer.proc.returncode == 0, (name, peer.lines[-5:])
            assert peer.state == "finished", (name, peer.states)
    return record


# ------------------------------------------------------------------ rounds


MODES = ["masking", "paillier", "hybrid"]
MASKED_MODES = ["masking", "hybrid"]  # the modes with R1 and R4 to kill peers in


def mode_args(mode: str) -> tuple[str, ...]:
    return ("--mode", mode)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
async def test_processes_round_without_kills(tmp_path: Path, mode: str) -> None:
    cluster = await run_cluster(tmp_path, None, server_args=mode_args(mode))
    record = check_ok(cluster)
    assert record["stats"]["mode"] == mode
    assert sorted(record["contributors"]) == sorted(cluster.peers)
    assert record["dropped"] == {}
    # The peers' stderr carries their progress and the outcome, and nothing secret.
    first_states = ["advertised", "reported"] if mode == "paillier" else \
        ["advertised", "sharing", "reported"]
    for peer in cluster.peers.values():
        states = [s for s in peer.states if s != "idle"]
        assert states[:len(first_states)] == first_states, peer.states
        assert states[-1] == "finished"
        assert any(f"{peer.name}: round 0: ok" in line for line in peer.lines)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MASKED_MODES)
async def test_processes_kill_during_share_exchange(tmp_path: Path, mode: str) -> None:
    victims = {"p001": "sharing", "p006": "sharing"}
    cluster = await run_cluster(tmp_path, kill_on(victims), server_args=mode_args(mode))
    assert set(cluster.killed()) == set(victims)
    record = check_ok(cluster)
    assert set(record["contributors"]) >= set(cluster.peers) - set(victims)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
async def test_processes_kill_leaf_before_masked_input(tmp_path: Path, mode: str) -> None:
    victims = {"p002": "reported", "p005": "reported"}
    cluster = await run_cluster(tmp_path, kill_on(victims), server_args=mode_args(mode))
    killed = cluster.killed()
    assert set(killed) == set(victims)
    record = check_ok(cluster)
    assert set(record["contributors"]) >= set(cluster.peers) - set(victims)
    for name, state in killed.items():
        if state == "reported":
            # The report was queued when the state was logged; SIGKILL may have come
            # before it was written.
            assert record["dropped"][name] in ("no_masked_input", "no_share_report")


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
async def test_processes_kill_relay_holding_sums(tmp_path: Path, mode: str) -> None:
    cluster = await run_cluster(tmp_path, kill_first("masking", 1), fan_in=2,
                                server_args=mode_args(mode))
    killed = cluster.killed()
    assert len(killed) == 1, cluster.diagnostics()
    record = check_ok(cluster)
    # The relay's children re-send to the nearest live ancestor.
    assert set(record["contributors"]) >= set(cluster.peers) - set(killed)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MASKED_MODES)
async def test_processes_kill_during_unmasking(tmp_path: Path, mode: str) -> None:
    victims = ["p003", "p007"]

    def hook(cluster: Cluster, process: Process, line: str) -> None:
        if process.state == "unmasked" and process.name not in victims:
            for name in victims:
                if cluster.peers[name].state in ("forwarded", "unmasked"):
                    cluster.peers[name].kill()

    cluster = await run_cluster(tmp_path, hook, server_args=mode_args(mode))
    killed = cluster.killed()
    assert set(killed) == set(victims), cluster.diagnostics()
    record = check_ok(cluster)
    for name, state in killed.items():
        # Their masked inputs were summed before anyone was asked to unmask.
        assert name in record["contributors"]
        if state == "forwarded":  # the request was never answered
            assert record["dropped"][name] == "unmask_share_missing"


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
async def test_processes_too_many_killed_aborts(tmp_path: Path, mode: str) -> None:
    # n - t + 2 die before their input leaves them (in R1 where there is one): even
    # if one got a phase further than logged, fewer than t inputs can reach the root.
    state = "reported" if mode == "paillier" else "sharing"
    victims = {name: state for name in peer_names(N)[: N - T + 2]}
    cluster = await run_cluster(tmp_path, kill_on(victims), server_args=mode_args(mode))
    assert set(cluster.killed()) == set(victims)
    record = cluster.record()
    assert record["status"] == "aborted", record
    assert record["contributors"] == []
    assert record["reason"]
    assert not (cluster.out / "round-0.npy").exists()
    for name, peer in cluster.peers.items():
        if name not in victims:
            assert any("round 0: aborted" in line for line in peer.lines), peer.lines[-5:]


# -------------------------------------------------------------------- CLI


def run_cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert proc.returncode != 0
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


SERVER_BASE = ["--host", HOST, "--port", "0", "--max-peers", "10", "--threshold", "6",
               "--dim", "8"]


@pytest.mark.parametrize(("args", "fragment"), [
    (["--host", HOST, "--port", "0", "--max-peers", "10", "--threshold", "6"], "--dim"),
    ([*SERVER_BASE[:-4], "--threshold", "5", "--dim", "8"], "threshold"),
    ([*SERVER_BASE[:-4], "--threshold", "11", "--dim", "8"], "threshold"),
    ([*SERVER_BASE, "--graph", "ring"], "--graph"),
    ([*SERVER_BASE, "--dim", "-3"], "--dim"),
    ([*SERVER_BASE, "--phase-timeout", "0"], "--phase-timeout"),
    ([*SERVER_BASE, "--port", "70000"], "--port"),
    ([*SERVER_BASE, "--mode", "paillier", "--graph", "sparse"], "--mode paillier"),
    ([*SERVER_BASE, "--mode", "rsa"], "--mode"),
    ([*SERVER_BASE, "--mode", "hybrid", "--paillier-key-bits", "1024"], "--paillier-key-bits"),
], ids=["missing-dim", "threshold-half", "threshold-above-n", "unknown-graph", "negative-dim",
        "zero-timeout", "bad-port", "paillier-sparse", "unknown-mode", "small-key"])
def test_server_cli_rejects_bad_arguments(tmp_path: Path, args: list[str],
                                          fragment: str) -> None:
    proc = run_cli("-m", "server", *args, "--out", str(tmp_path / "out"))
    assert_one_line_error(proc, fragment)
    assert not list(tmp_path.glob("out/round-*"))


def test_server_cli_port_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        sock.listen()
        port = sock.getsockname()[1]
        proc = run_cli("-m", "server", "--host", HOST, "--port", str(port), "--max-peers", "3",
                       "--threshold", "2", "--dim", "4", "--out", str(tmp_path))
    assert_one_line_error(proc)


@pytest.fixture
def input_file(tmp_path: Path) -> Path:
    path = tmp_path / "x.npy"
    np.save(path, np.zeros(4))
    return path


@pytest.mark.parametrize(("args", "fragment"), [
    (["--input", "{tmp}/missing.npy"], "--input"),
    (["--input", "{tmp}/garbage.npy"], "--input"),
    (["--input", "{tmp}/x.npy", "--listen", "localhost"], "--listen"),
    (["--input", "{tmp}/x.npy", "--listen", "127.0.0.1:99999"], "--listen"),
    (["--input", "{tmp}/x.npy", "--listen", "127.0.0.1:http"], "--listen"),
    (["--input", "{tmp}/x.npy", "--weight", "heavy"], "--weight"),
], ids=["missing-input", "unreadable-input", "listen-no-port", "listen-port-range",
        "listen-port-name", "bad-weight"])
def test_peer_cli_rejects_bad_arguments(tmp_path: Path, input_file: Path, args: list[str],
                                        fragment: str) -> None:
    (tmp_path / "garbage.npy").write_bytes(b"\x93NUMPY nope, not an array")
    args = [arg.replace("{tmp}", str(tmp_path)) for arg in args]
    proc = run_cli("-m", "peers", "--server", "ws://127.0.0.1:9", "--id", "a", *args)
    assert_one_line_error(proc, fragment)


def test_peer_cli_rejects_a_non_websocket_server_url(input_file: Path) -> None:
    proc = run_cli("-m", "peers", "--server", "http://127.0.0.1:9", "--id", "a",
                   "--input", str(input_file))
    assert_one_line_error(proc, "--server")


def test_peer_cli_unreachable_server_is_one_line(input_file: Path) -> None:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        proc = run_cli("-m", "peers", "--server", f"ws://{HOST}:{port}", "--id", "a",
                       "--input", str(input_file))
    assert_one_line_error(proc, "coordinator")


@pytest.mark.parametrize("module", ["server", "peers"])
def test_help_works(module: str) -> None:
    proc = run_cli("-m", module, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout
    assert ("--max-peers" if module == "server" else "--input") in proc.stdout


@pytest.mark.parametrize("script", ["secagg-server", "secagg-peer"])
def test_console_scripts_are_installed(script: str) -> None:
    path = BIN / script
    if not path.exists():
        pytest.skip(f"{script} is not installed next to {sys.executable}")
    proc = subprocess.run([str(path), "--help"], capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout
