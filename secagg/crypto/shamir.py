"""Shamir t-of-n secret sharing of 32-byte secrets over GF(PRIME).

PRIME = 2^256 + 297 is the smallest prime above 2^256 (checked by a Miller-Rabin test
in tests/test_crypto.py): the smallest field that holds every 32-byte secret, so
shares stay 33 bytes.

The range check in ``reconstruct`` (a value >= 2^256 cannot be a secret) only guards
the encoding: a wrong share set gives a near-uniform field element, which lands in
[2^256, PRIME) with probability ~2^-248, so it practically never fires. Real
detection of bad shares needs redundancy (``reconstruct_checked`` with more than
``threshold`` shares) or an authenticated secret (e.g. re-deriving a public key).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

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


@lru_cache(maxsize=4096)
def _lagrange_weights(xs: tuple[int, ...], at: int) -> tuple[int, ...]:
    """Lagrange basis values l_i(at) mod PRIME for the points ``xs``.

    Cached: a simulation reconstructs many secrets from the same surviving index set,
    so the modular inversions are paid once per index set.
    """
    weights = []
    for i, xi in enumerate(xs):
        num = 1
        den = 1
        for j, xj in enumerate(xs):
            if i != j:
                num = num * (at - xj) % PRIME
                den = den * (xi - xj) % PRIME
        weights.append(num * pow(den, -1, PRIME) % PRIME)
    return tuple(weights)


def _lagrange_eval(points: Sequence[Share], at: int) -> int:
    """Evaluate the interpolating polynomial through ``points`` at x = ``at`` (mod PRIME)."""
    weights = _lagrange_weights(tuple(s.index for s in points), at)
    return sum(s.value * w for s, w in zip(points, weights, strict=True)) % PRIME


def _validate(shares: Sequence[Share], threshold: int) -> None:
    if threshold < 1:
        raise ShamirError(f"threshold must be >= 1, got {threshold}")
    if len(shares) < threshold:
        raise ShamirError(f"need at least {threshold} shares to reconstruct, got {len(shares)}")
    _check_indices([s.index for s in shares])


def _to_secret(value: int) -> bytes:
    if value >= _SECRET_BOUND:
        # A real secret is < 2^256, so this set of shares is wrong or insufficient.
        raise ShamirError("reconstructed value is not a valid secret: wrong or inconsistent shares")
    return value.to_bytes(SECRET_LENGTH, "big")


def reconstruct(shares: Sequence[Share], *, threshold: int) -> bytes:
    """Recover the secret from the first ``threshold`` shares (Lagrange at 0)."""
    _validate(shares, threshold)
    return _to_secret(_lagrange_eval(shares[:threshold], 0))


def reconstruct_checked(shares: Sequence[Share], *, threshold: int) -> bytes:
    """Like ``reconstruct``, but also check every extra share lies on the same polynomial."""
    _validate(shares, threshold)
    basis = shares[:threshold]
    for extra in shares[threshold:]:
        if _lagrange_eval(basis, extra.index) != extra.value:
            raise ShamirError(
                f"share at index {extra.index} is inconsistent with the shares at indices "
                f"{[s.index for s in basis]}: one of them is corrupted"
            )
    return _to_secret(_lagrange_eval(basis, 0))
