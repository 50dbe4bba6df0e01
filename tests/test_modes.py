"""The paillier and hybrid modes, in memory: whole rounds in the simulator, and the
protocol objects driven by hand where a test needs to forge or inspect a frame.

The hybrid mode runs the masking protocol with encrypted tree payloads, so it must
match the masking oracle of ``test_sim`` under every dropout schedule. The paillier
mode has no R1, R3 or R4: a peer contributes iff it registered and lived through
the tree phase, and the round aborts iff fewer than t contributions reach the root.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_sim import (
    Case,
    cases,
    check_complete_oracle,
    check_soundness,
    effectively_complete,
    quantizer_bound,
    u3_of,
)

from secagg.crypto.aead import open_sealed, seal
from secagg.errors import WireError
from secagg.graph import session_graph_seed
from secagg.paillier import PaillierKeyPair, decrypt_vector, generate_keypair, public_key_bytes
from secagg.protocol import (
    MessageReceived,
    PeerGone,
    PeerProtocol,
    RoundFinished,
    Send,
    ServerConfig,
    TimerExpired,
)
from secagg.protocol.common import PARTIAL_SUM, associated, round_limits, slot_layout
from secagg.protocol.errors import DropReason
from secagg.protocol.events import Disconnect, FrameReceived
from secagg.protocol.modes import round_mode
from secagg.protocol.payload import CiphertextPayloads, decode_partial
from secagg.protocol.peer.context import RoundContext
from secagg.protocol.peer.relay import Relay
from secagg.protocol.peer.tree import TreePhase
from secagg.protocol.server import ServerProtocol
from secagg.sim import Network, SimResult, peer_name, run_round
from secagg.wire import (
    SERVER,
    SESSION_BYTES,
    EncryptedPartialSum,
    EncryptedShares,
    Envelope,
    PartialSum,
    PeerDropped,
    PeerEntry,
    RootAggregate,
    Roster,
    ShareReport,
    UnmaskShares,
    decode,
    encode,
    encode_record,
)

# One key pair for the whole module (hypothesis examples included): keygen is not cheap.
_KEYS: list[PaillierKeyPair] = []


@pytest.fixture
def keys() -> PaillierKeyPair:
    return module_keys()


def module_keys() -> PaillierKeyPair:
    if not _KEYS:
        _KEYS.append(generate_keypair(2048))
    return _KEYS[0]


def run_case(case: Case, mode: str) -> SimResult:
    return run_round(case.inputs(), case.t, case.dropouts, graph=case.graph,  # type: ignore[arg-type]
                     seed=case.seed, fan_in=case.fan_in, threat_model=case.threat_model,
                     mode=mode, paillier_keys=module_keys())  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# Hybrid: the masking oracle, unchanged


@settings(max_examples=25, deadline=None)
@given(cases(max_n=25))
def test_hybrid_rounds_match_the_masking_oracle(case: Case) -> None:
    result = run_case(case, "hybrid")
    check_soundness(case, result)
    if effectively_complete(case, result):
        check_complete_oracle(case, result)


# --------------------------------------------------------------------------
# Paillier: its own, simpler oracle

NEVER_CONTRIBUTE_PAILLIER = frozenset({"advertise_keys", "share_keys", "masked_input", "relay"})


def check_paillier_round(case: Case, result: SimResult) -> None:
    n, t = case.n, case.t
    # A server in paillier mode holds no shares and asks for none.
    assert result.server_view.revealed_secrets() == {}
    assert not any(isinstance(env.body, UnmaskShares) for env in result.server_view.messages)
    # The one aggregate it receives is encrypted: Paillier ciphertexts, never a ring vector.
    ciphertext_bytes = 2 * module_keys().key_bits // 8
    assert all(len(env.body.payload) % ciphertext_bytes == 0
               for env in result.server_view.messages if isinstance(env.body, RootAggregate))
    for members in result.server_view.vectors():
        assert len(members) >= t, f"ciphertexts of {len(members)} < t contributors released"
    registered = n - sum(1 for ph in case.dropouts.values() if ph == "advertise_keys")
    if registered < t:
        assert result.status == "aborted" and "registered" in result.reason
        return
    u3 = u3_of(result)
    if u3 is None or len(u3) < t:
        assert result.status == "aborted", result.stats
        assert "no aggregate" in result.reason or "masked inputs" in result.reason, \
            result.reason
        assert result.aggregate is None
        return
    assert result.status == "ok", (result.reason, result.stats)
    never = {p for p, ph in case.dropouts.items() if ph in NEVER_CONTRIBUTE_PAILLIER}
    assert not set(result.contributors) & never
    # Deaths in R3/R4 phases cannot happen: those phases do not exist here.
    late = {p for p, ph in case.dropouts.items() if ph in ("consistency_check", "unmasking")}
    assert result.stats["u3"] == len(result.contributors) == len(u3)
    assert set(result.contributors) == u3
    assert result.aggregate is not None
    error = np.abs(result.aggregate - case.inputs()[result.contributors].sum(axis=0))
    assert error.max() < quantizer_bound(n, case.d)
    if case.graph == "complete" and not {p for p, ph in case.dropouts.items()
                                          if ph == "relay"}:
        # Without a dying relay nobody alive is lost, and the late "deaths" contribute.
        alive = set(range(n)) - never
        assert set(result.contributors) == alive
        assert late <= alive


@settings(max_examples=25, deadline=None)
@given(cases(max_n=25, graphs=("complete",)))
def test_paillier_rounds_are_exact_or_abort_below_threshold(case: Case) -> None:
    check_paillier_round(case, run_case(case, "paillier"))


# --------------------------------------------------------------------------
# Examples


@pytest.mark.parametrize("mode", ["paillier", "hybrid"])
def test_round_without_dropouts_is_exact(mode: str, keys: PaillierKeyPair) -> None:
    inputs = np.random.default_rng(1).uniform(-1, 1, size=(12, 50))
    result = run_round(inputs, 7, mode=mode, paillier_keys=keys)  # type: ignore[arg-type]
    assert result.status == "ok", result.reason
    assert result.contributors == list(range(12))
    assert result.aggregate is not None
    assert np.abs(result.aggregate - inputs.sum(axis=0)).max() < quantizer_bound(12, 50)
    assert result.stats["decrypt_seconds"] > 0


def test_modes_agree_on_the_quantized_sum(keys: PaillierKeyPair) -> None:
    # Inputs on the quantization grid round deterministically, so every mode must
    # produce the very same aggregate, bit for bit.
    scale = 2.0 ** 20
    inputs = np.random.default_rng(2).integers(-2**18, 2**18, size=(9, 30)) / scale
    results = {mode: run_round(inputs, 5, {3: "masked_input", 7: "unmasking"}, scale=scale,
                               mode=mode, paillier_keys=keys)  # type: ignore[arg-type]
               for mode in ("masking", "paillier", "hybrid")}
    expected = inputs.sum(axis=0)
    for mode, result in results.items():
        assert result.status == "ok", (mode, result.reason)
        assert result.aggregate is not None
        contributors = result.contributors
        np.testing.assert_array_equal(result.aggregate, inputs[contributors].sum(axis=0))
    # Peer 7's death in R4 matters to masking and hybrid only: paillier has no R4.
    assert 7 in results["paillier"].contributors
    np.testing.assert_array_equal(results["paillier"].aggregate,
                                  expected - inputs[3])


def test_hybrid_on_the_sparse_graph(keys: PaillierKeyPair) -> None:
    # Under active the graph assumes a 5 % corrupt fraction and is sparse only from about
    # n = 200 (test_sim.py::test_active_sparse_round_at_n_200_is_sound covers that).
    inputs = np.random.default_rng(3).uniform(-1, 1, size=(60, 8))
    result = run_round(inputs, 31, {5: "share_keys", 9: "masked_input", 11: "unmasking"},
                       graph="sparse", mode="hybrid",
                       paillier_keys=keys)
    assert result.status == "ok", result.reason
    assert result.stats["degree"] < 59  # really sparse
    assert result.aggregate is not None
    error = np.abs(result.aggregate - inputs[result.contributors].sum(axis=0))
    assert error.max() < quantizer_bound(60, 8)


def test_weighted_paillier_round(keys: PaillierKeyPair) -> None:
    inputs = np.random.default_rng(4).uniform(-1, 1, size=(8, 5))
    weights = np.arange(1, 9, dtype=np.float64)
    result = run_round(inputs, 5, weights=weights, mode="paillier", paillier_keys=keys)
    assert result.status == "ok", result.reason
    expected = (weights[:, None] * inputs).sum(axis=0) / weights.sum()
    assert result.mean is not None
    assert np.abs(result.mean - expected).max() < 1e-6
    assert result.total_weight == pytest.approx(weights.sum(), rel=1e-6)


def test_3072_bit_key_and_64_bit_ring() -> None:
    inputs = np.random.default_rng(5).uniform(-1, 1, size=(5, 40))
    result = run_round(inputs, 3, {1: "relay"}, mode="hybrid", modulus_bits=64,
                       paillier_key_bits=3072)
    assert result.status == "ok", result.reason
    assert result.aggregate is not None
    error = np.abs(result.aggregate - inputs[result.contributors].sum(axis=0))
    assert error.max() < quantizer_bound(5, 40, modulus_bits=64)


def test_paillier_mode_rejects_the_sparse_graph() -> None:
    with pytest.raises(ValueError, match="no neighbour graph"):
        ServerConfig(session=bytes(SESSION_BYTES), round=0, max_peers=10, threshold=6, dim=3,
                     graph="sparse", mode="paillier")
    with pytest.raises(ValueError, match="mode must be one of"):
        ServerConfig(session=bytes(SESSION_BYTES), round=0, max_peers=10, threshold=6, dim=3,
                     mode="plaintext")  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# What each mode protects against: a server colluding with one relay


def _context(peer: PeerProtocol) -> RoundContext:
    context = peer.phase.context
    assert context is not None, "the peer has no roster yet"
    return context


def _relay(peer: PeerProtocol) -> Relay:
    phase = peer.phase
    assert isinstance(phase, TreePhase), f"{peer.name} is not in the tree phase"
    return phase.relay


class _Tap(Network):
    """A network that records every partial sum sent up the tree and can replace the
    payload one chosen peer sends (a peer that holds valid channel keys but lies)."""

    def __init__(self, *args: Any, forger: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.partial_sums: list[tuple[str, Send]] = []
        self.forger = forger

    def _send(self, sender: str, action: Send) -> None:
        if action.envelope.type == EncryptedPartialSum.TYPE:
            if self.forger == "first leaf" and not _relay(self.peers[sender]).expected:
                self.forger = sender
            if sender == self.forger:
                action = self._forge(sender, action)
            self.partial_sums.append((sender, action))
        super()._send(sender, action)

    def _forge(self, sender: str, action: Send) -> Send:
        peer = self.peers[sender]
        context = _context(peer)
        target = context.index_of[action.recipient]
        # Values >= n^2 are not ciphertexts: the relay must refuse the frame.
        codec = context.codec
        assert isinstance(codec, CiphertextPayloads)
        forged = encode_record(PartialSum(payload=b"\xff" * codec.byte_length,
                                          contributors=[peer.index]))
        sealed = seal(context.channel_key(target), forged,
                      associated(peer.session, peer.round, PARTIAL_SUM, peer.index, target))
        return replace(action, envelope=replace(action.envelope,
                                                body=EncryptedPartialSum(ciphertext=sealed)))


def _run_tapped(mode: str, keys: PaillierKeyPair, inputs: np.ndarray, *, scale: float,
                forger: str = "") -> tuple[_Tap, ServerProtocol]:
    n, d = inputs.shape
    session = bytes(range(SESSION_BYTES))
    config = ServerConfig(session=session, round=0, max_peers=n, threshold=n // 2 + 1, dim=d,
                          scale=scale, fan_in=2, mode=mode,  # type: ignore[arg-type]
                          phase_timeout=5.0)
    server = ServerProtocol(config, paillier_keys=keys)
    peers = {peer_name(i): PeerProtocol(peer_name(i)) for i in range(n)}
    network = _Tap(server, peers, {}, encode_frames=True, forger=forger)
    network.apply(SERVER, server.start())
    for i, name in enumerate(peers):
        network.apply(name, peers[name].start(session, 0, inputs[i]))
    network.run()
    return network, server


@pytest.mark.parametrize("mode", ["paillier", "hybrid"])
def test_server_colluding_with_a_relay(mode: str, keys: PaillierKeyPair) -> None:
    """The colluding relay opens what its children sent it (it holds the channel keys)
    and hands the payloads to the server, which decrypts them. In paillier mode that
    exposes a leaf's input (the documented weakness); in hybrid mode it is masked."""
    scale = 2.0 ** 20
    inputs = np.round(np.random.default_rng(6).uniform(-1, 1, size=(9, 4)) * scale) / scale
    network, server = _run_tapped(mode, keys, inputs, scale=scale)
    assert server.outcome is not None and server.outcome.status == "ok"
    leaves = 0
    for sender_name, action in network.partial_sums:
        sender, relay = network.peers[sender_name], network.peers[action.recipient]
        plaintext = open_sealed(_context(relay).channel_key(sender.index),
                                action.envelope.body.ciphertext,  # type: ignore[attr-defined]
                                associated(sender.session, 0, PARTIAL_SUM, sender.index,
                                           relay.index))
        codec = _context(relay).codec
        assert isinstance(codec, CiphertextPayloads)
        partial = decode_partial(codec, plaintext, relay.limits())
        if partial.contributors != (sender.index,):
            continue  # a relay's sum: the leaves are what matters here
        leaves += 1
        ring = decrypt_vector(keys.private, partial.payload, codec.layout, 4, np.uint32)
        seen = server.encoder.quantizer.decode(ring)
        if mode == "paillier":
            np.testing.assert_array_equal(seen, inputs[sender.index])
        else:
            assert not np.allclose(seen, inputs[sender.index], atol=1e-3)
    assert leaves > 0


