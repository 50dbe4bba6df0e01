"""Neighbour graphs (complete, or the SecAgg+ sparse Harary graph) and the accumulation tree.

Everything here is a pure function of public inputs: the round's roster size ``n``, the global
threshold ``t`` and a public seed (bytes).  No I/O, no clock, no numpy RNG.

Deterministic orderings
-----------------------
Every random-looking order is obtained by sorting integer ids by the key::

    SHA-256(seed || label || id.to_bytes(8, "big"))        (ties, never seen, broken by id)

with ``label = b"secagg/graph/harary/v1"`` for the neighbour graph and
``label = b"secagg/graph/tree/v1"`` for the accumulation tree.  Any party holding the seed can
recompute both in O(n log n), independently of Python, numpy or platform.

Sparse graph (SecAgg+)
----------------------
As in Bell et al. 2020 and Google fcp's ``SecretSharingHararyGraph``: the ids are permuted by the
order above, put on a ring, and ring position ``p`` is adjacent to positions ``p±1 .. p±k/2``
(mod n), ``k`` even. Given the roster's ``names`` (sorted; id = position), the ring orders
the peers by ``SHA-256(seed || label || name)`` instead, so that a roster with one peer
more or less moves only the neighbourhoods next to it on the ring (and a shrinking ``k``
drops each peer's two farthest neighbours): the rounds of a session keep their links
while its peers come and go (see ``session_graph_seed``).  ``NeighbourGraph.degree`` is ``k``
(neighbours *excluding* self);
``neighbours()`` returns the closed neighbourhood (``k + 1`` ids, self included), which is the
set a peer Shamir-shares its two secrets over, with threshold ``share_threshold = s``.
(fcp's Harary graph "degree" counts the self-edge, so fcp degree = our degree + 1, odd.)

Parameter choice (``sparse_parameters``)
----------------------------------------
Model: each peer drops out independently with probability ``δ`` (``dropout_rate``) and is
corrupt (colluding with the server) independently with probability ``γ`` (``corrupt_rate``).
Using independent binomial counts rather than fcp's hypergeometric ones (a fixed ``δn`` dropped,
``γn`` corrupt) is slightly conservative: the binomial has the heavier tails.  All tails are
exact binomial sums in log space (``math.lgamma`` + log-sum-exp), union-bounded over the n peers.

For ``k = 2, 4, 6, ...`` (``k < n - 1``) the first ``k`` satisfying all of the following is taken:

1. Security, shares (< 2^-41).  Let ``c*`` be the smallest ``c`` with
   ``n · P[Bin(k, γ) >= c] < 2^-41``, i.e. with that probability no honest peer has ``c*`` or
   more corrupt neighbours.  The local threshold is the smallest ``s`` with ``2s - (k+1) >= c*``,
   i.e. ``s = ceil((c* + k + 1) / 2)``.  Reason: a server that lies about who dropped can show
   one set of honest neighbours "u dropped" (they send s_sk_u shares) and a disjoint set "u
   survived" (they send b_u shares); with ``c`` corrupt neighbours it gets both secrets of u only
   if ``(k + 1 - c) + 2c >= 2s``.  This is fcp's SEMI_MALICIOUS_SERVER rule
   (``t1 -> ceil((t1 + k - 1.25) / 2)``); we apply it under both threat models because the
   project always demands the analogue of ``t > n/2``.  With ``γ = 0`` it gives exactly
   ``s = k/2 + 1 > (k+1)/2``: an honest majority of every neighbourhood is needed.  It also
   implies ``s > c*`` (corrupt neighbours alone never hold ``s`` shares: the curious-server
   condition).
2. Security, connectivity (< 2^-41).  A set of removed (dropped or corrupt) peers disconnects
   the Harary graph only if it covers two disjoint runs of ``k/2`` consecutive ring positions;
   union bound over ``< n²/2`` pairs of runs: ``n²/2 · (γ + δ)^k < 2^-41`` (fcp checks the same
   event).  It never binds for the default parameters.  Like fcp, this treats dropouts as random;
   a server that *chooses* whom to declare dropped can still split honest survivors into large
   groups (Bell et al.'s α-summation guarantee), which a sparse graph cannot prevent.
3. Correctness (< 2^-20).  Every peer's secrets must stay reconstructible: its closed
   neighbourhood keeps at least ``s`` survivors (its own share counts iff it survives):
   ``n · P[Bin(k + 1, 1 - δ) < s] < 2^-20``.

If no ``k < n - 1`` qualifies (small n, or ``2δ + γ >= 1`` which makes 1 and 3 incompatible) the
complete graph with the global threshold ``t`` is used instead.  Totals: security < 2^-40,
failure < 2^-20, the targets of fcp's ``graph_parameter_finder`` (kSecurityParameter = 40,
kCorrectnessParameter = 20, split evenly over the two security events as fcp does).

Default dropout rate: ``δ = min(0.15, 1 - t/n)``.  ``1 - t/n`` is the dropout fraction the
operator's global threshold declares tolerable; it is capped because an honest-majority
neighbourhood cannot tolerate rates near 1/2 (at ``t = n/2 + 1``, ``1 - t/n`` is about 0.5 and
no finite degree would do), and at 0.15 rather than fcp's 0.33 because the degree, hence every
peer's key agreements, shares and masks, grows steeply with δ: at n = 5000 the default gives
degree 58 (share threshold 30) against 318 at δ = 0.33, i.e. O(log n) with a small constant. The
figures below are for ``δ = 0.33``, for comparison.  Consequence worth knowing: the degree is
set by the correctness condition and grows like ``(ln n + 20 ln 2) / D(1/2 || 1 - δ)``
(Chernoff, with D the Kullback–Leibler divergence, 0.059 at ``δ = 0.33``); the exact tails give
282 at n = 500, 294 at 1000, 318 at 5000, 330 at 10000 (share threshold degree/2 + 1), and the
complete graph below n = 274 (at δ = 0.15: 46 at n = 100, 58 at n = 5000).  That is the price of
the honest-majority constraint: fcp's own semi-malicious table (γ = 0.05, δ = 0.33) lists 398 at
n = 1000 and 746 at n = 10^4 (this module, binomial, gives 728 and 814), while its semi-honest
one, whose threshold is only about k/3, lists 72 and 86.  Pass a smaller ``dropout_rate`` when
fewer dropouts are expected (n = 5000: 0.05 → 24, 0.1 → 38, 0.2 → 88, 0.25 → 136).  More than a
``δ`` fraction of dropouts may make a round abort even with ``t`` survivors.

Sources: Bell, Bonawitz, Gascón, Lepoint, Raykova, "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead", CCS 2020; google-parfait/federated-compute
``fcp/secagg/server/graph_parameter_finder.cc`` and ``secret_sharing_harary_graph.h`` (read for
the method, not copied).  Flower's ``SecAggPlusWorkflow`` takes ``num_shares`` and
``reconstruction_threshold`` from the user and does no such search.

Accumulation tree
-----------------
``build_tree`` orders the members by the hash key (tree label) and lays them out as an implicit
``fan_in``-ary heap: position 0 is the root and position ``p`` has children
``f·p + 1 .. f·p + f``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

__all__ = [
    "AccumulationTree",
    "GraphKind",
    "NeighbourGraph",
    "SparseParameters",
    "build_tree",
    "check_threshold",
    "complete_graph",
    "corrupt_rate_for",
    "default_threshold",
    "make_graph",
    "seeded_order",
    "seeded_order_by_name",
    "session_graph_seed",
    "sparse_graph",
    "sparse_parameters",
    "tolerated_colluders",
]

GraphKind = Literal["complete", "sparse"]

GRAPH_LABEL = b"secagg/graph/harary/v1"
SESSION_SEED_LABEL = b"secagg/graph/session-seed/v1"
TREE_LABEL = b"secagg/graph/tree/v1"

SECURITY_BITS = 40
CORRECTNESS_BITS = 20
DEFAULT_DROPOUT_CAP = 0.15
_MAX_ID = 2**64


# --------------------------------------------------------------------------- thresholds


def check_threshold(n: int, threshold: int, threat_model: str = "honest-but-curious") -> None:
    """Raise ``ValueError`` unless ``n/2 < threshold <= n`` (and ``n >= 1``), and under
    ``"active"`` also ``3t > 2n``.

    Why ``3t > 2n`` under ``active``: a malicious server may show two groups of honest holders
    two different U3 sets; a colluding peer signs both, so each set collects ``t`` signatures,
    one group hands over shares of b_u, the other of s_sk_u, and u's input is exposed.  That
    needs ``2t - n`` colluders (Bonawitz et al. 2017, sec. 6.5, "t > n/2 + |C|/2"); ``3t > 2n``
    keeps that number above ``n/3``.  :func:`tolerated_colluders` gives the exact bound."""
    if n < 1:
        raise ValueError(f"need at least one peer, got n={n}")
    if threshold > n:
        raise ValueError(
            f"threshold {threshold} exceeds the number of peers n={n}: "
            f"lower the threshold to at most {n} or admit more peers"
        )
    if 2 * threshold <= n:
        raise ValueError(
            f"threshold {threshold} is too low for n={n} peers: it must be more than n/2, "
            f"so raise it to at least {n // 2 + 1} (or admit fewer peers)"
        )
    if threat_model == "active" and 3 * threshold <= 2 * n:
        raise ValueError(
            f"threshold {threshold} is too low for n={n} peers under the active threat model: "
            f"it must be more than 2n/3, so raise it to at least {2 * n // 3 + 1} "
            "(or admit fewer peers)"
        )


def tolerated_colluders(n: int, threshold: int, threat_model: str) -> int:
    """The most peers that may collude with the server without exposing an honest peer's
    input, on the complete graph.

    ``honest-but-curious`` (the server follows the protocol): ``t - 1``, since colluders with
    fewer than ``t`` shares of a secret learn nothing of it.  ``active`` (the server lies about
    who dropped, consistency checked by signatures): ``2t - n - 1`` (Bonawitz et al. 2017,
    Theorem 6.5: secure while ``2t > n + |C|``)."""
    check_threshold(n, threshold, threat_model)
    if threat_model == "active":
        return 2 * threshold - n - 1
    return threshold - 1


ACTIVE_CORRUPT_RATE = 0.05
"""The corrupt fraction γ the sparse graph's share threshold is chosen for under ``active``
(the semi-malicious setting of fcp's graph parameter finder, γ = 0.05 in its tables); under
``honest-but-curious`` γ = 0, which still demands an honest majority of every neighbourhood."""


def corrupt_rate_for(threat_model: str) -> float:
    """γ for :func:`sparse_parameters` under ``threat_model``."""
    return ACTIVE_CORRUPT_RATE if threat_model == "active" else 0.0


def default_threshold(n: int, threat_model: str) -> int:
    """``floor(2n/3) + 1`` under ``"active"``, ``floor(n/2) + 1`` under ``"honest-but-curious"``."""
    if n < 1:
        raise ValueError(f"need at least one peer, got n={n}")
    if threat_model == "active":
        return 2 * n // 3 + 1
    if threat_model == "honest-but-curious":
        return n // 2 + 1
    raise ValueError(f"unknown threat model {threat_model!r}: use 'honest-but-curious' or 'active'")


# --------------------------------------------------------------------------- ordering


def _sort_key(seed: bytes, label: bytes, peer: int) -> tuple[bytes, int]:
    return hashlib.sha256(seed + label + peer.to_bytes(8, "big")).digest(), peer


def seeded_order(ids: Iterable[int], seed: bytes, label: bytes) -> tuple[int, ...]:
    """Sort ``ids`` by ``SHA-256(seed || label || id as 8 bytes big-endian)``."""
    if not isinstance(seed, bytes):
        raise TypeError(f"seed must be bytes, got {type(seed).__name__}")
    items = list(ids)
    for peer in items:
        if not isinstance(peer, int) or isinstance(peer, bool) or not 0 <= peer < _MAX_ID:
            raise ValueError(f"peer ids must be ints in [0, 2**64), got {peer!r}")
    return tuple(sorted(items, key=lambda peer: _sort_key(seed, label, peer)))


def seeded_order_by_name(names: Sequence[str], seed: bytes, label: bytes) -> tuple[int, ...]:
    """The positions of ``names`` sorted by ``SHA-256(seed || label || name as UTF-8)``
    (ties, never seen, broken by position)."""
    if not isinstance(seed, bytes):
        raise TypeError(f"seed must be bytes, got {type(seed).__name__}")
    keys = [hashlib.sha256(seed + label + name.encode()).digest() for name in names]
    return tuple(sorted(range(len(names)), key=lambda i: (keys[i], i)))


# --------------------------------------------------------------------------- neighbour graph


@dataclass(frozen=True)
class NeighbourGraph:
    """Whom each peer shares its secrets with and pairs masks with.

    ``degree`` excludes the peer itself; ``neighbours(u)`` includes it.  For ``"sparse"`` the
    graph is the seed-permuted Harary ring described in the module docstring.
    """

    kind: GraphKind
    n: int
    degree: int
    share_threshold: int
    seed: bytes
    names: tuple[str, ...] = ()
    """The roster's names (id = position); if given, the ring is keyed by them."""
    # ring[i] = peer at ring position i; ring_pos[peer] = its ring position (sparse only).
    _ring: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _ring_pos: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"need at least one peer, got n={self.n}")
        if not isinstance(self.seed, bytes):
            raise TypeError(f"seed must be bytes, got {type(self.seed).__name__}")
        if self.kind == "complete":
            if self.degree != self.n - 1:
                raise ValueError(
                    f"complete graph on {self.n} peers has degree {self.n - 1}, got {self.degree}"
                )
            ring: tuple[int, ...] = tuple(range(self.n))
            ring_pos = ring
        elif self.kind == "sparse":
            if self.degree < 2 or self.degree % 2 or self.degree > self.n - 2:
                raise ValueError(
                    f"sparse graph degree must be even and in [2, n-2] = [2, {self.n - 2}], "
                    f"got {self.degree}"
                )
            if self.names:
                if len(self.names) != self.n:
                    raise ValueError(f"{len(self.names)} names for a roster of {self.n}")
                ring = seeded_order_by_name(self.names, self.seed, GRAPH_LABEL)
            else:
                ring = seeded_order(range(self.n), self.seed, GRAPH_LABEL)
            pos = [0] * self.n
            for i, peer in enumerate(ring):
                pos[peer] = i
            ring_pos = tuple(pos)
        else:
            raise ValueError(f"unknown graph kind {self.kind!r}: use 'complete' or 'sparse'")
        if not (self.degree + 1) < 2 * self.share_threshold <= 2 * (self.degree + 1):
            raise ValueError(
                f"share_threshold {self.share_threshold} must be in "
                f"({(self.degree + 1) / 2}, {self.degree + 1}] for a neighbourhood of "
                f"{self.degree + 1} peers"
            )
        object.__setattr__(self, "_ring", ring)
        object.__setattr__(self, "_ring_pos", ring_pos)

    def _check_peer(self, peer: int) -> None:
        if not 0 <= peer < self.n:
            raise ValueError(f"peer {peer} is not in the roster 0..{self.n - 1}")

    def neighbours(self, peer: int) -> tuple[int, ...]:
        """Sorted closed neighbourhood of ``peer`` (``degree + 1`` ids, ``peer`` included)."""
        self._check_peer(peer)
        if self.kind == "complete":
            return self._ring
        half = self.degree // 2
        p = self._ring_pos[peer]
        n = self.n
        ring = self._ring
        return tuple(sorted(ring[(p + j) % n] for j in range(-half, half + 1)))

    def are_neighbours(self, a: int, b: int) -> bool:
        """Whether ``a`` and ``b`` share secrets/masks (true for ``a == b``)."""
        self._check_peer(a)
        self._check_peer(b)
        if self.kind == "complete":
            return True
        gap = abs(self._ring_pos[a] - self._ring_pos[b])
        return min(gap, self.n - gap) <= self.degree // 2


