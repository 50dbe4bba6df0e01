"""Forward abuse (security item 7): what the coordinator relays for peers behind NAT.

A peer without a listener is reached through the coordinator, which relays sealed
``Forward`` frames to it. A registered peer must not be able to use that relay as
a free channel: to itself, to a peer that has a listener, outside its
neighbourhood or tree path, for another session or round, or as a flood. Each
attack runs against a real :class:`~server.Coordinator` on 127.0.0.1 with honest
peers (half of them behind NAT) taking part in the same round; the forbidden
frame must never reach its recipient, the coordinator must log why it refused
it, a flood must end in a disconnection with ``forbidden_forward``, and the
honest peers' round must still end ok with the exact sum.

The attackers of the share phase are raw clients (``helpers_network.RawClient``)
that register behind NAT and then stay silent; their victims are raw clients too,
which record every frame the coordinator sends them, so "never relayed" is an
observation, not a timeout. The tree attack needs an attacker inside the
accumulation tree: a real peer that also sends forged forwards.

The pure check (secagg.protocol.server.forward) is unit-tested at the end, on a
hand-built round context (a sparse neighbour graph, a tree, NAT and listening
peers), and ServerProtocol.relay on the in-memory network with a real sealed frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from helpers_network import (
    HOST,
    ROUND_TIMEOUT,
    RawClient,
    Swarm,
    assert_exact_sum,
    free_port,
    make_inputs,
    peer_names,
    port_refuses,
    tolerance,
)
from helpers_protocol import ROUND, SESSION, is_type, make_round
from websockets.exceptions import ConnectionClosed

from peers.peer import Peer
from secagg.crypto.keys import generate_keypair
from secagg.graph import AccumulationTree, NeighbourGraph, complete_graph
from secagg.protocol import MessageReceived, PeerOutcome, PeerProtocol, ServerConfig
from secagg.protocol.errors import DropReason
from secagg.protocol.events import Disconnect, Send
from secagg.protocol.server.base import ServerState
from secagg.protocol.server.context import ServerContext
from secagg.protocol.server.forward import (
    MAX_FORWARD_STRIKES,
    SHARE_FRAME_BYTES,
    ForwardGate,
    judge_forward,
)
from secagg.protocol.server.protocol import ServerProtocol
from secagg.sim import DeterministicRandom, peer_name
from secagg.wire import (
    SERVER,
    AdvertiseKeys,
    EncryptedPartialSum,
    EncryptedShares,
    Envelope,
    Forward,
    Message,
    PeerEntry,
    Roster,
    RoundOutcome,
    decode,
    encode,
)
from server.coordinator import Coordinator

DIM = 16
PHASE_TIMEOUT = 3.0
HONEST = peer_names(6)
NAT = set(HONEST[3:])  # p003..p005 have no listener: the coordinator relays for them
FLOOD = 300


def coordinator(n: int, **overrides: Any) -> Coordinator:
    options: dict[str, Any] = dict(max_peers=n, threshold=n // 2 + 1, dim=DIM,
                                   phase_timeout=PHASE_TIMEOUT, fan_in=2)
    options.update(overrides)
    return Coordinator(HOST, 0, **options)


def listen(name: str) -> tuple[str, int] | None:
    return None if name in NAT else (HOST, 0)


def junk_shares(session: bytes, round_number: int, sender: str) -> bytes:
    """A sealed-looking share frame (it cannot authenticate: the key is not the pair's)."""
    return encode(Envelope(session=session, round=round_number, sender=sender,
                           body=EncryptedShares(ciphertext=os.urandom(80))))


def junk_partial_sum(session: bytes, round_number: int, sender: str) -> bytes:
    return encode(Envelope(session=session, round=round_number, sender=sender,
                           body=EncryptedPartialSum(ciphertext=os.urandom(200))))


def refusals(caplog: pytest.LogCaptureFixture, sender: str) -> list[str]:
    """The coordinator's logged refusals of forwards from ``sender``."""
    return [r.getMessage() for r in caplog.records
            if r.name.startswith("secagg.server") and
            r.getMessage().startswith(f"refusing a forward from {sender!r}")]


# ------------------------------------------------------------- raw clients


@dataclass
class Recorder:
    """A registered raw client and every frame the coordinator sent it."""

    client: RawClient
    name: str
    frames: list[Envelope] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None

    async def register(self, address: str = "") -> None:
        """Register with fresh keys (and a commitment to a self-mask seed it will never
        need: it never shares), then record everything the coordinator sends."""
        client = self.client
        await client.open_round()
        client.name = self.name
        await client.send_message(AdvertiseKeys(
            address=address, channel_key=generate_keypair().public_bytes,
            mask_key=generate_keypair().public_bytes, self_mask_commitment=os.urandom(32)))
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                self.frames.append(await self.client.receive(ROUND_TIMEOUT))

    async def wait_for(self, kind: type[Message]) -> Envelope:
        async with asyncio.timeout(30):
            while True:
                for env in self.frames:
                    if isinstance(env.body, kind):
                        return env
                if self.reader is not None and self.reader.done():
                    raise AssertionError(f"{self.name}: closed before any {kind.TYPE}")
                await asyncio.sleep(0.01)

    def forwards_from(self, sender: str) -> list[Forward]:
        """Forwards relayed to this client whose (relabelled) origin is ``sender``."""
        return [env.body for env in self.frames
                if isinstance(env.body, Forward) and env.body.recipient == sender]

    async def forward(self, recipient: str, frame: bytes, *, session: bytes | None = None,
                      round_number: int | None = None) -> None:
        await self.client.send_message(Forward(recipient=recipient, frame=frame),
                                       session=session, round_number=round_number)


Attack = Callable[[Recorder, Recorder, Recorder], Awaitable[None]]
"""``attack(mallory, sink, decoy)``: sent by mallory once the roster is out (R1)."""


@dataclass
class AttackRound:
    result: Any
    outcomes: dict[str, PeerOutcome | BaseException]
    inputs: dict[str, np.ndarray]
    mallory: Recorder
    sink: Recorder
    decoy: Recorder


async def attack_round(attack: Attack) -> AttackRound:
    """Six honest peers (three behind NAT), and three raw clients on the roster:
    ``mallory`` (NAT, the attacker), ``sink`` (NAT) and ``decoy`` (advertises a
    listener that refuses connections). The raw clients never share keys, so the
    round drops them at the share deadline and goes on with the honest peers."""
    inputs = make_inputs(HONEST, DIM, seed=71)
    dead_port = free_port()
    assert port_refuses(dead_port)
    n = len(HONEST) + 3
    async with coordinator(n) as c, Swarm(c.url, HONEST, listen=listen) as swarm, \
            RawClient(c.url) as m, RawClient(c.url) as s, RawClient(c.url) as d:
        round_task = asyncio.create_task(c.run_round())
        mallory, sink, decoy = Recorder(m, "mallory"), Recorder(s, "sink"), Recorder(d, "decoy")
        await mallory.register()
        await sink.register()
        await decoy.register(address=f"ws://{HOST}:{dead_port}")
        contributions = asyncio.create_task(swarm.contribute(inputs))
        await mallory.wait_for(Roster)
        await sink.wait_for(Roster)
        await attack(mallory, sink, decoy)
        # The share phase ends (the raw clients never share) with an "excluded"
        # notice to each of them, queued after anything relayed during the phase.
        await sink.wait_for(RoundOutcome)
        await decoy.wait_for(RoundOutcome)
        async with asyncio.timeout(ROUND_TIMEOUT):
            outcomes = await contributions
            result = await round_task
    return AttackRound(result, outcomes, inputs, mallory, sink, decoy)


def check_honest_round(run: AttackRound, extra_drops: dict[str, str] | None = None) -> None:
    result = run.result
    assert result.status == "ok", (result.outcome.reason, result.outcome.dropped)
    assert sorted(result.contributors) == HONEST
    assert_exact_sum(result.aggregate, run.inputs, result.contributors,
                     tolerance(len(HONEST) + 3, DIM))
    for name, outcome in run.outcomes.items():
        assert getattr(outcome, "status", None) == "ok", (name, outcome)
    expected = {"mallory": "no_share_report", "sink": "no_share_report",
                "decoy": "no_share_report", **(extra_drops or {})}
    assert result.outcome.dropped == expected


def session_of(client: Recorder) -> tuple[bytes, int]:
    return client.client.session, client.client.round


# ------------------------------------------------------- the share phase (R1)


async def test_a_forward_between_nat_neighbours_is_relayed() -> None:
    """The control: mallory and sink are NAT neighbours in R1, so one share frame from
    mallory to sink is exactly what the relay is for, and it arrives."""
    sent: list[bytes] = []

    async def attack(mallory: Recorder, sink: Recorder, decoy: Recorder) -> None:
        frame = junk_shares(*session_of(mallory), "mallory")
        sent.append(frame)
        await mallory.forward("sink", frame)

    run = await attack_round(attack)
    assert [f.frame for f in run.sink.forwards_from("mallory")] == sent
    check_honest_round(run)


async def test_a_forward_to_oneself_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)

    async def attack(mallory: Recorder, sink: Recorder, decoy: Recorder) -> None:
        await mallory.forward("mallory", junk_shares(*session_of(mallory), "mallory"))

    run = await attack_round(attack)
    assert run.mallory.forwards_from("mallory") == []
    assert any("to itself" in m for m in refusals(caplog, "mallory")), refusals(caplog,
                                                                                 "mallory")
    check_honest_round(run)


