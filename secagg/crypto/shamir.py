"""Shamir t-of-n secret sharing of 32-byte secrets over GF(PRIME).

PRIME = 2^256 + 297 is the smallest prime above 2^256 (checked by a Miller-Rabin test
in tests/test_crypto.py): the smallest field that holds every 32-byte secret, so
shares stay 33 bytes.

The range check in ``reconstruct`` (a value >= 2^256 cannot be a secret) only guards
the encoding: a wrong share set gives a near-uniform field element, which lands in
[2^256, PRIME) with probability ~2^-248, so it practically never fires. Real
detection of bad shares needs redundancy (``reconstruct_checked`` with more than
``threshold`` shares) or an authenticated secret (e.g. re-deriving a public key).

A server reconstructing many secrets calls ``reconstruct_many`` (or
``reconstruct_many_checked``) once with all of them, having asked the same holders
for every secret it can: the Lagrange weights are computed once per distinct set of
holder indices, so choosing few sets (ideally one, e.g. the t lowest live holder
indices) leaves one t-term dot product per secret. ``Share.from_packed`` parses a
holder's packed answer for many secrets at once.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from secagg.crypto.keys import RandomBytes
from secagg.errors import ShamirError

PRIME = 2**256 + 297
SECRET_LENGTH = 32
SHARE_LENGTH = 33  # ceil(log2(PRIME) / 8): values reach 2^256 + 296

_SECRET_BOUND = 2**256
# Coefficients: draw 40 bytes (320 bits) and accept below the largest multiple of PRIME
# that fits, then reduce. Exactly uniform, and rejects with probability < 2^-63, so one
# random_bytes call per polynomial is the norm.
_SAMPLE_BYTES = 40
_SAMPLE_LIMIT = (2 ** (8 * _SAMPLE_BYTES) // PRIME) * PRIME


@dataclass(frozen=True)
class Share:
    """The point (index, value) of the sharing polynomial; ``index`` is x >= 1."""

    index: int
    value: int

    def __post_init__(self) -> None:
        if not 1 <= self.index < PRIME:
            raise ShamirError(f"share index must be in [1, PRIME), got {self.index}")
        if not 0 <= self.value < PRIME:
            raise ShamirError(f"share value for index {self.index} is outside [0, PRIME)")

    def to_bytes(self) -> bytes:
        """The value as 33 bytes big-endian (the index travels separately)."""
        return self.value.to_bytes(SHARE_LENGTH, "big")

    @classmethod
    def from_bytes(cls, index: int, data: bytes) -> Share:
        """Parse ``to_bytes`` output; raise ShamirError on wrong length or range."""
        if len(data) != SHARE_LENGTH:
            raise ShamirError(
                f"share for index {index} must be {SHARE_LENGTH} bytes, got {len(data)}"
            )
        return cls(index, int.from_bytes(data, "big"))

    @classmethod
    def from_packed(cls, index: int, data: bytes) -> list[Share]:
        """Parse consecutive 33-byte values, all at ``index``: one holder's answer for
        many secrets. Same checks as :meth:`from_bytes`, once for the whole answer."""
        if len(data) % SHARE_LENGTH:
            raise ShamirError(f"shares for index {index} must be a multiple of "
                              f"{SHARE_LENGTH} bytes, got {len(data)}")
        if not 1 <= index < PRIME:
            raise ShamirError(f"share index must be in [1, PRIME), got {index}")
        values = [int.from_bytes(data[i:i + SHARE_LENGTH], "big")
                  for i in range(0, len(data), SHARE_LENGTH)]
        if values and max(values) >= PRIME:
            raise ShamirError(f"share value for index {index} is outside [0, PRIME)")
        # Validated above as a whole, so the per-share __post_init__ is skipped: a server
        # parses hundreds of thousands of shares per round.
        shares = []
        for value in values:
            share = object.__new__(cls)
            share.__dict__.update(index=index, value=value)
            shares.append(share)
        return shares


def _check_indices(indices: Sequence[int]) -> None:
    seen: set[int] = set()
    for x in indices:
        if x in seen:
            raise ShamirError(f"duplicate share index {x}")
        seen.add(x)


def _random_coefficient(random_bytes: RandomBytes) -> int:
    while True:
        r = int.from_bytes(random_bytes(_SAMPLE_BYTES), "big")
        if r < _SAMPLE_LIMIT:
            return r % PRIME


def split(
    secret: bytes,
    *,
    threshold: int,
    indices: Sequence[int],
    random_bytes: RandomBytes = os.urandom,
) -> list[Share]:
    """Share a 32-byte ``secret`` so that any ``threshold`` of the shares recover it."""
    if len(secret) != SECRET_LENGTH:
        raise ShamirError(f"secret must be {SECRET_LENGTH} bytes, got {len(secret)}")
    if not 1 <= threshold <= len(indices):
        raise ShamirError(f"threshold must be in [1, {len(indices)}], got {threshold}")
    for x in indices:
        if not 1 <= x < PRIME:
            raise ShamirError(f"share index must be in [1, PRIME), got {x}")
    _check_indices(indices)

    degree = threshold - 1
    raw = random_bytes(_SAMPLE_BYTES * degree)
    coeffs = []  # highest degree first, ready for Horner
    for k in range(degree):
        r = int.from_bytes(raw[k * _SAMPLE_BYTES : (k + 1) * _SAMPLE_BYTES], "big")
        coeffs.append(r % PRIME if r < _SAMPLE_LIMIT else _random_coefficient(random_bytes))
    coeffs.append(int.from_bytes(secret, "big"))

    head, tail = coeffs[0], coeffs[1:]
    shares = []
    for x in indices:
        # Horner with a single reduction at the end: indices are small (1..n), so acc
        # only grows by log2(x) bits per step, which is much cheaper than reducing
        # at every step (~1.7x faster for t=20, n=40). gmpy2 did not help here.
        acc = head
        for c in tail:
            acc = acc * x + c
        shares.append(Share(x, acc % PRIME))
    return shares


# --------------------------------------------------------------------------
# Interpolation at 0: Lagrange weights, computed once per set of share indices.
#
# The secret is f(0) = sum_i l_i * y_i with l_i = prod_{j != i} x_j / (x_j - x_i) over the
# indices x of the shares used. The weights depend only on the index set, so a server
# that reconstructs many secrets from the same holders pays for them once; what remains
# per secret is one t-term dot product. Two ways to compute a set's weights, both with
# the differences multiplied as exact small integers (numpy int64 blocks, then Python
# ints) and reduced once, instead of t^2 modular multiplications:
#
# * direct: l_i = (prod_j x_j / x_i) / prod_{j != i} (x_j - x_i), O(t^2) small products,
#   and one modular inversion for all the new sets of a batch (Montgomery's trick);
# * complement, for a set S that fills most of [1, N] with N = max(S): against the full
#   range the weights are signed binomials, and removing the complement C = [1, N] \ S
#   gives l_i = (-1)^(x_i - 1) * prod(S) * prod_{c in C} (x_c - x_i) / (x_i! (N - x_i)!),
#   O(t * |C|) small products and no inversion (a cached inverse-factorial table).
#
# The complement form is what makes a large t cheap on the complete graph: a server that
# asks the t lowest live holders for every secret has |C| = the gone holders below the
# highest one asked. Measured for t = 251 of n = 500: a scattered set about 6 ms direct;
# the 251 lowest of 350 live holders (110 gaps) about 3 ms by complement; the former
# t^2 modular products 55 ms. Per secret, the dot product then costs about 0.07 ms.

_NUMPY_INDEX_BOUND = 1 << 20
"""Below this, index differences go through numpy int64 products (exact: see below)."""
_NUMPY_BLOCK = 1 << 20
"""Most int64 differences materialized at once (8 MB)."""
_COMPLEMENT_LIMIT = 1 << 17
"""Largest N for the complement form (its inverse-factorial table is O(N) field elements)."""
_BASIS_CACHE_SIZE = 128
"""Index sets whose weights are kept between calls (a few KB to ~40 KB each at t = 251)."""


@dataclass(frozen=True)
class _Basis:
    """Lagrange weights at 0 for one set of share indices."""

    product: int
    """prod(indices), exact (used for the weights at other points)."""
    weights: dict[int, int]
    """index -> l_index(0) mod PRIME."""


_BASES: dict[tuple[int, ...], _Basis] = {}
_INV_FACTORIALS: list[int] = [1, 1]


def _difference_products(points: Sequence[int], others: Sequence[int]) -> list[int]:
    """For each p in ``points``: prod over o in ``others``, o != p, of (o - p), exactly."""
    if not others:
        return [1] * len(points)
    top = max(max(points), max(others))
    if top >= _NUMPY_INDEX_BOUND:
        return [math.prod([o - p for o in others if o != p]) for p in points]
    # |o - p| < 2^bits, so a product of `per` differences stays below 2^62: exact in int64.
    # Grouping them cuts the Python-level big-integer multiplications by `per`.
    bits = top.bit_length()
    per = max(1, 62 // bits)
    row = np.asarray(others, dtype=np.int64)
    width = len(others) + (-len(others) % per)
    rows_per_block = max(1, _NUMPY_BLOCK // width)
    out: list[int] = []
    for start in range(0, len(points), rows_per_block):
        column = np.asarray(points[start:start + rows_per_block], dtype=np.int64)[:, None]
        diffs = np.ones((column.shape[0], width), dtype=np.int64)
        np.subtract(row[None, :], column, out=diffs[:, :len(others)])
        diffs[diffs == 0] = 1  # o == p is skipped
        grouped = diffs.reshape(column.shape[0], -1, per).prod(axis=2)
        out.extend(math.prod(r) for r in grouped.tolist())
    return out


def _inverse_all(values: Sequence[int]) -> list[int]:
    """Inverses of nonzero field elements with one modular inversion (Montgomery's trick)."""
    prefix = []
    acc = 1
    for v in values:
        prefix.append(acc)
        acc = acc * v % PRIME
    inv = pow(acc, -1, PRIME)
    out = [0] * len(values)
    for i in range(len(values) - 1, -1, -1):
        out[i] = inv * prefix[i] % PRIME
        inv = inv * values[i] % PRIME
    return out


def _inverse_factorials(top: int) -> list[int]:
    """1/k! mod PRIME for k = 0..top (at least), cached and grown geometrically."""
    global _INV_FACTORIALS
    table = _INV_FACTORIALS
    if len(table) > top:
        return table
    size = min(max(top + 1, 2 * len(table)), _COMPLEMENT_LIMIT + 1)
    fact = 1
    for k in range(2, size):
        fact = fact * k % PRIME
    table = [1] * size
    table[-1] = pow(fact, -1, PRIME)
    for k in range(size - 1, 1, -1):
        table[k - 1] = table[k] * k % PRIME
    _INV_FACTORIALS = table
    return table


def _complement_basis(indices: tuple[int, ...]) -> _Basis:
    """Weights for a sorted ``indices`` that fills most of [1, max]: see the notes above."""
    top = indices[-1]
    members = set(indices)
    complement = [c for c in range(1, top + 1) if c not in members]
    inv_fact = _inverse_factorials(top)
    product = math.prod(indices)
    p_mod = product % PRIME
    weights = {}
    for x, removed in zip(indices, _difference_products(indices, complement), strict=True):
        w = p_mod * (removed % PRIME) % PRIME * inv_fact[x] % PRIME * inv_fact[top - x] % PRIME
        weights[x] = w if x % 2 else (PRIME - w) % PRIME
    return _Basis(product, weights)


def _bases_for(keys: Sequence[tuple[int, ...]]) -> dict[tuple[int, ...], _Basis]:
    """The basis of every (sorted, distinct) index tuple in ``keys``, cached."""
    found: dict[tuple[int, ...], _Basis] = {}
    direct: list[tuple[int, ...]] = []
    for key in keys:
        if key in found:
            continue
        cached = _BASES.get(key)
        if cached is not None:
            found[key] = cached
        elif key[-1] - len(key) < len(key) - 1 and key[-1] <= _COMPLEMENT_LIMIT:
            found[key] = _complement_basis(key)
        else:
            direct.append(key)
            found[key] = _Basis(0, {})  # placeholder, filled below
    denominators: list[int] = []
    for key in direct:
        denominators.extend(d % PRIME for d in _difference_products(key, key))
    inverses = iter(_inverse_all(denominators))
    for key in direct:
        product = math.prod(key)
        found[key] = _Basis(product, {x: product // x % PRIME * next(inverses) % PRIME
                                      for x in key})
    for key, basis in found.items():
        if key not in _BASES:
            if len(_BASES) >= _BASIS_CACHE_SIZE:
                _BASES.pop(next(iter(_BASES)), None)  # oldest first
            _BASES[key] = basis
    return found


def _weights_at(basis: _Basis, at: int) -> dict[int, int]:
    """l_i(at) for a point ``at`` outside the basis, from the weights at 0.

    l_i(at) / l_i(0) = prod_{j != i} (x_j - at) / x_j, so
    l_i(at) = l_i(0) * x_i * prod_j (x_j - at) / (prod_j x_j * (x_i - at)).
    """
    xs = list(basis.weights)
    scale = math.prod(x - at for x in xs) % PRIME
    p_mod = basis.product % PRIME
    inverses = _inverse_all([p_mod * ((x - at) % PRIME) % PRIME for x in xs])
    return {x: basis.weights[x] * x % PRIME * scale % PRIME * inv % PRIME
            for x, inv in zip(xs, inverses, strict=True)}


def _combine(shares: Sequence[Share], weights: dict[int, int]) -> int:
    return sum(s.value * weights[s.index] for s in shares) % PRIME


def _validate(shares: Sequence[Share], threshold: int) -> tuple[int, ...]:
    """Check one share list; return the sorted indices of the ``threshold`` it uses."""
    if threshold < 1:
        raise ShamirError(f"threshold must be >= 1, got {threshold}")
    if len(shares) < threshold:
        raise ShamirError(f"need at least {threshold} shares to reconstruct, got {len(shares)}")
    _check_indices([s.index for s in shares])
    return tuple(sorted(s.index for s in shares[:threshold]))


def _to_secret(value: int) -> bytes:
    if value >= _SECRET_BOUND:
        # A real secret is < 2^256, so this set of shares is wrong or insufficient.
        raise ShamirError("reconstructed value is not a valid secret: wrong or inconsistent shares")
    return value.to_bytes(SECRET_LENGTH, "big")


class ReconstructionError(ShamirError):
    """One secret of a batch failed; ``position`` is its place in the batch."""

    def __init__(self, position: int, message: str) -> None:
        super().__init__(f"secret {position}: {message}")
        self.position = position


def _reconstruct_all(share_lists: Sequence[Sequence[Share]], threshold: int,
                     checked: bool) -> list[bytes]:
    """Both batch functions; raises ShamirError (threshold) or ReconstructionError."""
    if threshold < 1:
        raise ShamirError(f"threshold must be >= 1, got {threshold}")
    keys: list[tuple[int, ...]] = []
    for position, shares in enumerate(share_lists):
        try:
            keys.append(_validate(shares, threshold))
        except ShamirError as exc:
            raise ReconstructionError(position, str(exc)) from None
    bases = _bases_for(keys)
    # Weights at the extra shares' indices, shared by every secret with the same basis.
    elsewhere: dict[tuple[tuple[int, ...], int], dict[int, int]] = {}
    secrets = []
    for position, (shares, key) in enumerate(zip(share_lists, keys, strict=True)):
        basis = bases[key]
        used = shares[:threshold]
        if checked:
            for extra in shares[threshold:]:
                weights = elsewhere.get((key, extra.index))
                if weights is None:
                    weights = elsewhere[key, extra.index] = _weights_at(basis, extra.index)
                if _combine(used, weights) != extra.value:
                    raise ReconstructionError(
                        position,
                        f"share at index {extra.index} is inconsistent with the shares at "
                        f"indices {[s.index for s in used]}: one of them is corrupted")
        try:
            secrets.append(_to_secret(_combine(used, basis.weights)))
        except ShamirError as exc:
            raise ReconstructionError(position, str(exc)) from None
    return secrets


def reconstruct_many(share_lists: Sequence[Sequence[Share]], *, threshold: int) -> list[bytes]:
    """``[reconstruct(shares, threshold=threshold) for shares in share_lists]``, faster.

    The Lagrange weights depend only on the set of share indices used (the first
    ``threshold`` of each list, in any order), so they are computed once per
    distinct set, and kept for later calls for a few recent sets; each secret then
    costs one ``threshold``-term dot product. Pass lists that draw on few distinct
    index sets (the same ``threshold`` holders for every secret where possible):
    a new set of t indices costs O(t^2) small-integer products, or O(t * g) when its
    indices fill [1, max] but for g gaps.

    Raises :class:`ReconstructionError` (a :class:`ShamirError`) naming the
    ``position`` of the first list that fails, or ShamirError for a bad threshold.
    """
    return _reconstruct_all(share_lists, threshold, checked=False)


def reconstruct_many_checked(share_lists: Sequence[Sequence[Share]], *,
                             threshold: int) -> list[bytes]:
    """``reconstruct_checked`` for each list, with the weights shared as in
    :func:`reconstruct_many`; each extra share costs one more dot product."""
    return _reconstruct_all(share_lists, threshold, checked=True)


def _single(shares: Sequence[Share], threshold: int, checked: bool) -> bytes:
    try:
        return _reconstruct_all([shares], threshold, checked)[0]
    except ReconstructionError as exc:
        # One list: report the failure without the batch position.
        message = str(exc).removeprefix(f"secret {exc.position}: ")
        raise ShamirError(message) from None


def reconstruct(shares: Sequence[Share], *, threshold: int) -> bytes:
    """Recover the secret from the first ``threshold`` shares (Lagrange at 0)."""
    return _single(shares, threshold, checked=False)


def reconstruct_checked(shares: Sequence[Share], *, threshold: int) -> bytes:
    """Like ``reconstruct``, but also check every extra share lies on the same polynomial."""
    return _single(shares, threshold, checked=True)