def complete_graph(n: int, threshold: int) -> NeighbourGraph:
    """Bonawitz's complete graph: every peer shares with all ``n`` peers, threshold ``t``."""
    check_threshold(n, threshold)
    return NeighbourGraph("complete", n, n - 1, threshold, b"")


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class SparseParameters:
    """Outcome of the degree/threshold search (log2 of the union-bounded probabilities)."""

    degree: int
    share_threshold: int
    dropout_rate: float
    corrupt_rate: float
    log2_failure: float
    log2_security: float


_NEG_INF = -math.inf
_LN2 = math.log(2.0)


def _logaddexp(a: float, b: float) -> float:
    if a == _NEG_INF:
        return b
    if b == _NEG_INF:
        return a
    hi, lo = (a, b) if a >= b else (b, a)
    return hi + math.log1p(math.exp(lo - hi))


def _log_pmf(m: int, i: int, p: float) -> float:
    """log P[Bin(m, p) = i]."""
    if p <= 0.0:
        return 0.0 if i == 0 else _NEG_INF
    if p >= 1.0:
        return 0.0 if i == m else _NEG_INF
    return (
        math.lgamma(m + 1)
        - math.lgamma(i + 1)
        - math.lgamma(m - i + 1)
        + i * math.log(p)
        + (m - i) * math.log1p(-p)
    )


