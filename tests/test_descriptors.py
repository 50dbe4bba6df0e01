"""Liveness past the open-file limit: the coordinator runs out of descriptors gracefully.

Every client connection costs the coordinator one descriptor. Beyond its
``RLIMIT_NOFILE``, asyncio's accept loop used to fail with ``EMFILE`` on every
pending connection, log a traceback for each (tens of thousands of lines a
second), and leave the process unable to write its round result. Now the
coordinator admits the connections that fit under the limit, closes the others
at once with one log line per interval, and runs the round with the peers that
are in.

- A real ``secagg-server`` process under a limit of 80 descriptors, with more
  peers (in another process, with the usual limit) than fit, and ``--max-peers``
  above what fits (so registration waits for its deadline): the round ends ok
  with those admitted, the result file is written, the log stays short.
- A coordinator whose descriptors are all taken by something else in its process:
  ``accept()`` itself fails, and the coordinator refuses waiting connections
  without an error storm, then admits a peer again once descriptors are free.
- The accept gate on its own, with a stand-in backlog.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import re
import resource
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers_network import HOST, RawClient, tolerance
from websockets.asyncio.client import connect

from server.coordinator import _AcceptGate

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 80
MAX_PEERS = 72
THRESHOLD = 37
PEERS = 90
DIM = 8
PHASE_TIMEOUT = 10.0
PROCESS_TIMEOUT = 180.0
LISTENING = re.compile(r"secagg-server listening on (ws://\S+)")
# What descriptor exhaustion looked like in the log: asyncio's accept-loop error and its
# errno, and the coordinator's own notice.
EXHAUSTION = re.compile(r"too many open files|out of system resource|refusing new connections",
                        re.IGNORECASE)

# Peers behind NAT (no listener: one descriptor each here), each with input rng(i).
SWARM = """
import asyncio, json, logging, sys
import numpy as np
from peers.peer import Peer

async def main(url, n, dim):
    logging.basicConfig(level=logging.ERROR)
    async def one(i):
        peer = Peer(url, f"p{i:03d}", listen=None, connect_attempts=3, backoff=0.2)
        try:
            await peer.start()
        except Exception:
            return "unreachable"
        try:
            vector = np.random.default_rng(i).uniform(-1, 1, dim)
            return (await peer.contribute(vector)).status
        except Exception as exc:
            return type(exc).__name__
        finally:
            await peer.close()
    results = await asyncio.gather(*(one(i) for i in range(n)))
    print(json.dumps({f"p{i:03d}": r for i, r in enumerate(results)}), flush=True)

asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
"""

# A coordinator whose every free descriptor is then taken (as by a leak elsewhere in
# the process); stdin says when to give them back and when to stop.
HOGGED = """
import asyncio, contextlib, logging, os, sys
import concurrent.futures.thread  # imported now: with every descriptor taken it could not be
from server.coordinator import Coordinator

async def main():
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(name)s %(levelname)s %(message)s")
    loop = asyncio.get_running_loop()
    async with Coordinator("127.0.0.1", 0, max_peers=3, threshold=2, dim=4,
                           phase_timeout=120) as coordinator:
        round_task = asyncio.create_task(coordinator.run_round())
        await asyncio.sleep(0)
        hog = []
        with contextlib.suppress(OSError):
            while True:
                hog.append(os.open(os.devnull, os.O_RDONLY))
        print(coordinator.url, len(hog), flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)
        for fd in hog:
            os.close(fd)
        print("freed", flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)
        round_task.cancel()

