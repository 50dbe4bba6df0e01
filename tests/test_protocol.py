"""PeerProtocol and ServerProtocol driven directly, in memory, without sockets.

A tiny synchronous network (:class:`Net`) routes the ``Send`` actions between
protocol objects, FIFO, passing every envelope through ``wire.encode`` and
``wire.decode`` with the recipient's limits. Timers are recorded but fire only
when a test fires them. Tests can hold back frames (``hold=``), kill a party, or
hand-craft a frame (for example a malicious server request) and deliver it.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest

from secagg import wire
from secagg.crypto.signing import SigningKey, generate_signing_key, sign
from secagg.errors import CryptoError, ProtocolError, WireError
from secagg.protocol import (
    PEER_TRANSITIONS,
    SERVER_TRANSITIONS,
    Action,
    CancelTimer,
    DeliveryFailed,
    Disconnect,
    Event,
    MessageReceived,
    PeerGone,
    PeerProtocol,
    PeerState,
    RoundFinished,
    Send,
    ServerConfig,
    ServerProtocol,
    ServerState,
    SetTimer,
    TimerExpired,
)
from secagg.protocol.common import Encoder, consistency_message
from secagg.protocol.peer import FORWARD_TIMER
from secagg.protocol.server import PHASE_TIMER
from secagg.sim import DeterministicRandom, peer_name
from secagg.wire import SERVER, Envelope

SESSION = bytes(range(16))
OTHER_SESSION = bytes(range(1, 17))
ROUND = 3

Hold = Callable[[str, str, Envelope], bool]


@dataclass
class Net:
    """A FIFO in-memory network between one server and some peers."""

    server: ServerProtocol
    peers: dict[str, PeerProtocol]
    queue: deque[tuple[str, str, Envelope, bytes]] = field(default_factory=deque)
    held: list[tuple[str, str, Envelope, bytes]] = field(default_factory=list)
    timers: dict[str, dict[str, float]] = field(default_factory=dict)
    finished: dict[str, RoundFinished] = field(default_factory=dict)
    disconnects: list[Disconnect] = field(default_factory=list)
    errors: list[tuple[str, str, Exception]] = field(default_factory=list)
    dead: set[str] = field(default_factory=set)
    sent: list[tuple[str, str, Envelope]] = field(default_factory=list)

    def party(self, name: str) -> ServerProtocol | PeerProtocol:
        return self.server if name == SERVER else self.peers[name]

    def apply(self, party: str, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Send):
                frame = wire.encode(action.envelope)
                self.sent.append((party, action.recipient, action.envelope))
                self.queue.append((action.recipient, party, action.envelope, frame))
            elif isinstance(action, SetTimer):
                self.timers.setdefault(party, {})[action.name] = action.delay
            elif isinstance(action, CancelTimer):
                self.timers.get(party, {}).pop(action.name, None)
            elif isinstance(action, Disconnect):
                self.disconnects.append(action)
                if action.name in self.peers and action.name not in self.dead:
                    self.event(action.name, PeerGone(SERVER))
            elif isinstance(action, RoundFinished):
                self.finished[party] = action

    def event(self, party: str, event: Event) -> None:
        self.apply(party, self.party(party).handle(event))

    def deliver(self, recipient: str, sender: str, env: Envelope, frame: bytes) -> None:
        if recipient in self.dead:
            if sender != SERVER and sender not in self.dead:
                self.event(sender, DeliveryFailed(recipient, env))
            return
        if sender in self.dead:
            return
        protocol = self.party(recipient)
        decoded = wire.decode(frame, protocol.limits())
        try:
            actions = protocol.handle(MessageReceived(decoded))
        except (ProtocolError, WireError, CryptoError) as exc:
            self.errors.append((recipient, sender, exc))
            if recipient == SERVER:
                self.apply(SERVER, self.server.reject(sender, str(exc)))
            return
        self.apply(recipient, actions)

    def run(self, hold: Hold | None = None, max_steps: int = 100_000) -> None:
        steps = 0
        while self.queue:
            steps += 1
            assert steps < max_steps, "the in-memory round did not converge"
            recipient, sender, env, frame = self.queue.popleft()
            if hold is not None and hold(recipient, sender, env):
                self.held.append((recipient, sender, env, frame))
                continue
            self.deliver(recipient, sender, env, frame)

    def release(self, which: Hold | None = None) -> None:
        """Put held frames (all, or those ``which`` selects) back on the queue."""
        keep = []
        for item in self.held:
            if which is None or which(item[0], item[1], item[2]):
                self.queue.append(item)
            else:
                keep.append(item)
        self.held = keep

    def fire(self, party: str, timer: str) -> None:
        assert timer in self.timers.get(party, {}), f"{party} has no pending timer {timer!r}"
        del self.timers[party][timer]
        self.event(party, TimerExpired(timer))

    def kill(self, name: str) -> None:
        """``name`` dies: everyone sees its connection close."""
        self.dead.add(name)
        for other in [SERVER, *self.peers]:
            if other != name and other not in self.dead:
                self.event(other, PeerGone(name))

    def held_of(self, type_name: str, recipient: str | None = None) -> list[Envelope]:
        return [env for r, _, env, _ in self.held
                if env.type == type_name and (recipient is None or r == recipient)]


def make_round(
    n: int = 4,
    threshold: int = 3,
    dim: int = 5,
    *,
    seed: int = 0,
    threat_model: str = "honest-but-curious",
    fan_in: int = 8,
    graph: str = "complete",
    start_peers: bool = True,
    pin_identities: bool = False,
) -> tuple[Net, np.ndarray, dict[str, SigningKey]]:
    """A server and ``n`` peers with deterministic randomness, all registered."""
    config = ServerConfig(session=SESSION, round=ROUND, min_peers=n, threshold=threshold,
                          dim=dim, threat_model=threat_model,  # type: ignore[arg-type]
                          graph=graph,  # type: ignore[arg-type]
                          fan_in=fan_in, phase_timeout=10.0)
    server = ServerProtocol(config, random_bytes=DeterministicRandom(seed, "server"),
                            record_view=True)
    identities: dict[str, SigningKey] = {}
    names = [peer_name(i) for i in range(n)]
    if threat_model == "active":
        identities = {name: generate_signing_key(DeterministicRandom(seed, f"id/{name}"))
                      for name in names}
    pinned = ({name: key.public_bytes for name, key in identities.items()}
              if pin_identities else None)
    peers = {name: PeerProtocol(name, address=f"ws://127.0.0.1:{9000 + i}",
                                random_bytes=DeterministicRandom(seed, name),
                                identity=identities.get(name), trusted_identities=pinned)
             for i, name in enumerate(names)}
    net = Net(server, peers)
    inputs = np.random.default_rng(seed).uniform(-1.0, 1.0, size=(n, dim))
    net.apply(SERVER, server.start())
    if start_peers:
        for i, name in enumerate(names):
            net.apply(name, peers[name].start(SESSION, ROUND, inputs[i]))
    return net, inputs, identities


def error_bound(n: int, dim: int) -> float:
    quantizer = Encoder.create(n=n, dim=dim, clip=1.0, scale=None, modulus_bits=32,
                               weighted=False, max_weight=1.0).quantizer
    return quantizer.error_bound(n) + 1e-9


def assert_sum(net: Net, inputs: np.ndarray, contributors: list[int]) -> None:
    outcome = net.server.outcome
    assert outcome is not None and outcome.status == "ok", outcome
    assert outcome.contributors == tuple(peer_name(i) for i in contributors)
    assert outcome.aggregate is not None
    expected = inputs[contributors].sum(axis=0)
    n = inputs.shape[0]
    assert np.max(np.abs(outcome.aggregate - expected)) < error_bound(n, inputs.shape[1])


def server_env(body: wire.Message, *, session: bytes = SESSION, round: int = ROUND) -> Envelope:
    return Envelope(session=session, round=round, sender=SERVER, body=body)


def through_wire(env: Envelope, limits: wire.Limits | None = None) -> MessageReceived:
    return MessageReceived(wire.decode(wire.encode(env), limits))


def is_type(type_name: str) -> Hold:
    return lambda recipient, sender, env: env.type == type_name


# --------------------------------------------------------------------------
# Happy rounds


@pytest.mark.parametrize(("n", "threshold"), [(3, 2), (4, 3), (5, 3), (5, 5)])
def test_happy_round_gives_exact_sum(n: int, threshold: int) -> None:
    net, inputs, _ = make_round(n, threshold, dim=6, seed=n)
    net.run()
    assert net.errors == []
    assert_sum(net, inputs, list(range(n)))
    assert net.server.state is ServerState.FINISHED
    for name, peer in net.peers.items():
        assert peer.state is PeerState.FINISHED
        assert peer.outcome is not None and peer.outcome.status == "ok"
        assert peer.outcome.contributors == net.server.outcome.contributors  # type: ignore[union-attr]
        assert peer.outcome.included and peer.outcome.contributor_count == n
        assert name in net.finished
    # Under honest-but-curious no consistency round happens.
    assert not any(env.type == "consistency_request" for _, _, env in net.sent)


def test_happy_round_with_small_fan_in_builds_a_deep_tree() -> None:
    net, inputs, _ = make_round(5, 3, dim=3, seed=11, fan_in=2)
    net.run()
    assert net.errors == []
    assert_sum(net, inputs, [0, 1, 2, 3, 4])
    assert net.server.stats["tree_depth"] == 2
    # Exactly one vector reaches the server, and it is the root's.
    aggregates = [env for env in net.server.view if env.type == "root_aggregate"]
    assert len(aggregates) == 1
    assert sorted(aggregates[0].body.contributors) == [0, 1, 2, 3, 4]  # type: ignore[attr-defined]


def test_server_never_sees_a_single_masked_input() -> None:
    net, _, _ = make_round(5, 3, dim=3, seed=12, fan_in=2)
    net.run()
    to_server = [env.type for _, recipient, env in net.sent if recipient == SERVER]
    assert "encrypted_partial_sum" not in to_server
    assert to_server.count("root_aggregate") == 1
    # Peer-to-peer partial sums are sealed: the PartialSum record never travels bare.
    assert not any(env.type == "partial_sum" for _, _, env in net.sent)


# --------------------------------------------------------------------------
# Transition tables


def test_transition_tables_reference_existing_handlers() -> None:
    types = wire.message_types()
    for table, cls, states in ((PEER_TRANSITIONS, PeerProtocol, PeerState),
                               (SERVER_TRANSITIONS, ServerProtocol, ServerState)):
        assert table
        for (state, type_name), handler in table.items():
            assert state in set(states)
            assert type_name in types, type_name
            assert callable(getattr(cls, handler, None)), f"{cls.__name__}.{handler} missing"


def test_peer_rejects_unlisted_transition_naming_state_and_type() -> None:
    peer = PeerProtocol("peer-00000", random_bytes=DeterministicRandom(1, "p"))
    peer.start(SESSION, ROUND, np.zeros(5))
    assert peer.state is PeerState.ADVERTISED
    start = wire.MaskingStart(survivors=[0, 1, 2], total_survivors=3, tree_seed=bytes(32),
                              ancestors=[], descendants=[], descendant_parents=[], contacts=[],
                              forward_after=1.0)
    with pytest.raises(ProtocolError) as info:
        peer.handle(through_wire(server_env(start)))
    message = str(info.value)
    assert "advertised" in message and "masking_start" in message
    assert peer.state is PeerState.ADVERTISED


def test_server_rejects_unlisted_transition_naming_state_and_type() -> None:
    net, _, _ = make_round(4, 3)
    net.run(hold=is_type("encrypted_shares"))
    assert net.server.state is ServerState.SHARING
    body = wire.UnmaskShares(self_mask_shares=b"", secret_key_shares=b"")
    env = Envelope(SESSION, ROUND, "peer-00001", body)
    with pytest.raises(ProtocolError) as info:
        net.server.handle(through_wire(env))
    message = str(info.value)
    assert "sharing" in message and "unmask_shares" in message
    assert net.server.state is ServerState.SHARING


def test_peer_refuses_server_messages_from_a_peer() -> None:
    net, _, _ = make_round(4, 3)
    net.run(hold=is_type("roster"))
    roster = net.held_of("roster", "peer-00000")[0]
    forged = dataclasses.replace(roster, sender="peer-00001")
    peer = net.peers["peer-00000"]
    with pytest.raises(ProtocolError, match="only come from the server"):
        peer.handle(through_wire(forged))
    assert peer.state is PeerState.ADVERTISED


def test_server_refuses_a_peer_claiming_to_be_the_server() -> None:
    net, _, _ = make_round(4, 3, start_peers=False)
    keys = wire.AdvertiseKeys(address="", channel_key=bytes(32), mask_key=bytes([1]) * 32)
    with pytest.raises(ProtocolError, match="server"):
        net.server.handle(through_wire(server_env(keys)))
    assert net.server._registered == {}


# --------------------------------------------------------------------------
# Replays and misdirected frames


def _snapshot(obj: object) -> dict[str, str]:
    return {key: repr(value) for key, value in vars(obj).items()}


REPLAYS = [({"session": OTHER_SESSION}, "another session"), ({"round": ROUND + 1}, "for round 4"),
           ({"round": ROUND - 1}, "for round 2")]


@pytest.mark.parametrize(("mutation", "match"), REPLAYS)
def test_replayed_roster_from_another_session_or_round_changes_nothing(
        mutation: dict[str, object], match: str) -> None:
    net, inputs, _ = make_round(4, 3, seed=2)
    net.run(hold=is_type("roster"))
    peer = net.peers["peer-00002"]
    roster = net.held_of("roster", "peer-00002")[0]
    before = _snapshot(peer)
    with pytest.raises(ProtocolError, match=match):
        peer.handle(through_wire(dataclasses.replace(roster, **mutation)))  # type: ignore[arg-type]
    assert _snapshot(peer) == before
    # The genuine roster is still accepted and the round completes.
    net.release()
    net.run()
    assert_sum(net, inputs, [0, 1, 2, 3])


@pytest.mark.parametrize(("mutation", "match"), REPLAYS)
def test_replayed_share_report_at_the_server_changes_nothing(
        mutation: dict[str, object], match: str) -> None:
    net, inputs, _ = make_round(4, 3, seed=3)
    net.run(hold=is_type("share_report"))
    report = net.held_of("share_report")[0]
    before = _snapshot(net.server)
    with pytest.raises(ProtocolError, match=match):
        net.server.handle(through_wire(dataclasses.replace(report, **mutation)))  # type: ignore[arg-type]
    assert _snapshot(net.server) == before
    net.release()
    net.run()
    assert_sum(net, inputs, [0, 1, 2, 3])


def test_shares_from_another_round_are_rejected_and_round_completes() -> None:
    net, inputs, _ = make_round(4, 3, seed=4)
    net.run(hold=is_type("encrypted_shares"))
    target = "peer-00003"
    shares = net.held_of("encrypted_shares", target)[0]
    peer = net.peers[target]
    before = _snapshot(peer)
    with pytest.raises(ProtocolError, match="round"):
        peer.handle(through_wire(dataclasses.replace(shares, round=ROUND + 1)))
    assert _snapshot(peer) == before
    net.release()
    net.run()
    assert net.errors == []
    assert_sum(net, inputs, [0, 1, 2, 3])


def test_duplicate_shares_are_a_replay() -> None:
    net, inputs, _ = make_round(5, 3, seed=5)
    net.run(hold=is_type("encrypted_shares"))
    target = "peer-00001"
    first = net.held_of("encrypted_shares", target)[0]
    peer = net.peers[target]
    peer.handle(through_wire(first, peer.limits()))
    with pytest.raises(ProtocolError, match="duplicate shares"):
        peer.handle(through_wire(first, peer.limits()))
    # The held copy is delivered once more by the network: rejected, round still fine.
    net.release()
    net.run()
    assert [recipient for recipient, _, _ in net.errors] == [target]
    assert_sum(net, inputs, [0, 1, 2, 3, 4])


def test_forged_sender_of_encrypted_shares_fails_and_round_completes() -> None:
    net, inputs, _ = make_round(4, 3, seed=6)
    net.run(hold=is_type("encrypted_shares"))
    victim = net.peers["peer-00002"]
    # peer-00000's shares for peer-00002, relabelled as coming from peer-00001.
    genuine = next(env for r, s, env, _ in net.held
                   if r == "peer-00002" and s == "peer-00000")
    forged = dataclasses.replace(genuine, sender="peer-00001")
    held_before = dict(victim._held)
    with pytest.raises((CryptoError, ProtocolError)):
        victim.handle(through_wire(forged, victim.limits()))
    assert victim._held == held_before
    assert victim.state is PeerState.SHARING
    net.release()
    net.run()
    assert net.errors == []
    assert_sum(net, inputs, [0, 1, 2, 3])


def test_shares_redirected_to_another_peer_fail_authentication() -> None:
    net, _, _ = make_round(4, 3, seed=7)
    net.run(hold=is_type("encrypted_shares"))
    for_two = next(env for r, s, env, _ in net.held if r == "peer-00002" and s == "peer-00000")
    other = net.peers["peer-00003"]
    with pytest.raises(CryptoError):
        other.handle(through_wire(for_two, other.limits()))


def test_server_peer_dropped_notice_ends_the_wait_for_shares() -> None:
    net, _, _ = make_round(4, 3, seed=14)
    late = "peer-00003"
    net.run(hold=lambda r, s, env: env.type == "encrypted_shares" and s == late)
    peer = net.peers["peer-00000"]
    assert peer.state is PeerState.SHARING  # still waiting for peer 3's shares
    # A PeerDropped notice claiming to come from a peer is refused ...
    forged = Envelope(SESSION, ROUND, "peer-00001", wire.PeerDropped(peer=3))
    with pytest.raises(ProtocolError, match="only come from the server"):
        peer.handle(through_wire(forged, peer.limits()))
    assert peer.state is PeerState.SHARING
    # ... the server's own ends the wait: the peer reports the missing shares.
    actions = peer.handle(through_wire(server_env(wire.PeerDropped(peer=3)), peer.limits()))
    reports = [a.envelope.body for a in actions if isinstance(a, Send)]
    assert reports == [wire.ShareReport(missing_from=[3])]
    assert peer.state is PeerState.REPORTED


def test_roster_without_the_peers_own_keys_is_refused() -> None:
    net, _, _ = make_round(4, 3, seed=15)
    net.run(hold=is_type("roster"))
    env = net.held_of("roster", "peer-00001")[0]
    roster = env.body
    assert isinstance(roster, wire.Roster)
    swapped = [dataclasses.replace(entry, mask_key=bytes(32)) if entry.index == 1 else entry
               for entry in roster.neighbours]
    peer = net.peers["peer-00001"]
    with pytest.raises(ProtocolError, match="own keys"):
        peer.handle(through_wire(dataclasses.replace(
            env, body=dataclasses.replace(roster, neighbours=swapped))))
    with pytest.raises(ProtocolError, match="neighbour"):
        peer.handle(through_wire(dataclasses.replace(
            env, body=dataclasses.replace(roster, neighbours=roster.neighbours[:-1]))))
    with pytest.raises(ProtocolError):  # t <= n/2 is never accepted
        peer.handle(through_wire(dataclasses.replace(
            env, body=dataclasses.replace(roster, threshold=2, share_threshold=2))))
    assert peer.state is PeerState.ADVERTISED


# --------------------------------------------------------------------------
# Registration


def test_duplicate_registration_is_rejected_and_the_round_goes_on() -> None:
    net, inputs, _ = make_round(4, 3, seed=8, start_peers=False)
    names = list(net.peers)
    dup = names[0]
    net.apply(dup, net.peers[dup].start(SESSION, ROUND, inputs[0]))
    net.run()
    impostor = PeerProtocol(dup, random_bytes=DeterministicRandom(99, "impostor"))
    advert = impostor.start(SESSION, ROUND, inputs[0])
    assert isinstance(advert[0], Send)
    with pytest.raises(ProtocolError, match="duplicate registration"):
        net.server.handle(through_wire(advert[0].envelope))
    actions = net.server.reject(dup, "duplicate registration")
    assert Disconnect(dup, "duplicate registration") in actions
    net.apply(SERVER, actions)
    # The dropped peer saw the server go and aborted.
    outcome = net.peers[dup].outcome
    assert outcome is not None and outcome.status == "aborted"
    for i, name in enumerate(names[1:], start=1):
        net.apply(name, net.peers[name].start(SESSION, ROUND, inputs[i]))
    net.run()
    assert net.server.state is ServerState.COLLECTING_KEYS  # 3 of min_peers=4
    net.fire(SERVER, PHASE_TIMER)
    net.run()
    outcome_s = net.server.outcome
    assert outcome_s is not None and outcome_s.status == "ok", outcome_s
    assert outcome_s.contributors == tuple(names[1:])
    expected = inputs[1:].sum(axis=0)
    assert outcome_s.aggregate is not None
    assert np.max(np.abs(outcome_s.aggregate - expected)) < error_bound(4, inputs.shape[1])


def test_late_registration_gets_rejected() -> None:
    net, inputs, _ = make_round(4, 3, seed=9)
    net.run(hold=is_type("encrypted_shares"))
    assert net.server.state is ServerState.SHARING
    late = PeerProtocol("peer-late", random_bytes=DeterministicRandom(9, "late"))
    net.peers["peer-late"] = late
    net.apply("peer-late", late.start(SESSION, ROUND, inputs[0]))
    net.run(hold=is_type("encrypted_shares"))
    assert late.outcome is not None and late.outcome.status == "rejected"
    assert "closed" in late.outcome.reason
    assert "peer-late" not in net.server.names
    # A second registration from a rostered name is rejected too, naming the id.
    again = PeerProtocol("peer-00001", random_bytes=DeterministicRandom(9, "again"))
    actions = again.start(SESSION, ROUND, inputs[0])
    assert isinstance(actions[0], Send)
    reply = net.server.handle(through_wire(actions[0].envelope))
    assert len(reply) == 1 and isinstance(reply[0], Send)
    assert isinstance(reply[0].envelope.body, wire.Rejected)
    assert "already registered" in reply[0].envelope.body.reason
    del net.peers["peer-late"]
    net.release()
    net.run()
    assert_sum(net, inputs, [0, 1, 2, 3])


def _register_too_few() -> Net:
    net, inputs, _ = make_round(5, 4, seed=10, start_peers=False)
    for i, name in enumerate(list(net.peers)[:3]):
        net.apply(name, net.peers[name].start(SESSION, ROUND, inputs[i]))
    net.run()
    assert net.server.state is ServerState.COLLECTING_KEYS
    net.fire(SERVER, PHASE_TIMER)
    net.run()
    return net


def test_registration_below_threshold_aborts_at_the_deadline() -> None:
    net = _register_too_few()
    outcome = net.server.outcome
    assert outcome is not None and outcome.status == "aborted"
    assert "only 3 peers registered" in outcome.reason
    assert outcome.aggregate is None and outcome.contributors == ()
    assert isinstance(net.finished[SERVER], RoundFinished)


# Regression test (was a strict xfail documenting a bug, since fixed).
def test_registered_peers_learn_that_registration_aborted() -> None:
    net = _register_too_few()
    for name in list(net.peers)[:3]:
        peer_outcome = net.peers[name].outcome
        assert peer_outcome is not None and peer_outcome.status == "aborted"
        assert "registered" in peer_outcome.reason


# --------------------------------------------------------------------------
# Losing the server


@pytest.mark.parametrize("stage", ["advertised", "sharing", "forwarded"])
def test_peer_aborts_when_the_server_is_gone(stage: str) -> None:
    net, _, _ = make_round(4, 3, seed=13)
    holds: dict[str, Hold] = {
        "advertised": lambda r, s, env: True,
        "sharing": is_type("encrypted_shares"),
        "forwarded": is_type("unmask_request"),
    }
    net.run(hold=holds[stage])
    peer = net.peers["peer-00001"]
    assert peer.state.value == stage
    net.event("peer-00001", PeerGone(SERVER))
    assert peer.state is PeerState.FINISHED
    assert peer.outcome is not None and peer.outcome.status == "aborted"
    assert "server" in peer.outcome.reason
    assert isinstance(net.finished["peer-00001"], RoundFinished)
    # A finished peer ignores further events.
    assert peer.handle(PeerGone(SERVER)) == []
    assert peer.handle(TimerExpired(FORWARD_TIMER)) == []


# --------------------------------------------------------------------------
# A malicious server in R4


def _run_to_unmasking(threat_model: str = "honest-but-curious", n: int = 5, threshold: int = 3,
                      seed: int = 20) -> tuple[Net, np.ndarray]:
    net, inputs, _ = make_round(n, threshold, dim=4, seed=seed, threat_model=threat_model)
    net.run(hold=is_type("unmask_request"))
    assert net.server.state is ServerState.UNMASKING
    assert len(net.held_of("unmask_request")) == n
    return net, inputs


def _shares_sent(net: Net, name: str) -> list[Envelope]:
    return [env for sender, _, env in net.sent
            if sender == name and env.type == "unmask_shares"]


def _deliver_request(net: Net, name: str, request: wire.UnmaskRequest) -> list[Action]:
    peer = net.peers[name]
    actions = peer.handle(through_wire(server_env(request), peer.limits()))
    net.apply(name, actions)
    return actions


def _assert_refused(net: Net, name: str, actions: list[Action], reason: str) -> None:
    peer = net.peers[name]
    sends = [a for a in actions if isinstance(a, Send)]
    assert len(sends) == 1 and sends[0].recipient == SERVER
    body = sends[0].envelope.body
    assert isinstance(body, wire.Refusal), body
    assert reason in body.reason
    assert peer.state is PeerState.FINISHED
    assert peer.outcome is not None and peer.outcome.status == "aborted"
    assert reason in peer.outcome.reason
    assert _shares_sent(net, name) == []
    assert peer._held == {}  # secrets forgotten


def test_honest_unmask_request_is_answered() -> None:
    net, inputs = _run_to_unmasking()
    requests = {recipient: env.body for recipient, _, env, _ in net.held
                if env.type == "unmask_request"}
    net.release()
    net.run()
    assert_sum(net, inputs, [0, 1, 2, 3, 4])
    threshold = net.server.config.threshold
    for name, request in requests.items():
        assert isinstance(request, wire.UnmaskRequest)
        assert request.contributors == [0, 1, 2, 3, 4] and request.dropped == []
        assert request.secret_key_wanted == []
        shares = _shares_sent(net, name)
        assert len(shares) == 1
        body = shares[0].body
        assert isinstance(body, wire.UnmaskShares)
        assert len(body.self_mask_shares) == 33 * len(request.self_mask_wanted)
        assert body.secret_key_shares == b""
    # The server asks for exactly t shares of each self mask, and nothing else.
    received = net.server.shares_received
    assert {kind for kind, _, _ in received} == {"self_mask"}
    for owner in range(5):
        holders = [h for _, o, h in received if o == owner]
        assert len(holders) == len(set(holders)) == threshold


def test_unmask_request_wanting_a_share_outside_the_partition_is_refused() -> None:
    # The partition is honest, but the server wants the secret-key share of a contributor.
    net, _ = _run_to_unmasking()
    name = "peer-00002"
    honest = net.held_of("unmask_request", name)[0].body
    assert isinstance(honest, wire.UnmaskRequest)
    actions = _deliver_request(net, name, dataclasses.replace(honest, secret_key_wanted=[1]))
    _assert_refused(net, name, actions, "outside the announced partition")


def test_follow_up_request_must_repeat_the_partition() -> None:
    net, _ = _run_to_unmasking(n=5, threshold=3, seed=22)
    name = "peer-00003"
    honest = net.held_of("unmask_request", name)[0].body
    assert isinstance(honest, wire.UnmaskRequest)
    first = _deliver_request(net, name, honest)
    assert any(isinstance(a, Send) and isinstance(a.envelope.body, wire.UnmaskShares)
               for a in first)
    assert net.peers[name].state is PeerState.UNMASKED
    # A follow-up for more shares under the same partition is answered ...
    again = _deliver_request(net, name, dataclasses.replace(honest, self_mask_wanted=[0, 1, 2]))
    sends = [a for a in again if isinstance(a, Send)]
    assert len(sends) == 1 and isinstance(sends[0].envelope.body, wire.UnmaskShares)
    assert len(sends[0].envelope.body.self_mask_shares) == 3 * 33
    # ... one that moves peer 4 to the dropped side is refused, revealing nothing more.
    before = len(_shares_sent(net, name))
    lie = dataclasses.replace(honest, contributors=[0, 1, 2, 3], dropped=[4],
                              total_contributors=4, self_mask_wanted=[],
                              secret_key_wanted=[4])
    actions = _deliver_request(net, name, lie)
    bodies = [a.envelope.body for a in actions if isinstance(a, Send)]
    assert len(bodies) == 1 and isinstance(bodies[0], wire.Refusal)
    assert "follow-up" in bodies[0].reason
    assert len(_shares_sent(net, name)) == before
    assert net.peers[name].outcome is not None
    assert net.peers[name].outcome.status == "aborted"


def test_malicious_request_for_both_shares_of_one_peer_is_refused() -> None:
    net, _ = _run_to_unmasking()
    name = "peer-00001"
    honest = net.held_of("unmask_request", name)[0].body
    assert isinstance(honest, wire.UnmaskRequest)
    malicious = dataclasses.replace(honest, dropped=[3])  # 3 is also in contributors
    assert 3 in malicious.contributors
    actions = _deliver_request(net, name, malicious)
    _assert_refused(net, name, actions, "both")


def test_malicious_request_with_u3_below_threshold_is_refused() -> None:
    net, _ = _run_to_unmasking(n=5, threshold=4)
    name = "peer-00002"
    malicious = wire.UnmaskRequest(contributors=[0, 1, 2], dropped=[3, 4],
                                   total_contributors=3, signatures=[],
                                   self_mask_wanted=[0, 1, 2], secret_key_wanted=[3, 4])
    actions = _deliver_request(net, name, malicious)
    _assert_refused(net, name, actions, "below the threshold")


def test_malicious_request_lying_about_the_count_is_refused() -> None:
    # The list is short, the announced total is inflated: the complete graph catches it.
    net, _ = _run_to_unmasking(n=5, threshold=4)
    name = "peer-00002"
    malicious = wire.UnmaskRequest(contributors=[0, 1, 2], dropped=[3, 4],
                                   total_contributors=5, signatures=[],
                                   self_mask_wanted=[0, 1, 2], secret_key_wanted=[3, 4])
    actions = _deliver_request(net, name, malicious)
    _assert_refused(net, name, actions, "disagrees")


@pytest.mark.parametrize(("contributors", "dropped"), [
    ([0, 1, 2, 3], []),  # omits peer 4 altogether
    ([0, 1, 2, 3], [4, 4]),  # lists a dropped peer twice
    ([0, 1, 2, 3, 4], [5]),  # a dropped peer this peer never saw in U2
])
def test_malicious_request_not_partitioning_u2_is_refused(contributors: list[int],
                                                          dropped: list[int]) -> None:
    net, _ = _run_to_unmasking()
    name = "peer-00000"
    limits = net.peers[name].limits()
    malicious = wire.UnmaskRequest(contributors=contributors, dropped=dropped,
                                   total_contributors=len(contributors), signatures=[],
                                   self_mask_wanted=contributors[:3],
                                   secret_key_wanted=sorted(set(dropped)))
    try:
        actions = _deliver_request(net, name, malicious)
    except WireError:
        # An index outside the roster never even decodes.
        assert max(dropped) >= limits.max_peers
        return
    peer = net.peers[name]
    assert peer.outcome is not None and peer.outcome.status == "aborted"
    sends = [a for a in actions if isinstance(a, Send)]
    assert len(sends) == 1 and isinstance(sends[0].envelope.body, wire.Refusal)
    assert _shares_sent(net, name) == []


def test_malicious_request_with_a_contributor_outside_u2_is_refused() -> None:
    # U2 = {1,2,3,4} (peer 0 never reports its shares); the server claims 0 contributed.
    net, inputs, _ = make_round(5, 3, dim=4, seed=21)
    net.run(hold=lambda r, s, env: env.type == "unmask_request"
            or (s == "peer-00000" and env.type == "share_report"))
    assert net.server.state is ServerState.SHARING
    net.held = [item for item in net.held if item[1] != "peer-00000"]
    net.kill("peer-00000")
    net.run(hold=is_type("unmask_request"))
    assert net.server.state is ServerState.UNMASKING
    assert net.server.u2 == frozenset({1, 2, 3, 4})
    malicious = wire.UnmaskRequest(contributors=[0, 1, 2, 3, 4], dropped=[],
                                   total_contributors=5, signatures=[],
                                   self_mask_wanted=[0, 1, 2], secret_key_wanted=[])
    actions = _deliver_request(net, "peer-00001", malicious)
    _assert_refused(net, "peer-00001", actions, "not in U2")
    # The others answer honestly; the refusing peer is dropped as "refused".
    net.release()
    net.run()
    outcome = net.server.outcome
    assert outcome is not None and outcome.status == "ok", outcome
    assert outcome.dropped["peer-00001"] == "refused"
    assert_sum(net, inputs, [1, 2, 3, 4])


def test_refusal_is_recorded_and_other_peers_finish() -> None:
    net, inputs = _run_to_unmasking(n=5, threshold=3)
    name = "peer-00004"
    honest = net.held_of("unmask_request", name)[0].body
    assert isinstance(honest, wire.UnmaskRequest)
    net.held = [item for item in net.held if item[0] != name]
    _deliver_request(net, name, dataclasses.replace(honest, dropped=[0]))
    net.release()
    net.run()
    outcome = net.server.outcome
    assert outcome is not None and outcome.status == "ok", outcome
    assert outcome.dropped == {name: "refused"}
    # Peer 4's input is in the sum: it contributed before refusing to unmask.
    assert_sum(net, inputs, [0, 1, 2, 3, 4])


# --------------------------------------------------------------------------
# Active threat model


def test_active_round_succeeds_with_identity_keys() -> None:
    net, inputs, identities = make_round(5, 4, dim=3, seed=30, threat_model="active")
    net.run()
    assert net.errors == []
    assert_sum(net, inputs, [0, 1, 2, 3, 4])
    assert net.server.stats["u4"] == 5
    signatures = [env for env in net.server.view if env.type == "consistency_signature"]
    assert len(signatures) == 5
    advertised = [env for env in net.server.view if env.type == "advertise_keys"]
    for env in advertised:
        assert isinstance(env.body, wire.AdvertiseKeys)
        assert env.body.identity_key == identities[env.sender].public_bytes


def test_active_round_rejects_unsigned_registration() -> None:
    net, inputs, _ = make_round(4, 3, dim=3, seed=31, threat_model="active", start_peers=False)
    unsigned = PeerProtocol("peer-00000", random_bytes=DeterministicRandom(31, "x"))
    actions = unsigned.start(SESSION, ROUND, inputs[0])
    assert isinstance(actions[0], Send)
    with pytest.raises(ProtocolError, match="signed"):
        net.server.handle(through_wire(actions[0].envelope))
    assert net.server._registered == {}


def test_active_unmask_request_with_a_different_u3_is_refused() -> None:
    net, _ = _run_to_unmasking("active", n=5, threshold=3, seed=32)
    name = "peer-00001"
    honest = net.held_of("unmask_request", name)[0].body
    assert isinstance(honest, wire.UnmaskRequest)
    assert honest.contributors == [0, 1, 2, 3, 4] and len(honest.signatures) == 5
    # Claim peer 4 dropped: a consistent partition of U2 with |U3| >= t, which only the
    # signed U3 exposes. Under honest-but-curious the same request would be answered.
    lie = dataclasses.replace(honest, contributors=[0, 1, 2, 3], dropped=[4],
                              total_contributors=4, self_mask_wanted=[0, 1],
                              secret_key_wanted=[4])
    actions = _deliver_request(net, name, lie)
    _assert_refused(net, name, actions, "differs from the U3 this peer signed")


def test_honest_but_curious_peer_answers_the_same_lie() -> None:
    # The contrast to the test above: without R3 the peer cannot tell.
    net, _ = _run_to_unmasking("honest-but-curious", n=5, threshold=3, seed=32)
    name = "peer-00001"
    honest = net.held_of("unmask_request", name)[0].body
    assert isinstance(honest, wire.UnmaskRequest)
    lie = dataclasses.replace(honest, contributors=[0, 1, 2, 3], dropped=[4],
                              total_contributors=4, self_mask_wanted=[0, 1],
                              secret_key_wanted=[4])
    actions = _deliver_request(net, name, lie)
    sends = [a for a in actions if isinstance(a, Send)]
    assert len(sends) == 1
    body = sends[0].envelope.body
    assert isinstance(body, wire.UnmaskShares)
    assert len(body.secret_key_shares) == 33 and len(body.self_mask_shares) == 66


def test_active_unmask_request_with_too_few_signatures_is_refused() -> None:
    net, _ = _run_to_unmasking("active", n=5, threshold=4, seed=33)
    name = "peer-00003"
    honest = net.held_of("unmask_request", name)[0].body
    assert isinstance(honest, wire.UnmaskRequest)
    actions = _deliver_request(net, name, dataclasses.replace(
        honest, signatures=honest.signatures[:3]))
    _assert_refused(net, name, actions, "valid consistency signatures")


def test_active_unmask_request_with_a_forged_signature_is_refused() -> None:
    net, _ = _run_to_unmasking("active", n=5, threshold=3, seed=34)
    name = "peer-00000"
    honest = net.held_of("unmask_request", name)[0].body
    assert isinstance(honest, wire.UnmaskRequest)
    forged = [dataclasses.replace(s, signature=bytes(64)) if s.index == 2 else s
              for s in honest.signatures]
    actions = _deliver_request(net, name, dataclasses.replace(honest, signatures=forged))
    _assert_refused(net, name, actions, "invalid consistency signature")


def test_active_consistency_request_below_threshold_is_refused() -> None:
    net, _, _ = make_round(5, 4, dim=3, seed=35, threat_model="active")
    net.run(hold=is_type("consistency_request"))
    name = "peer-00000"
    peer = net.peers[name]
    assert peer.state is PeerState.FORWARDED
    request = wire.ConsistencyRequest(contributors=[0, 1, 2])
    actions = peer.handle(through_wire(server_env(request), peer.limits()))
    bodies = [a.envelope.body for a in actions if isinstance(a, Send)]
    assert len(bodies) == 1 and isinstance(bodies[0], wire.Refusal)
    assert peer.outcome is not None and peer.outcome.status == "aborted"


# --------------------------------------------------------------------------
# Tree repair


def _tree_of(net: Net) -> tuple[int, ...]:
    tree = net.server._tree
    assert tree is not None
    return tree.order


def test_dead_root_is_replaced_and_the_round_succeeds() -> None:
    net, inputs, _ = make_round(5, 3, dim=3, seed=40, fan_in=2)
    net.run(hold=is_type("masking_start"))
    order = _tree_of(net)
    root = peer_name(order[0])
    # The root dies before it receives its MaskingStart.
    net.held = [item for item in net.held if item[0] != root]
    net.kill(root)
    net.release()
    net.run()
    outcome = net.server.outcome
    assert outcome is not None and outcome.status == "ok", outcome
    assert "new_root" in outcome.stats
    assert outcome.stats["new_root"] in {peer_name(c) for c in order[1:3]}
    assert outcome.dropped == {root: "no_masked_input"}
    assert_sum(net, inputs, sorted(order[1:]))


def test_new_root_waits_for_the_orphans_of_a_dead_child_of_the_root() -> None:
    # Regression: the new root used to expect only the old root's live children, so
    # Y below (the new root releasing with 3 < t contributors) was lost and the round
    # aborted although 4 = t peers were alive.
    # Tree (fan-in 2) over 6 peers: R on top; A and X its children; C, D below A; Y below X.
    net, inputs, _ = make_round(6, 4, dim=3, seed=41, fan_in=2)
    net.run(hold=is_type("masking_start"))
    order = _tree_of(net)
    r, _, x, _, _, y = (peer_name(i) for i in order)
    net.held = [item for item in net.held if item[0] not in (r, x)]
    net.kill(r)
    net.kill(x)
    net.release()
    # Y's report that it has no live ancestor is slower than A's.
    net.run(hold=lambda recipient, sender, env: sender == y
            and env.type == "ancestors_unreachable")
    if len(net.held) != 1:
        raise RuntimeError("precondition: Y's ancestors_unreachable must be held")
    net.release()
    net.run()
    if net.server.state is ServerState.MASKING:
        net.fire(SERVER, PHASE_TIMER)
    outcome = net.server.outcome
    assert outcome is not None
    assert outcome.status == "ok", (outcome.reason, net.errors)
    assert_sum(net, inputs, sorted(order[i] for i in (1, 3, 4, 5)))


# Regression test (was a strict xfail documenting a bug, since fixed).
def test_repeated_ancestors_unreachable_from_the_new_root_does_not_kill_the_round() -> None:
    # Tree (fan-in 2) over 5 peers: R at the top, A and B its children, C and D below A.
    net, inputs, _ = make_round(5, 3, dim=3, seed=40, fan_in=2)
    net.run(hold=is_type("masking_start"))
    order = _tree_of(net)
    r, a, b, c, _ = (peer_name(i) for i in order)
    net.held = [item for item in net.held if item[0] != r]
    net.kill(r)
    net.release()
    # C's partial sum to A is slow, and so is B's report that its root is gone.
    net.run(hold=lambda recipient, sender, env: (
        sender == c and recipient == a and env.type == "encrypted_partial_sum")
        or (sender == b and env.type == "ancestors_unreachable"))
    if net.peers[a].state is not PeerState.MASKING or len(net.held) != 2:
        raise RuntimeError("precondition: A must be waiting for C, B's report held")
    net.fire(a, FORWARD_TIMER)  # A forwards A+D, has no live ancestor: AU #1
    net.release(lambda recipient, sender, env: sender == c)  # reaches A before NewRoot
    net.run()  # A passes C's sum on, still without an ancestor: AU #2
    net.release()
    net.run()
    if net.server.state is ServerState.MASKING:
        net.fire(SERVER, PHASE_TIMER)
    outcome = net.server.outcome
    assert outcome is not None
    assert outcome.status == "ok", (outcome.reason, net.errors)
    assert_sum(net, inputs, sorted(order[1:]))


# --------------------------------------------------------------------------
# Sparse graph


def test_sparse_round_in_memory_gives_exact_sum() -> None:
    # With t = n no dropout is tolerated, so the SecAgg+ graph is a ring (degree 2).
    net, inputs, _ = make_round(7, 7, dim=3, seed=50, graph="sparse", fan_in=2)
    net.run()
    assert net.errors == []
    graph = net.server._graph
    assert graph is not None and graph.kind == "sparse" and graph.degree == 2
    assert_sum(net, inputs, list(range(7)))
    # Each peer exchanged shares with its two ring neighbours only.
    shares = [(s, r) for s, r, env in net.sent if env.type == "encrypted_shares"]
    assert len(shares) == 7 * 2


def test_active_sparse_round_in_memory_gives_exact_sum() -> None:
    net, inputs, _ = make_round(6, 6, dim=3, seed=51, graph="sparse", fan_in=2,
                                threat_model="active")
    net.run()
    assert net.errors == []
    assert_sum(net, inputs, list(range(6)))


# Regression test (was a strict xfail documenting a bug, since fixed).
def test_active_peer_does_not_count_signatures_under_substituted_identity_keys() -> None:
    n = 6  # t = n: the SecAgg+ graph is a ring, each peer has 2 neighbours
    net, _, _ = make_round(n, n, dim=3, seed=52, graph="sparse", fan_in=2,
                           threat_model="active", pin_identities=True)
    net.run(hold=is_type("masking_start"))
    graph, tree = net.server._graph, net.server._tree
    assert graph is not None and tree is not None and graph.kind == "sparse"
    root = tree.root()  # the root's tree contacts are every other peer
    strangers = [u for u in range(n) if u not in graph.neighbours(root)]
    if len(strangers) < graph.share_threshold:
        raise RuntimeError("precondition: the root needs enough non-neighbour relatives")
    name = peer_name(root)
    peer = net.peers[name]
    # The malicious server swaps in its own identity key for every stranger.
    attacker = generate_signing_key(DeterministicRandom(52, "attacker"))
    start_env = net.held_of("masking_start", name)[0]
    start = start_env.body
    assert isinstance(start, wire.MaskingStart)
    contacts = [dataclasses.replace(entry, identity_key=attacker.public_bytes)
                if entry.index in strangers else entry for entry in start.contacts]
    assert contacts != start.contacts
    net.held = [item for item in net.held if item[0] != name]
    forged_start = dataclasses.replace(start_env, body=dataclasses.replace(start,
                                                                           contacts=contacts))
    try:
        actions = peer.handle(through_wire(forged_start, peer.limits()))
    except ProtocolError:
        return  # fixed: the substituted entries are refused
    net.apply(name, actions)
    net.release()
    net.run(hold=is_type("unmask_request"))
    assert peer.state is PeerState.SIGNED
    honest = net.held_of("unmask_request", name)[0].body
    assert isinstance(honest, wire.UnmaskRequest)
    # R4 with no genuine signature at all: only forgeries "from" the strangers.
    message = consistency_message(SESSION, ROUND, honest.contributors)
    forged = [wire.SignedIndex(index=u, signature=sign(attacker, message)) for u in strangers]
    actions = _deliver_request(net, name, dataclasses.replace(honest, signatures=forged))
    bodies = [a.envelope.body for a in actions if isinstance(a, Send)]
    assert len(bodies) == 1
    assert isinstance(bodies[0], wire.Refusal), "shares revealed on forged signatures"