def _log_tail_ge(m: int, c: int, p: float) -> float:
    """An upper bound on log P[Bin(m, p) >= c], tight to a relative 1e-20.

    Terms are summed exactly (log space) from ``c`` upward; once past the mode a term falls
    below e^-50 of the running total, the rest (decreasing geometrically with ratio ``r``) is
    bounded by ``term * r / (1 - r)`` and added.  Over-estimating is the conservative
    direction for every use here (all tails are probabilities of bad events)."""
    if c <= 0:
        return 0.0
    if c > m or p <= 0.0:
        return _NEG_INF
    if p >= 1.0:
        return 0.0
    log_odds = math.log(p) - math.log1p(-p)
    mode = math.floor((m + 1) * p)
    total = _NEG_INF
    lp = _log_pmf(m, c, p)
    i = c
    while True:
        total = _logaddexp(total, lp)
        if i == m:
            break
        step = math.log((m - i) / (i + 1)) + log_odds  # log pmf(i+1) - log pmf(i)
        if i >= mode and step < 0.0 and lp < total - 50.0:
            rest = lp + step - math.log1p(-math.exp(step))  # >= sum of all terms above i
            total = _logaddexp(total, rest)
            break
        lp += step
        i += 1
    return min(total, 0.0)


def _smallest_safe_count(m: int, p: float, log_bound: float) -> int:
    """Smallest ``c >= 1`` with ``log P[Bin(m, p) >= c] < log_bound`` (``log_bound < log 1/2``).

    The tail is non-increasing in ``c`` and at least 1/2 at ``floor(m p)`` (a median), so the
    answer lies in ``(floor(m p), m + 1]``; binary search."""
    lo = math.floor(m * p)  # tail(lo) >= 1/2 > bound
    hi = m + 1  # tail(hi) = 0 < bound
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _log_tail_ge(m, mid, p) < log_bound:
            hi = mid
        else:
            lo = mid
    return max(hi, 1)


