"""Stalls with real processes: a peer, or the server, SIGSTOPped in the middle of a round.

A stopped process keeps its connections open and answers nothing (a frozen laptop, a
process swapped out, a full send buffer): only unanswered keepalive pings, sends that
stop making progress, or a server that stays silent for too long show it. With n = 8
and fan-in 2 the accumulation tree has a root, relays at depths 1 and 2 and leaves.

- A stopped leaf, relay or root is a dropout: the round ends ok and exact over the
  seven live peers; the stopped peer, resumed after the round, does not claim ``ok``.
- A stopped server: every peer exits with the lost-server status within two phase
  deadlines, the root too, though its aggregate (large here) is stuck in a socket
  that nobody reads.
- A server that answers pings but never sends the next message: the peer gives up
  after two phase deadlines of silence (the coordinator here is a stub in the test).
- The mechanisms behind these, in one process: the outbox gives up on a send that
  makes no progress (and not on a slow reader), the keepalive aborts a connection
  whose pongs stop, and closing a connection to a stalled party does not hang.

Peers run with ``-v``: each logs, when the masking phase starts, its place in the tree
(``in the accumulation tree as a relay (depth 1, 3 peers below)``), which is how the
test picks its victim. Peer processes import everything
before the server starts, so that registration (one phase deadline) never waits for
interpreters starting on a busy machine. Every wait is bounded; times are asserted
only against generous deadlines.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers_network import HOST, assert_exact_sum, make_inputs, peer_names, tolerance
from test_cli import diagnostics, spawn_tool, start_server
from test_processes import Process
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from secagg.cli_support import ExitStatus
from secagg.driver import Outbox, close_within, start_keepalive
from secagg.protocol import ServerConfig, ServerProtocol
from secagg.wire import SESSION_BYTES, encode

N = 8
T = 5
FAN_IN = 2
PHASE_TIMEOUT = 15.0
"""Keepalive pings every 2 s (secagg.protocol.common.keepalive_seconds): a stall is
noticed within a few seconds, well inside a phase."""
STALL_DIM = 20_000
"""Large enough that computing a masked input takes a while (a victim picked when its
masking phase starts is stopped before its sum leaves it), small enough to be quick."""
SERVER_STALL_DIM = 1_000_000
SERVER_STALL_ARGS = ["--modulus-bits", "64"]
"""The root's aggregate (8 MB) cannot fit in the socket buffers of a connection to a
stopped server (Linux lets a socket buffer grow to 4 MB by default): the root's send
blocks."""
EXIT_BOUND = 2 * PHASE_TIMEOUT + 10.0
"""How long after the server stops every peer must have exited."""
START_TIMEOUT = 180.0
"""For eight interpreters to import everything on a loaded two-core machine."""
ROUND_TIMEOUT = 150.0
"""For a round with a stall: registration, a few phase deadlines, exits."""
RESUMED_EXIT = 60.0
"""For a resumed peer to notice the round is over for it and exit."""

PLACE = re.compile(r"secagg\.peer INFO (\S+): round 0: in the accumulation tree as "
                   r"(?:the|a) (root|relay|leaf) \(depth (\d+), (\d+) peers below\)")
READY = "ready"

# A peer process that imports the CLI, says so, and waits for the server's URL on stdin.
PREWARMED_PEER = (
    "import sys\n"
    "from peers.cli import main\n"
    f"print({READY!r}, file=sys.stderr, flush=True)\n"
    "url = sys.stdin.readline().strip()\n"
    "sys.exit(main(['--server', url, *sys.argv[1:]]))\n"
)


@dataclass(frozen=True)
class Place:
    """Where the coordinator put a peer in the accumulation tree."""

    role: str
    depth: int
    below: int


@dataclass
class Stall:
    """A server, eight peers, and the one the test stops."""

    tmp: Path
    dim: int
    on_line: Callable[[Stall, Process, str], None] = lambda stall, process, line: None
    server: Process | None = None
    peers: dict[str, Process] = field(default_factory=dict)
    inputs: dict[str, np.ndarray] = field(default_factory=dict)
    places: dict[str, Place] = field(default_factory=dict)
    stopped: dict[str, float] = field(default_factory=dict)
    """Process name -> event-loop time of its SIGSTOP."""
    exited: dict[str, float] = field(default_factory=dict)
    """Process name -> event-loop time at which its exit was seen."""
    resumed: set[str] = field(default_factory=set)
    _watchers: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def process(self, name: str) -> Process:
        return self.server if name == "server" and self.server else self.peers[name]

    def stop(self, name: str) -> None:
        """SIGSTOP, once: the process keeps its sockets and does nothing."""
        process = self.process(name)
        if name not in self.stopped and process.proc.returncode is None:
            process.proc.send_signal(signal.SIGSTOP)
            self.stopped[name] = asyncio.get_running_loop().time()

    def resume(self, name: str) -> None:
        process = self.process(name)
        if name in self.stopped and name not in self.resumed:
            self.resumed.add(name)
            if process.proc.returncode is None:
                process.proc.send_signal(signal.SIGCONT)

    async def start(self, server_args: list[str] | None = None) -> None:
        names = peer_names(N)
        self.inputs = make_inputs(names, self.dim, seed=7)
        ready = {name: asyncio.Event() for name in names}
        for name in names:
            path = self.tmp / f"{name}.npy"
            np.save(path, self.inputs[name])
            self.peers[name] = await self._spawn_peer(name, [
                "--id", name, "--input", str(path), "-v"], ready[name])
        try:
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in ready.values())),
                                   START_TIMEOUT)
        except TimeoutError:
            pytest.fail("peer processes did not start:\n" + self.diagnostics())
        self.server, url = await start_server(
            self.tmp, "--max-peers", str(N), "--threshold", str(T), "--dim", str(self.dim),
            "--fan-in", str(FAN_IN), "--phase-timeout", str(PHASE_TIMEOUT), "-v",
            *(server_args or []))
        self._watch(self.server)
        for peer in self.peers.values():
            assert peer.proc.stdin is not None
            peer.proc.stdin.write(f"{url}\n".encode())
            await peer.proc.stdin.drain()
            peer.proc.stdin.close()

    async def _spawn_peer(self, name: str, args: list[str], ready: asyncio.Event) -> Process:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", PREWARMED_PEER, *args, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        process = Process(name, proc)

        async def read() -> None:
            assert proc.stderr is not None
            while line := (await proc.stderr.readline()).decode(errors="replace"):
                line = line.rstrip("\n")
                process.lines.append(line)
                if line == READY:
                    ready.set()
                self._parse(process, line)

        process.reader = asyncio.create_task(read())
        self._watch(process)
        return process

    def _parse(self, process: Process, line: str) -> None:
        place = PLACE.search(line)
        if place and place.group(1) == process.name:
            self.places[process.name] = Place(place.group(2), int(place.group(3)),
                                              int(place.group(4)))
        self.on_line(self, process, line)

    def _watch(self, process: Process) -> None:
        async def watch() -> None:
            await process.proc.wait()
            self.exited[process.name] = asyncio.get_running_loop().time()
        self._watchers.append(asyncio.create_task(watch()))

    async def finish(self, process: Process, timeout: float) -> int:
        try:
            return await process.finish(timeout)
        except TimeoutError:
            pytest.fail(f"{process.name} did not exit within {timeout:.0f} s:\n"
                        + self.diagnostics())

    async def close(self) -> None:
        """Resume whatever is stopped and kill whatever is left (a failed test)."""
        for process in [*self.peers.values(), *([self.server] if self.server else [])]:
            if process.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.proc.send_signal(signal.SIGCONT)
                    process.proc.kill()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(process.proc.wait(), 10)
            if process.reader is not None:
                process.reader.cancel()
                with contextlib.suppress(BaseException):
                    await process.reader
        for watcher in self._watchers:
            watcher.cancel()

    def record(self) -> dict[str, Any]:
        record: dict[str, Any] = json.loads((self.out / "round-0.json").read_text())
        return record

    def diagnostics(self) -> str:
        return diagnostics(*[p for p in [self.server, *self.peers.values()] if p is not None])


def printed_ok(process: Process) -> bool:
    return any(re.search(r"^secagg-peer \S+: round 0: ok\b", line) for line in process.lines)


async def run_peer_stall(tmp_path: Path, stall: Stall) -> tuple[str, dict[str, Any]]:
    """Start, let the hook stop one peer, wait for the server's result, resume the peer;
    check that the round is ok and exact over every live peer and that the stopped peer
    does not claim ok. Returns the stopped peer's name and the round's record."""
    try:
        await stall.start()
        assert stall.server is not None
        server_status = await stall.finish(stall.server, ROUND_TIMEOUT)
        assert len(stall.stopped) == 1, "no peer was stopped:\n" + stall.diagnostics()
        (victim,) = stall.stopped
        stall.resume(victim)
        statuses = {name: await stall.finish(peer, RESUMED_EXIT)
                    for name, peer in stall.peers.items()}
    finally:
        await stall.close()
    details = stall.diagnostics()
    assert server_status == ExitStatus.OK, details
    record = stall.record()
    live = set(stall.peers) - {victim}
    contributors = set(record["contributors"])
    assert record["status"] == "ok", (record, details)
    assert contributors >= live, (sorted(live - contributors), record, details)
    aggregate = np.load(stall.out / "round-0.npy", allow_pickle=False)
    assert_exact_sum(aggregate, stall.inputs, record["contributors"],
                     tolerance(N, stall.dim))
    for name in live:
        assert statuses[name] == ExitStatus.OK, (name, details)
        assert printed_ok(stall.peers[name]), (name, stall.peers[name].lines[-5:])
    victim_process = stall.peers[victim]
    if victim in contributors:
        # Its sum had left it when the stop arrived: "ok" would be the truth then.
        assert statuses[victim] in (ExitStatus.OK, ExitStatus.EXCLUDED,
                                    ExitStatus.LOST_SERVER), details
        assert printed_ok(victim_process) == (statuses[victim] == ExitStatus.OK), details
    else:
        assert record["dropped"].get(victim), record
        assert statuses[victim] in (ExitStatus.EXCLUDED, ExitStatus.LOST_SERVER), \
            (statuses[victim], victim_process.lines[-10:])
        assert not printed_ok(victim_process), victim_process.lines[-10:]
    return victim, record


# -------------------------------------------------------------- stalled peers


def stop_first(role: str, depth: int | None = None, below: int | None = None
               ) -> Callable[[Stall, Process, str], None]:
    """Stop the first peer that says it has this place in the tree, as it says so: it has
    not begun computing its masked input, let alone sent it."""
    def on_line(stall: Stall, process: Process, line: str) -> None:
        place = stall.places.get(process.name)
        if place and place.role == role and depth in (None, place.depth) and \
                below in (None, place.below) and not stall.stopped:
            stall.stop(process.name)
    return on_line


@pytest.mark.slow
async def test_stalled_leaf_is_dropped_and_does_not_claim_ok(tmp_path: Path) -> None:
    stall = Stall(tmp_path, STALL_DIM, on_line=stop_first("leaf"))
    victim, _ = await run_peer_stall(tmp_path, stall)
    assert stall.places[victim].role == "leaf"


@pytest.mark.slow
async def test_stalled_relay_costs_only_itself(tmp_path: Path) -> None:
    # The depth-1 relay with a relay below it: its children's sums are re-sent to the root.
    stall = Stall(tmp_path, STALL_DIM, on_line=stop_first("relay", depth=1, below=3))
    victim, _ = await run_peer_stall(tmp_path, stall)
    assert stall.places[victim] == Place("relay", 1, 3)


@pytest.mark.slow
async def test_stalled_root_is_replaced(tmp_path: Path) -> None:
    stall = Stall(tmp_path, STALL_DIM, on_line=stop_first("root"))
    victim, record = await run_peer_stall(tmp_path, stall)
    assert record["stats"]["root"] == victim
    if victim not in record["contributors"]:
        assert record["stats"].get("new_root") in set(stall.peers) - {victim}, record


# -------------------------------------------------------------- stalled server


@pytest.mark.slow
async def test_stalled_server_every_peer_exits_with_lost_server(tmp_path: Path) -> None:
    # The server stops once every peer has learned its place in the tree (computing a
    # masked input of this size takes a while, so the root has not forwarded yet); the
    # root then sends its aggregate into a connection nobody reads.
    def on_line(stall: Stall, process: Process, line: str) -> None:
        if len(stall.places) == N:
            stall.stop("server")

    stall = Stall(tmp_path, SERVER_STALL_DIM, on_line=on_line)
    try:
        await stall.start(SERVER_STALL_ARGS)
        assert stall.server is not None
        statuses = {name: await stall.finish(peer, ROUND_TIMEOUT)
                    for name, peer in stall.peers.items()}
        stall.resume("server")
        server_status = await stall.finish(stall.server, ROUND_TIMEOUT)
    finally:
        await stall.close()
    details = stall.diagnostics()
    assert "server" in stall.stopped, details
    stopped_at = stall.stopped["server"]
    late = {name: round(stall.exited[name] - stopped_at, 1) for name in stall.peers
            if stall.exited[name] - stopped_at > EXIT_BOUND}
    assert not late, (f"exited later than {EXIT_BOUND:.0f} s after the server stopped", late,
                      details)
    roots = [name for name, place in stall.places.items() if place.role == "root"]
    assert len(roots) == 1, (stall.places, details)
    for name, status in statuses.items():
        assert status == ExitStatus.LOST_SERVER, (name, status, details)
        lines = stall.peers[name].lines
        assert f"secagg-peer {name}: round 0: lost the connection to the coordinator" \
            in lines, (name, lines[-10:])
        assert not [line for line in lines if "Traceback" in line], (name, lines)
    # Resumed, the server finds every peer gone: the round aborts, with a result file.
    assert server_status == ExitStatus.ROUND_ABORTED, details
    assert stall.record()["status"] == "aborted"


# ------------------------------------------------------- a server gone silent


async def silent_coordinator(phase_timeout: float) -> tuple[Any, str, list[float]]:
    """A stub coordinator that announces a round and then never sends anything again,
    though its connections stay open and answer pings (a server whose protocol hangs).
    Returns the server, its URL and the event-loop times at which frames arrived."""
    config = ServerConfig(session=bytes(SESSION_BYTES), round=0, max_peers=2, threshold=2,
                          dim=4, phase_timeout=phase_timeout)
    protocol = ServerProtocol(config)
    protocol.start()
    notice = encode(protocol.round_open())
    received: list[float] = []

    async def handler(connection: ServerConnection) -> None:
        await connection.send(notice)
        with contextlib.suppress(ConnectionClosed):  # the peer gives up: it aborts
            async for _frame in connection:
                received.append(asyncio.get_running_loop().time())

    server = await serve(handler, HOST, 0, compression=None, ping_interval=None)
    port = next(iter(server.sockets)).getsockname()[1]
    return server, f"ws://{HOST}:{port}", received


@pytest.mark.slow
async def test_peer_gives_up_on_a_silent_server(tmp_path: Path) -> None:
    phase_timeout = 5.0
    server, url, received = await silent_coordinator(phase_timeout)
    path = tmp_path / "x.npy"
    np.save(path, np.zeros(4))
    loop = asyncio.get_running_loop()
    try:
        peer = await spawn_tool("secagg-peer", ["--server", url, "--id", "alice",
                                                "--input", str(path), "-v"])
        try:
            status = await peer.finish(ROUND_TIMEOUT)
        finally:
            if peer.proc.returncode is None:
                peer.proc.kill()
        exited = loop.time()
    finally:
        server.close()
        await server.wait_closed()
    assert received, "the peer never registered:\n" + "\n".join(peer.lines)
    assert status == ExitStatus.LOST_SERVER, peer.lines
    # From its registration, the last thing it sent.
    assert exited - received[0] < 2 * phase_timeout + 10.0, (exited - received[0], peer.lines)
    assert "secagg-peer alice: round 0: lost the connection to the coordinator" in \
        peer.lines, peer.lines


# ------------------------------------------- the mechanisms, in one process


@contextlib.asynccontextmanager
async def stalled_reader() -> Any:
    """A websocket whose far end has stopped reading (as a SIGSTOPped process): yields
    the client end. Nothing the client sends is read, and no ping is answered."""
    stalled: list[ServerConnection] = []

    async def handler(connection: ServerConnection) -> None:
        connection.transport.pause_reading()
        stalled.append(connection)
        await connection.wait_closed()

    server = await serve(handler, HOST, 0, compression=None, ping_interval=None)
    port = next(iter(server.sockets)).getsockname()[1]
    client = await connect(f"ws://{HOST}:{port}", compression=None, ping_interval=None,
                           max_size=None)
    try:
        yield client
    finally:
        client.transport.abort()
        for connection in stalled:  # not reading, it would not notice the abort
            connection.transport.abort()
        server.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 10)


BIG_FRAME = bytes(32 << 20)
"""More than the kernel buffers of a loopback connection hold."""


async def test_outbox_gives_up_on_a_send_that_makes_no_progress() -> None:
    async with stalled_reader() as client:
        stuck = asyncio.Event()
        failed: list[object] = []
        outbox = Outbox(client.send, stall_timeout=0.5,
                        backlog=client.transport.get_write_buffer_size,
                        on_stuck=stuck.set, on_failed=failed.extend)
        outbox.start()
        outbox.put(BIG_FRAME, "big")
        outbox.put(b"after", "small")
        # Noticed within two stall timeouts (far more allowed for a busy machine).
        await asyncio.wait_for(stuck.wait(), 20)
        assert failed == ["big", "small"]
        assert outbox.failed


async def test_outbox_waits_for_a_slow_reader_that_keeps_reading() -> None:
    async def slow_reader(connection: ServerConnection) -> None:
        # Reads in bursts: the sender's backlog shrinks every few tenths of a second.
        while connection.state is not State.CLOSED:
            connection.transport.pause_reading()
            await asyncio.sleep(0.3)
            connection.transport.resume_reading()
            await asyncio.sleep(0.01)

    received = asyncio.Event()

    async def handler(connection: ServerConnection) -> None:
        reader = asyncio.ensure_future(slow_reader(connection))
        with contextlib.suppress(ConnectionClosed):
            await connection.recv()
            received.set()
            await connection.wait_closed()
        reader.cancel()

    server = await serve(handler, HOST, 0, compression=None, ping_interval=None,
                         max_size=None)
    port = next(iter(server.sockets)).getsockname()[1]
    client = await connect(f"ws://{HOST}:{port}", compression=None, ping_interval=None)
    try:
        stuck: list[bool] = []
        outbox = Outbox(client.send, stall_timeout=1.0,
                        backlog=client.transport.get_write_buffer_size,
                        on_stuck=lambda: stuck.append(True))
        outbox.start()
        outbox.put(BIG_FRAME)
        await asyncio.wait_for(received.wait(), 60)
        await outbox.drain(10)
        assert not stuck and not outbox.failed
    finally:
        await client.close()
        server.close()
        await server.wait_closed()


async def test_keepalive_aborts_a_connection_whose_pongs_stop() -> None:
    async with stalled_reader() as client:
        loop = asyncio.get_running_loop()
        started = loop.time()
        start_keepalive(client, 0.5, "test: the stalled end")
        await asyncio.wait_for(client.wait_closed(), 20)
        # One interval and one pong timeout (1 s), not websockets' closing handshake
        # timeout on top (10 s); generous for a busy machine.
        assert loop.time() - started < 8.0


async def test_close_within_does_not_wait_on_a_stalled_party() -> None:
    async with stalled_reader() as client:
        sending = asyncio.ensure_future(client.send(BIG_FRAME))  # fills every buffer
        await asyncio.sleep(0.2)
        assert not sending.done()
        await asyncio.wait_for(close_within(client, 1.0), 20)
        assert client.state is State.CLOSED
        with contextlib.suppress(ConnectionClosed):
            await asyncio.wait_for(sending, 10)


async def test_keepalive_does_not_blame_the_other_side_for_its_own_busy_loop() -> None:
    # This process's loop blocks for longer than the pong timeout while the pong is
    # already on its way: a busy loop is not the other party's stall.
    from secagg.driver import _pong_within

    loop = asyncio.get_running_loop()
    pong: asyncio.Future[float] = loop.create_future()
    loop.call_later(0.05, pong.set_result, 0.0)
    loop.call_soon(time.sleep, 0.6)  # blocks the loop past the 0.2 s timeout
    assert await _pong_within(pong, 0.2)
    silent: asyncio.Future[float] = loop.create_future()
    assert not await _pong_within(silent, 0.2)