async def test_a_forward_to_a_peer_with_a_listener_is_refused(
        caplog: pytest.LogCaptureFixture) -> None:
    """decoy advertised a listener: peers reach it directly, never through the relay."""
    caplog.set_level(logging.INFO)

    async def attack(mallory: Recorder, sink: Recorder, decoy: Recorder) -> None:
        await mallory.forward("decoy", junk_shares(*session_of(mallory), "mallory"))
        await mallory.forward("p000", junk_shares(*session_of(mallory), "mallory"))

    run = await attack_round(attack)
    assert run.decoy.forwards_from("mallory") == []
    logged = refusals(caplog, "mallory")
    assert sum("has a listener" in m for m in logged) == 2, logged
    check_honest_round(run)


@pytest.mark.parametrize("case", ["another-session", "a-later-round"])
async def test_a_forward_for_another_session_or_round_is_refused(
        case: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)

    async def attack(mallory: Recorder, sink: Recorder, decoy: Recorder) -> None:
        session, round_number = session_of(mallory)
        if case == "another-session":
            session = os.urandom(16)
        else:
            round_number += 3
        await mallory.forward("sink", junk_shares(session, round_number, "mallory"),
                              session=session, round_number=round_number)

    run = await attack_round(attack)
    assert run.sink.forwards_from("mallory") == []
    fragment = "another session" if case == "another-session" else "round 3"
    assert any(fragment in m for m in refusals(caplog, "mallory")), refusals(caplog,
                                                                              "mallory")
    check_honest_round(run)


