"""A holder hands the server a wrong but well-formed share in R4.

Attack (security hardening, item 4): the server asked for exactly t shares per
secret, so a holder returning a wrong share of b_u made the round end ``ok`` with a
wrong aggregate, under either threat model. Each peer now commits to b_u in R0 (a
hash bound to session, round and peer, inside the signed keys under ``active``);
the server checks every rebuilt b_u against it (and s_sk_u against its public key),
fetches spare shares on a mismatch, finds a t-subset that passes, drops the liar
with ``wrong_share`` and finishes exact.
"""

from __future__ import annotations

import dataclasses

import pytest
from helpers_protocol import SERVER, Net, assert_sum, is_type, make_round

from secagg import wire
from secagg.crypto.shamir import PRIME, SHARE_LENGTH
from secagg.protocol import ServerState
from secagg.protocol.errors import DropReason
from secagg.sim import peer_name


def _tamper(packed: bytes, position: int, delta: int) -> bytes:
    """The packed shares with the one at ``position`` moved off its polynomial."""
    start = position * SHARE_LENGTH
    value = int.from_bytes(packed[start:start + SHARE_LENGTH], "big")
    wrong = ((value + delta) % PRIME).to_bytes(SHARE_LENGTH, "big")
    return packed[:start] + wrong + packed[start + SHARE_LENGTH:]


def _run_with_liars(net: Net, liars: dict[str, str]) -> None:
    """Run to the end; each liar's first answer has its first share of ``kind``
    ("self" or "key") tampered with, each by its own offset (equal offsets can cancel
    out in the Lagrange sum: +1 at x = 1 and x = 2 leaves the secret of a degree-2
    polynomial through x = 1, 2, 3 unchanged)."""
    net.run(hold=lambda recipient, sender, env: sender in liars
            and env.type == "unmask_shares")
    for number, (recipient, sender, env, _) in enumerate(list(net.held)):
        body = env.body
        assert isinstance(body, wire.UnmaskShares)
        delta = 1 + 6 * number
        if liars[sender] == "self":
            body = dataclasses.replace(
                body, self_mask_shares=_tamper(body.self_mask_shares, 0, delta))
        else:
            body = dataclasses.replace(
                body, secret_key_shares=_tamper(body.secret_key_shares, 0, delta))
        forged = dataclasses.replace(env, body=body)
        net.deliver(recipient, sender, forged, wire.encode(forged))
    net.held = []
    net.run()


@pytest.mark.parametrize("threat_model", ["honest-but-curious", "active"])
def test_one_wrong_self_mask_share_is_caught_and_the_liar_dropped(threat_model: str) -> None:
    net, inputs, _ = make_round(5, 4, dim=4, seed=80, threat_model=threat_model)
    _run_with_liars(net, {peer_name(1): "self"})
    assert_sum(net, inputs, [0, 1, 2, 3, 4])
    outcome = net.server.outcome
    assert outcome is not None
    assert outcome.dropped == {peer_name(1): DropReason.WRONG_SHARE.value}


def test_two_liars_need_two_spares_and_the_round_is_still_exact() -> None:
    net, inputs, _ = make_round(6, 4, dim=4, seed=81)
    _run_with_liars(net, {peer_name(0): "self", peer_name(2): "self"})
    assert_sum(net, inputs, list(range(6)))
    outcome = net.server.outcome
    assert outcome is not None
    assert outcome.dropped == {peer_name(0): "wrong_share", peer_name(2): "wrong_share"}


def test_a_wrong_mask_key_share_of_a_dropped_peer_is_caught() -> None:
    net, inputs, _ = make_round(6, 4, dim=4, seed=82)
    # peer 5 shares its keys, then dies before sending its masked input.
    net.run(hold=is_type("masking_start"))
    net.held = [item for item in net.held if item[0] != peer_name(5)]
    net.kill(peer_name(5))
    net.release()
    _run_with_liars(net, {peer_name(0): "key"})
    assert_sum(net, inputs, [0, 1, 2, 3, 4])
    outcome = net.server.outcome
    assert outcome is not None
    assert outcome.dropped[peer_name(0)] == "wrong_share"


def test_too_many_liars_abort_instead_of_a_wrong_sum() -> None:
    # t = 3 of 4 honest shares needed, but 2 of the 4 holders lie: no t-subset passes.
    net, _, _ = make_round(4, 3, dim=4, seed=83)
    _run_with_liars(net, {peer_name(0): "self", peer_name(1): "self"})
    outcome = net.server.outcome
    assert outcome is not None and outcome.status == "aborted", outcome
    assert "fail its check" in outcome.reason
    assert net.server.state is ServerState.FINISHED


def test_registration_without_a_commitment_is_refused() -> None:
    net, _, _ = make_round(4, 3, seed=84, start_peers=False)
    keys = wire.AdvertiseKeys(address="", channel_key=bytes(range(32)),
                              mask_key=bytes(range(1, 33)))
    env = wire.Envelope(session=net.server.config.session, round=net.server.config.round,
                        sender="intruder", body=keys)
    actions = net.server.handle(wire_received(env))
    refused = [a for a in actions if getattr(a, "reason", None) is DropReason.INVALID_KEYS]
    assert refused and "commit" in refused[0].detail  # type: ignore[attr-defined]
    assert SERVER not in net.finished


def wire_received(env: wire.Envelope) -> object:
    from secagg.protocol import FrameReceived
    return FrameReceived("#1", wire.encode(env))
