"""A malicious server redraws the sparse graph until it suits it.

The graph seed used to be fresh server randomness every round, so a server could
draw seeds until a victim's neighbourhood held its colluders. It is now a hash of
the session id (``graph.session_graph_seed``): one graph per session for a given
roster, which also lets every round after the first reuse the session's links.
Each peer checks the seed.
"""

from __future__ import annotations

import dataclasses

import pytest
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


def _forged_names(names: list[str], case: str, neighbour: int) -> list[str]:
    if case == "unsorted":
        return [names[1], names[0], *names[2:]]
    if case == "missing":  # one name left out: the ring would shift
        return names[:-1]
    if case == "renamed":  # a neighbour under another name (still sorted): another ring
        return [*names[:neighbour], names[neighbour] + "x", *names[neighbour + 1:]]
    return []  # "none": the index-keyed ring instead of the name-keyed one


@pytest.mark.parametrize("case", ["unsorted", "missing", "renamed", "none"])
def test_peer_refuses_roster_names_that_are_not_the_roster(case: str) -> None:
    """The sparse ring is keyed by the roster's names: a server that lists them out of
    order, short, or renamed (to move a victim's neighbourhood), or not at all (to pick
    the index-keyed ring), is refused. (Which peers are on the roster is the server's
    to say in any case: a name it adds is a peer it registered.)"""
    net, _, _ = make_round(7, 7, seed=93, graph="sparse", fan_in=2)
    net.run(hold=is_type("roster"))
    env = net.held_of("roster", "peer-00003")[0]
    roster = env.body
    assert isinstance(roster, wire.Roster) and len(roster.names) == 7
    neighbour = next(e.index for e in roster.neighbours if e.index != 3)
    forged = dataclasses.replace(env, body=dataclasses.replace(
        roster, names=_forged_names(list(roster.names), case, neighbour)))
    actions = net.peers["peer-00003"].handle(through_wire(forged))
    assert not any(isinstance(a, Send) for a in actions), "the peer took part"
    disconnects = [a for a in actions if isinstance(a, Disconnect)]
    assert [(a.name, a.reason) for a in disconnects] == [(SERVER, DropReason.BAD_MESSAGE)]


def test_a_roster_with_a_peer_more_or_less_keeps_most_neighbourhoods() -> None:
    """Keyed by names, the ring moves only the neighbourhoods next to a peer that came or
    went, so a session keeps most of its links when its roster changes."""
    names = [f"peer-{i:05d}" for i in range(300)]
    seed = session_graph_seed(SESSION)
    before = make_graph("sparse", 300, 151, seed, names=names)
    after = make_graph("sparse", 299, 150, seed, names=names[:150] + names[151:])
    assert before.degree == after.degree

    def neighbourhood(graph: object, roster: list[str], name: str) -> set[str]:
        assert isinstance(graph, type(before))
        return {roster[v] for v in graph.neighbours(roster.index(name))}

    roster_after = names[:150] + names[151:]
    moved = [name for name in roster_after
             if neighbourhood(before, names, name) - {names[150]}
             != neighbourhood(after, roster_after, name)]
    # Only the peers that had the gone one as a neighbour gain a new one.
    assert 0 < len(moved) <= before.degree
    # Keyed by roster index, the same change moves almost everyone.
    by_index = [name for name in roster_after
                if neighbourhood(make_graph("sparse", 300, 151, seed), names, name)
                - {names[150]} != neighbourhood(make_graph("sparse", 299, 150, seed),
                                                roster_after, name)]
    assert len(by_index) > 250
