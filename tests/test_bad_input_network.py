"""Bad input against a live coordinator and live peer listeners (DESIGN.md section 9).

Malformed frames, wrong types, text frames, oversized frames, unknown message
types, replays from another session or an earlier round, forged senders and
duplicate ids. In every case the offending connection is closed with a logged
reason (and, for a registered peer, a specific drop reason such as
``forged_sender``, ``wrong_session`` or ``malformed_message``), and the
honest peers still finish the round with the exact sum.

Attacks from a registered client happen after registration closed: the attacker
is on the roster and never sends its shares; once the coordinator drops it the
honest peers stop waiting for it (at their R1 deadline, 0.75 * phase_timeout, at
the latest) and the round goes on without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack
import numpy as np
import pytest
from helpers_network import (
    HOST,
    ROUND_TIMEOUT,
    RawClient,
    Swarm,
    assert_exact_sum,
    empty_message,
    make_inputs,
    peer_names,
    random_frame,
    tolerance,
)
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosedError

from secagg.wire import (
    WIRE_VERSION,
    EncryptedPartialSum,
    EncryptedShares,
    Limits,
    Refusal,
    Rejected,
    RootAbort,
    Roster,
    ShareReport,
    encode,
)
from secagg.wire import Envelope as Env
from server.coordinator import Coordinator

DIM = 16
HONEST = 6
PHASE_TIMEOUT = 3.0

def coordinator(max_peers: int, **overrides: Any) -> Coordinator:
    options: dict[str, Any] = dict(max_peers=max_peers, threshold=max_peers // 2 + 1, dim=DIM,
                                   phase_timeout=PHASE_TIMEOUT)
    options.update(overrides)
    return Coordinator(HOST, 0, **options)


def packed(*items: Any) -> bytes:
    data: bytes = msgpack.packb(list(items), use_bin_type=True)
    return data


def all_fields(cls: type[Any], value: Any) -> dict[str, Any]:
    return {f.name: value for f in dataclasses.fields(cls)}


def oversized(max_peers: int) -> bytes:
    """A frame one byte over the coordinator's limit for this round (sized from --dim:
    the ring carries the DIM input coordinates and the clipped counter)."""
    limit = Limits.for_round(max_peers=max_peers, dim=DIM + 1, modulus_bits=32).max_frame_bytes
    return bytes(limit + 1)


def logged(caplog: pytest.LogCaptureFixture, fragment: str) -> bool:
    return any(fragment in record.getMessage() for record in caplog.records
               if record.levelno >= logging.WARNING)


def check_honest_round(result: Any, outcomes: dict[str, Any],
                       inputs: dict[str, np.ndarray], n: int) -> None:
    assert result.status == "ok", (result.outcome.reason, result.outcome.dropped)
    assert sorted(result.contributors) == sorted(inputs)
    assert_exact_sum(result.aggregate, inputs, result.contributors, tolerance(n, DIM))
    for name, outcome in outcomes.items():
        assert getattr(outcome, "status", None) == "ok", (name, outcome)


# ----------------------------------------- coordinator, unregistered connections

Attack = Callable[[RawClient], bytes | str]

UNREGISTERED: dict[str, tuple[Attack, str]] = {
    "random-bytes": (lambda c: random_frame(300), "malformed frame"),
    "truncated-msgpack": (lambda c: c.advertise_frame("evil")[:40], "malformed frame"),
    "text-frame": (lambda c: "advertise_keys please", "text frames"),
    "empty-frame": (lambda c: b"", "malformed frame"),
    "not-an-envelope": (lambda c: packed(WIRE_VERSION, "advertise_keys"), "envelope"),
    "wrong-version": (lambda c: packed(99, "advertise_keys", c.session, 0, "evil", {}),
                      "wire version"),
    "wrong-envelope-types": (lambda c: packed(WIRE_VERSION, "advertise_keys", c.session, "0",
                                              "evil", {}), "round must be an integer"),
    "wrong-body-types": (lambda c: packed(WIRE_VERSION, "advertise_keys", c.session, 0, "evil",
                                          {"address": "", "channel_key": 7,
                                           "mask_key": b"k" * 32}), "channel_key"),
    "bad-sender-name": (lambda c: packed(WIRE_VERSION, "advertise_keys", c.session, 0,
                                         "no spaces allowed", {}), "sender"),
    "unknown-type": (lambda c: packed(WIRE_VERSION, "steal_the_sum", c.session, 0, "evil", {}),
                     "unknown message type"),
    "first-frame-not-registration": (
        lambda c: encode(Env(c.session, 0, "evil", empty_message(ShareReport))),
        "first frame must be advertise_keys"),
    "registration-from-another-session": (
        lambda c: c.advertise_frame("evil").replace(c.session, os.urandom(16)),
        "registration for this round is closed"),
    "registration-for-another-round": (
        lambda c: c.advertise_frame("evil", round_number=5),
        "registration for this round is closed"),
}


@pytest.mark.parametrize("case", sorted(UNREGISTERED))
async def test_coordinator_closes_bad_unregistered_connections(
        case: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    attack, fragment = UNREGISTERED[case]
    names = peer_names(HONEST)
    inputs = make_inputs(names, DIM, seed=1)
    async with coordinator(HONEST) as c:
        round_task = asyncio.create_task(c.run_round())
        async with RawClient(c.url) as attacker:
            await attacker.open_round()
            await attacker.send(attack(attacker))
            await attacker.closed(timeout=10)
        assert logged(caplog, fragment), [r.getMessage() for r in caplog.records]
        async with Swarm(c.url, names) as swarm, asyncio.timeout(ROUND_TIMEOUT):
            outcomes = await swarm.contribute(inputs)
            result = await round_task
    check_honest_round(result, outcomes, inputs, HONEST)
    assert result.outcome.dropped == {}


async def test_coordinator_refuses_an_oversized_frame() -> None:
    names = peer_names(HONEST)
    inputs = make_inputs(names, DIM, seed=2)
    async with coordinator(HONEST) as c:
        round_task = asyncio.create_task(c.run_round())
        async with RawClient(c.url) as attacker:
            await attacker.open_round()
            await attacker.send(oversized(HONEST))
            code, reason = await attacker.closed(timeout=10)
        assert code == 1009, (code, reason)  # message too big, before any decoding
        async with Swarm(c.url, names) as swarm, asyncio.timeout(ROUND_TIMEOUT):
            outcomes = await swarm.contribute(inputs)
            result = await round_task
    check_honest_round(result, outcomes, inputs, HONEST)


# Regression test (was a strict xfail documenting a bug, since fixed).
async def test_coordinator_close_code_carries_the_reason() -> None:
    async with coordinator(HONEST) as c:
        round_task = asyncio.create_task(c.run_round())
        try:
            async with RawClient(c.url) as attacker:
                await attacker.open_round()
                await attacker.send(random_frame(300))
                code, reason = await attacker.closed(timeout=10)
        finally:
            round_task.cancel()
            await asyncio.gather(round_task, return_exceptions=True)
    assert code == 1008
    assert "malformed" in reason


async def _registered(c: Coordinator, name: str) -> None:
    """Barrier: wait until the coordinator has bound ``name`` to its connection."""
    async with asyncio.timeout(10):
        while name not in c.connected_names:
            await asyncio.sleep(0.01)


async def test_rejected_notice_reaches_a_duplicate_id() -> None:
    async with coordinator(3) as c, RawClient(c.url) as original:
        round_task = asyncio.create_task(c.run_round())
        try:
            await original.register("dup")
            await _registered(c, "dup")
            async with RawClient(c.url) as impostor:
                await impostor.open_round()
                await impostor.send(impostor.advertise_frame("dup"))
                await impostor.closed(timeout=10)
        finally:
            round_task.cancel()
            await asyncio.gather(round_task, return_exceptions=True)
    rejections = [env.body for env in impostor.received if isinstance(env.body, Rejected)]
    assert rejections and "duplicate id" in rejections[0].reason


# -------------------------------------------- coordinator, a registered attacker

RegisteredAttack = Callable[[RawClient], Awaitable[None]]


def send_frame(make: Callable[[RawClient], bytes | str]) -> RegisteredAttack:
    async def attack(client: RawClient) -> None:
        await client.send(make(client))
    return attack


REGISTERED: dict[str, tuple[RegisteredAttack, str, str | None]] = {
    # name: (attack, logged fragment, expected drop reason of the attacker)
    "forged-sender": (
        send_frame(lambda c: encode(Env(c.session, c.round, "p000",
                                        empty_message(ShareReport)))),
        "forged sender", "forged_sender"),
    "replay-from-another-session": (
        send_frame(lambda c: encode(Env(os.urandom(16), c.round, c.name,
                                        empty_message(ShareReport)))),
        "another session", "wrong_session"),
    "random-bytes": (send_frame(lambda c: random_frame(500, seed=3)), "malformed",
                     "malformed_message"),
    "text-frame": (send_frame(lambda c: "\u00bfshare_report?"), "text frames", "malformed_message"),
    "wrong-types": (
        send_frame(lambda c: packed(WIRE_VERSION, ShareReport.TYPE, c.session, c.round, c.name,
                                    all_fields(ShareReport, "everyone"))),
        "expected a list", "malformed_message"),
    "unknown-type": (
        send_frame(lambda c: packed(WIRE_VERSION, "reveal_inputs", c.session, c.round, c.name,
                                    {})),
        "unknown message type", "malformed_message"),
    "message-not-allowed-now": (
        send_frame(lambda c: encode(Env(c.session, c.round, c.name,
                                        RootAbort(contributor_count=0)))),
        "cannot accept", "unexpected_message"),
    "peer-message-to-the-server": (
        send_frame(lambda c: encode(Env(c.session, c.round, c.name,
                                        EncryptedShares(ciphertext=b"x" * 64)))),
        "cannot accept", "unexpected_message"),
    "server-message-from-a-peer": (
        send_frame(lambda c: encode(Env(c.session, c.round, c.name,
                                        Rejected(reason="you are out")))),
        "cannot accept", "unexpected_message"),
    "claims-to-be-the-server": (
        send_frame(lambda c: encode(Env(c.session, c.round, "server",
                                        Refusal(reason="I am the server")))),
        "forged sender", "forged_sender"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(REGISTERED))
async def test_coordinator_drops_a_misbehaving_registered_peer(
        case: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    attack, fragment, reason = REGISTERED[case]
    names = peer_names(HONEST)
    inputs = make_inputs(names, DIM, seed=4)
    n = HONEST + 1
    async with coordinator(n) as c, Swarm(c.url, names) as swarm, \
            RawClient(c.url) as attacker:
        round_task = asyncio.create_task(c.run_round())
        await attacker.register("mallory")
        contributions = asyncio.create_task(swarm.contribute(inputs))
        await attacker.wait_for(Roster.TYPE)
        await attack(attacker)
        await attacker.closed(timeout=10)
        async with asyncio.timeout(ROUND_TIMEOUT):
            outcomes = await contributions
            result = await round_task
    assert logged(caplog, fragment), [r.getMessage() for r in caplog.records]
    check_honest_round(result, outcomes, inputs, n)
    assert result.outcome.dropped == {"mallory": reason}
    assert fragment in result.stats["drop_details"]["mallory"]


@pytest.mark.slow
async def test_coordinator_oversized_frame_from_a_registered_peer() -> None:
    names = peer_names(HONEST)
    inputs = make_inputs(names, DIM, seed=5)
    n = HONEST + 1
    async with coordinator(n) as c, Swarm(c.url, names) as swarm, \
            RawClient(c.url) as attacker:
        round_task = asyncio.create_task(c.run_round())
        await attacker.register("mallory")
        contributions = asyncio.create_task(swarm.contribute(inputs))
        await attacker.wait_for(Roster.TYPE)
        await attacker.send(oversized(n))
        code, _ = await attacker.closed(timeout=10)
        async with asyncio.timeout(ROUND_TIMEOUT):
            outcomes = await contributions
            result = await round_task
    assert code == 1009
    check_honest_round(result, outcomes, inputs, n)
    assert result.outcome.dropped.get("mallory")


@pytest.mark.slow
async def test_coordinator_rejects_a_duplicate_id_during_registration(
        caplog: pytest.LogCaptureFixture) -> None:
    """A second connection registering a name that is already registered is turned away."""
    caplog.set_level(logging.INFO)
    names = peer_names(HONEST)
    inputs = make_inputs(names, DIM, seed=6)
    n = HONEST + 1
    async with coordinator(n) as c, RawClient(c.url) as original:
        round_task = asyncio.create_task(c.run_round())
        await original.register("dup")
        await _registered(c, "dup")
        async with RawClient(c.url) as impostor:
            await impostor.open_round()
            await impostor.send(impostor.advertise_frame("dup"))
            await impostor.closed(timeout=10)
        assert logged(caplog, "duplicate id")
        async with Swarm(c.url, names) as swarm, asyncio.timeout(ROUND_TIMEOUT):
            outcomes = await swarm.contribute(inputs)  # the original stays silent
            result = await round_task
    check_honest_round(result, outcomes, inputs, n)
    # Exactly one "dup" was on the roster: the original, which never shared.
    assert result.stats["u1"] == n
    assert result.outcome.dropped == {"dup": "no_share_report"}


async def test_coordinator_rejects_a_duplicate_id_between_rounds(
        caplog: pytest.LogCaptureFixture) -> None:
    """An impostor registering a connected honest peer's name cannot take its place."""
    caplog.set_level(logging.INFO)
    names = peer_names(HONEST)
    first = make_inputs(names, DIM, seed=11)
    second = make_inputs(names, DIM, seed=12)
    async with coordinator(HONEST) as c, Swarm(c.url, names) as swarm:
        async with asyncio.timeout(ROUND_TIMEOUT):
            round_task = asyncio.create_task(c.run_round())
            outcomes0 = await swarm.contribute(first)
            result0 = await round_task
        async with RawClient(c.url) as impostor:
            impostor.session, impostor.round = c.session, 0
            await impostor.send(impostor.advertise_frame("p000"))
            await impostor.closed(timeout=10)
        async with asyncio.timeout(ROUND_TIMEOUT):
            round_task = asyncio.create_task(c.run_round())
            outcomes1 = await swarm.contribute(second)
            result1 = await round_task
    assert logged(caplog, "duplicate id")
    check_honest_round(result0, outcomes0, first, HONEST)
    check_honest_round(result1, outcomes1, second, HONEST)
    assert result1.outcome.dropped == {}