@pytest.mark.parametrize("mode", ["paillier", "hybrid"])
def test_forged_ciphertexts_are_rejected_and_the_round_finishes(
        mode: str, keys: PaillierKeyPair) -> None:
    """A peer with valid channel keys sends values that are not ciphertexts: its relay
    refuses the frame with a logged reason, and the round ends with the exact sum of
    the others."""
    scale = 2.0 ** 20
    inputs = np.round(np.random.default_rng(8).uniform(-1, 1, size=(9, 4)) * scale) / scale
    network, server = _run_tapped(mode, keys, inputs, scale=scale, forger="first leaf")
    forger = network.forger
    assert any(forger in r and "ciphertext" in r.lower() for r in network.rejections), \
        network.rejections
    outcome = server.outcome
    assert outcome is not None and outcome.status == "ok", outcome
    assert forger not in outcome.contributors
    contributors = [int(name.split("-")[1]) for name in outcome.contributors]
    assert outcome.aggregate is not None
    np.testing.assert_array_equal(outcome.aggregate, inputs[contributors].sum(axis=0))


# --------------------------------------------------------------------------
# Bad input


def _roster_for(peer: PeerProtocol, session: bytes, mode: str, key: bytes, *,
                full: bool = False) -> Envelope:
    """A roster of 3 for ``peer`` (index 0): its own entry, or with ``full`` every
    entry of the complete graph (what a round with masks lists)."""
    started = peer.start(session, 0, np.zeros(3))
    keys = started[0]
    assert isinstance(keys, Send)
    body = keys.envelope.body
    entry = PeerEntry(index=0, name=peer.name, address="", channel_key=body.channel_key,  # type: ignore[attr-defined]
                      mask_key=body.mask_key)  # type: ignore[attr-defined]
    entries = [entry]
    if full:
        others = [PeerProtocol(f"peer-{c}").start(session, 0, np.zeros(3))[0] for c in "bc"]
        entries += [PeerEntry(index=i, name=f"peer-{c}", address="",
                              channel_key=s.envelope.body.channel_key,  # type: ignore[union-attr]
                              mask_key=s.envelope.body.mask_key)  # type: ignore[union-attr]
                    for i, (c, s) in enumerate(zip("bc", others, strict=True), start=1)]
    return Envelope(session=session, round=0, sender="server", body=Roster(
        # Three input coordinates and the clipped counter.
        your_index=0, size=3, threshold=2, dim=4, modulus_bits=32, clip=1.0, scale=1024.0,
        weighted=False, max_weight=1.0, threat_model="honest-but-curious",
        graph_kind="complete", graph_seed=session_graph_seed(session), degree=2,
        share_threshold=2, fan_in=8,
        phase_timeout=5.0, neighbours=entries, mode=mode, paillier_key=key, input_dim=3))