async def test_a_forward_flood_ends_in_a_disconnection(
        caplog: pytest.LogCaptureFixture) -> None:
    """mallory floods her NAT neighbour sink with share frames: the coordinator relays
    no more than R1 can need, refuses the rest and cuts mallory off."""
    caplog.set_level(logging.INFO)

    async def attack(mallory: Recorder, sink: Recorder, decoy: Recorder) -> None:
        frame = junk_shares(*session_of(mallory), "mallory")
        with contextlib.suppress(ConnectionClosed):
            for _ in range(FLOOD):
                await mallory.forward("sink", frame)
        assert mallory.reader is not None
        async with asyncio.timeout(30):
            await mallory.reader  # until the coordinator closes the connection

    run = await attack_round(attack)
    relayed = run.sink.forwards_from("mallory")
    # Her budget: one share frame per NAT neighbour (sink, p003..p005) plus slack.
    assert 0 < len(relayed) <= 4 + 16, len(relayed)
    ws = run.mallory.client.ws
    assert ws is not None and ws.close_code == 1008, ws.close_code if ws else None
    assert len(refusals(caplog, "mallory")) <= MAX_FORWARD_STRIKES + 1
    check_honest_round(run, {"mallory": "forbidden_forward"})
    assert "forward" in run.result.stats["drop_details"]["mallory"]


# ------------------------------------------------------- the tree phase (R2)


class MaliciousPeer(Peer):
    """A peer that takes part honestly and, once it reaches one of ``attack_states``,
    also asks the coordinator to relay forged frames (through its own coordinator link)."""

    def __init__(self, url: str, name: str, attack_states: set[str],
                 attack: Callable[[MaliciousPeer], list[Envelope]]) -> None:
        super().__init__(url, name, listen=None, progress=self._on_progress)
        self.attack_states = attack_states
        self.attack = attack
        self.attacked = False

    def _on_progress(self, state: str, round_number: int) -> None:
        if state in self.attack_states and round_number == 0 and not self.attacked:
            self.attacked = True
            for envelope in self.attack(self):
                # What a modified client would put on its coordinator link.
                self._send_to_server(envelope)


