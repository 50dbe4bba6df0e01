"""A malicious server redraws the sparse graph until it suits it.

The graph seed used to be fresh server randomness every round, so a server could
draw seeds until a victim's neighbourhood held its colluders. It is now a hash of
the session id (``graph.session_graph_seed``): one graph per session for a given
roster, which also lets every round after the first reuse the session's links.
Each peer checks the seed.
"""

from __future__ import annotations

import dataclasses

from helpers_protocol import SERVER, SESSION, is_type, make_round, through_wire

from secagg import wire
from secagg.graph import make_graph, session_graph_seed
from secagg.protocol import Disconnect, Send
from secagg.protocol.errors import DropReason


def test_peer_refuses_a_graph_seed_other_than_the_sessions() -> None:
    net, _, _ = make_round(7, 7, seed=90, graph="sparse", fan_in=2)
    net.run(hold=is_type("roster"))
    env = net.held_of("roster", "peer-00003")[0]
    roster = env.body
    assert isinstance(roster, wire.Roster) and roster.graph_seed == session_graph_seed(SESSION)
    # A seed of the server's choosing, with the neighbour list made to match it.
    seed = bytes(32)
    graph = make_graph("sparse", 7, 7, seed)
    assert graph.neighbours(3) != make_graph("sparse", 7, 7, roster.graph_seed).neighbours(3)
    peer = net.peers["peer-00003"]
    forged = dataclasses.replace(env, body=dataclasses.replace(roster, graph_seed=seed))
    actions = peer.handle(through_wire(forged))
    assert not any(isinstance(a, Send) for a in actions), "the peer took part"
    disconnects = [a for a in actions if isinstance(a, Disconnect)]
    assert [(a.name, a.reason) for a in disconnects] == [(SERVER, DropReason.BAD_MESSAGE)]
    assert "graph seed is not the session's" in disconnects[0].detail


def test_every_round_of_a_session_with_the_same_roster_has_the_same_graph() -> None:
    graphs = []
    for seed in (91, 92):  # two rounds: different server randomness, same session
        net, _, _ = make_round(7, 7, seed=seed, graph="sparse", fan_in=2)
        net.run()
        graph = net.server.graph
        assert graph is not None
        graphs.append([graph.neighbours(u) for u in range(7)])
    assert graphs[0] == graphs[1]