def test_peer_requiring_hybrid_refuses_a_paillier_round(keys: PaillierKeyPair) -> None:
    peer = PeerProtocol("peer-a", mode="hybrid")
    session = bytes(SESSION_BYTES)
    actions = peer.handle(MessageReceived(_roster_for(peer, session, "paillier",
                                                      public_key_bytes(keys.public))))
    assert peer.finished and peer.outcome is not None
    assert peer.outcome.status == "aborted"
    assert "only in hybrid mode" in peer.outcome.reason
    assert any(isinstance(a, RoundFinished) for a in actions)


def test_peer_takes_part_in_a_paillier_round_without_sharing(keys: PaillierKeyPair) -> None:
    peer = PeerProtocol("peer-a")
    session = bytes(SESSION_BYTES)
    actions = peer.handle(MessageReceived(_roster_for(peer, session, "paillier",
                                                      public_key_bytes(keys.public))))
    assert peer.mode == "paillier" and not peer.finished
    assert not any(isinstance(a, Send) and isinstance(a.envelope.body, EncryptedShares)
                   for a in actions)


@pytest.mark.parametrize("key", [b"", b"\x01" * 256, b"\xff" * 100])
def test_peer_aborts_on_an_unusable_paillier_key(key: bytes) -> None:
    peer = PeerProtocol("peer-a")
    peer.handle(MessageReceived(_roster_for(peer, bytes(SESSION_BYTES), "paillier", key)))
    assert peer.finished and peer.outcome is not None
    assert "Paillier" in peer.outcome.reason