async def test_a_partial_sum_forward_outside_the_tree_path_is_refused(
        caplog: pytest.LogCaptureFixture) -> None:
    """In R2 a peer sends its partial sum to a tree ancestor only. With fan-in 2 and
    three listening peers, the four NAT peers (mallory among them) are the tree's
    leaves: no NAT peer is mallory's ancestor, so none of her partial-sum forwards to
    them may be relayed. She stays below the strike limit and contributes. (A leaf
    sends its sum in the step that enters R2: it may report "forwarded" at once.)"""
    caplog.set_level(logging.INFO)
    names = sorted([*HONEST, "mallory"])
    inputs = make_inputs(names, DIM, seed=72)
    n = len(names)
    victims = sorted(NAT)

    def forge(peer: MaliciousPeer) -> list[Envelope]:
        return [Envelope(session=c.session, round=0, sender="mallory",
                         body=Forward(recipient=victim,
                                      frame=junk_partial_sum(c.session, 0, "mallory")))
                for victim in victims]

    async with coordinator(n) as c, Swarm(c.url, HONEST, listen=listen) as swarm:
        mallory = MaliciousPeer(c.url, "mallory", {"masking", "forwarded"}, forge)
        async with mallory:
            round_task = asyncio.create_task(c.run_round())
            contributions = asyncio.create_task(swarm.contribute(
                {name: inputs[name] for name in HONEST}))
            own = await asyncio.wait_for(mallory.contribute(inputs["mallory"]), ROUND_TIMEOUT)
            async with asyncio.timeout(ROUND_TIMEOUT):
                outcomes = await contributions
                result = await round_task
    assert mallory.attacked
    # No victim ever saw a partial sum from mallory (a relayed one would be logged by
    # the victim as rejected: it does not authenticate, and mallory is not its child).
    seen = [r.getMessage() for r in caplog.records if r.name.startswith("secagg.peer")
            and "from 'mallory'" in r.getMessage()]
    assert seen == [], seen
    logged = refusals(caplog, "mallory")
    for victim in victims:
        # Refused as outside her path up the tree (or, had R2 already ended, as late).
        assert any(f"to {victim!r}: " in m and ("ancestor" in m or "R2 is over" in m)
                   for m in logged), (victim, logged)
    assert result.status == "ok", (result.outcome.reason, result.outcome.dropped)
    assert sorted(result.contributors) == names
    assert_exact_sum(result.aggregate, inputs, result.contributors, tolerance(n, DIM))
    assert own.status == "ok"
    for name, outcome in outcomes.items():
        assert getattr(outcome, "status", None) == "ok", (name, outcome)


# ------------------------------------------------------------ the pure check


def entry(index: int, nat: bool) -> PeerEntry:
    return PeerEntry(index=index, name=f"q{index}",
                     address="" if nat else f"ws://127.0.0.1:{9000 + index}",
                     channel_key=generate_keypair().public_bytes,
                     mask_key=generate_keypair().public_bytes)