@pytest.mark.slow
async def test_coordinator_drops_a_replay_from_an_earlier_round(
        caplog: pytest.LogCaptureFixture) -> None:
    """Round 1: a peer re-sends the registration it sent in round 0."""
    caplog.set_level(logging.INFO)
    names = peer_names(HONEST)
    first = make_inputs(names, DIM, seed=7)
    second = make_inputs(names, DIM, seed=8)
    n = HONEST + 1
    async with coordinator(n) as c, Swarm(c.url, names) as swarm, \
            RawClient(c.url) as attacker:
        async with asyncio.timeout(ROUND_TIMEOUT):
            round_task = asyncio.create_task(c.run_round())
            old_frame = await attacker.register("mallory")
            outcomes0 = await swarm.contribute(first)  # mallory stays silent
            result0 = await round_task

            round_task = asyncio.create_task(c.run_round())
            await attacker.open_round()
            assert attacker.round == 1
            await attacker.register("mallory")
            contributions = asyncio.create_task(swarm.contribute(second))
            await attacker.wait_for(Roster.TYPE)
            await attacker.send(old_frame)
            await attacker.closed(timeout=10)
            outcomes1 = await contributions
            result1 = await round_task
    check_honest_round(result0, outcomes0, first, n)
    assert result0.outcome.dropped == {"mallory": "no_share_report"}
    check_honest_round(result1, outcomes1, second, n)
    assert result1.outcome.dropped == {"mallory": "wrong_session"}
    assert "round 0" in result1.stats["drop_details"]["mallory"]
    assert logged(caplog, "replayed or late")