def _server_fault(actions: list[Any]) -> Disconnect:
    """The one Disconnect a peer answers a bad server frame with (it also aborts)."""
    disconnects = [a for a in actions if isinstance(a, Disconnect)]
    assert len(disconnects) == 1 and disconnects[0].name == SERVER, actions
    assert any(isinstance(a, RoundFinished) for a in actions)
    return disconnects[0]


def test_masking_roster_with_a_paillier_key_is_refused(keys: PaillierKeyPair) -> None:
    peer = PeerProtocol("peer-a")
    roster = _roster_for(peer, bytes(SESSION_BYTES), "masking", public_key_bytes(keys.public),
                         full=True)
    actions = peer.handle(MessageReceived(roster))
    fault = _server_fault(actions)
    assert fault.reason is DropReason.BAD_MESSAGE and "Paillier key" in fault.detail
    assert not any(isinstance(a, Send) for a in actions)  # no share left the peer
    assert peer.outcome is not None and peer.outcome.status == "aborted"
    assert "Paillier key" in peer.outcome.reason


def test_unknown_mode_in_a_roster_is_a_protocol_error(keys: PaillierKeyPair) -> None:
    peer = PeerProtocol("peer-a")
    actions = peer.handle(MessageReceived(_roster_for(peer, bytes(SESSION_BYTES), "rot13",
                                                      b"")))
    fault = _server_fault(actions)
    assert fault.reason is DropReason.BAD_MESSAGE and "unknown mode" in fault.detail
    assert peer.outcome is not None and peer.outcome.status == "aborted"
    assert "unknown mode" in peer.outcome.reason