def context(nat: set[int], *, n: int = 10, sparse: bool = True,
            tree_order: tuple[int, ...] | None = None) -> ServerContext:
    """A round of ``n`` peers q0..q{n-1}; ``nat`` have no listener. The graph is a
    sparse ring of degree 4 (in a seeded ring order) or complete."""
    config = ServerConfig(session=SESSION, round=2, max_peers=n, threshold=n // 2 + 1,
                          dim=4, fan_in=2)
    ctx = ServerContext.create(config, random_bytes=os.urandom, record_view=False,
                               paillier_keys=None)
    ctx.entries = [entry(i, i in nat) for i in range(n)]
    ctx.names = [e.name for e in ctx.entries]
    ctx.index = {name: i for i, name in enumerate(ctx.names)}
    ctx.graph = NeighbourGraph("sparse", n, 4, 3, b"s" * 32) if sparse else \
        complete_graph(n, n // 2 + 1)
    ctx.u2 = frozenset(range(n))
    if tree_order is not None:
        ctx.tree = AccumulationTree(order=tree_order, fan_in=2)
        ctx.root = ctx.tree.root()
    return ctx


def forward(sender: str, recipient: str, inner: bytes, *, session: bytes = SESSION,
            round_number: int = 2) -> Envelope:
    return Envelope(session=session, round=round_number, sender=sender,
                    body=Forward(recipient=recipient, frame=inner))


def shares(sender: str, session: bytes = SESSION, round_number: int = 2) -> bytes:
    return junk_shares(session, round_number, sender)


def sums(sender: str) -> bytes:
    return junk_partial_sum(SESSION, 2, sender)


def test_judge_forward_shares_go_only_to_nat_neighbours() -> None:
    ctx = context(nat={0, 1, 2, 3, 4, 5, 6, 7, 8, 9})
    graph = ctx.graph
    assert graph is not None
    sender = 0
    near = [v for v in graph.neighbours(sender) if v != sender]
    far = [v for v in range(10) if v not in graph.neighbours(sender)]
    assert near and far
    state = ServerState.SHARING
    for v in near:
        verdict = judge_forward(ctx, state, "q0", forward("q0", f"q{v}", shares("q0")))
        assert verdict.recipient == f"q{v}" and verdict.kind == "shares", verdict
    for v in far:
        verdict = judge_forward(ctx, state, "q0", forward("q0", f"q{v}", shares("q0")))
        assert verdict.forbidden and "not a neighbour" in verdict.refused, verdict


def test_judge_forward_refuses_what_no_honest_peer_sends() -> None:
    ctx = context(nat={0, 1, 2, 3, 4, 5, 6, 7, 8}, sparse=False)  # q9 listens
    state = ServerState.SHARING
    cases = {
        "to itself": forward("q0", "q0", shares("q0")),
        "has a listener": forward("q0", "q9", shares("q0")),
        "not on the roster": forward("q0", "stranger", shares("q0")),
        "forged sender": forward("q1", "q2", shares("q1")),
        "inner frame names": forward("q0", "q2", shares("q1")),
        "another session": forward("q0", "q2", shares("q0", session=bytes(16)),
                                   session=bytes(16)),
        "round 5": forward("q0", "q2", shares("q0", round_number=5), round_number=5),
        "does not decode": forward("q0", "q2", b"\x93junk"),
        "only relays": forward("q0", "q2", encode(Envelope(
            session=SESSION, round=2, sender="q0", body=Forward(recipient="q2", frame=b"x")))),
        "bytes": forward("q0", "q2", encode(Envelope(
            session=SESSION, round=2, sender="q0",
            body=EncryptedPartialSum(ciphertext=bytes(SHARE_FRAME_BYTES))))),
    }
    for fragment, env in cases.items():
        verdict = judge_forward(ctx, state, "q0", env)
        assert verdict.forbidden and not verdict.recipient, (fragment, verdict)
        assert fragment in verdict.refused, (fragment, verdict)
    # A partial sum during R1 is early: no honest peer has a tree yet.
    early = judge_forward(ctx, state, "q0", forward("q0", "q2", sums("q0")))
    assert early.forbidden and "R2" in early.refused, early


def test_judge_forward_late_frames_are_dropped_without_a_strike() -> None:
    ctx = context(nat=set(range(10)), sparse=False, tree_order=tuple(range(10)))
    # Shares that cross the end of R1, and a frame of the previous round.
    late = judge_forward(ctx, ServerState.MASKING, "q0", forward("q0", "q2", shares("q0")))
    assert late.refused and not late.forbidden and late.kind == "shares", late
    stale = judge_forward(ctx, ServerState.SHARING, "q0", forward(
        "q0", "q2", shares("q0", round_number=1), round_number=1))
    assert stale.refused and not stale.forbidden and stale.kind == "stale", stale
    ctx.gone.add(2)
    gone = judge_forward(ctx, ServerState.SHARING, "q0", forward("q0", "q2", shares("q0")))
    assert gone.refused and not gone.forbidden, gone


def test_judge_forward_partial_sums_go_up_the_tree_or_to_a_named_root() -> None:
    # Heap order with fan-in 2: q0 is the root; q1, q2 its children; q3, q4 under q1;
    # q5, q6 under q2; q7, q8 under q3; q9 under q4.
    ctx = context(nat=set(range(10)), sparse=False, tree_order=tuple(range(10)))
    state = ServerState.MASKING
    up = {7: [3, 1, 0], 9: [4, 1, 0], 5: [2, 0]}
    for sender, ancestors in up.items():
        for v in range(10):
            verdict = judge_forward(ctx, state, f"q{sender}",
                                    forward(f"q{sender}", f"q{v}", sums(f"q{sender}")))
            if v in ancestors:
                assert verdict.recipient == f"q{v}" and verdict.kind == "sums", verdict
            else:
                assert verdict.forbidden, (sender, v, verdict)
    # The root is gone and q6 was named the new root: anyone may send it their sum.
    ctx.gone.add(0)
    ctx.root = 6
    verdict = judge_forward(ctx, state, "q9", forward("q9", "q6", sums("q9")))
    assert verdict.recipient == "q6", verdict


def test_forward_gate_budget_and_strikes() -> None:
    """One share frame per NAT neighbour (plus slack) per sender; past it, and for
    anything forbidden, a strike; past the strike limit, the sender is cut off."""
    ctx = context(nat={0, 1, 2}, sparse=False)
    gate = ForwardGate(ctx)
    state = ServerState.SHARING
    env = forward("q0", "q1", shares("q0"))
    relayed = 0
    while gate.judge(state, "q0", env).recipient:
        relayed += 1
        assert relayed < 1000
    assert relayed == gate.budget("q0", "shares") == 2 + gate.slack
    assert gate.strikes("q0") == 1
    for _ in range(MAX_FORWARD_STRIKES - 1):
        assert gate.judge(state, "q0", forward("q0", "q0", shares("q0"))).forbidden
    assert not gate.over_limit("q0")
    gate.judge(state, "q0", forward("q0", "q0", shares("q0")))
    assert gate.over_limit("q0")
    # Another sender's budget is its own.
    assert gate.judge(state, "q1", forward("q1", "q2", shares("q1"))).recipient == "q2"


def test_server_protocol_relays_refuses_and_cuts_off() -> None:
    """ServerProtocol.relay turns the verdicts into actions: the relayed frame (sender
    relabelled, inner frame untouched), nothing, or the sender's disconnection."""
    config = ServerConfig(session=SESSION, round=0, max_peers=3, threshold=2, dim=4)
    protocol = ServerProtocol(config)
    protocol.start()
    # Before registration closes nothing is relayed; a connection token is not a peer.
    actions = protocol.relay("#1", Envelope(SESSION, 0, "x", Forward(recipient="y",
                                                                     frame=b"z")))
    assert any(isinstance(a, Disconnect) and a.reason is DropReason.NOT_REGISTERED
               for a in actions), actions
    # A registered name whose forwards are all forbidden is cut off at the limit.
    env = Envelope(SESSION, 0, "q0", Forward(recipient="q0", frame=shares("q0", round_number=0)))
    cut: list[Any] = []
    for _ in range(MAX_FORWARD_STRIKES + 1):
        cut = protocol.relay("q0", env)
    assert [a.reason for a in cut if isinstance(a, Disconnect)] == [
        DropReason.FORBIDDEN_FORWARD], cut
    assert not any(isinstance(a, Send) and isinstance(a.envelope.body, Forward)
                   for a in cut)


def test_server_protocol_relays_a_real_share_frame_with_the_sender_relabelled() -> None:
    """In-memory R1 between peers behind NAT: a real sealed share frame, forwarded,
    comes out relabelled with its sender, and its recipient accepts it."""
    net, _, _ = make_round(4, 3, start_peers=False)
    for name in list(net.peers):
        net.peers[name] = PeerProtocol(name, address="",
                                       random_bytes=DeterministicRandom(0, name))
        net.apply(name, net.peers[name].start(SESSION, ROUND, np.zeros(5)))
    net.run(hold=is_type(EncryptedShares.TYPE))
    assert net.server.state is ServerState.SHARING
    sender, recipient = peer_name(0), peer_name(1)
    [frame] = [f for r, s, _, f in net.held if (s, r) == (sender, recipient)]
    [send] = net.server.relay(sender, Envelope(SESSION, ROUND, sender,
                                               Forward(recipient=recipient, frame=frame)))
    assert isinstance(send, Send) and send.recipient == recipient
    assert send.envelope.sender == SERVER
    assert send.envelope.body == Forward(recipient=sender, frame=frame)
    victim = net.peers[recipient]
    victim.handle(MessageReceived(decode(frame, victim.limits()), origin=""))
    assert victim.rejected == []
    # The same frame to the sender itself is refused (and is a strike).
    assert net.server.relay(sender, Envelope(SESSION, ROUND, sender,
                                             Forward(recipient=sender, frame=frame))) == []
