"""A malicious server against peers that insist on the active threat model.

A peer that holds an identity key or pins other peers' identities has asked for
the active model; the server must not be able to talk it down to
honest-but-curious (where nobody checks signatures), nor slip a peer of its own
making into a roster of pinned peers. Each attack below is a server deviating
from the protocol in the in-memory network of ``helpers_protocol``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from helpers_protocol import ROUND, SESSION, Net, assert_sum, make_round

from peers.peer import Peer
from secagg.crypto.signing import SigningKey, generate_signing_key
from secagg.protocol import Disconnect, PeerProtocol
from secagg.protocol.errors import DropReason
from secagg.sim import DeterministicRandom, peer_name
from secagg.wire import SERVER

N = 5
T = 4  # 3t > 2n: a valid threshold under both threat models
DIM = 3

PeerOptions = Callable[[str, dict[str, SigningKey]], dict[str, Any]]


def identities_of(names: list[str], seed: int) -> dict[str, SigningKey]:
    return {name: generate_signing_key(DeterministicRandom(seed, f"id/{name}"))
            for name in names}


def pins_of(identities: dict[str, SigningKey]) -> dict[str, bytes]:
    return {name: key.public_bytes for name, key in identities.items()}


def round_with_peers(server_threat_model: str, seed: int, options: PeerOptions,
                     names: list[str] | None = None) -> tuple[Net, np.ndarray]:
    """A server running ``server_threat_model`` and peers built with ``options(name,
    identities)`` (identities: every peer's signing key), all started."""
    names = names if names is not None else [peer_name(i) for i in range(N)]
    net, _, _ = make_round(len(names), T, dim=DIM, seed=seed,
                           threat_model=server_threat_model, start_peers=False)
    identities = identities_of(names, seed)
    net.peers = {name: PeerProtocol(name, address=f"ws://127.0.0.1:{9000 + i}",
                                    random_bytes=DeterministicRandom(seed, name),
                                    **options(name, identities))
                 for i, name in enumerate(names)}
    inputs = np.random.default_rng(seed).uniform(-1.0, 1.0, size=(len(names), DIM))
    for i, name in enumerate(names):
        net.apply(name, net.peers[name].start(SESSION, ROUND, inputs[i]))
    return net, inputs


def end_server_round(net: Net) -> None:
    """Fire the server's deadlines until its round ends (the peers that left are not
    coming back)."""
    for _ in range(20):
        if net.server.outcome is not None:
            return
        pending = sorted(net.timers.get(SERVER, {}))
        assert pending, "the server waits without a deadline"
        net.fire(SERVER, pending[0])
        net.run()
    raise AssertionError("the server's round did not end")


def sent_by_peers(net: Net, type_name: str) -> list[str]:
    return [sender for sender, _, env in net.sent if sender != SERVER and env.type == type_name]


def server_disconnects(net: Net) -> list[DropReason]:
    return [action.reason for action in net.disconnects
            if isinstance(action, Disconnect) and action.name == SERVER]


# ------------------------------------------------- (a) downgrade to honest-but-curious


INSISTING: dict[str, PeerOptions] = {
    # Holding an identity key is asking for the active model.
    "identity": lambda name, ids: {"identity": ids[name]},
    # So is pinning the other peers' identities.
    "pinned": lambda name, ids: {"identity": ids[name], "trusted_identities": pins_of(ids)},
    "explicit": lambda name, ids: {"identity": ids[name], "threat_model": "active"},
}


@pytest.mark.parametrize("how", sorted(INSISTING))
def test_roster_downgraded_to_honest_but_curious_is_refused(how: str) -> None:
    net, _ = round_with_peers("honest-but-curious", seed=70, options=INSISTING[how])
    net.run()
    for name, peer in net.peers.items():
        outcome = peer.outcome
        assert peer.finished and outcome is not None, name
        assert outcome.status == "aborted", (name, outcome)
        assert "honest-but-curious" in outcome.reason and "active" in outcome.reason, outcome
    # Refused at the roster: not one share left any peer.
    assert sent_by_peers(net, "encrypted_shares") == []
    end_server_round(net)
    assert net.server.outcome is not None and net.server.outcome.status == "aborted"


def test_peer_that_asked_for_honest_but_curious_takes_part() -> None:
    # The insistence is this peer's choice: one that says honest-but-curious (or has
    # no identity) still follows such a round, and the sum is exact.
    net, inputs = round_with_peers(
        "honest-but-curious", seed=71,
        options=lambda name, ids: {"identity": ids[name],
                                   "threat_model": "honest-but-curious"})
    net.run()
    assert net.errors == []
    assert_sum(net, inputs, list(range(N)))


# ------------------------------------------------- (b) a fake peer among pinned ones


def test_self_signed_unknown_peer_in_a_pinned_roster_is_refused() -> None:
    # The server registers a sybil of its own ("mallory", a real protocol peer with a
    # fresh identity key that signs its own keys perfectly well). The honest peers pin
    # each other only.
    honest = [peer_name(i) for i in range(N - 1)]
    honest_ids = identities_of(honest, 72)

    def options(name: str, ids: dict[str, SigningKey]) -> dict[str, Any]:
        if name == "mallory":
            return {"identity": ids[name]}
        return {"identity": honest_ids[name], "trusted_identities": pins_of(honest_ids)}

    net, _ = round_with_peers("active", seed=72, options=options, names=[*honest, "mallory"])
    net.run()
    for name in honest:
        outcome = net.peers[name].outcome
        assert outcome is not None and outcome.status == "aborted", (name, outcome)
        assert "'mallory'" in outcome.reason and "trusted" in outcome.reason, outcome
    assert server_disconnects(net) == [DropReason.INVALID_KEYS] * len(honest)
    assert [sender for sender in sent_by_peers(net, "encrypted_shares")
            if sender != "mallory"] == []


def test_pin_list_is_closed_under_honest_but_curious_too() -> None:
    # A peer that pins identities but explicitly accepts honest-but-curious rounds
    # still refuses a roster with a peer outside its list.
    honest = [peer_name(i) for i in range(N - 1)]
    honest_ids = identities_of(honest, 73)

    def options(name: str, ids: dict[str, SigningKey]) -> dict[str, Any]:
        if name == "mallory":
            return {"identity": ids[name], "threat_model": "honest-but-curious"}
        return {"identity": honest_ids[name], "trusted_identities": pins_of(honest_ids),
                "threat_model": "honest-but-curious"}

    net, _ = round_with_peers("honest-but-curious", seed=73, options=options,
                              names=[*honest, "mallory"])
    net.run()
    for name in honest:
        outcome = net.peers[name].outcome
        assert outcome is not None and outcome.status == "aborted", (name, outcome)
        assert "'mallory'" in outcome.reason, outcome
    assert server_disconnects(net) == [DropReason.INVALID_KEYS] * len(honest)


def test_pinned_active_round_without_strangers_gives_exact_sum() -> None:
    net, inputs, _ = make_round(N, T, dim=DIM, seed=74, threat_model="active",
                                pin_identities=True)
    net.run()
    assert net.errors == []
    assert_sum(net, inputs, list(range(N)))


# ------------------------------------------------- (c) unmasking without signatures


def test_unmask_request_without_signatures_gets_no_shares() -> None:
    # The server skips the consistency check (announcing honest-but-curious) and asks
    # peers that hold identity keys to unmask on its word alone, with no signature
    # of U3. No peer may reveal a single share.
    net, _ = round_with_peers("honest-but-curious", seed=75,
                              options=INSISTING["identity"])
    net.run()
    end_server_round(net)
    unmask_requests = [env for sender, _, env in net.sent
                       if sender == SERVER and env.type == "unmask_request"]
    assert all(not env.body.signatures for env in unmask_requests)  # type: ignore[attr-defined]
    assert sent_by_peers(net, "unmask_shares") == []
    assert sent_by_peers(net, "consistency_signature") == []
    outcome = net.server.outcome
    assert outcome is not None and outcome.status == "aborted", outcome
    for name, peer in net.peers.items():
        assert peer.outcome is not None and peer.outcome.status == "aborted", name


def test_peer_cannot_be_constructed_with_an_unknown_threat_model() -> None:
    with pytest.raises(ValueError, match="threat_model"):
        PeerProtocol("p000", threat_model="paranoid")  # type: ignore[arg-type]


def test_pins_without_own_identity_are_a_local_error() -> None:
    ids = identities_of(["p000", "p001"], 76)
    with pytest.raises(ValueError, match="identity"):
        PeerProtocol("p000", trusted_identities=pins_of(ids))
    # Pinning this peer under another key than its own is a configuration error too.
    with pytest.raises(ValueError, match="p000"):
        PeerProtocol("p000", identity=ids["p001"], trusted_identities=pins_of(ids))


def test_websocket_peer_resolves_and_checks_its_threat_model_when_built() -> None:
    ids = identities_of(["p000", "p001"], 77)
    url = "ws://127.0.0.1:9"  # never contacted: nothing here starts the peer
    assert Peer(url, "p000").threat_model is None
    assert Peer(url, "p000", identity=ids["p000"]).threat_model == "active"
    assert Peer(url, "p000", identity=ids["p000"],
                threat_model="honest-but-curious").threat_model == "honest-but-curious"
    with pytest.raises(ValueError, match="identity"):
        Peer(url, "p000", trusted_identities=pins_of(ids))
    with pytest.raises(ValueError, match="threat_model"):
        Peer(url, "p000", threat_model="paranoid")  # type: ignore[arg-type]
