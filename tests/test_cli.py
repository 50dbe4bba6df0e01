"""The command-line tools as other programs see them: exit statuses, the lines they
print, and their ``--help``.

Real ``secagg-server`` and ``secagg-peer`` processes on 127.0.0.1 (the installed
console scripts, or ``python -m server`` / ``python -m peers`` without them),
driven through the stderr-reading harness of ``test_processes``. Every scenario
here is deterministic: rounds abort because too few peers register before the
registration deadline, and the server is killed only once the peers said (with
``-v``) that they are inside the round.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
from helpers_network import HOST
from test_processes import BIN, LISTENING, Process, assert_one_line_error, run_cli

from secagg.cli_support import (
    PEER_EXIT_STATUSES,
    SERVER_EXIT_STATUSES,
    ExitStatus,
    exit_status_epilog,
    worse,
)

ROOT = Path(__file__).resolve().parents[1]
TOOLS = {"secagg-server": "server", "secagg-peer": "peers"}
TIMEOUT = 60.0
DIM = 4


def tool_command(tool: str) -> list[str]:
    """The installed console script, or ``python -m`` when it is not installed."""
    script = BIN / tool
    return [str(script)] if script.exists() else [sys.executable, "-m", TOOLS[tool]]


async def spawn_tool(tool: str, args: Sequence[str],
                     hook: Callable[[Process, str], None] | None = None,
                     name: str = "") -> Process:
    proc = await asyncio.create_subprocess_exec(
        *tool_command(tool), *args, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    process = Process(name or tool, proc)

    async def read() -> None:
        assert proc.stderr is not None
        while line := (await proc.stderr.readline()).decode(errors="replace"):
            process.lines.append(line.rstrip("\n"))
            if hook is not None:
                hook(process, line)

    process.reader = asyncio.create_task(read())
    return process


async def start_server(tmp_path: Path, *args: str) -> tuple[Process, str]:
    """A server on a free port; returns it with its URL once it listens."""
    url: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def hook(process: Process, line: str) -> None:
        match = LISTENING.search(line)
        if match and not url.done():
            url.set_result(match.group(1))

    server = await spawn_tool("secagg-server", [
        "--host", HOST, "--port", "0", "--dim", str(DIM), "--out", str(tmp_path / "out"),
        *args], hook)
    exited = asyncio.ensure_future(server.proc.wait())
    done, _ = await asyncio.wait([url, exited], timeout=TIMEOUT,
                                 return_when=asyncio.FIRST_COMPLETED)
    exited.cancel()
    assert url in done, "server did not start:\n" + "\n".join(server.lines)
    return server, url.result()


def input_file(tmp_path: Path, rows: int | None = None) -> Path:
    path = tmp_path / f"input-{rows}.npy"
    shape = (DIM,) if rows is None else (rows, DIM)
    np.save(path, np.full(shape, 0.25))
    return path


async def finish(*processes: Process) -> list[int]:
    """Wait for the processes and their stderr; kill what is left on failure."""
    try:
        return [await process.finish(TIMEOUT) for process in processes]
    finally:
        for process in processes:
            if process.proc.returncode is None:
                process.proc.kill()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(process.proc.wait(), 10)


def diagnostics(*processes: Process) -> str:
    return "\n".join(f"--- {p.name} (rc={p.proc.returncode})\n" + "\n".join(p.lines)
                     for p in processes)


def round_lines(process: Process) -> list[str]:
    """The lines the tool prints itself (not the library's log records)."""
    return [line for line in process.lines
            if re.match(r"^(round \d+: |secagg-peer \S+: round \d+: )", line)]


# ------------------------------------------------------------------ exit statuses


@pytest.mark.slow
async def test_aborted_round_exits_with_the_aborted_status(tmp_path: Path) -> None:
    # Three peers expected, one comes: registration closes at the deadline, below t.
    # (The deadline leaves the peer process time to start on a busy machine.)
    server, url = await start_server(tmp_path, "--max-peers", "3", "--threshold", "2",
                                     "--phase-timeout", "10", "-v")
    peer = await spawn_tool("secagg-peer", ["--server", url, "--id", "alice",
                                            "--input", str(input_file(tmp_path))])
    codes = await finish(server, peer)
    assert codes == [ExitStatus.ROUND_ABORTED] * 2, diagnostics(server, peer)
    assert peer.lines == ["secagg-peer alice: round 0: aborted (only 1 peers registered, "
                          "threshold is 2)"], peer.lines
    # The server says so once, even with -v (the coordinator logs the same event).
    aborted = [line for line in server.lines if "aborted" in line]
    assert aborted == ["round 0: aborted (only 1 peers registered, threshold is 2); "
                       "0 contributors, 0 dropped"], server.lines
    # -v shows the protocol's progress, not a line per websocket connection.
    assert not [line for line in server.lines if "websockets" in line], server.lines
    assert any("registration open" in line for line in server.lines), server.lines
    record = json.loads((tmp_path / "out" / "round-0.json").read_text())
    assert record["status"] == "aborted"


async def test_server_killed_mid_round(tmp_path: Path) -> None:
    server, url = await start_server(tmp_path, "--max-peers", "3", "--threshold", "2",
                                     "--phase-timeout", "30")
    inside: set[str] = set()
    both_inside = asyncio.Event()

    def hook(process: Process, line: str) -> None:
        if re.search(r"secagg\.peer\.cli INFO round 0: advertised", line):
            inside.add(process.name)
            if len(inside) == 2:
                both_inside.set()

    peers = []
    for name in ("alice", "bob"):
        peers.append(await spawn_tool("secagg-peer", [
            "--server", url, "--id", name, "--input", str(input_file(tmp_path)), "-v"],
            hook, name))
    try:
        await asyncio.wait_for(both_inside.wait(), TIMEOUT)
    finally:
        server.kill()  # SIGKILL: the connections are reset, nothing is said
    codes = await finish(server, *peers)
    assert codes == [-signal.SIGKILL] + [ExitStatus.LOST_SERVER] * 2, \
        diagnostics(server, *peers)
    for peer in peers:
        assert round_lines(peer) == [f"secagg-peer {peer.name}: round 0: lost the connection "
                                     "to the coordinator"], peer.lines
        assert not [line for line in peer.lines if "reject" in line], peer.lines


async def test_server_with_fewer_rounds_than_the_peers(tmp_path: Path) -> None:
    server, url = await start_server(tmp_path, "--max-peers", "2", "--threshold", "2",
                                     "--rounds", "1")
    two_rows = input_file(tmp_path, rows=2)  # two rounds
    peers = [await spawn_tool("secagg-peer", ["--server", url, "--id", name,
                                              "--input", str(two_rows)])
             for name in ("alice", "bob")]
    codes = await finish(server, *peers)
    assert codes == [ExitStatus.OK, ExitStatus.LOST_SERVER, ExitStatus.LOST_SERVER], \
        diagnostics(server, *peers)
    assert round_lines(server) == ["round 0: ok; 2 contributors, 0 dropped"]
    for peer, name in zip(peers, ("alice", "bob"), strict=True):
        assert peer.lines == [
            f"secagg-peer {name}: round 0: ok (2 contributors)",
            f"secagg-peer {name}: round 1: lost the connection to the coordinator before the "
            "round opened (this peer's round 2 of 2; did the server run fewer --rounds?)",
        ], peer.lines


async def test_duplicate_id_is_rejected(tmp_path: Path) -> None:
    server, url = await start_server(tmp_path, "--max-peers", "2", "--threshold", "2",
                                     "--phase-timeout", "30")
    registered = asyncio.Event()

    def hook(process: Process, line: str) -> None:
        if "INFO round 0: advertised" in line:
            registered.set()

    first = await spawn_tool("secagg-peer", ["--server", url, "--id", "alice", "--input",
                                             str(input_file(tmp_path)), "-v"], hook)
    await asyncio.wait_for(registered.wait(), TIMEOUT)
    second = await spawn_tool("secagg-peer", ["--server", url, "--id", "alice", "--input",
                                              str(input_file(tmp_path))])
    try:
        (code,) = await finish(second)
    finally:
        server.proc.send_signal(signal.SIGTERM)
    assert code == ExitStatus.REJECTED, diagnostics(second)
    assert second.lines == ["secagg-peer alice: round 0: rejected by the coordinator: peer id "
                            "'alice' is already connected (duplicate id)"], second.lines
    codes = await finish(server, first)
    # SIGTERM ends the server's round; the first peer then loses the coordinator.
    assert codes == [ExitStatus.INTERRUPTED, ExitStatus.LOST_SERVER], \
        diagnostics(server, first)
    assert server.lines[-1] == "secagg-server: interrupted"


async def test_peer_interrupted_while_waiting(tmp_path: Path) -> None:
    server, url = await start_server(tmp_path, "--max-peers", "3", "--threshold", "2",
                                     "--phase-timeout", "30")
    waiting = asyncio.Event()

    def hook(process: Process, line: str) -> None:
        if "INFO round 0: advertised" in line:
            waiting.set()

    peer = await spawn_tool("secagg-peer", ["--server", url, "--id", "alice", "--input",
                                            str(input_file(tmp_path)), "-v"], hook)
    try:
        await asyncio.wait_for(waiting.wait(), TIMEOUT)
        peer.proc.send_signal(signal.SIGTERM)
        (code,) = await finish(peer)
    finally:
        server.proc.send_signal(signal.SIGINT)
    assert code == ExitStatus.INTERRUPTED, diagnostics(peer)
    assert peer.lines[-1] == "secagg-peer: interrupted"
    assert await finish(server) == [ExitStatus.INTERRUPTED], diagnostics(server)


def test_unreachable_coordinator(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind((HOST, 0))  # bound, never listening: connections are refused
        url = f"ws://{HOST}:{sock.getsockname()[1]}"
        proc = subprocess.run([*tool_command("secagg-peer"), "--server", url, "--id", "a",
                               "--input", str(input_file(tmp_path))],
                              capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert proc.returncode == ExitStatus.LOST_SERVER
    assert proc.stderr == f"secagg-peer: error: cannot reach the coordinator at {url}\n"


@pytest.mark.parametrize(("tool", "args", "fragment"), [
    ("secagg-server", ["--max-peers", "4", "--threshold", "2", "--dim", "3", "--out", "x"],
     "--threshold"),
    ("secagg-server", ["--max-peers", "4", "--threshold", "3", "--out", "x"], "--dim"),
    ("secagg-server", ["--max-peers", "4", "--threshold", "3", "--dim", "3", "--out", "x",
                       "--rounds", "0"], "--rounds"),
    ("secagg-peer", ["--server", "ws://", "--id", "a", "--input", "x.npy"], "--server"),
    ("secagg-peer", ["--server", "ws://127.0.0.1:9", "--id", "a", "--input", "x.npy",
                     "--rounds", "0"], "--rounds"),
    ("secagg-peer", ["--server", "ws://127.0.0.1:9", "--id", "a"], "--input"),
], ids=["threshold", "missing-dim", "zero-rounds", "empty-url", "zero-rounds-peer",
        "missing-input"])
def test_bad_arguments_exit_2_with_one_line(tmp_path: Path, tool: str, args: list[str],
                                            fragment: str) -> None:
    np.save(tmp_path / "x.npy", np.zeros(DIM))
    proc = subprocess.run([*tool_command(tool), *args], capture_output=True, text=True,
                          timeout=TIMEOUT, check=False, cwd=tmp_path)
    assert proc.returncode == ExitStatus.BAD_ARGUMENTS
    assert_one_line_error(proc, f"{tool}: error: ", fragment)


def test_round_status_of_each_outcome() -> None:
    from peers.cli import round_status
    from secagg.protocol import PeerOutcome

    def status(**fields: object) -> ExitStatus:
        return round_status(PeerOutcome(round=0, **fields))[0]  # type: ignore[arg-type]

    assert status(status="ok", included=True, contributor_count=5) == ExitStatus.OK
    assert status(status="ok", included=False, contributor_count=5) == ExitStatus.EXCLUDED
    assert status(status="excluded", reason="not in U2: no_share_report") == \
        ExitStatus.EXCLUDED
    assert status(status="aborted", reason="U2 has 3 peers") == ExitStatus.ROUND_ABORTED
    # How Peer.contribute reports a coordinator that went away, mid-round or before.
    assert status(status="aborted", reason="lost the connection to the server") == \
        ExitStatus.LOST_SERVER
    assert status(status="aborted", reason="lost the connection to the coordinator") == \
        ExitStatus.LOST_SERVER
    assert status(status="rejected", reason="the coordinator closed the connection") == \
        ExitStatus.LOST_SERVER
    lost = PeerOutcome(status="aborted", round=1, reason="lost the connection to the server")
    assert round_status(lost, opened=False)[1] == \
        "lost the connection to the coordinator before the round opened"
    assert status(status="rejected", reason="registration closed") == ExitStatus.REJECTED
    line = round_status(PeerOutcome(status="ok", round=0, included=False,
                                    contributor_count=5))[1]
    assert line.startswith("excluded: ") and "without this peer's input" in line
    # The most severe round decides; ok < excluded < aborted.
    assert worse(ExitStatus.OK, ExitStatus.EXCLUDED) == ExitStatus.EXCLUDED
    assert worse(ExitStatus.ROUND_ABORTED, ExitStatus.EXCLUDED) == ExitStatus.ROUND_ABORTED


# ------------------------------------------------------------------------- help


OPTION = re.compile(r"^  (-\S+)")


def help_entries(text: str) -> dict[str, str]:
    """Option -> its help text, from ``--help`` output (up to the epilog)."""
    body = text.split("\noptions:\n", 1)[1].split("\n\n", 1)[0]
    entries: dict[str, str] = {}
    current = ""
    for line in body.splitlines():
        match = OPTION.match(line)
        if match:
            current = match.group(1).rstrip(",")
            entries[current] = line[2:]
        else:
            entries[current] += " " + line.strip()
    return entries


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_help_shows_every_option_with_its_default(tool: str) -> None:
    proc = subprocess.run([*tool_command(tool), "--help"], capture_output=True, text=True,
                          timeout=TIMEOUT, check=False,
                          env={**os.environ, "COLUMNS": "100"})
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    text = proc.stdout
    assert text.startswith(f"usage: {tool} ")
    assert "`" not in text
    entries = help_entries(text)
    from peers.cli import build_parser as peer_parser
    from server.cli import build_parser as server_parser

    parser = server_parser() if tool == "secagg-server" else peer_parser()
    options = [action for action in parser._actions if action.option_strings
               and action.dest != "help"]
    assert {a.option_strings[0] for a in options} <= set(entries), entries
    for action in options:
        entry = entries[action.option_strings[0]]
        assert action.help, action.option_strings
        if action.nargs == 0:  # a flag: on or off
            continue
        assert re.search(r"\((default: [^)]+|required)\)", entry), entry
    if tool == "secagg-peer":  # how many rounds a peer stays for, and what to give it
        assert "default: 1 for a 1-D --input" in entries["--rounds"]
        assert "server's --rounds" in entries["--rounds"]
    # The exit statuses, from the one definition.
    statuses = SERVER_EXIT_STATUSES if tool == "secagg-server" else PEER_EXIT_STATUSES
    epilog = text.split("exit status:\n", 1)[1]
    for status in statuses:
        assert re.search(rf"^\s+{int(status)}  \S", epilog, re.MULTILINE), (status, epilog)
    assert max(len(line) for line in exit_status_epilog(statuses).splitlines()) <= 78


def test_readme_documents_every_exit_status() -> None:
    section = (ROOT / "README.md").read_text().split("## Command line", 1)[1]
    section = section.split("\n## ", 1)[0]
    documented = {int(m) for m in re.findall(r"^\| (\d+) \|", section, re.MULTILINE)}
    assert documented == {int(status) for status in ExitStatus}


def test_verbosity_keeps_websockets_quiet() -> None:
    code = ("import logging, sys\n"
            "from secagg.cli_support import configure_logging\n"
            "configure_logging(int(sys.argv[1]))\n"
            "print(logging.getLogger('websockets.server').getEffectiveLevel(),"
            " logging.getLogger('secagg.peer').getEffectiveLevel())\n")
    levels = {}
    for verbosity in (0, 1, 2):
        proc = run_cli("-c", code, str(verbosity))
        assert proc.returncode == 0, proc.stderr
        levels[verbosity] = tuple(int(v) for v in proc.stdout.split())
    assert levels == {0: (30, 30), 1: (30, 20), 2: (20, 10)}


# ------------------------------------------------------------------- README example


def readme_example() -> str:
    section = (ROOT / "README.md").read_text().split("## Command line", 1)[1]
    section = section.split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.DOTALL)
    (example,) = [block for block in blocks if "&" in block]
    return example


@pytest.mark.slow
def test_readme_example_runs(tmp_path: Path) -> None:
    """The README's two-round example, as written (on a free port): every round ok."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port = sock.getsockname()[1]
    script = readme_example().replace("8765", str(port))
    # "sleep 2" is plenty on an idle machine; a loaded test machine waits for the port.
    assert "\nsleep 2 " in script
    wait = (f"until python -c \"import socket; socket.create_connection(('{HOST}', {port}))\""
            " 2>/dev/null; do sleep 0.2; done #")
    script = script.replace("\nsleep 2 ", f"\n{wait} ")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(["bash", "-e", "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    rounds = sorted((tmp_path / "results").glob("round-*.json"))
    assert [path.name for path in rounds] == ["round-0.json", "round-1.json"], proc.stderr
    for path in rounds:
        record = json.loads(path.read_text())
        assert record["status"] == "ok" and len(record["contributors"]) == 8, record
    assert proc.stderr.count(": ok (8 contributors)") == 16, proc.stderr