def _server_in_masking(mode: str, keys: PaillierKeyPair) -> tuple[ServerProtocol, str]:
    """A server of 3 peers in R2 (everyone shared keys), and the name of the tree root."""
    session = bytes(SESSION_BYTES)
    config = ServerConfig(session=session, round=0, max_peers=3, threshold=2, dim=3,
                          mode=mode)  # type: ignore[arg-type]
    server = ServerProtocol(config, paillier_keys=keys)
    server.start()
    for peer in [PeerProtocol(f"p{i}") for i in range(3)]:
        for action in peer.start(session, 0, np.zeros(3)):
            assert isinstance(action, Send)
            server.handle(MessageReceived(action.envelope))
    for name in list(server.names) if round_mode(mode).shares_keys else []:
        server.handle(MessageReceived(Envelope(session=session, round=0, sender=name,
                                               body=ShareReport(missing_from=[]))))
    assert server.state == "masking" and server.root >= 0
    return server, server.names[server.root]


def test_server_refuses_an_aggregate_of_the_wrong_kind(keys: PaillierKeyPair) -> None:
    """A plaintext vector in a paillier round, and ciphertexts in a masking round, are
    dropped as bad messages; the round goes on (and here aborts cleanly)."""
    vector = np.zeros(3, np.uint32).tobytes()
    for mode, payload in (("paillier", vector), ("masking", b"\x01" * 512)):
        server, root = _server_in_masking(mode, keys)
        env = Envelope(session=bytes(SESSION_BYTES), round=0, sender=root,
                       body=RootAggregate(payload=payload, contributors=[0, 1, 2]))
        # The wire limits refuse a payload of the wrong size before anything else ...
        actions = server.handle(FrameReceived(root, encode(env)))
        (cut,) = [a for a in actions if isinstance(a, Disconnect)]
        assert (cut.name, cut.reason) == (root, DropReason.MALFORMED_MESSAGE)
        assert "payload" in cut.detail and server.state == "masking"
        assert server.dropped == {root: DropReason.MALFORMED_MESSAGE}
        # ... and the payload codec does, for a driver that decoded without them.
        server, root = _server_in_masking(mode, keys)
        actions = server.handle(MessageReceived(replace(env, sender=root)))
        (cut,) = [a for a in actions if isinstance(a, Disconnect)]
        assert (cut.name, cut.reason) == (root, DropReason.MALFORMED_MESSAGE)
        assert server.state == "masking" and server.u3 == frozenset()
        actions = server.handle(TimerExpired("phase"))
        outcome = server.outcome
        assert outcome is not None and outcome.status == "aborted"
        assert outcome.dropped[root] == "malformed_message"
        assert any(isinstance(a, RoundFinished) for a in actions)