# ------------------------------------------------------------ peer listeners


def listener_attacks(session: bytes, round_number: int) -> dict[str, tuple[bytes | str, str]]:
    """name: (frame sent to an honest peer's listener, fragment its log must show)."""
    limits = Limits.for_round(max_peers=HONEST + 1, dim=DIM, modulus_bits=32)
    sealed = EncryptedShares(ciphertext=os.urandom(100))
    return {
        "random-bytes": (random_frame(200, seed=9), "malformed frame"),
        "truncated-msgpack": (encode(Env(session, round_number, "p001", sealed))[:30],
                              "malformed frame"),
        "text-frame": ("hello neighbour", "text frame"),
        "wrong-types": (packed(WIRE_VERSION, EncryptedShares.TYPE, session, round_number,
                               "p001", {"ciphertext": 12}), "malformed frame"),
        "unknown-type": (packed(WIRE_VERSION, "gossip", session, round_number, "p001", {}),
                         "unknown message type"),
        "over-the-round-limit": (encode(Env(session, round_number, "p001",
                                            EncryptedPartialSum(ciphertext=bytes(
                                                limits.max_frame_bytes)))),
                                 "exceeds the limit"),
        "forged-sender": (encode(Env(session, round_number, "p001", sealed)),
                          "authentication_failed"),
        "unknown-sender": (encode(Env(session, round_number, "stranger", sealed)),
                           "unknown peer 'stranger'"),
        "claims-to-be-the-server": (encode(Env(session, round_number, "server", sealed)),
                                    "claims to come from the server"),
        "server-message-from-a-peer": (encode(Env(session, round_number, "p001",
                                                  Rejected(reason="leave the round"))),
                                       "may only come from the server"),
        "replay-from-another-session": (encode(Env(os.urandom(16), round_number, "p001",
                                                   sealed)), "another session"),
    }


