"""A malicious server with few colluders splits the holders under ``active``.

Attack (security hardening, item 1): under ``active`` the server shows two groups of
honest holders two different U3 sets; each honest peer signs once, a colluding peer
signs both, so each set collects t signatures. One group hands over shares of b_u,
the other of s_sk_u, and a colluding tree parent supplies y_u: u's input is exposed.
That takes 2t - n colluders: with n = 5, t = 3 a single one. The fix demands 3t > 2n
under ``active``, in ServerConfig and, since the server is the adversary, in every
peer's own check of the roster; on the sparse graph the local share threshold is
chosen for a corrupt fraction above zero.
"""

from __future__ import annotations

import dataclasses

import pytest
from helpers_protocol import SERVER, is_type, make_round, through_wire

from secagg import wire
from secagg.graph import (
    ACTIVE_CORRUPT_RATE,
    check_threshold,
    make_graph,
    sparse_parameters,
    tolerated_colluders,
)
from secagg.protocol import Disconnect, Send, ServerConfig
from secagg.protocol.errors import DropReason


def test_the_split_needs_fewer_colluders_than_honest_peers_at_the_old_bound() -> None:
    # The arithmetic of the attack: with n = 5, t = 3 one colluder suffices.
    n, t = 5, 3
    assert 2 * t - n == 1
    with pytest.raises(ValueError, match="more than 2n/3"):
        check_threshold(n, t, "active")
    check_threshold(n, t, "honest-but-curious")  # the server follows the protocol there


@pytest.mark.parametrize("threshold", [3])
def test_server_config_refuses_a_splittable_active_threshold(threshold: int) -> None:
    with pytest.raises(ValueError, match="more than 2n/3"):
        ServerConfig(session=bytes(16), round=0, max_peers=5, threshold=threshold, dim=2,
                     threat_model="active")


def test_peer_refuses_an_active_roster_with_a_splittable_threshold() -> None:
    # A server that ignores the rule: a valid active round at n = 5, t = 4, whose roster
    # the server rewrites to t = 3 before it reaches the peer.
    net, _, _ = make_round(5, 4, seed=70, threat_model="active")
    net.run(hold=is_type("roster"))
    env = net.held_of("roster", "peer-00001")[0]
    roster = env.body
    assert isinstance(roster, wire.Roster)
    lowered = dataclasses.replace(env, body=dataclasses.replace(roster, threshold=3,
                                                                share_threshold=3))
    peer = net.peers["peer-00001"]
    actions = peer.handle(through_wire(lowered))
    assert not any(isinstance(a, Send) for a in actions), "the peer took part"
    disconnects = [a for a in actions if isinstance(a, Disconnect)]
    assert [(a.name, a.reason) for a in disconnects] == [(SERVER, DropReason.BAD_MESSAGE)]
    assert "more than 2n/3" in disconnects[0].detail
    assert peer.outcome is not None and peer.outcome.status == "aborted"


def test_sparse_share_threshold_assumes_corruption_under_active() -> None:
    n, t = 1000, 667
    curious = make_graph("sparse", n, t, b"s" * 32, "honest-but-curious")
    active = make_graph("sparse", n, t, b"s" * 32, "active")
    params = sparse_parameters(n, t, corrupt_rate=ACTIVE_CORRUPT_RATE)
    assert params is not None
    assert (active.degree, active.share_threshold) == (params.degree, params.share_threshold)
    # More neighbours and a higher local threshold: c corrupt neighbours plus a lying
    # server get both secrets of u only if (k + 1 - c) + 2c >= 2s.
    assert active.share_threshold > curious.share_threshold
    assert 2 * active.share_threshold - (active.degree + 1) > 0


@pytest.mark.parametrize(("n", "t", "model", "colluders"), [
    (5, 3, "honest-but-curious", 2), (5, 4, "active", 2), (10, 7, "active", 3),
    (100, 67, "active", 33), (100, 51, "honest-but-curious", 50)])
def test_tolerated_colluders(n: int, t: int, model: str, colluders: int) -> None:
    assert tolerated_colluders(n, t, model) == colluders