asyncio.run(main())
"""


def limit_descriptors() -> None:
    """In the child, before exec: at most LIMIT descriptors, soft and hard (so the
    server's own attempt to raise its limit cannot help it)."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, LIMIT))


@dataclass
class Child:
    proc: asyncio.subprocess.Process
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    readers: list[asyncio.Task[None]] = field(default_factory=list)

    async def wait(self, timeout: float = PROCESS_TIMEOUT) -> int:
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        await asyncio.wait_for(asyncio.gather(*self.readers), timeout)
        return code

    async def line(self, pattern: re.Pattern[str], timeout: float = 60.0) -> re.Match[str]:
        """Wait for a line of stdout or stderr matching ``pattern``."""
        async with asyncio.timeout(timeout):
            while True:
                for line in [*self.stdout, *self.stderr]:
                    if match := pattern.search(line):
                        return match
                if self.proc.returncode is not None:
                    raise AssertionError(f"exited {self.proc.returncode}: {self.stderr[-20:]}")
                await asyncio.sleep(0.05)

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()


async def spawn(args: list[str], *, preexec: Callable[[], None] | None = None,
                stdin: bool = False) -> Child:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout, whatever is installed
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *args, env=env, preexec_fn=preexec,
        stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    child = Child(proc)

    async def read(stream: asyncio.StreamReader | None, into: list[str]) -> None:
        assert stream is not None
        while line := await stream.readline():
            into.append(line.decode(errors="replace").rstrip("\n"))

    child.readers = [asyncio.create_task(read(proc.stdout, child.stdout)),
                     asyncio.create_task(read(proc.stderr, child.stderr))]
    return child


@pytest.mark.slow
async def test_server_past_its_descriptor_limit_runs_the_round_with_those_that_fit(
        tmp_path: Path) -> None:
    out = tmp_path / "out"
    server = await spawn(["-m", "server", "--host", HOST, "--port", "0",
                          "--max-peers", str(MAX_PEERS), "--threshold", str(THRESHOLD),
                          "--dim", str(DIM), "--phase-timeout", str(PHASE_TIMEOUT),
                          "--out", str(out), "-v"], preexec=limit_descriptors)
    swarm: Child | None = None
    try:
        url = (await server.line(LISTENING)).group(1)
        swarm = await spawn(["-c", SWARM, url, str(PEERS), str(DIM)])
        server_code = await server.wait()
        assert await swarm.wait() == 0, swarm.stderr[-20:]
    finally:
        for child in (server, swarm):
            if child is not None:
                child.kill()
    peers: dict[str, str] = json.loads(swarm.stdout[-1])
    log = server.stderr
    assert server_code == 0, log[-30:]
    record = json.loads((out / "round-0.json").read_text())
    assert record["status"] == "ok", record
    contributors = record["contributors"]
    # Not everyone fit: the others were turned away, and the round went on without them.
    assert THRESHOLD <= len(contributors) < PEERS
    assert sorted(name for name, status in peers.items() if status == "ok") == contributors
    assert "unreachable" in peers.values(), peers
    aggregate = np.load(out / "round-0.npy")
    expected = sum(np.random.default_rng(int(name[1:])).uniform(-1, 1, DIM)
                   for name in contributors)
    assert np.max(np.abs(aggregate - expected)) <= tolerance(MAX_PEERS, DIM)
    # A few lines about the limit, not one per attempt; no traceback.
    exhaustion = [line for line in log if EXHAUSTION.search(line)]
    assert 1 <= len(exhaustion) <= 5, exhaustion
    assert not any("Traceback" in line for line in log), log[-30:]
    assert len(log) < 300, len(log)


@pytest.mark.slow
async def test_coordinator_without_free_descriptors_refuses_quietly_and_recovers() -> None:
    coordinator = await spawn(["-c", HOGGED], preexec=limit_descriptors, stdin=True)
    try:
        match = await coordinator.line(re.compile(r"^(ws://\S+) (\d+)$"))
        url, hogged = match.group(1), int(match.group(2))
        assert hogged > 0

        async def knock() -> bool:
            """Try to open a websocket; True if the coordinator took it."""
            try:
                async with connect(url, open_timeout=10, proxy=None):
                    return True
            except (OSError, TimeoutError, Exception):
                return False

        admitted = await asyncio.gather(*(knock() for _ in range(40)))
        assert not any(admitted)
        assert coordinator.proc.stdin is not None
        coordinator.proc.stdin.write(b"free\n")
        await coordinator.line(re.compile(r"^freed$"))
        # Descriptors are back: a peer gets in and hears of the open round.
        async with RawClient(url) as client:
            notice = await client.open_round(timeout=30)
        assert notice.round == 0
        coordinator.proc.stdin.write(b"stop\n")
        assert await coordinator.wait() == 0, coordinator.stderr[-20:]
    finally:
        coordinator.kill()
    log = coordinator.stderr
    exhaustion = [line for line in log if EXHAUSTION.search(line)]
    assert 1 <= len(exhaustion) <= 5, exhaustion[:10]
    assert not any("out of system resource" in line for line in log)
    assert not any("Traceback" in line for line in log), log[-30:]


# ------------------------------------------------------------ the accept gate


class Backlog:
    """Stands in for a listening socket's accept(): hands out real sockets, or fails."""

    def __init__(self) -> None:
        self.waiting = 0
        self.fail: OSError | None = None
        self.handed: list[socket.socket] = []

    def accept(self) -> tuple[socket.socket, Any]:
        if self.fail is not None:
            raise self.fail
        if not self.waiting:
            raise BlockingIOError(errno.EAGAIN, "nothing waiting")
        self.waiting -= 1
        ours, theirs = socket.socketpair()
        self.handed.append(theirs)
        return ours, ("127.0.0.1", 1)


def test_accept_gate_admits_up_to_capacity_and_refuses_the_rest(
        caplog: pytest.LogCaptureFixture) -> None:
    gate = _AcceptGate(capacity=2, limit=64)
    backlog = Backlog()
    backlog.waiting = 10
    first, _ = gate.accept(backlog.accept)
    second, _ = gate.accept(backlog.accept)
    assert gate.open == 2
    with pytest.raises(BlockingIOError):
        gate.accept(backlog.accept)  # the other 8 are accepted and closed at once
    assert backlog.waiting == 0
    assert all(peer.recv(1) == b"" for peer in backlog.handed[2:])  # closed on them
    notices = [r for r in caplog.records if "refusing new connections" in r.getMessage()]
    assert len(notices) == 1, notices  # one line per interval, not one per connection
    first.close()
    assert gate.open == 1  # a closed client gives its slot back
    backlog.waiting = 1
    third, _ = gate.accept(backlog.accept)
    assert gate.open == 2
    for sock in (second, third, *backlog.handed):
        sock.close()
    gate.close()


def test_accept_gate_without_descriptors_refuses_with_its_spare_then_backs_off() -> None:
    gate = _AcceptGate(capacity=None, limit=None)
    backlog = Backlog()
    backlog.waiting = 1
    backlog.fail = OSError(errno.EMFILE, os.strerror(errno.EMFILE))
    real_fail = backlog.fail

    def accept_once_the_spare_is_free() -> tuple[socket.socket, Any]:
        # The first call fails for want of a descriptor; with the spare closed, the
        # second gets the waiting connection.
        if backlog.fail is not None:
            backlog.fail = None
            raise real_fail
        return backlog.accept()

    with pytest.raises(BlockingIOError):
        gate.accept(accept_once_the_spare_is_free)
    assert backlog.waiting == 0 and backlog.handed[0].recv(1) == b""
    assert gate.open == 0
    # With no spare left, the error goes to asyncio once (it pauses reading the
    # socket for a second); calls within that second do not touch the socket.
    gate.close()
    backlog.fail = real_fail
    with pytest.raises(OSError) as raised:
        gate.accept(backlog.accept)
    assert raised.value.errno == errno.EMFILE
    backlog.fail = None
    backlog.waiting = 1
    with pytest.raises(BlockingIOError):
        gate.accept(backlog.accept)
    assert backlog.waiting == 1
    for sock in backlog.handed:
        sock.close()
