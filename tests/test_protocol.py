"""PeerProtocol and ServerProtocol driven directly, in memory, without sockets.

The network is :class:`helpers_protocol.Net`; see there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import pytest
from helpers_protocol import (
    OTHER_SESSION,
    ROUND,
    SESSION,
    Hold,
    Net,
    assert_sum,
    error_bound,
    is_type,
    make_round,
    server_env,
    through_wire,
)

from secagg import wire
from secagg.crypto.signing import generate_signing_key, sign
from secagg.errors import WireError
from secagg.protocol import (
    PEER_TRANSITIONS,
    SERVER_TRANSITIONS,
    Action,
    Bind,
    DeliveryFailed,
    Disconnect,
    FrameReceived,
    MessageReceived,
    PeerConnected,
    PeerGone,
    PeerProtocol,
    PeerState,
    RoundFinished,
    Send,
    ServerProtocol,
    ServerState,
    TimerExpired,
)
from secagg.protocol.common import consistency_message
from secagg.protocol.errors import DropReason, LocalProtocolError
from secagg.protocol.peer import FORWARD_TIMER, SHARE_TIMER
from secagg.protocol.peer.early import MAX_FRAMES, MAX_FRAMES_PER_SOURCE
from secagg.protocol.peer.phase import DEFER, PEER_GONE, SETTLE, timer
from secagg.protocol.peer.protocol import MAX_STALE_FRAMES, PEER_PHASES
from secagg.protocol.peer.share import SharingPhase
from secagg.protocol.server import PHASE_TIMER, SERVER_PHASES
from secagg.protocol.server.register import RegisterPhase
from secagg.sim import DeterministicRandom, peer_name
from secagg.wire import SERVER, Envelope

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
    # The peer's table is derived from its phase classes: every row names a handler of
    # the phase class of its state (or "defer", the dispatcher's buffer) and declares
    # where it may lead; every state has exactly one phase class.
    phase_of = {phase.STATE: phase for phase in PEER_PHASES}
    assert PEER_TRANSITIONS and set(phase_of) == set(PeerState)
    events = {PEER_GONE, "delivery_failed", SETTLE, timer(SHARE_TIMER), timer(FORWARD_TIMER)}
    for (peer_state, key), (handler, peer_next) in PEER_TRANSITIONS.items():
        assert key in types or key in events, key
        assert peer_next and peer_next <= set(PeerState), (peer_state, key)
        if handler == DEFER:
            assert key in types and peer_next == {peer_state}
        else:
            assert callable(getattr(phase_of[peer_state], handler, None)), \
                f"{phase_of[peer_state].__name__}.{handler} missing"
    live = set(PeerState) - {PeerState.IDLE, PeerState.FINISHED}
    for peer_state in live:  # the server can end the round, and a departure is noted
        assert (peer_state, "round_outcome") in PEER_TRANSITIONS
        assert (peer_state, PEER_GONE) in PEER_TRANSITIONS
    assert not any(peer_state in (PeerState.IDLE, PeerState.FINISHED)
                   for peer_state, _ in PEER_TRANSITIONS)
    # The server's table likewise: every state after start() has one phase class, every
    # row a handler of it and declared next states; a deadline and a departure are
    # handled in every such state.
    assert SERVER_TRANSITIONS
    assert set(SERVER_PHASES) == set(ServerState) - {ServerState.IDLE}
    server_events = {f"timer:{PHASE_TIMER}", "peer_gone"}
    for (state, key), (handler, next_states) in SERVER_TRANSITIONS.items():
        assert key in types or key in server_events, key
        assert next_states and next_states <= set(ServerState) - {ServerState.IDLE}, \
            (state, key)
        phase = SERVER_PHASES[state]
        assert callable(getattr(phase, handler, None)), f"{phase.__name__}.{handler} missing"
    for state in SERVER_PHASES:
        for key in server_events:
            assert (state, key) in SERVER_TRANSITIONS, (state, key)
    # Only the finished phase takes anything: R0 takes only registrations (and
    # withdrawals of peers that will not register).
    assert {key for state, key in SERVER_TRANSITIONS
            if state is ServerState.COLLECTING_KEYS} == {"advertise_keys", "withdraw",
                                                         *server_events}


def test_peer_rejects_unlisted_transition_naming_state_and_type() -> None:
    peer = PeerProtocol("peer-00000", random_bytes=DeterministicRandom(1, "p"))
    peer.start(SESSION, ROUND, np.zeros(5))
    assert peer.state is PeerState.ADVERTISED
    start = wire.MaskingStart(survivors=[0, 1, 2], total_survivors=3, tree_seed=bytes(32),
                              ancestors=[], descendants=[], descendant_parents=[], contacts=[],
                              forward_after=1.0)
    # From a peer, an unlisted message is refused and cuts that connection off; the
    # state does not change.
    keys = wire.AdvertiseKeys(address="", channel_key=bytes(32), mask_key=bytes([1]) * 32)
    before = _peer_snapshot(peer)
    actions = peer.handle(through_wire(Envelope(SESSION, ROUND, "peer-00001", keys)))
    detail = _refused(actions, "peer-00001", DropReason.UNEXPECTED_MESSAGE).detail
    assert "advertised" in detail and "advertise_keys" in detail
    assert peer.rejected == [detail]
    assert _peer_snapshot(peer) == before and peer.state is PeerState.ADVERTISED
    # From the server, it means the peer can no longer follow it: it aborts, naming why.
    actions = peer.handle(through_wire(server_env(start)))
    assert [a.reason for a in actions if isinstance(a, Disconnect)] == [
        DropReason.UNEXPECTED_MESSAGE]
    message = next(a.detail for a in actions if isinstance(a, Disconnect))
    assert "advertised" in message and "masking_start" in message
    assert peer.finished
    assert peer.outcome is not None and peer.outcome.status == "aborted"
    assert "advertised" in peer.outcome.reason and "masking_start" in peer.outcome.reason
    assert any(isinstance(a, RoundFinished) for a in actions)


def test_server_rejects_unlisted_transition_naming_state_and_type() -> None:
    net, _, _ = make_round(4, 3)
    net.run(hold=is_type("encrypted_shares"))
    assert net.server.state is ServerState.SHARING
    body = wire.UnmaskShares(self_mask_shares=b"", secret_key_shares=b"")
    env = Envelope(SESSION, ROUND, "peer-00001", body)
    before = _server_snapshot(net.server, but_departures=True)
    actions = net.server.handle(through_wire(env))
    # The sender is cut off for it, naming the state and the type ...
    message = _cut_off(actions, "peer-00001", DropReason.UNEXPECTED_MESSAGE).detail
    assert "sharing" in message and "unmask_shares" in message
    assert net.server.dropped == {"peer-00001": DropReason.UNEXPECTED_MESSAGE}
    assert net.server.drop_details["peer-00001"] == message
    # ... and is gone: its neighbours stop waiting for its shares. Nothing else changes.
    notices = {a.recipient for a in actions
               if isinstance(a, Send) and a.envelope.body == wire.PeerDropped(peer=1)}
    assert notices == {"peer-00000", "peer-00002", "peer-00003"}
    assert net.server.state is ServerState.SHARING
    assert _server_snapshot(net.server, but_departures=True) == before


def test_peer_refuses_server_messages_from_a_peer() -> None:
    net, _, _ = make_round(4, 3)
    net.run(hold=is_type("roster"))
    roster = net.held_of("roster", "peer-00000")[0]
    forged = dataclasses.replace(roster, sender="peer-00001")
    peer = net.peers["peer-00000"]
    before = _peer_snapshot(peer)
    actions = peer.handle(through_wire(forged))
    detail = _refused(actions, "peer-00001", DropReason.UNEXPECTED_MESSAGE).detail
    assert "only come from the server" in detail and peer.rejected == [detail]
    assert _peer_snapshot(peer) == before
    assert peer.state is PeerState.ADVERTISED
    # On the server link, a frame that names a peer as its sender is the server's fault.
    actions = peer.handle(FrameReceived(SERVER, wire.encode(forged)))
    assert [a.reason for a in actions if isinstance(a, Disconnect)] == [
        DropReason.FORGED_SENDER]
    assert peer.outcome is not None and peer.outcome.status == "aborted"


def test_server_refuses_a_peer_claiming_to_be_the_server() -> None:
    net, _, _ = make_round(4, 3, start_peers=False)
    keys = wire.AdvertiseKeys(address="", channel_key=bytes(32), mask_key=bytes([1]) * 32)
    before = _server_snapshot(net.server)
    actions = net.server.handle(FrameReceived("#1", wire.encode(server_env(keys))))
    detail = _turned_away(actions, "#1", DropReason.FORGED_SENDER)
    assert "server" in detail
    assert _registered(net.server) == {}
    assert _server_snapshot(net.server) == before


# --------------------------------------------------------------------------
# Replays and misdirected frames


def _snapshot(obj: object) -> dict[str, str]:
    return {key: repr(value) for key, value in vars(obj).items()}


_DEPARTURE_KEYS = ("context.gone", "context.dropped", "context.drop_details", "phase.awaited")
"""Where the server records that a peer is gone, and why."""


def _server_snapshot(server: ServerProtocol, *, but_departures: bool = False
                     ) -> dict[str, str]:
    """The server's whole state (protocol, phase, round context); with
    ``but_departures``, all but the record of who is gone and why."""
    parts: dict[str, object] = {f"protocol.{k}": v for k, v in vars(server).items()
                                if k != "_ctx"}
    parts.update({f"phase.{k}": v for k, v in vars(server.phase).items() if k != "ctx"})
    parts.update({f"context.{k}": v for k, v in vars(server._ctx).items()})
    if but_departures:
        for key in _DEPARTURE_KEYS:
            parts.pop(key, None)
    return {key: repr(value) for key, value in parts.items()}


def _cut_off(actions: list[Action], culprit: str, reason: DropReason) -> Disconnect:
    """The server's answer to a bad frame from a roster member: one Disconnect first,
    then whatever its departure means for the phase."""
    disconnects = [a for a in actions if isinstance(a, Disconnect)]
    assert len(disconnects) == 1 and actions[0] is disconnects[0], actions
    assert (disconnects[0].name, disconnects[0].reason) == (culprit, reason), disconnects
    return disconnects[0]


def _turned_away(actions: list[Action], connection: str, reason: DropReason) -> str:
    """The server's answer to a bad frame on an unregistered connection: it is told
    why, then closed; nothing else. Returns the reason given."""
    assert len(actions) == 2, actions
    notice, disconnect = actions
    assert isinstance(notice, Send) and notice.recipient == connection
    assert isinstance(notice.envelope.body, wire.Rejected)
    assert disconnect == Disconnect(connection, reason, notice.envelope.body.reason)
    return disconnect.detail


def _registered(server: ServerProtocol) -> dict[str, wire.AdvertiseKeys]:
    phase = server.phase
    assert isinstance(phase, RegisterPhase)
    return phase.registered


def _peer_snapshot(peer: PeerProtocol) -> dict[str, str]:
    """A peer's whole state (protocol, phase, round context, early buffer), except the
    log of refused frames and the immutable round input that carries it."""
    parts: dict[str, object] = {f"protocol.{k}": v for k, v in vars(peer).items()
                                if k not in ("rejected", "_input")}
    parts.update({f"phase.{k}": v for k, v in vars(peer.phase).items() if k != "input"})
    parts.update({f"early.{k}": v for k, v in vars(peer._early).items()})
    context = peer.phase.context
    if context is not None:
        parts.update({f"context.{k}": v for k, v in vars(context).items() if k != "input"})
    return {key: repr(value) for key, value in parts.items()}


def _refused(actions: list[Action], culprit: str, reason: DropReason) -> Disconnect:
    """The answer to one bad frame from a peer: cutting its connection off, and nothing
    else."""
    assert len(actions) == 1 and isinstance(actions[0], Disconnect), actions
    assert (actions[0].name, actions[0].reason) == (culprit, reason), actions[0]
    return actions[0]


REPLAYS = [({"session": OTHER_SESSION}, "another session"), ({"round": ROUND + 1}, "for round 4"),
           ({"round": ROUND - 1}, "for round 2")]


@pytest.mark.parametrize(("mutation", "match"), REPLAYS)
def test_replayed_roster_from_another_session_or_round_changes_nothing(
        mutation: dict[str, object], match: str) -> None:
    net, inputs, _ = make_round(4, 3, seed=2)
    net.run(hold=is_type("roster"))
    peer = net.peers["peer-00002"]
    roster = net.held_of("roster", "peer-00002")[0]
    before = _peer_snapshot(peer)
    # Stale rather than hostile: it cannot speak for this round, so it is only recorded.
    assert peer.handle(through_wire(dataclasses.replace(roster, **mutation))) == []  # type: ignore[arg-type]
    assert len(peer.rejected) == 1
    assert match in peer.rejected[0] and "roster" in peer.rejected[0]
    assert _peer_snapshot(peer) == before
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
    replay = wire.encode(dataclasses.replace(report, **mutation))  # type: ignore[arg-type]
    # A replay on a connection nobody registered is turned away and changes nothing.
    before = _server_snapshot(net.server)
    detail = _turned_away(net.server.handle(FrameReceived("#9", replay)), "#9",
                          DropReason.NOT_REGISTERED)
    assert "advertise_keys" in detail
    assert _server_snapshot(net.server) == before
    # On its sender's own connection it cuts off only the sender, naming why: the
    # reports received stay as they were, and the round completes without it.
    sender = report.sender
    actions = net.server.handle(FrameReceived(sender, replay))
    detail = _cut_off(actions, sender, DropReason.WRONG_SESSION).detail
    assert match in detail and "share_report" in detail
    assert net.server.state is ServerState.SHARING
    assert net.server.dropped == {sender: DropReason.WRONG_SESSION}
    assert _server_snapshot(net.server, but_departures=True) == {
        key: value for key, value in before.items() if key not in _DEPARTURE_KEYS}
    net.apply(SERVER, actions)
    net.release()
    net.run()
    outcome = net.server.outcome
    assert outcome is not None and outcome.dropped == {sender: "wrong_session"}
    assert_sum(net, inputs, [u for u in range(4) if peer_name(u) != sender])


def test_shares_from_another_round_are_rejected_and_round_completes() -> None:
    net, inputs, _ = make_round(4, 3, seed=4)
    net.run(hold=is_type("encrypted_shares"))
    target = "peer-00003"
    shares = net.held_of("encrypted_shares", target)[0]
    peer = net.peers[target]
    before = _peer_snapshot(peer)
    actions = peer.handle(through_wire(dataclasses.replace(shares, round=ROUND + 1)))
    detail = _refused(actions, shares.sender, DropReason.WRONG_SESSION).detail
    assert "round" in detail and "encrypted_shares" in detail
    assert _peer_snapshot(peer) == before
    net.release()
    net.run()
    assert net.errors == []
    assert_sum(net, inputs, [0, 1, 2, 3])


def test_shares_of_an_earlier_round_are_ignored_and_the_link_kept() -> None:
    """Links outlive rounds: a neighbour still a round behind (its shares of a round
    that aborted) is lag, not an attack. Its frames are ignored and noted once; cutting
    the link would make the next rounds open it again."""
    net, inputs, _ = make_round(4, 3, seed=4)
    net.run(hold=is_type("encrypted_shares"))
    target = "peer-00003"
    shares = net.held_of("encrypted_shares", target)[0]
    peer = net.peers[target]
    late = through_wire(dataclasses.replace(shares, round=ROUND - 1))
    for _ in range(MAX_STALE_FRAMES):
        assert peer.handle(late) == []
    assert [r for r in peer.rejected if "ignored" in r] == [
        f"encrypted_shares from {shares.sender!r} of round {ROUND - 1} ignored: this is "
        f"round {ROUND} (late)"]
    net.release()
    net.run()
    assert net.errors == []
    assert_sum(net, inputs, [0, 1, 2, 3])


def test_a_flood_of_earlier_rounds_frames_is_cut_off() -> None:
    net, _, _ = make_round(4, 3, seed=4)
    net.run(hold=is_type("encrypted_shares"))
    shares = net.held_of("encrypted_shares", "peer-00003")[0]
    peer = net.peers["peer-00003"]
    late = through_wire(dataclasses.replace(shares, round=ROUND - 1))
    for _ in range(MAX_STALE_FRAMES):
        peer.handle(late)
    _refused(peer.handle(late), shares.sender, DropReason.TOO_MANY_FRAMES)


def test_duplicate_shares_are_a_replay() -> None:
    net, inputs, _ = make_round(5, 3, seed=5)
    net.run(hold=is_type("encrypted_shares"))
    target = "peer-00001"
    first = net.held_of("encrypted_shares", target)[0]
    peer = net.peers[target]
    peer.handle(through_wire(first, peer.limits()))
    before = _peer_snapshot(peer)
    actions = peer.handle(through_wire(first, peer.limits()))
    detail = _refused(actions, first.sender, DropReason.DUPLICATE_MESSAGE).detail
    assert "duplicate shares" in detail and "encrypted_shares" in detail
    assert _peer_snapshot(peer) == before
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
    before = _peer_snapshot(victim)
    actions = victim.handle(through_wire(forged, victim.limits()))
    assert "authenticate" in _refused(actions, "peer-00001",
                                      DropReason.AUTHENTICATION_FAILED).detail
    # On peer-00000's own link it is a forged sender; on a connection nobody has
    # proven to own, it fails to authenticate, and the connection is never bound.
    frame = wire.encode(forged)
    _refused(victim.handle(FrameReceived("peer-00000", frame)), "peer-00000",
             DropReason.FORGED_SENDER)
    _refused(victim.handle(FrameReceived("#7", frame)), "#7",
             DropReason.AUTHENTICATION_FAILED)
    assert len(victim.rejected) == 3
    assert _peer_snapshot(victim) == before
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
    before = _peer_snapshot(other)
    actions = other.handle(through_wire(for_two, other.limits()))
    detail = _refused(actions, "peer-00000", DropReason.AUTHENTICATION_FAILED).detail
    assert "does not authenticate" in detail and other.rejected == [detail]
    assert _peer_snapshot(other) == before


def test_server_peer_dropped_notice_ends_the_wait_for_shares() -> None:
    net, _, _ = make_round(4, 3, seed=14)
    late = "peer-00003"
    net.run(hold=lambda r, s, env: env.type == "encrypted_shares" and s == late)
    peer = net.peers["peer-00000"]
    assert peer.state is PeerState.SHARING  # still waiting for peer 3's shares
    # A PeerDropped notice claiming to come from a peer is refused ...
    forged = Envelope(SESSION, ROUND, "peer-00001", wire.PeerDropped(peer=3))
    before = _peer_snapshot(peer)
    actions = peer.handle(through_wire(forged, peer.limits()))
    assert "only come from the server" in _refused(
        actions, "peer-00001", DropReason.UNEXPECTED_MESSAGE).detail
    assert _peer_snapshot(peer) == before
    assert peer.state is PeerState.SHARING
    # ... the server's own ends the wait: the peer reports the missing shares.
    actions = peer.handle(through_wire(server_env(wire.PeerDropped(peer=3)), peer.limits()))
    reports = [a.envelope.body for a in actions if isinstance(a, Send)]
    assert reports == [wire.ShareReport(missing_from=[3])]
    assert peer.state is PeerState.REPORTED


def _swap_own_mask_key(roster: wire.Roster) -> dict[str, object]:
    return {"neighbours": [dataclasses.replace(entry, mask_key=bytes(32))
                           if entry.index == roster.your_index else entry
                           for entry in roster.neighbours]}


@pytest.mark.parametrize(("mutation", "match", "reason"), [
    (_swap_own_mask_key, "own keys", DropReason.INVALID_KEYS),
    (lambda roster: {"neighbours": roster.neighbours[:-1]}, "neighbour",
     DropReason.BAD_MESSAGE),
    # t <= n/2 is never accepted
    (lambda roster: {"threshold": 2, "share_threshold": 2}, "more than n/2",
     DropReason.BAD_MESSAGE),
])
def test_roster_without_the_peers_own_keys_is_refused(
        mutation: Callable[[wire.Roster], dict[str, object]], match: str,
        reason: DropReason) -> None:
    net, _, _ = make_round(4, 3, seed=15)
    net.run(hold=is_type("roster"))
    env = net.held_of("roster", "peer-00001")[0]
    roster = env.body
    assert isinstance(roster, wire.Roster)
    peer = net.peers["peer-00001"]
    bad = dataclasses.replace(env, body=dataclasses.replace(roster, **mutation(roster)))  # type: ignore[arg-type]
    actions = peer.handle(through_wire(bad))
    # A roster the server got wrong ends the round before a single share is sent.
    assert not any(isinstance(a, Send) for a in actions)
    disconnects = [a for a in actions if isinstance(a, Disconnect)]
    assert [(a.name, a.reason) for a in disconnects] == [(SERVER, reason)]
    assert match in disconnects[0].detail
    assert peer.outcome is not None and peer.outcome.status == "aborted"
    assert match in peer.outcome.reason and "roster" in peer.outcome.reason


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
    # A second connection registering the id is turned away; the first keeps it.
    before = _server_snapshot(net.server)
    actions = net.server.handle(FrameReceived("#2", wire.encode(advert[0].envelope)))
    detail = _turned_away(actions, "#2", DropReason.DUPLICATE_ID)
    assert "duplicate id" in detail and repr(dup) in detail
    assert _server_snapshot(net.server) == before and list(_registered(net.server)) == [dup]
    # The registered peer registering again on its own connection is a replay: it is
    # dropped, and may not come back this round.
    own = next(env for sender, _, env in net.sent
               if sender == dup and env.type == "advertise_keys")
    actions = net.server.handle(through_wire(own))
    detail = _cut_off(actions, dup, DropReason.DUPLICATE_MESSAGE).detail
    assert "duplicate registration" in detail
    assert _registered(net.server) == {}
    assert net.server.dropped == {dup: DropReason.DUPLICATE_MESSAGE}
    again = net.server.handle(FrameReceived("#3", wire.encode(own)))
    assert "dropped from this round" in _turned_away(again, "#3", DropReason.NOT_REGISTERED)
    net.apply(SERVER, actions)
    # The dropped peer saw the server go and aborted.
    outcome = net.peers[dup].outcome
    assert outcome is not None and outcome.status == "aborted"
    for i, name in enumerate(names[1:], start=1):
        net.apply(name, net.peers[name].start(SESSION, ROUND, inputs[i]))
    net.run()
    assert net.server.state is ServerState.COLLECTING_KEYS  # 3 of max_peers=4
    net.fire(SERVER, PHASE_TIMER)
    net.run()
    outcome_s = net.server.outcome
    assert outcome_s is not None and outcome_s.status == "ok", outcome_s
    assert outcome_s.contributors == tuple(names[1:])
    assert outcome_s.dropped == {dup: "duplicate_message"}
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
    # Registration closed because max_peers registered: the notice names the setting.
    assert "max_peers=4" in late.outcome.reason and "raise max_peers" in late.outcome.reason
    assert "peer-late" not in net.server.names
    # A second registration from a rostered name is rejected too, naming the id; the
    # rostered peer keeps its place.
    again = PeerProtocol("peer-00001", random_bytes=DeterministicRandom(9, "again"))
    actions = again.start(SESSION, ROUND, inputs[0])
    assert isinstance(actions[0], Send)
    reply = net.server.handle(FrameReceived("#5", wire.encode(actions[0].envelope)))
    assert "already registered" in _turned_away(reply, "#5", DropReason.DUPLICATE_ID)
    assert net.server.dropped == {}
    # A connection opening now hears that registration is closed, and why; it is kept
    # (not disconnected) for the next round.
    closed = net.server.handle(PeerConnected("#6"))
    assert len(closed) == 1 and isinstance(closed[0], Send), closed
    assert closed[0].recipient == "#6" and isinstance(closed[0].envelope.body, wire.Rejected)
    assert "raise max_peers" in closed[0].envelope.body.reason
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


def test_connections_hear_the_round_notice_while_registration_is_open() -> None:
    net, inputs, _ = make_round(4, 3, seed=16, start_peers=False)
    notice = net.server.round_open()
    assert notice.sender == SERVER and (notice.session, notice.round) == (SESSION, ROUND)
    body = notice.body
    assert isinstance(body, wire.RoundOpen)
    assert (body.dim, body.weighted, body.max_peers, body.mode, body.paillier_key_bits) == (
        5, False, 4, "masking", 0)
    # A connection that opens now gets the very same notice.
    assert net.server.handle(PeerConnected("#1")) == [Send("#1", notice)]
    # Registering on it binds it to the name before anything is sent to that name.
    name = "peer-00000"
    advert = net.peers[name].start(SESSION, ROUND, inputs[0])[0]
    assert isinstance(advert, Send)
    assert net.server.handle(FrameReceived("#1", wire.encode(advert.envelope))) == [
        Bind("#1", name)]
    assert list(_registered(net.server)) == [name]
    # A frame claiming another sender on the bound connection is forged.
    other = net.peers["peer-00001"].start(SESSION, ROUND, inputs[1])[0]
    assert isinstance(other, Send)
    actions = net.server.handle(FrameReceived(name, wire.encode(other.envelope)))
    assert "forged sender" in _cut_off(actions, name, DropReason.FORGED_SENDER).detail
    assert _registered(net.server) == {}
    # An unregistered connection that closes leaves no trace.
    assert net.server.handle(PeerGone("#7")) == []


def test_the_server_never_raises_for_what_a_peer_sends() -> None:
    net, _, _ = make_round(4, 3, seed=17)
    net.run(hold=is_type("share_report"))
    assert net.server.state is ServerState.SHARING
    before = _server_snapshot(net.server)
    # Garbage on a new connection, and a frame over the round's size limit.
    detail = _turned_away(net.server.handle(FrameReceived("#1", b"\x93garbage")), "#1",
                          DropReason.MALFORMED_MESSAGE)
    assert "malformed frame" in detail
    huge = bytes(net.server.limits().max_frame_bytes + 1)
    _turned_away(net.server.handle(FrameReceived("#2", huge)), "#2",
                 DropReason.MALFORMED_MESSAGE)
    assert _server_snapshot(net.server) == before
    # Garbage from a roster member cuts it off, with the phase's consequences.
    actions = net.server.handle(FrameReceived("peer-00002", b"\xc1"))
    _cut_off(actions, "peer-00002", DropReason.MALFORMED_MESSAGE)
    assert net.server.state is ServerState.SHARING
    # Its later frames come from a peer no longer in the round.
    report = net.held_of("share_report")[0]
    stale = dataclasses.replace(report, sender="peer-00002")
    actions = net.server.handle(FrameReceived("peer-00002", wire.encode(stale)))
    assert "already dropped" in _cut_off(actions, "peer-00002",
                                         DropReason.NOT_ON_ROSTER).detail
    # A report naming a peer outside the roster is an invalid report, not a crash.
    bad = Envelope(SESSION, ROUND, "peer-00003", wire.ShareReport(missing_from=[99]))
    actions = net.server.handle(MessageReceived(bad))
    assert "outside the neighbourhood" in _cut_off(actions, "peer-00003",
                                                   DropReason.INVALID_REPORT).detail
    assert net.server.dropped == {"peer-00002": DropReason.MALFORMED_MESSAGE,
                                  "peer-00003": DropReason.INVALID_REPORT}
    # Only the caller's mistakes raise.
    with pytest.raises(LocalProtocolError):
        net.server.start()
    with pytest.raises(LocalProtocolError):  # every frame at the server has a connection
        net.server.handle(FrameReceived("", wire.encode(report)))
    idle = ServerProtocol(net.server.config)
    with pytest.raises(LocalProtocolError):
        idle.handle(PeerConnected("#1"))
    with pytest.raises(TypeError):
        net.server.handle("not an event")  # type: ignore[arg-type]


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
    context = peer.phase.context  # secrets forgotten
    assert context is not None and context.shares == {} and not any(context.self_mask_seed)


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
    # The server asks for exactly t shares of each self mask, and nothing else ...
    received = net.server.shares_received
    assert {kind for kind, _, _ in received} == {"self_mask"}
    holder_sets = set()
    for owner in range(5):
        holders = [h for _, o, h in received if o == owner]
        assert len(holders) == len(set(holders)) == threshold
        holder_sets.add(frozenset(holders))
    # ... and on the complete graph from the same t holders for every secret, so that
    # it interpolates over one set of share indices.
    assert len(holder_sets) == 1


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


def test_a_holder_that_vanishes_in_r4_is_replaced_for_every_secret_it_owed() -> None:
    net, inputs = _run_to_unmasking(n=6, threshold=4, seed=23)
    asked = {recipient for recipient, _, env, _ in net.held if env.type == "unmask_request"
             and env.body.self_mask_wanted}  # type: ignore[attr-defined]
    assert len(asked) == 4  # the same t holders for all six self masks
    gone = sorted(asked)[1]
    net.held = [item for item in net.held if item[0] != gone]
    net.kill(gone)
    net.release()
    net.run()
    outcome = net.server.outcome
    assert outcome is not None and outcome.status == "ok", outcome
    assert outcome.dropped == {gone: "unmask_share_missing"}
    assert_sum(net, inputs, list(range(6)))  # its masked input was already in the sum
    holder_sets = {frozenset(h for _, o, h in net.server.shares_received if o == owner)
                   for owner in range(6)}
    (holders,) = holder_sets  # one replacement, the same for every secret
    assert len(holders) == 4 and gone not in {peer_name(h) for h in holders}


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
    frame = wire.encode(actions[0].envelope)
    before = _server_snapshot(net.server)
    # On a new connection: turned away, and the connection never becomes the peer's.
    detail = _turned_away(net.server.handle(FrameReceived("#1", frame)), "#1",
                          DropReason.INVALID_KEYS)
    assert "signed" in detail
    # On a connection the driver vouches for: cut off.
    reply = net.server.handle(through_wire(actions[0].envelope))
    assert "signed" in _cut_off(reply, "peer-00000", DropReason.INVALID_KEYS).detail
    assert _registered(net.server) == {}
    assert _server_snapshot(net.server) == before


def test_active_unmask_request_with_a_different_u3_is_refused() -> None:
    net, _ = _run_to_unmasking("active", n=5, threshold=4, seed=32)
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
    net, _ = _run_to_unmasking("active", n=5, threshold=4, seed=34)
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
    tree = net.server.tree
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
    graph = net.server.graph
    assert graph is not None and graph.kind == "sparse" and graph.degree == 2
    assert_sum(net, inputs, list(range(7)))
    # Each peer exchanged shares with its two ring neighbours only.
    shares = [(s, r) for s, r, env in net.sent if env.type == "encrypted_shares"]
    assert len(shares) == 7 * 2


def test_active_sparse_round_in_memory_gives_exact_sum() -> None:
    # Under active the graph is built for a corrupt fraction (graph.ACTIVE_CORRUPT_RATE):
    # with t = n = 30 that is degree 12, where the honest-but-curious graph is a ring.
    net, inputs, _ = make_round(30, 30, dim=3, seed=51, graph="sparse", fan_in=2,
                                threat_model="active")
    net.run()
    assert net.errors == []
    graph = net.server.graph
    assert graph is not None and graph.kind == "sparse" and 2 < graph.degree < 29
    assert_sum(net, inputs, list(range(30)))


# Regression test (was a strict xfail documenting a bug, since fixed).
def test_active_peer_does_not_count_signatures_under_substituted_identity_keys() -> None:
    n = 30  # t = n: the active SecAgg+ graph has degree 12, so most peers are strangers
    net, _, _ = make_round(n, n, dim=3, seed=52, graph="sparse", fan_in=2,
                           threat_model="active", pin_identities=True)
    net.run(hold=is_type("masking_start"))
    graph, tree = net.server.graph, net.server.tree
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
    actions = peer.handle(through_wire(forged_start, peer.limits()))
    if peer.finished:  # fixed: the substituted entries are refused, and the round ends
        assert [(a.name, a.reason) for a in actions if isinstance(a, Disconnect)] == [
            (SERVER, DropReason.INVALID_KEYS)]
        assert peer.outcome is not None and "pinned" in peer.outcome.reason
        return
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


# --------------------------------------------------------------------------
# The peer's input, caller misuse, and the dispatcher's own checks


@pytest.mark.parametrize(("vector", "weight", "match"), [
    (np.array([0.0, np.nan, 1.0]), 1.0, "NaN or inf"),
    (np.array([0.0, np.inf]), 1.0, "NaN or inf"),
    (np.zeros((2, 3)), 1.0, "1-D"),
    (np.zeros(3), -1.0, "weight"),
    (np.zeros(3), float("inf"), "weight"),
    (np.zeros(3), float("nan"), "weight"),
])
def test_start_validates_the_input_before_anything_is_sent(
        vector: np.ndarray, weight: float, match: str) -> None:
    peer = PeerProtocol("peer-00000", random_bytes=DeterministicRandom(1, "p"))
    with pytest.raises(ValueError, match=match):
        peer.start(SESSION, ROUND, vector, weight)
    assert peer.state is PeerState.IDLE
    actions = peer.start(SESSION, ROUND, np.zeros(3))
    assert [type(a.envelope.body) for a in actions if isinstance(a, Send)] == [
        wire.AdvertiseKeys]


def test_misusing_a_peer_raises_and_a_remote_fault_never_does() -> None:
    peer = PeerProtocol("peer-00000", random_bytes=DeterministicRandom(1, "p"))
    with pytest.raises(LocalProtocolError, match="not started"):
        peer.handle(TimerExpired(SHARE_TIMER))
    peer.start(SESSION, ROUND, np.zeros(3))
    with pytest.raises(LocalProtocolError, match="already started"):
        peer.start(SESSION, ROUND, np.zeros(3))
    with pytest.raises(TypeError):
        peer.handle("roster")  # type: ignore[arg-type]
    # Garbage from a connection nobody owns: refused, the connection cut, nothing raised.
    _refused(peer.handle(FrameReceived("#1", b"\x93junk")), "#1", DropReason.MALFORMED_MESSAGE)
    # Garbage on the server link: the peer cannot follow the server; it says why.
    actions = peer.handle(FrameReceived(SERVER, b"\x93junk"))
    assert [(a.name, a.reason) for a in actions if isinstance(a, Disconnect)] == [
        (SERVER, DropReason.MALFORMED_MESSAGE)]
    assert peer.outcome is not None and peer.outcome.status == "aborted"
    assert "malformed" in peer.outcome.reason and "lost the connection" not in \
        peer.outcome.reason
    assert peer.handle(FrameReceived(SERVER, b"\x93junk")) == []  # finished: ignored


def test_dispatcher_refuses_a_transition_its_phase_did_not_declare(
        monkeypatch: pytest.MonkeyPatch) -> None:
    net, _, _ = make_round(4, 3, seed=16)
    net.run(hold=is_type("encrypted_shares"))
    target = "peer-00002"
    shares = net.held_of("encrypted_shares", target)[0]
    # A bug: a handler declared to stay in SHARING reports (moves to REPORTED).
    monkeypatch.setattr(SharingPhase, "on_shares", lambda self, opened: self.report())
    with pytest.raises(AssertionError, match="declared next states"):
        net.peers[target].handle(through_wire(shares))


# --------------------------------------------------------------------------
# Link binding and the early-frame buffer


def test_a_connection_is_bound_only_by_a_fresh_authenticated_frame() -> None:
    net, inputs, _ = make_round(4, 3, seed=17)
    net.run(hold=is_type("encrypted_shares"))
    target, sender = "peer-00002", "peer-00000"
    peer = net.peers[target]
    genuine = next(env for r, s, env, _ in net.held if r == target and s == sender)
    net.held = [item for item in net.held if item[2] is not genuine]
    frame = wire.encode(genuine)
    forged = wire.encode(dataclasses.replace(genuine, sender="peer-00001"))
    # Junk, and a frame that does not authenticate: cut off, never bound.
    _refused(peer.handle(FrameReceived("#1", b"junk")), "#1", DropReason.MALFORMED_MESSAGE)
    _refused(peer.handle(FrameReceived("#2", forged)), "#2", DropReason.AUTHENTICATION_FAILED)
    # The genuine frame on a fresh connection binds it to its sender, once.
    actions = peer.handle(FrameReceived("#3", frame))
    assert [a for a in actions if isinstance(a, Bind)] == [Bind("#3", sender)]
    # A replay of it proves nothing about the connection it came on.
    _refused(peer.handle(FrameReceived("#4", frame)), "#4", DropReason.DUPLICATE_MESSAGE)
    # Frames the coordinator forwarded ("" origin) bind nothing, and one that does not
    # authenticate cuts nobody off: its claimed sender proves nothing.
    rejected = len(peer.rejected)
    assert peer.handle(FrameReceived("", forged)) == []
    assert peer.handle(FrameReceived("", frame)) == []
    assert len(peer.rejected) == rejected + 2
    # The bound connection speaks for its owner only.
    _refused(peer.handle(FrameReceived("#3", forged)), "#3", DropReason.FORGED_SENDER)
    assert not any(isinstance(a, Bind) for a in peer.handle(FrameReceived("#3", frame)))
    net.release()
    net.run()
    assert_sum(net, inputs, [0, 1, 2, 3])


def test_early_frames_are_bound_when_they_authenticate_after_the_roster() -> None:
    net, inputs, _ = make_round(4, 3, seed=18)
    late = "peer-00002"
    net.run(hold=is_type("roster"))
    net.release(lambda recipient, sender, env: recipient != late)
    net.run(hold=lambda recipient, sender, env: recipient == late)
    peer = net.peers[late]
    assert peer.state is PeerState.ADVERTISED
    early = next(env for r, s, env, _ in net.held if r == late and s == "peer-00000"
                 and env.type == "encrypted_shares")
    net.held = [item for item in net.held if item[2] is not early]
    # Before the roster nothing can be authenticated: the frame waits, with its origin.
    assert peer.handle(FrameReceived("#5", wire.encode(early))) == []
    assert peer.handle(FrameReceived("#6", wire.encode(dataclasses.replace(
        early, sender="peer-00003")))) == []
    roster = next(env for r, _, env, _ in net.held if r == late and env.type == "roster")
    net.held = [item for item in net.held if item[2] is not roster]
    actions = peer.handle(FrameReceived(SERVER, wire.encode(roster)))
    assert [a for a in actions if isinstance(a, Bind)] == [Bind("#5", "peer-00000")]
    assert [(a.name, a.reason) for a in actions if isinstance(a, Disconnect)] == [
        ("#6", DropReason.AUTHENTICATION_FAILED)]
    net.apply(late, actions)
    net.release()
    net.run()
    assert_sum(net, inputs, [0, 1, 2, 3])


def test_early_frame_buffer_is_bounded_per_source_and_in_total() -> None:
    net, inputs, _ = make_round(4, 3, seed=19)
    net.run(hold=is_type("roster"))
    peer = net.peers["peer-00001"]

    def junk(sender: str, size: int = 64) -> bytes:
        return wire.encode(Envelope(SESSION, ROUND, sender,
                                    wire.EncryptedShares(ciphertext=bytes(size))))

    for _ in range(MAX_FRAMES_PER_SOURCE):
        assert peer.handle(FrameReceived("#flood", junk("peer-00003"))) == []
    actions = peer.handle(FrameReceived("#flood", junk("peer-00003")))
    detail = _refused(actions, "#flood", DropReason.TOO_MANY_FRAMES).detail
    assert "early frames" in detail and detail in peer.rejected
    assert len(peer._early) == 0  # everything that source sent is dropped
    # Bytes are bounded too: one source may not park a huge frame.
    _refused(peer.handle(FrameReceived("#big", wire.encode(Envelope(
        SESSION, ROUND, "peer-00003", wire.EncryptedPartialSum(ciphertext=bytes(17 << 20)))))),
        "#big", DropReason.TOO_MANY_FRAMES)
    assert len(peer._early) == 0
    # Many sources together: the total bound holds as well.
    for i in range(MAX_FRAMES):
        assert peer.handle(FrameReceived(f"#{i // 16}", junk("peer-00003"))) == []
    _refused(peer.handle(FrameReceived("#last", junk("peer-00003"))), "#last",
             DropReason.TOO_MANY_FRAMES)
    assert len(peer._early) == MAX_FRAMES
    # When the roster comes, the junk fails to authenticate: its connections are cut,
    # none is bound, and the round goes on.
    roster = net.held_of("roster", "peer-00001")[0]
    net.held = [item for item in net.held if item[2] is not roster]
    actions = peer.handle(FrameReceived(SERVER, wire.encode(roster)))
    assert not any(isinstance(a, Bind) for a in actions)
    cut = [(a.name, a.reason) for a in actions if isinstance(a, Disconnect)]
    assert len(cut) == MAX_FRAMES
    assert set(cut) == {(f"#{i}", DropReason.AUTHENTICATION_FAILED)
                        for i in range(MAX_FRAMES // 16)}
    assert peer.state is PeerState.SHARING and len(peer._early) == 0
    net.apply("peer-00001", actions)
    net.release()
    net.run()
    assert_sum(net, inputs, [0, 1, 2, 3])


# --------------------------------------------------------------------------
# In-flight partial sums


def test_an_undeliverable_partial_sum_goes_to_the_next_live_ancestor() -> None:
    net, inputs, _ = make_round(5, 3, dim=3, seed=60, fan_in=2)
    net.run(hold=is_type("encrypted_partial_sum"))
    leaf = next(name for name, p in net.peers.items() if p.state is PeerState.FORWARDED
                and len(p.phase.relay.ancestors) == 2)  # type: ignore[attr-defined]
    peer = net.peers[leaf]
    parent, root = (peer.name_of(i) for i in peer.phase.relay.ancestors)  # type: ignore[attr-defined]
    assert parent is not None and root is not None
    sent = next(env for r, s, env, _ in net.held if s == leaf and r == parent)
    net.held = [item for item in net.held if item[2] is not sent]
    # Failures are matched by recipient and message type: an undelivered share frame
    # moves no partial sum.
    shares = Envelope(SESSION, ROUND, leaf, wire.EncryptedShares(ciphertext=bytes(40)))
    assert peer.handle(DeliveryFailed(parent, shares)) == []
    actions = peer.handle(DeliveryFailed(parent, sent))
    resent = [a for a in actions if isinstance(a, Send)]
    assert [(a.recipient, a.envelope.type) for a in resent] == [
        (root, "encrypted_partial_sum")]
    assert peer.handle(DeliveryFailed(parent, sent)) == []  # nothing left in flight there
    net.apply(leaf, actions)
    net.release()
    net.run()
    if net.peers[parent].state is PeerState.MASKING:  # it waits for the sum it never got
        net.fire(parent, FORWARD_TIMER)
        net.run()
    assert_sum(net, inputs, [0, 1, 2, 3, 4])


def test_a_live_peer_left_out_of_u3_hears_so_when_u3_is_fixed() -> None:
    # A leaf whose sum arrives too late is told at once, not when the round ends: a
    # peer hearing nothing for two phase deadlines would take the server for lost.
    net, inputs, _ = make_round(5, 3, dim=3, seed=95, fan_in=2)
    net.run(hold=is_type("masking_start"))
    order = _tree_of(net)
    parent, leaf = peer_name(order[1]), peer_name(order[3])
    net.release()
    net.run(hold=lambda recipient, sender, env: sender == leaf
            and env.type == "encrypted_partial_sum")
    net.fire(parent, FORWARD_TIMER)  # the parent gives up waiting for the leaf
    net.run(hold=is_type("unmask_request"))
    assert net.server.state is ServerState.UNMASKING
    outcome = net.peers[leaf].outcome
    assert outcome is not None and (outcome.status, outcome.included) == ("excluded", False)
    net.held = [item for item in net.held if item[1] != leaf]
    net.release()
    net.run()
    assert_sum(net, inputs, sorted(u for u in order if peer_name(u) != leaf))