@pytest.mark.slow
async def test_peer_listener_closes_bad_connections(caplog: pytest.LogCaptureFixture) -> None:
    """Every attack on its own connection to p000's listener, during R1."""
    caplog.set_level(logging.INFO)
    names = peer_names(HONEST)
    inputs = make_inputs(names, DIM, seed=10)
    n = HONEST + 1
    async with coordinator(n) as c, Swarm(c.url, names) as swarm, \
            RawClient(c.url) as silent:
        round_task = asyncio.create_task(c.run_round())
        await silent.register("silent")
        contributions = asyncio.create_task(swarm.contribute(inputs))
        await silent.wait_for(Roster.TYPE)
        # p000 now waits for the silent client's shares; before "sharing" it would
        # still buffer sealed peer frames instead of checking them.
        assert await swarm.wait_state("p000", ["sharing"], timeout=10) == "sharing"
        target = swarm.peers["p000"].address
        attacks = listener_attacks(silent.session, silent.round)

        async def attack(frame: bytes | str) -> int | None:
            async with connect(target, compression=None, max_size=None, proxy=None) as ws:
                await ws.send(frame)
                async with asyncio.timeout(10):
                    with contextlib.suppress(ConnectionClosedError):
                        async for _ in ws:
                            pass
                return ws.close_code

        results = await asyncio.gather(*(attack(frame) for frame, _ in attacks.values()),
                                       return_exceptions=True)
        async with asyncio.timeout(ROUND_TIMEOUT):
            outcomes = await contributions
            result = await round_task
    for case, outcome in zip(attacks, results, strict=True):
        # Closed by the peer: 1008 (policy violation) with the reason, or 1000 when the
        # listener simply stops reading a connection (a text frame).
        assert outcome in (1000, 1008), (case, outcome)
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("secagg.peer")]
    for case, (_, fragment) in attacks.items():
        assert any(fragment in m for m in messages), (case, fragment, messages)
    check_honest_round(result, outcomes, inputs, n)
    assert result.outcome.dropped == {"silent": "no_share_report"}