def test_payload_block_of_the_wrong_size_is_a_wire_error() -> None:
    layout = slot_layout(key_bits=2048, modulus_bits=32, peers=10)
    payload_bytes = layout.ciphertext_count(100) * layout.ciphertext_bytes
    limits = round_limits(peers=10, dim=100, modulus_bits=32, payload_bytes=payload_bytes)
    assert limits.payload_bytes == layout.ciphertext_count(100) * 512
    env = Envelope(session=bytes(SESSION_BYTES), round=0, sender="p0",
                   body=RootAggregate(payload=b"\x01" * (payload_bytes - 1), contributors=[0]))
    with pytest.raises(WireError, match="payload"):
        decode(encode(env), limits)
    good = replace(env, body=RootAggregate(payload=b"\x01" * payload_bytes, contributors=[0]))
    assert decode(encode(good), limits).body == good.body


@settings(max_examples=5, deadline=None)
@given(st.integers(0, 2**16))
def test_same_seed_same_paillier_round(seed: int) -> None:
    inputs = np.random.default_rng(seed).uniform(-1, 1, size=(6, 3))
    keys = module_keys()
    first = run_round(inputs, 4, {2: "relay"}, seed=seed, mode="paillier", paillier_keys=keys)
    second = run_round(inputs, 4, {2: "relay"}, seed=seed, mode="paillier", paillier_keys=keys)
    assert first.status == second.status
    assert first.contributors == second.contributors
    if first.aggregate is not None:
        np.testing.assert_array_equal(first.aggregate, second.aggregate)
    assert first.stats["server_bytes_in"] == second.stats["server_bytes_in"]


