"""A malicious peer tries to take over the root of the accumulation tree.

Attack (adversarial review, issue "security hardening" item 2): a member of U2 that
is not the root sends ``AncestorsUnreachable`` while the root is alive and connected.
The server used to demote the root on that word alone and name the reporter the new
root. In ``paillier`` mode the reporter then sent one ciphertext (in the real attack,
its child's) while listing t contributors, and the server decrypted and published
that single input as "the sum"; in ``masking`` the same report made an honest round
abort. The server now re-routes or names a new root only for a root it has itself
seen go, and bounds how often a peer may report.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers_protocol import ROUND, SERVER, SESSION, Net, assert_sum, is_type, make_round

from secagg import wire
from secagg.paillier import PaillierKeyPair, generate_keypair
from secagg.protocol import ServerState
from secagg.protocol.errors import DropReason
from secagg.protocol.peer.tree import own_payload
from secagg.protocol.server import PHASE_TIMER
from secagg.protocol.server.collect import MAX_ANCESTOR_REPORTS
from secagg.sim import peer_name
from secagg.wire import Envelope


@pytest.fixture(scope="module")
def keys() -> PaillierKeyPair:
    return generate_keypair(2048)


def _report(net: Net, name: str) -> None:
    """``name`` claims it can reach none of its ancestors."""
    body = wire.AncestorsUnreachable(tried=[])
    env = Envelope(session=SESSION, round=ROUND, sender=name, body=body)
    net.deliver(SERVER, name, env, wire.encode(env))


def _named_roots(net: Net) -> list[str]:
    """Every peer the server told it is the root."""
    return [recipient for sender, recipient, env in net.sent
            if sender == SERVER and isinstance(env.body, wire.NewRoot)
            and env.body.root.name == recipient]


def _finish(net: Net) -> None:
    net.run()
    if net.server.state is ServerState.MASKING:
        net.fire(SERVER, PHASE_TIMER)
        net.run()


def test_one_report_does_not_demote_a_connected_root() -> None:
    # Tree (fan-in 2) over 5 peers: R on top, A and B its children, C and D below A.
    net, inputs, _ = make_round(5, 3, dim=3, seed=60, fan_in=2)
    net.run(hold=is_type("masking_start"))
    order = net.server.tree.order  # type: ignore[union-attr]
    attacker = peer_name(order[3])  # a leaf
    net.release()
    net.run(hold=lambda recipient, sender, env: sender == attacker
            and env.type == "encrypted_partial_sum")
    _report(net, attacker)
    _report(net, attacker)  # and again, after being pointed at the live root
    assert _named_roots(net) == [], "a peer's word demoted a connected root"
    net.held = []  # the attacker leaves with its sum: it is not counted
    net.kill(attacker)
    _finish(net)
    assert_sum(net, inputs, sorted(u for u in order if peer_name(u) != attacker))


def test_reports_are_bounded() -> None:
    net, _, _ = make_round(5, 3, dim=3, seed=61, fan_in=2)
    net.run(hold=is_type("masking_start"))
    order = net.server.tree.order  # type: ignore[union-attr]
    attacker = peer_name(order[4])
    net.release()
    net.run(hold=lambda recipient, sender, env: sender == attacker)
    for _ in range(MAX_ANCESTOR_REPORTS + 1):
        _report(net, attacker)
    cut = [d for d in net.disconnects if d.name == attacker]
    assert cut and cut[-1].reason is DropReason.TOO_MANY_FRAMES, net.disconnects
    assert _named_roots(net) == []


def test_paillier_relay_cannot_publish_a_single_ciphertext_as_the_sum(
        keys: PaillierKeyPair) -> None:
    # Tree (fan-in 2) over 5 peers: R on top, M and B its children, C and D below M.
    net, inputs, _ = make_round(5, 3, dim=3, seed=62, fan_in=2, mode="paillier",
                                paillier_keys=keys)
    net.run(hold=is_type("masking_start"))
    order = net.server.tree.order  # type: ignore[union-attr]
    relay = peer_name(order[1])
    net.release()
    # M keeps its subtree's sum to itself and reports the live root unreachable ...
    net.run(hold=lambda recipient, sender, env: sender == relay
            and env.type == "encrypted_partial_sum")
    _report(net, relay)
    net.run(hold=lambda recipient, sender, env: sender == relay)
    # ... then sends one ciphertext alone as "the aggregate" of every peer.
    context = net.peers[relay]._context
    assert context is not None
    single = own_payload(context, frozenset(range(5)))
    forged = wire.RootAggregate(payload=context.codec.to_bytes(single),
                                contributors=list(range(5)))
    env = Envelope(session=SESSION, round=ROUND, sender=relay,
                   body=forged)
    net.deliver(SERVER, relay, env, wire.encode(env))
    outcome = net.server.outcome
    published_single = outcome is not None and outcome.status == "ok" and \
        outcome.aggregate is not None and np.allclose(outcome.aggregate,
                                                       inputs[order[1]], atol=1e-3)
    assert not published_single, "the server published one peer's input as the sum"
    cut = [d for d in net.disconnects if d.name == relay]
    assert cut and cut[-1].reason is DropReason.INVALID_AGGREGATE
    net.held = []
    net.kill(relay)
    _finish(net)
    # The relay and whatever it held are lost; the rest is exact (or, if fewer than t
    # sums survive, the round aborts: never a wrong "ok").
    outcome = net.server.outcome
    assert outcome is not None
    if outcome.status == "ok":
        contributors = [int(name.split("-")[1]) for name in outcome.contributors]
        assert peer_name(order[1]) not in outcome.contributors
        assert_sum(net, inputs, sorted(contributors))
