"""Snapshot and restore of a peer's round (record and replay): a peer rebuilt from
bytes after every message behaves exactly as one that never stopped."""

from __future__ import annotations

import hashlib

import msgpack
import numpy as np
import pytest
from helpers_protocol import ROUND, SESSION, Net, assert_sum, is_type, make_round

from secagg import wire
from secagg.crypto.signing import generate_signing_key
from secagg.protocol import Action, Event, PeerGone, PeerState
from secagg.protocol.peer.snapshot import RecordedPeer, SeededRandom, SnapshotError
from secagg.sim import DeterministicRandom, peer_name
from secagg.wire import SERVER


def _seed(seed: int, name: str) -> bytes:
    return hashlib.sha256(f"snapshot-test/{seed}/{name}".encode()).digest()


class RebuiltEveryEvent:
    """Stands in for a peer in the in-memory Net: after every event the live peer is
    thrown away and rebuilt from its snapshot, as a fresh process would."""

    def __init__(self, peer: RecordedPeer) -> None:
        self.peer = peer
        self.restores = 0

    def start(self, session: bytes, round: int, vector: np.ndarray,
              weight: float = 1.0) -> list[Action]:
        actions = self.peer.start(session, round, vector, weight)
        self._rebuild()
        return actions

    def handle(self, event: Event) -> list[Action]:
        actions = self.peer.handle(event)
        self._rebuild()
        return actions

    def _rebuild(self) -> None:
        self.peer = RecordedPeer.restore(self.peer.snapshot())
        self.restores += 1

    def __getattr__(self, name: str) -> object:
        return getattr(self.peer.protocol, name)


def _round(n: int, threshold: int, *, rebuilt: bool, seed: int = 5, dim: int = 7,
           fan_in: int = 2) -> tuple[Net, np.ndarray]:
    net, inputs, _ = make_round(n, threshold, dim=dim, seed=seed, fan_in=fan_in,
                                start_peers=False)
    for i, name in enumerate(sorted(net.peers)):
        recorded = RecordedPeer(name, address=f"ws://127.0.0.1:{9000 + i}",
                                seed=_seed(seed, name))
        party = RebuiltEveryEvent(recorded) if rebuilt else recorded.protocol
        net.peers[name] = party  # type: ignore[assignment]
        net.apply(name, party.start(SESSION, ROUND, inputs[i]))
    return net, inputs


def _wire_log(net: Net) -> list[tuple[str, str, bytes]]:
    return [(sender, recipient, wire.encode(env)) for sender, recipient, env in net.sent]


def test_a_peer_rebuilt_after_every_event_sends_the_same_bytes() -> None:
    plain, inputs = _round(5, 3, rebuilt=False)
    plain.run()
    rebuilt, _ = _round(5, 3, rebuilt=True)
    rebuilt.run()
    assert_sum(rebuilt, inputs, [0, 1, 2, 3, 4])
    assert _wire_log(rebuilt) == _wire_log(plain)
    assert rebuilt.server.outcome is not None and plain.server.outcome is not None
    assert np.array_equal(rebuilt.server.outcome.aggregate,  # type: ignore[arg-type]
                          plain.server.outcome.aggregate)  # type: ignore[arg-type]
    for name, party in rebuilt.peers.items():
        assert party.state is PeerState.FINISHED
        assert party.outcome == plain.peers[name].outcome
        assert party.restores > 3  # type: ignore[union-attr]


