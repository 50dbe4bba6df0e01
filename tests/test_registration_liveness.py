"""Registration does not wait for connections that are gone, and a peer that arrives
while a round runs is kept for the next one.

Two levels, as everywhere: the sans-I/O server (driven by hand over the in-memory
network of ``helpers_protocol``) for what the protocol decides, and a real
``Coordinator`` with real ``Peer``s (and raw clients) on 127.0.0.1 for what the
drivers do with it.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import numpy as np
import pytest
from helpers_network import (
    HOST,
    ROUND_TIMEOUT,
    RawClient,
    Swarm,
    assert_exact_sum,
    make_inputs,
    peer_names,
    tolerance,
)
from helpers_protocol import ROUND, SESSION, Hold, Net, error_bound, is_type
from test_cli import DIM as CLI_DIM
from test_cli import diagnostics, finish, input_file, spawn_tool
from test_processes import Process

from peers.peer import Peer
from secagg import wire
from secagg.cli_support import ExitStatus
from secagg.protocol import (
    Disconnect,
    FrameReceived,
    PeerConnected,
    PeerGone,
    PeerProtocol,
    Send,
    ServerConfig,
    ServerProtocol,
)
from secagg.protocol.errors import DropReason
from secagg.protocol.server import ServerState
from secagg.sim import DeterministicRandom, peer_name
from secagg.wire import SERVER, Roster
from server.coordinator import Coordinator

DIM = 8
PHASE_TIMEOUT = 30.0
"""Long enough that waiting it out shows: registration must close well before it."""
PROMPTLY = 10.0
"""A generous bound on "at once" (a loaded 2-core machine), still far below the deadline."""


# ------------------------------------------------------------------ sans-I/O


def _server_round(peers: int, *, connected: int, max_peers: int, threshold: int,
                  seed: int = 0) -> tuple[Net, np.ndarray]:
    """A server told that ``connected`` connections heard of the round, and ``peers``
    peers (not started)."""
    config = ServerConfig(session=SESSION, round=ROUND, max_peers=max_peers,
                          threshold=threshold, dim=5, phase_timeout=10.0)
    server = ServerProtocol(config, random_bytes=DeterministicRandom(seed, "server"))
    names = [peer_name(i) for i in range(peers)]
    net = Net(server, {name: PeerProtocol(name, address=f"ws://127.0.0.1:{9000 + i}",
                                          random_bytes=DeterministicRandom(seed, name))
                       for i, name in enumerate(names)})
    net.apply(SERVER, server.start(connected=connected))
    inputs = np.random.default_rng(seed).uniform(-1.0, 1.0, size=(peers, 5))
    return net, inputs


def _register(net: Net, inputs: np.ndarray, indices: list[int], hold: Hold | None = None
              ) -> None:
    for i in indices:
        name = peer_name(i)
        net.apply(name, net.peers[name].start(SESSION, ROUND, inputs[i]))
    net.run(hold)


def _assert_ok_sum(net: Net, inputs: np.ndarray, contributors: list[int],
                   max_peers: int) -> None:
    outcome = net.server.outcome
    assert outcome is not None and outcome.status == "ok", outcome
    assert outcome.contributors == tuple(peer_name(i) for i in contributors)
    assert outcome.aggregate is not None
    error = np.max(np.abs(outcome.aggregate - inputs[contributors].sum(axis=0)))
    assert error < error_bound(max_peers, inputs.shape[1])


@pytest.mark.parametrize("leaves_first", [True, False], ids=["leaves-first", "leaves-last"])
def test_a_connection_that_leaves_unregistered_does_not_hold_registration(
        leaves_first: bool) -> None:
    # Five connections heard of the round: four peers and one that dies unregistered.
    net, inputs = _server_round(4, connected=5, max_peers=5, threshold=3)
    if leaves_first:
        net.event(SERVER, PeerGone("#5"))
        _register(net, inputs, [0, 1, 2])
        assert net.server.state is ServerState.COLLECTING_KEYS  # p3 has not answered yet
        _register(net, inputs, [3])
    else:
        _register(net, inputs, [0, 1, 2, 3])
        # Nobody left or withdrew: the fifth connection may still register, as today.
        assert net.server.state is ServerState.COLLECTING_KEYS
        net.event(SERVER, PeerGone("#5"))
    assert net.server.state is not ServerState.COLLECTING_KEYS
    assert net.server.names == [peer_name(i) for i in range(4)]
    net.run()
    _assert_ok_sum(net, inputs, [0, 1, 2, 3], max_peers=5)


def test_a_peer_that_registers_and_leaves_does_not_hold_registration() -> None:
    net, inputs = _server_round(5, connected=5, max_peers=5, threshold=3)
    _register(net, inputs, [4])
    net.dead.add(peer_name(4))  # registered, then its connection closed
    net.event(SERVER, PeerGone(peer_name(4)))
    _register(net, inputs, [0, 1, 2])
    assert net.server.state is ServerState.COLLECTING_KEYS  # p3 has not answered yet
    _register(net, inputs, [3])
    assert net.server.names == [peer_name(i) for i in range(4)]
    net.run()
    _assert_ok_sum(net, inputs, [0, 1, 2, 3], max_peers=5)


def test_a_departure_is_counted_once() -> None:
    # p0 is cut off for a replayed registration (a departure), then its connection
    # closes (the same departure, told again): counted twice, the five answers
    # below would close registration before p4 answered.
    net, inputs = _server_round(5, connected=6, max_peers=6, threshold=4)
    _register(net, inputs, [0])
    own = next(env for sender, _, env in net.sent
               if sender == peer_name(0) and env.type == "advertise_keys")
    net.event(SERVER, FrameReceived(peer_name(0), wire.encode(own)))
    assert [d.name for d in net.disconnects] == [peer_name(0)]
    net.event(SERVER, PeerGone(peer_name(0)))
    net.event(SERVER, PeerGone("#6"))
    _register(net, inputs, [1, 2, 3])
    assert net.server.state is ServerState.COLLECTING_KEYS
    _register(net, inputs, [4])
    assert net.server.names == [peer_name(i) for i in range(1, 5)]
    net.run()
    _assert_ok_sum(net, inputs, [1, 2, 3, 4], max_peers=6)


def test_a_connection_after_registration_is_told_and_kept() -> None:
    net, inputs = _server_round(3, connected=3, max_peers=3, threshold=2)
    _register(net, inputs, [0, 1, 2], hold=is_type("encrypted_shares"))
    assert net.server.state is ServerState.SHARING
    actions = net.server.handle(PeerConnected("#7"))
    assert len(actions) == 1 and not any(isinstance(a, Disconnect) for a in actions), actions
    notice = actions[0]
    assert isinstance(notice, Send) and notice.recipient == "#7"
    assert isinstance(notice.envelope.body, wire.Rejected)
    assert "raise max_peers" in notice.envelope.body.reason
    # Registering late on it is answered the same way; the connection stays.
    late = PeerProtocol("peer-late", random_bytes=DeterministicRandom(0, "late"))
    advert = late.start(SESSION, ROUND, inputs[0])[0]
    assert isinstance(advert, Send)
    actions = net.server.handle(FrameReceived("#7", wire.encode(advert.envelope)))
    assert len(actions) == 1 and isinstance(actions[0], Send), actions
    assert isinstance(actions[0].envelope.body, wire.Rejected)
    assert "raise max_peers" in actions[0].envelope.body.reason
    # Anything else from it is judged as before: a bad frame closes it.
    actions = net.server.handle(FrameReceived("#7", b"\x93garbage"))
    closed = actions[-1]
    assert isinstance(closed, Disconnect), actions
    assert (closed.name, closed.reason) == ("#7", DropReason.MALFORMED_MESSAGE)
    net.release()
    net.run()
    _assert_ok_sum(net, inputs, [0, 1, 2], max_peers=3)


# ------------------------------------------------------------------ network


def _coordinator(**overrides: object) -> Coordinator:
    options: dict[str, object] = dict(threshold=3, dim=DIM, phase_timeout=PHASE_TIMEOUT)
    options.update(overrides)
    return Coordinator(HOST, 0, **options)  # type: ignore[arg-type]


@pytest.mark.parametrize("registers", [False, True], ids=["unregistered", "registered"])
async def test_coordinator_closes_registration_when_a_connection_dies(
        registers: bool) -> None:
    names = peer_names(4)
    inputs = make_inputs(names, DIM, seed=31)
    async with _coordinator(max_peers=5) as c, Swarm(c.url, names) as swarm:
        async with RawClient(c.url) as ghost:
            started = time.monotonic()
            round_task = asyncio.create_task(c.run_round())
            if registers:
                await ghost.register("ghost")
                async with asyncio.timeout(PROMPTLY):
                    while "ghost" not in c.connected_names:
                        await asyncio.sleep(0.01)
            else:
                await ghost.open_round()  # it heard of the round ...
        # ... and its process died before the others registered.
        async with asyncio.timeout(PROMPTLY):
            while "ghost" in c.connected_names:
                await asyncio.sleep(0.01)
        async with asyncio.timeout(ROUND_TIMEOUT):
            outcomes = await swarm.contribute(inputs)
            result = await round_task
        elapsed = time.monotonic() - started
    assert result.status == "ok", result.stats
    assert sorted(result.contributors) == names
    assert_exact_sum(result.aggregate, inputs, result.contributors, tolerance(5, DIM))
    assert all(o.status == "ok" for o in outcomes.values())  # type: ignore[union-attr]
    # Registration closed once the four answered, not at its 30 s deadline.
    assert result.stats["phase_seconds"]["collecting_keys"] < PROMPTLY, result.stats
    assert elapsed < PHASE_TIMEOUT


async def test_peer_arriving_mid_round_takes_part_in_the_next() -> None:
    names = peer_names(4)
    first = make_inputs(names, DIM, seed=32)
    second = make_inputs([*names, "latecomer"], DIM, seed=33)
    late: Peer | None = None
    try:
        async with _coordinator(max_peers=5) as c, Swarm(c.url, names) as swarm:
            async with RawClient(c.url) as silent:
                round0 = asyncio.create_task(c.run_round())
                await silent.register("silent")
                contributions = asyncio.create_task(swarm.contribute(first))
                await silent.wait_for(Roster.TYPE)  # registration of round 0 is closed
                late = Peer(c.url, "latecomer")
                await late.start()
                rejected = await asyncio.wait_for(late.contribute(second["latecomer"]),
                                                  PROMPTLY)
                assert not round0.done()
            # The silent member is gone: round 0 ends without it.
            async with asyncio.timeout(ROUND_TIMEOUT):
                outcomes0 = await contributions
                result0 = await round0
                round1 = asyncio.create_task(c.run_round())
                outcomes1, late_outcome = await asyncio.gather(
                    swarm.contribute({name: second[name] for name in names}),
                    late.contribute(second["latecomer"]))
                result1 = await round1
        # The coordinator is gone now: that is what the next call says, not the old
        # rejection.
        after = await asyncio.wait_for(late.contribute(second["latecomer"]), PROMPTLY)
    finally:
        if late is not None:
            await late.close()
    assert rejected.status == "rejected" and rejected.round == 0
    assert "raise max_peers" in rejected.reason
    assert result0.status == "ok" and sorted(result0.contributors) == names
    assert_exact_sum(result0.aggregate, first, result0.contributors, tolerance(5, DIM))
    assert all(o.status == "ok" for o in outcomes0.values())  # type: ignore[union-attr]
    assert result1.status == "ok", result1.stats
    assert sorted(result1.contributors) == sorted([*names, "latecomer"])
    assert_exact_sum(result1.aggregate, second, result1.contributors, tolerance(5, DIM))
    assert late_outcome.status == "ok" and late_outcome.round == 1 and late_outcome.included
    assert all(o.status == "ok" for o in outcomes1.values())  # type: ignore[union-attr]
    assert (after.status, after.reason) == ("aborted", "lost the connection to the coordinator")


async def test_cli_peer_turned_away_by_closed_registration_takes_the_next_round(
        tmp_path: Path) -> None:
    names = peer_names(2)
    told: asyncio.Event = asyncio.Event()

    def hook(process: Process, line: str) -> None:
        if re.match(r"secagg-peer carol: round 0: ", line):
            told.set()

    values = np.full(CLI_DIM, 0.25)
    inputs = {name: values for name in names}
    async with _coordinator(max_peers=3, threshold=2, dim=CLI_DIM) as c, \
            Swarm(c.url, names) as swarm:
        async with RawClient(c.url) as silent:
            round0 = asyncio.create_task(c.run_round())
            await silent.register("silent")
            contributions = asyncio.create_task(swarm.contribute(inputs))
            await silent.wait_for(Roster.TYPE)  # registration of round 0 is closed
            carol = await spawn_tool("secagg-peer", [
                "--server", c.url, "--id", "carol", "--input", str(input_file(tmp_path))],
                hook, "carol")
            try:
                await asyncio.wait_for(told.wait(), ROUND_TIMEOUT)
            except BaseException:
                carol.proc.kill()
                raise
        async with asyncio.timeout(ROUND_TIMEOUT):
            await contributions
            result0 = await round0
            round1 = asyncio.create_task(c.run_round())
            await swarm.contribute(inputs)
            result1 = await round1
            (code,) = await finish(carol)
    assert result0.status == "ok" and "carol" not in result0.contributors
    assert result1.status == "ok" and sorted(result1.contributors) == sorted([*names, "carol"])
    assert code == ExitStatus.OK, diagnostics(carol)
    lines = [line for line in carol.lines if line.startswith("secagg-peer carol:")]
    assert len(lines) == 2, diagnostics(carol)
    assert lines[0].startswith("secagg-peer carol: round 0: ") and \
        "registration for this round is closed" in lines[0] and "next round" in lines[0]
    assert lines[1] == "secagg-peer carol: round 1: ok (3 contributors)"
