"""Tests for secagg.graph: neighbour graphs, SecAgg+ parameters, accumulation tree."""

from __future__ import annotations

import hashlib
import itertools
import math
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secagg.graph import (
    GRAPH_LABEL,
    TREE_LABEL,
    AccumulationTree,
    NeighbourGraph,
    build_tree,
    check_threshold,
    complete_graph,
    default_threshold,
    make_graph,
    sparse_graph,
    sparse_parameters,
)

seeds = st.binary(min_size=0, max_size=32)


def _hash_order(ids: list[int], seed: bytes, label: bytes) -> list[int]:
    return sorted(ids, key=lambda i: hashlib.sha256(seed + label + i.to_bytes(8, "big")).digest())


def _binom_tail_ge(m: int, c: int, p: Fraction) -> Fraction:
    """Exact P[Bin(m, p) >= c] with rationals."""
    return sum(
        (math.comb(m, i) * p**i * (1 - p) ** (m - i) for i in range(max(c, 0), m + 1)),
        Fraction(0),
    )


@st.composite
def sparse_shapes(draw: st.DrawFn) -> tuple[int, int, bytes]:
    n = draw(st.integers(min_value=4, max_value=150))
    degree = 2 * draw(st.integers(min_value=1, max_value=(n - 2) // 2))
    return n, degree, draw(seeds)


def _sparse(n: int, degree: int, seed: bytes) -> NeighbourGraph:
    return NeighbourGraph("sparse", n, degree, degree // 2 + 1, seed)


# --------------------------------------------------------------------------- thresholds


@pytest.mark.parametrize(("n", "t"), [(1, 1), (2, 2), (3, 2), (10, 6), (10, 10), (101, 51)])
def test_check_threshold_accepts(n: int, t: int) -> None:
    check_threshold(n, t)


def test_check_threshold_too_low_says_what_to_do() -> None:
    with pytest.raises(ValueError, match=r"raise it to at least 6"):
        check_threshold(10, 5)
    with pytest.raises(ValueError, match=r"at least 51"):
        check_threshold(100, 1)


def test_check_threshold_too_high_and_empty() -> None:
    with pytest.raises(ValueError, match=r"lower the threshold to at most 10"):
        check_threshold(10, 11)
    with pytest.raises(ValueError, match=r"at least one peer"):
        check_threshold(0, 1)


@given(st.integers(min_value=1, max_value=5000))
def test_default_threshold(n: int) -> None:
    active = default_threshold(n, "active")
    hbc = default_threshold(n, "honest-but-curious")
    assert active == 2 * n // 3 + 1
    assert hbc == n // 2 + 1
    check_threshold(n, active)
    check_threshold(n, hbc)
    assert hbc <= active


def test_default_threshold_rejects_unknown_model() -> None:
    with pytest.raises(ValueError, match="threat model"):
        default_threshold(10, "paranoid")
    with pytest.raises(ValueError):
        default_threshold(0, "active")


# --------------------------------------------------------------------------- complete graph


@given(st.integers(min_value=1, max_value=60), st.data())
def test_complete_graph_shape(n: int, data: st.DataObject) -> None:
    t = data.draw(st.integers(min_value=n // 2 + 1, max_value=n))
    g = complete_graph(n, t)
    assert (g.kind, g.n, g.degree, g.share_threshold) == ("complete", n, n - 1, t)
    everyone = tuple(range(n))
    for u in range(n):
        assert g.neighbours(u) == everyone
        assert all(g.are_neighbours(u, v) for v in range(n))


def test_complete_graph_rejects_bad_threshold() -> None:
    with pytest.raises(ValueError):
        complete_graph(10, 5)
    with pytest.raises(ValueError):
        complete_graph(10, 11)


# --------------------------------------------------------------------------- sparse graph


@settings(max_examples=60, deadline=None)
@given(sparse_shapes())
def test_sparse_graph_regular_symmetric_self_included(shape: tuple[int, int, bytes]) -> None:
    n, degree, seed = shape
    g = _sparse(n, degree, seed)
    nbrs = [g.neighbours(u) for u in range(n)]
    for u in range(n):
        assert len(nbrs[u]) == degree + 1
        assert list(nbrs[u]) == sorted(set(nbrs[u]))
        assert u in nbrs[u]
        assert all(0 <= v < n for v in nbrs[u])
        for v in nbrs[u]:
            assert u in nbrs[v]  # symmetric
    # are_neighbours agrees with neighbours, and is symmetric
    for u in range(0, n, max(1, n // 12)):
        members = set(nbrs[u])
        for v in range(n):
            assert g.are_neighbours(u, v) == (v in members) == g.are_neighbours(v, u)
    assert sum(len(x) - 1 for x in nbrs) == n * degree  # n*k/2 undirected edges


@settings(max_examples=40, deadline=None)
@given(sparse_shapes())
def test_sparse_graph_matches_specified_hash_order(shape: tuple[int, int, bytes]) -> None:
    n, degree, seed = shape
    g = _sparse(n, degree, seed)
    ring = _hash_order(list(range(n)), seed, GRAPH_LABEL)
    half = degree // 2
    for p, u in enumerate(ring):
        expected = sorted(ring[(p + j) % n] for j in range(-half, half + 1))
        assert g.neighbours(u) == tuple(expected)


@settings(max_examples=30, deadline=None)
@given(sparse_shapes())
def test_sparse_graph_deterministic(shape: tuple[int, int, bytes]) -> None:
    n, degree, seed = shape
    a, b = _sparse(n, degree, seed), _sparse(n, degree, seed)
    assert a == b
    assert hash(a) == hash(b)
    assert all(a.neighbours(u) == b.neighbours(u) for u in range(n))


@settings(max_examples=30, deadline=None)
@given(st.integers(min_value=20, max_value=200), seeds, seeds)
def test_sparse_graph_differs_across_seeds(n: int, seed1: bytes, seed2: bytes) -> None:
    if seed1 == seed2:
        seed2 = seed1 + b"\x00"
    a, b = _sparse(n, 4, seed1), _sparse(n, 4, seed2)
    assert a != b
    assert any(a.neighbours(u) != b.neighbours(u) for u in range(n))


def test_neighbour_graph_validation() -> None:
    with pytest.raises(ValueError, match="even"):
        NeighbourGraph("sparse", 20, 3, 3, b"s")
    with pytest.raises(ValueError, match="even"):
        NeighbourGraph("sparse", 20, 20, 11, b"s")
    with pytest.raises(ValueError, match="share_threshold"):
        NeighbourGraph("sparse", 20, 4, 2, b"s")  # 2 <= (4+1)/2
    with pytest.raises(ValueError, match="share_threshold"):
        NeighbourGraph("sparse", 20, 4, 6, b"s")
    with pytest.raises(ValueError, match="degree"):
        NeighbourGraph("complete", 20, 4, 11, b"")
    with pytest.raises(ValueError, match="kind"):
        NeighbourGraph("ring", 20, 4, 3, b"")  # type: ignore[arg-type]
    g = _sparse(20, 4, b"s")
    with pytest.raises(ValueError, match="roster"):
        g.neighbours(20)
    with pytest.raises(ValueError, match="roster"):
        g.are_neighbours(-1, 0)


# --------------------------------------------------------------------------- parameters

TABLE_N = (500, 1000, 5000, 10000)


@pytest.mark.parametrize("n", [10, 20, 40])
def test_small_rosters_fall_back_to_complete(n: int) -> None:
    for t in (n // 2 + 1, 2 * n // 3 + 1):
        assert sparse_parameters(n, t) is None
        g = sparse_graph(n, t, b"seed")
        assert g == complete_graph(n, t)


def test_default_parameter_table_sane() -> None:
    for model in ("honest-but-curious", "active"):
        degrees = []
        for n in TABLE_N:
            g = sparse_graph(n, default_threshold(n, model), b"seed")
            assert g.kind == "sparse"
            assert g.degree % 2 == 0
            assert g.degree + 1 < 2 * g.share_threshold <= 2 * (g.degree + 1)
            degrees.append(g.degree)
        assert degrees == sorted(degrees)  # grows with n ...
        assert degrees[-1] < 1.5 * degrees[0]  # ... slowly (20x more peers)
        assert degrees[-1] < 10000 // 20


@pytest.mark.parametrize("dropout", [0.05, 0.1, 0.2, 0.33])
def test_lower_dropout_gives_smaller_degree(dropout: float) -> None:
    p = sparse_parameters(5000, 2501, dropout_rate=dropout)
    q = sparse_parameters(5000, 2501, dropout_rate=dropout / 2)
    assert p is not None and q is not None
    assert q.degree <= p.degree


@pytest.mark.parametrize(("n", "dropout"), [(200, 0.1), (1000, 0.2), (300, 0.05)])
def test_parameters_meet_targets_exactly_and_are_minimal(n: int, dropout: float) -> None:
    params = sparse_parameters(n, n // 2 + 1, dropout_rate=dropout)
    assert params is not None
    k, s = params.degree, params.share_threshold
    assert params.log2_failure < -20 and params.log2_security < -40
    delta = Fraction(dropout)
    # with no corruption the local threshold is the bare honest majority
    assert s == k // 2 + 1
    # correctness: n * P[fewer than s of k+1 survive] < 2^-20, checked with exact rationals
    assert n * _binom_tail_ge(k + 1, k + 2 - s, delta) < Fraction(1, 2**20)
    # connectivity: n^2/2 * delta^k < 2^-41
    assert Fraction(n * n, 2) * delta**k < Fraction(1, 2**41)
    # minimality: the previous even degree fails correctness or connectivity
    k2 = k - 2
    if k2 >= 2:
        s2 = k2 // 2 + 1
        fails = n * _binom_tail_ge(k2 + 1, k2 + 2 - s2, delta) >= Fraction(1, 2**20)
        disconnects = Fraction(n * n, 2) * delta**k2 >= Fraction(1, 2**41)
        assert fails or disconnects


def test_corruption_raises_local_threshold() -> None:
    n = 5000
    clean = sparse_parameters(n, 2501, dropout_rate=0.2)
    dirty = sparse_parameters(n, 2501, dropout_rate=0.2, corrupt_rate=0.1)
    assert clean is not None and dirty is not None
    assert dirty.share_threshold / (dirty.degree + 1) > clean.share_threshold / (clean.degree + 1)
    k, s = dirty.degree, dirty.share_threshold
    # an equivocating server with c corrupt neighbours needs c >= 2s - (k+1): rare enough
    gamma = Fraction(1, 10)
    assert n * _binom_tail_ge(k, 2 * s - k - 1, gamma) < Fraction(1, 2**41)
    assert dirty.log2_security < -40 and dirty.log2_failure < -20


def test_infeasible_rates_fall_back_to_complete() -> None:
    assert sparse_parameters(10000, 5001, dropout_rate=0.5) is None
    assert sparse_parameters(10000, 5001, dropout_rate=0.3, corrupt_rate=0.4) is None
    g = sparse_graph(10000, 5001, b"s", dropout_rate=0.5)
    assert g.kind == "complete" and g.share_threshold == 5001


def test_rate_validation() -> None:
    with pytest.raises(ValueError, match="dropout_rate"):
        sparse_parameters(100, 51, dropout_rate=1.0)
    with pytest.raises(ValueError, match="corrupt_rate"):
        sparse_parameters(100, 51, corrupt_rate=-0.1)
    with pytest.raises(ValueError):
        sparse_graph(100, 50, b"s")


def test_default_dropout_rate_is_capped() -> None:
    a = sparse_parameters(5000, 2501)
    b = sparse_parameters(5000, 2501, dropout_rate=0.15)
    assert a == b
    c = sparse_parameters(5000, 4501)  # tolerates 10% dropout
    d = sparse_parameters(5000, 4501, dropout_rate=1 - 4501 / 5000)
    assert c == d and c is not None and b is not None
    assert c.degree < b.degree
    wider = sparse_parameters(5000, 2501, dropout_rate=0.33)
    assert wider is not None and wider.degree > b.degree


def test_make_graph() -> None:
    assert make_graph("complete", 30, 16, b"x") == complete_graph(30, 16)
    assert make_graph("sparse", 2000, 1001, b"x") == sparse_graph(2000, 1001, b"x")
    assert make_graph("sparse", 2000, 1001, b"x").kind == "sparse"
    with pytest.raises(ValueError, match="kind"):
        make_graph("star", 30, 16, b"x")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- accumulation tree

members_st = st.sets(st.integers(min_value=0, max_value=10**6), min_size=1, max_size=120)
fan_ins = st.integers(min_value=2, max_value=9)


@settings(max_examples=60, deadline=None)
@given(members_st, seeds, fan_ins)
def test_tree_structure(members: set[int], seed: bytes, fan_in: int) -> None:
    tree = build_tree(members, seed, fan_in)
    assert sorted(tree.order) == sorted(members)
    assert len(tree.order) == len(set(tree.order))
    assert tree.fan_in == fan_in
    root = tree.root()
    assert tree.parent(root) is None
    assert tree.depth(root) == 0
    assert tree.ancestors(root) == ()
    child_count = 0
    for i, u in enumerate(tree.order):
        assert u in tree
        assert tree.position(u) == i
        kids = tree.children(u)
        assert len(kids) <= fan_in
        child_count += len(kids)
        for c in kids:
            assert tree.parent(c) == u
        anc = tree.ancestors(u)
        assert len(anc) == tree.depth(u)
        if u != root:
            parent = tree.parent(u)
            assert parent is not None
            assert u in tree.children(parent)
            assert anc[0] == parent
            assert anc[-1] == root
            for near, far in itertools.pairwise(anc):
                assert tree.parent(near) == far
    assert child_count == len(members) - 1
    assert tree.max_depth == max(tree.depth(u) for u in members)
    # the shallowest possible fan_in-ary tree
    d = tree.max_depth
    assert (fan_in ** (d + 1) - 1) // (fan_in - 1) >= len(members)
    assert d == 0 or (fan_in**d - 1) // (fan_in - 1) < len(members)


@settings(max_examples=60, deadline=None)
@given(members_st, seeds, fan_ins)
def test_tree_subtrees(members: set[int], seed: bytes, fan_in: int) -> None:
    tree = build_tree(members, seed, fan_in)
    assert sorted(tree.subtree(tree.root())) == sorted(members)
    for u in tree.order:
        sub = tree.subtree(u)
        assert sub[0] == u
        assert len(sub) == len(set(sub))
        assert len(sub) == 1 + sum(len(tree.subtree(c)) for c in tree.children(u))
        for v in sub[1:]:
            assert u in tree.ancestors(v)
    # the root's child subtrees partition everyone else
    level1 = tree.children(tree.root())
    assert sum(len(tree.subtree(c)) for c in level1) == len(members) - 1


@settings(max_examples=60, deadline=None)
@given(members_st, seeds, fan_ins, st.data())
def test_nearest_live_ancestor(
    members: set[int], seed: bytes, fan_in: int, data: st.DataObject
) -> None:
    tree = build_tree(members, seed, fan_in)
    dead = data.draw(st.sets(st.sampled_from(sorted(members))))
    for u in tree.order:
        got = tree.nearest_live_ancestor(u, lambda v: v not in dead)
        alive = [a for a in tree.ancestors(u) if a not in dead]
        assert got == (alive[0] if alive else None)
        assert tree.nearest_live_ancestor(u, lambda v: False) is None
        assert tree.nearest_live_ancestor(u, lambda v: True) == tree.parent(u)


def test_nearest_live_ancestor_skips_dead_chain() -> None:
    tree = build_tree(range(100), b"seed", fan_in=2)
    deepest = tree.order[-1]
    anc = tree.ancestors(deepest)
    assert len(anc) >= 3
    dead = set(anc[:2])
    assert tree.nearest_live_ancestor(deepest, lambda v: v not in dead) == anc[2]
    assert tree.nearest_live_ancestor(tree.root(), lambda v: True) is None


@settings(max_examples=30, deadline=None)
@given(members_st, seeds, fan_ins)
def test_tree_deterministic_and_specified(members: set[int], seed: bytes, fan_in: int) -> None:
    ordered = sorted(members)
    a = build_tree(ordered, seed, fan_in)
    b = build_tree(reversed(ordered), seed, fan_in)
    assert a == b
    assert list(a.order) == _hash_order(ordered, seed, TREE_LABEL)


def test_tree_differs_across_seeds_and_from_graph_order() -> None:
    a = build_tree(range(50), b"one")
    b = build_tree(range(50), b"two")
    assert a.order != b.order
    assert list(a.order) != _hash_order(list(range(50)), b"one", GRAPH_LABEL)


def test_tree_membership_and_errors() -> None:
    tree = build_tree([5, 7, 11], b"s", fan_in=2)
    assert 5 in tree and 6 not in tree
    assert "5" not in tree and None not in tree
    with pytest.raises(ValueError, match="not in the accumulation tree"):
        tree.position(6)
    with pytest.raises(ValueError):
        tree.parent(6)
    single = build_tree([3], b"s")
    assert single.root() == 3 and single.max_depth == 0 and single.subtree(3) == (3,)


@pytest.mark.parametrize("fan_in", [-1, 0, 1])
def test_tree_fan_in_validation(fan_in: int) -> None:
    with pytest.raises(ValueError, match="fan_in"):
        build_tree(range(10), b"s", fan_in)
    with pytest.raises(ValueError, match="fan_in"):
        AccumulationTree((1, 2, 3), fan_in)


def test_tree_rejects_empty_and_duplicates() -> None:
    with pytest.raises(ValueError, match="no members"):
        build_tree([], b"s")
    with pytest.raises(ValueError, match="more than once"):
        build_tree([1, 2, 1], b"s")
    with pytest.raises(ValueError, match="more than once"):
        AccumulationTree((1, 2, 1), 2)
    with pytest.raises(ValueError):
        build_tree([-1], b"s")