def test_slots_follow_the_roster_when_fewer_peers_register(keys: PaillierKeyPair) -> None:
    """129 expected peers need 48-bit slots, 128 fit in 40: when registration closes on
    its deadline with 128, server and peers must agree on the narrower layout."""
    session = bytes(SESSION_BYTES)
    config = ServerConfig(session=session, round=0, max_peers=129, threshold=65, dim=100,
                          mode="hybrid")
    server = ServerProtocol(config, paillier_keys=keys)
    assert server.slot_layout is not None and server.slot_layout.slot_bits == 48
    server.start()
    for i in range(128):
        for action in PeerProtocol(f"p{i:03d}").start(session, 0, np.zeros(100)):
            assert isinstance(action, Send)
            server.handle(MessageReceived(action.envelope))
    actions = server.handle(TimerExpired("phase"))
    rosters = [a.envelope.body for a in actions
               if isinstance(a, Send) and isinstance(a.envelope.body, Roster)]
    assert len(rosters) == 128 and rosters[0].size == 128
    peer_layout = slot_layout(key_bits=2048, modulus_bits=32, peers=rosters[0].size)
    assert server.slot_layout == peer_layout and peer_layout.slot_bits == 40
    assert server.limits().payload_bytes == peer_layout.ciphertext_count(100) * 512


@pytest.mark.parametrize("mode", ["paillier", "hybrid"])
@pytest.mark.parametrize("child_first", [True, False])
def test_death_notices_reach_whoever_waits_in_place_of_a_dead_relay(
        mode: str, child_first: bool, keys: PaillierKeyPair) -> None:
    """A relay C and its parent P both die: P's parent G must hear of both, in either
    order, or it waits for C's sum until its deadline (tree relatives need not share a
    connection that would tell them)."""
    session = bytes(SESSION_BYTES)
    n = 15
    config = ServerConfig(session=session, round=0, max_peers=n, threshold=8, dim=2,
                          fan_in=2, mode=mode)  # type: ignore[arg-type]
    server = ServerProtocol(config, paillier_keys=keys)
    server.start()
    peers = [PeerProtocol(f"p{i:02d}") for i in range(n)]
    for peer in peers:
        for action in peer.start(session, 0, np.zeros(2)):
            assert isinstance(action, Send)
            server.handle(MessageReceived(action.envelope))
    if mode == "hybrid":  # everyone reports full shares: on to the tree
        for peer in peers:
            server.handle(MessageReceived(Envelope(
                session=session, round=0, sender=peer.name,
                body=ShareReport(missing_from=[]))))
    tree = server.tree
    assert tree is not None
    child = next(u for u in range(n) if len(tree.ancestors(u)) >= 2 and tree.children(u))
    parent, grandparent = tree.ancestors(child)[:2]
    order = [child, parent] if child_first else [parent, child]
    notices: list[tuple[str, int]] = []
    for dead in order:
        for action in server.handle(PeerGone(server.names[dead])):
            if isinstance(action, Send) and isinstance(action.envelope.body, PeerDropped):
                notices.append((action.recipient, action.envelope.body.peer))
    told_grandparent = {peer for name, peer in notices if name == server.names[grandparent]}
    assert told_grandparent == {child, parent}, notices