def test_a_rebuilt_peer_survives_a_dropout_mid_round_identically() -> None:
    runs = []
    for rebuilt in (False, True):
        net, inputs = _round(6, 4, rebuilt=rebuilt, seed=9)
        # Hold the masked inputs, kill one peer, then let the round finish.
        net.run(hold=is_type("encrypted_partial_sum"))
        net.kill(peer_name(2))
        net.release()
        net.run()
        for party, timers in list(net.timers.items()):
            for name in list(timers):
                if party not in net.dead:
                    net.fire(party, name)
        net.run()
        runs.append(net)
    plain, rebuilt_net = runs
    assert_sum(rebuilt_net, inputs, [0, 1, 3, 4, 5])
    assert _wire_log(rebuilt_net) == _wire_log(plain)
    outcome, expected = rebuilt_net.server.outcome, plain.server.outcome
    assert outcome is not None and expected is not None and outcome.status == "ok"
    assert outcome.contributors == expected.contributors
    assert np.array_equal(outcome.aggregate, expected.aggregate)  # type: ignore[arg-type]
    assert peer_name(2) not in outcome.contributors
    for name, party in rebuilt_net.peers.items():
        assert party.outcome == plain.peers[name].outcome


def test_restore_checks_the_identity_key() -> None:
    identity = generate_signing_key(DeterministicRandom(1, "id"))
    other = generate_signing_key(DeterministicRandom(2, "id"))
    peer = RecordedPeer("peer-00000", identity=identity)
    peer.start(SESSION, ROUND, np.zeros(3))
    data = peer.snapshot()
    assert RecordedPeer.restore(data, identity=identity).protocol.state is PeerState.ADVERTISED
    with pytest.raises(SnapshotError, match="identity"):
        RecordedPeer.restore(data, identity=other)
    with pytest.raises(SnapshotError, match="identity"):
        RecordedPeer.restore(data)


def test_snapshot_round_trips_events_and_finished_state() -> None:
    peer = RecordedPeer("peer-00000")
    peer.start(SESSION, ROUND, np.arange(4.0), weight=2.5)
    peer.handle(PeerGone(SERVER))  # the round ends: aborted
    restored = RecordedPeer.restore(peer.snapshot())
    assert restored.protocol.finished
    assert restored.protocol.outcome == peer.protocol.outcome
    assert restored.events == 1
    assert restored.seed == peer.seed


@pytest.mark.parametrize("data", [
    b"", b"\x00not msgpack", msgpack.packb({"v": 99}), msgpack.packb([1, 2, 3]),
])
def test_unreadable_snapshots_are_refused(data: bytes) -> None:
    with pytest.raises(SnapshotError):
        RecordedPeer.restore(data)


def test_a_corrupt_event_is_refused() -> None:
    peer = RecordedPeer("peer-00000")
    peer.start(SESSION, ROUND, np.zeros(2))
    fields = msgpack.unpackb(peer.snapshot())
    fields["events"] = [[77, "x"]]
    with pytest.raises(SnapshotError, match="unknown event kind"):
        RecordedPeer.restore(msgpack.packb(fields))
    fields["events"] = [[0, 5, b""]]
    with pytest.raises(SnapshotError):
        RecordedPeer.restore(msgpack.packb(fields))


@pytest.mark.parametrize(("vector", "narrow"), [
    (np.arange(5, dtype=np.float32) / 3, True), (np.arange(5) / 3, False)])
def test_the_input_is_kept_exactly_in_the_smallest_float(vector: np.ndarray,
                                                         narrow: bool) -> None:
    peer = RecordedPeer("peer-00000")
    peer.start(SESSION, ROUND, vector)
    data = peer.snapshot()
    assert msgpack.unpackb(data)["f4"] is narrow
    restored = RecordedPeer.restore(data)
    assert restored.snapshot() == data


def test_snapshot_before_start_is_an_error() -> None:
    with pytest.raises(SnapshotError, match="not started"):
        RecordedPeer("peer-00000").snapshot()


def test_seeded_random_is_a_keystream_of_its_seed() -> None:
    seed = bytes(range(32))
    first, second = SeededRandom(seed), SeededRandom(seed)
    assert first(10) + first(22) == second(32)
    assert SeededRandom(bytes(32))(32) != second(32)
    with pytest.raises(ValueError):
        SeededRandom(b"short")
