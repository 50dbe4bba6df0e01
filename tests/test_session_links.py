"""Peer links over a session of the sparse graph: reused, and no more of them than it needs.

The graph's seed is the session's, so rounds with the same roster have the same
graph: their R1 exchange must reuse the previous round's links instead of dialling
them again. And between rounds a peer keeps only the links to its graph
neighbours, whatever tree relatives it had, so its descriptors stay near the
degree however many rounds it takes part in.

A 10-peer roster is too small for the SecAgg+ parameter search to pick a sparse
graph, so the search is replaced by a fixed degree of 4 (local threshold 3): the
graph is still the seeded Harary ring every party computes and checks.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers_network import (
    HOST,
    Swarm,
    assert_exact_sum,
    make_inputs,
    peer_names,
    run_round,
    tolerance,
)

from secagg import graph
from secagg.graph import SparseParameters
from server.coordinator import Coordinator

N, T, DEGREE, DIM = 10, 6, 4, 50


@pytest.fixture(autouse=True)
def _small_sparse_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    def fixed(n: int, threshold: int, **_: object) -> SparseParameters:
        return SparseParameters(degree=DEGREE, share_threshold=3, dropout_rate=0.1,
                                corrupt_rate=0.0, log2_failure=-40.0, log2_security=-40.0)
    monkeypatch.setattr(graph, "sparse_parameters", fixed)


def open_link_names(swarm: Swarm, name: str) -> set[str]:
    peer = swarm.peers[name]
    return set(peer._links.by_name) | set(peer._bound.values())


async def test_a_session_reuses_its_links_and_keeps_no_more_than_its_graph_needs() -> None:
    names = peer_names(N)
    async with Coordinator(HOST, 0, max_peers=N, threshold=T, dim=DIM, graph="sparse",
                           phase_timeout=15) as coordinator, Swarm(coordinator.url, names) as swarm:
        dials: list[int] = []
        for round_number in range(3):
            inputs = make_inputs(names, DIM, seed=round_number)
            before = sum(peer.links_dialled for peer in swarm.peers.values())
            result, outcomes = await run_round(coordinator, swarm, inputs)
            dials.append(sum(peer.links_dialled for peer in swarm.peers.values()) - before)
            assert result.status == "ok", result.outcome.reason
            assert sorted(result.contributors) == names
            assert_exact_sum(result.aggregate, inputs, names, tolerance(N, DIM))
            for name in names:
                outcome = outcomes[name]
                assert not isinstance(outcome, BaseException)
                neighbours = swarm.peers[name]._protocol.neighbour_names()  # type: ignore[union-attr]
                assert len(neighbours) == DEGREE
                # Tree relatives outside the neighbourhood were let go after the round.
                assert open_link_names(swarm, name) <= neighbours, name
    # Round 0 opened one link per neighbour pair (N * DEGREE / 2 = 20) plus some tree
    # links; later rounds open tree links at most (a child dials its parent: < N).
    assert dials[0] >= N * DEGREE // 2
    assert all(d < N for d in dials[1:]), dials
    assert np.all(np.array(dials[1:]) < dials[0])