def _check_rate(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
        raise ValueError(f"{name} must be a probability in [0, 1), got {value!r}")


def default_dropout_rate(n: int, threshold: int) -> float:
    """``min(0.15, 1 - t/n)``: the tolerated dropout fraction, capped (see module docstring)."""
    check_threshold(n, threshold)
    return min(DEFAULT_DROPOUT_CAP, 1.0 - threshold / n)


def sparse_parameters(
    n: int,
    threshold: int,
    *,
    dropout_rate: float | None = None,
    corrupt_rate: float = 0.0,
    security_bits: int = SECURITY_BITS,
    correctness_bits: int = CORRECTNESS_BITS,
) -> SparseParameters | None:
    """Degree and local threshold of the SecAgg+ Harary graph, or ``None`` if the complete
    graph is needed (no even degree ``< n - 1`` meets the targets).  See the module docstring."""
    check_threshold(n, threshold)
    delta = default_dropout_rate(n, threshold) if dropout_rate is None else float(dropout_rate)
    _check_rate("dropout_rate", delta)
    _check_rate("corrupt_rate", corrupt_rate)
    if security_bits < 1 or correctness_bits < 1:
        raise ValueError("security_bits and correctness_bits must be positive")
    return _search(n, delta, float(corrupt_rate), security_bits, correctness_bits)


@lru_cache(maxsize=256)
def _search(
    n: int, delta: float, gamma: float, security_bits: int, correctness_bits: int
) -> SparseParameters | None:
    if 2 * delta + gamma >= 1.0:
        return None  # survivors (1-δ) can never outnumber (1+γ)/2 of a neighbourhood
    log_n = math.log(n)
    log_sec = -(security_bits + 1) * _LN2  # per security event; two events -> 2^-security_bits
    log_fail = -correctness_bits * _LN2
    rho = min(1.0, delta + gamma)
    for k in range(2, n - 1, 2):
        # Cheap necessary condition first: s >= k/2 + 1, so failure >= P[survivors == k/2].
        if log_n + _log_pmf(k + 1, k // 2, 1.0 - delta) >= log_fail:
            continue
        # 2. connectivity after removing dropped/corrupt peers
        log_disconnect = 2 * log_n - _LN2 + k * math.log(rho) if rho > 0.0 else _NEG_INF
        if log_disconnect >= log_sec:
            continue
        # 1. local threshold from the corrupt-neighbour tail
        c_star = _smallest_safe_count(k, gamma, log_sec - log_n)
        s = (c_star + k + 2) // 2  # ceil((c* + k + 1) / 2)
        if s > k + 1:
            continue
        log_share = log_n + _log_tail_ge(k, 2 * s - k - 1, gamma)
        # 3. correctness: at least s survivors in every closed neighbourhood
        log_failure = log_n + _log_tail_ge(k + 1, k + 2 - s, delta)
        if log_failure >= log_fail:
            continue
        return SparseParameters(
            degree=k,
            share_threshold=s,
            dropout_rate=delta,
            corrupt_rate=gamma,
            log2_failure=log_failure / _LN2,
            log2_security=_logaddexp(log_share, log_disconnect) / _LN2,
        )
    return None


def sparse_graph(
    n: int,
    threshold: int,
    seed: bytes,
    *,
    names: Sequence[str] = (),
    dropout_rate: float | None = None,
    corrupt_rate: float = 0.0,
    security_bits: int = SECURITY_BITS,
    correctness_bits: int = CORRECTNESS_BITS,
) -> NeighbourGraph:
    """SecAgg+ random Harary graph; falls back to ``complete_graph(n, threshold)`` when no
    sparse degree meets the targets (see ``sparse_parameters``)."""
    params = sparse_parameters(
        n,
        threshold,
        dropout_rate=dropout_rate,
        corrupt_rate=corrupt_rate,
        security_bits=security_bits,
        correctness_bits=correctness_bits,
    )
    if params is None:
        return complete_graph(n, threshold)
    return NeighbourGraph("sparse", n, params.degree, params.share_threshold, seed,
                          tuple(names))


def session_graph_seed(session: bytes) -> bytes:
    """The neighbour graph's seed for every round of ``session``: a hash of the session id.

    Why one graph per session. Every link a peer opens serves the rest of the session,
    so a round whose roster is the previous round's reuses all of them (the sparse
    graph used to be redrawn per round, which rebuilt a session's links every round:
    3-4 s of 150 peers' sharing phase, round after round). A fixed graph is acceptable:
    the SecAgg+ analysis (Bell et al., CCS 2020, sec. 3-4) needs the graph drawn
    independently of which peers are corrupt, not fresh per execution; its secrecy
    comes from the round's keys, which stay fresh every round (new X25519 pairs, new
    b_u, masks bound to session and round), and the server, who knows any round's
    graph anyway, learns nothing from seeing the same one again. It also takes a choice
    away from a malicious server: derived from the session id, the seed cannot be
    redrawn round after round until the graph suits it; each peer checks it.
    A round with another roster (peers gone or new) keeps most of the graph: the ring is
    keyed by the peers' names (the roster sends every peer all n names, some 12 bytes
    each, so that each can check its own neighbourhood), so a peer more or less moves
    only the neighbourhoods next to it. Keyed by roster indices instead, any change of
    the roster redrew the whole ring, and its next R1 reopened every link (at 1,000
    peers, 24,000 of them, some 40 CPU-seconds, whenever a peer failed to register).
    """
    return hashlib.sha256(SESSION_SEED_LABEL + session).digest()


def make_graph(kind: GraphKind, n: int, threshold: int, seed: bytes,
               threat_model: str = "honest-but-curious",
               names: Sequence[str] = ()) -> NeighbourGraph:
    """``complete_graph`` or ``sparse_graph`` by name; the sparse graph for the default
    dropout rate and the corrupt fraction of ``threat_model`` (:func:`corrupt_rate_for`),
    its ring keyed by ``names`` when given (see the module docstring).

    Graphs are immutable, so the last few are cached: every round of a session with
    the same roster asks for the same one, and so does every peer of a process that
    runs many (n hashes and a sort, and 2n ints kept per copy, at n = 1,000)."""
    return _cached_graph(kind, n, threshold, seed, threat_model, tuple(names))


@lru_cache(maxsize=16)
def _cached_graph(kind: GraphKind, n: int, threshold: int, seed: bytes,
                  threat_model: str, names: tuple[str, ...]) -> NeighbourGraph:
    if kind == "complete":
        return complete_graph(n, threshold)
    if kind == "sparse":
        return sparse_graph(n, threshold, seed, names=names,
                            corrupt_rate=corrupt_rate_for(threat_model))
    raise ValueError(f"unknown graph kind {kind!r}: use 'complete' or 'sparse'")


# --------------------------------------------------------------------------- accumulation tree


@dataclass(frozen=True)
class AccumulationTree:
    """Implicit ``fan_in``-ary tree over ``order``: position 0 is the root, position ``p`` has
    children at positions ``fan_in*p + 1 .. fan_in*p + fan_in``.  Methods taking a peer raise
    ``ValueError`` if it is not a member."""

    order: tuple[int, ...]
    fan_in: int
    _pos: dict[int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.fan_in < 2:
            raise ValueError(f"fan_in must be at least 2, got {self.fan_in}")
        if not self.order:
            raise ValueError("an accumulation tree needs at least one member")
        pos = {peer: i for i, peer in enumerate(self.order)}
        if len(pos) != len(self.order):
            raise ValueError("tree order lists a peer more than once")
        object.__setattr__(self, "_pos", pos)

    def __len__(self) -> int:
        return len(self.order)

    def __contains__(self, peer: object) -> bool:
        return isinstance(peer, int) and not isinstance(peer, bool) and peer in self._pos

    def root(self) -> int:
        return self.order[0]

    def position(self, peer: int) -> int:
        try:
            return self._pos[peer]
        except KeyError:
            raise ValueError(f"peer {peer} is not in the accumulation tree") from None

    def parent(self, peer: int) -> int | None:
        p = self.position(peer)
        return None if p == 0 else self.order[(p - 1) // self.fan_in]

    def children(self, peer: int) -> tuple[int, ...]:
        first = self.fan_in * self.position(peer) + 1
        return self.order[first : first + self.fan_in]

    def ancestors(self, peer: int) -> tuple[int, ...]:
        """Ancestors of ``peer``, nearest first, root last (empty for the root)."""
        p = self.position(peer)
        out: list[int] = []
        while p:
            p = (p - 1) // self.fan_in
            out.append(self.order[p])
        return tuple(out)

    def depth(self, peer: int) -> int:
        return self._depth_of(self.position(peer))

    def _depth_of(self, p: int) -> int:
        d = 0
        while p:
            p = (p - 1) // self.fan_in
            d += 1
        return d

    @property
    def max_depth(self) -> int:
        return self._depth_of(len(self.order) - 1)

    def subtree(self, peer: int) -> tuple[int, ...]:
        """``peer`` and all its descendants, level by level in tree order."""
        lo = hi = self.position(peer)
        size = len(self.order)
        out: list[int] = []
        while lo < size:
            out.extend(self.order[lo : min(hi, size - 1) + 1])
            lo, hi = self.fan_in * lo + 1, self.fan_in * hi + self.fan_in
        return tuple(out)

    def nearest_live_ancestor(self, peer: int, is_alive: Callable[[int], bool]) -> int | None:
        """First ancestor (nearest first) for which ``is_alive`` holds, else ``None``."""
        for ancestor in self.ancestors(peer):
            if is_alive(ancestor):
                return ancestor
        return None


def build_tree(members: Iterable[int], seed: bytes, fan_in: int = 8) -> AccumulationTree:
    """Accumulation tree over ``members`` (distinct ids) in the seed-derived random order."""
    if fan_in < 2:
        raise ValueError(f"fan_in must be at least 2, got {fan_in}")
    items = list(members)
    if not items:
        raise ValueError("cannot build an accumulation tree over no members")
    if len(set(items)) != len(items):
        raise ValueError("members lists a peer more than once")
    return AccumulationTree(seeded_order(items, seed, TREE_LABEL), fan_in)
