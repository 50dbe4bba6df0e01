"""Clipping, scaling, stochastic rounding and the ring Z_{2^k}.

The client side of the distributed DP pipeline turns a float vector into
integers whose L2 norm is bounded, so that integer noise calibrated to that
bound makes the sum private (Kairouz, Liu, Steinke, ICML 2021, arXiv 2102.06387,
Sections 3-4):

* :func:`clip_l2` scales ``x`` down to L2 norm ``c`` if it is longer.
* The caller multiplies by the scale ``gamma`` (``DPParameters.scale``).
* :func:`stochastic_round` rounds each coordinate to ``floor(v)`` or
  ``floor(v) + 1``, up with probability ``v - floor(v)``, so ``E[q] = v``
  (unbiased up to the 2^-53 resolution of ``Generator.random``). Every
  coordinate moves by less than 1, hence ``||q|| < ||v|| + sqrt(D)``
  deterministically: the rounded L2 sensitivity is ``c gamma + sqrt(D)``.
* :func:`conditional_stochastic_round` (beta > 0) re-draws the rounding until
  ``||q||^2 <= (c gamma)^2 + D/4 + sqrt(2 ln(1/beta)) (c gamma + sqrt(D)/2)``,
  which a single draw meets with probability >= 1 - beta (Kairouz et al.,
  Theorem 1 / Section 4.1; the bound is :func:`inflated_l2_bound`). The bound is
  much tighter than ``c gamma + sqrt(D)`` when ``c gamma`` is not much larger
  than ``sqrt(D)``. The re-draw depends only on the norm of the rounded vector,
  which the sensitivity analysis accounts for.
* :func:`to_ring` / :func:`from_ring`: signed int64 <-> Z_{2^k} (two's
  complement, k = 32 or 64). ``from_ring`` centres: a ring element is read as the
  integer in ``[-2^(k-1), 2^(k-1))``, which is the true sum whenever that lies
  in this range (what ``DPParameters`` sizes the scale for).

The randomness of rounding is not secret (the noise is what protects), so any
:class:`numpy.random.Generator` works; the legacy ``np.random`` functions are
never used.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

from secagg.encoding import to_signed

__all__ = [
    "clip_l2",
    "conditional_stochastic_round",
    "from_ring",
    "inflated_l2_bound",
    "l1_bound",
    "ring_dtype",
    "stochastic_round",
    "to_ring",
]

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


def clip_l2(x: npt.ArrayLike, clip: float) -> tuple[FloatArray, bool]:
    """``x`` scaled to L2 norm at most ``clip`` (float64 copy), and whether it was scaled."""
    arr = np.array(x, dtype=np.float64)
    norm = math.sqrt(float(np.dot(arr.ravel(), arr.ravel())))
    if not math.isfinite(norm):
        raise ValueError("the vector has a non-finite coordinate (or its norm overflows)")
    if norm > clip:
        arr *= clip / norm
        return arr, True
    return arr, False


def inflated_l2_bound(scaled_clip: float, dim: int, beta: float = 0.0) -> float:
    """L2 norm bound after stochastic rounding of a vector of norm <= ``scaled_clip``.

    ``beta == 0``: ``scaled_clip + sqrt(dim)`` (holds for every draw). ``beta > 0``:
    the minimum of that and the conditional bound enforced by
    :func:`conditional_stochastic_round`.
    """
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    root = math.sqrt(dim)
    plain = scaled_clip + root
    if beta == 0.0:
        return plain
    squared = (scaled_clip**2 + 0.25 * dim
               + math.sqrt(2.0 * math.log(1.0 / beta)) * (scaled_clip + 0.5 * root))
    return min(plain, math.sqrt(squared))


def l1_bound(l2: float, dim: int) -> float:
    """L1 bound of an integer vector of L2 norm <= ``l2``: ``l2 min(sqrt D, l2)``.

    The second factor holds because every non-zero integer has |v_i| <= v_i^2.
    """
    return l2 * min(math.sqrt(dim), l2)


def stochastic_round(v: npt.NDArray[np.floating[Any]], rng: np.random.Generator) -> IntArray:
    """Unbiased randomized rounding of every coordinate of ``v`` (not modified)."""
    low = np.floor(v).astype(np.float64, copy=False)
    frac = np.subtract(v, low)
    up = rng.random(v.shape[0]) < frac
    np.add(low, up, out=low)
    rounded: IntArray = low.astype(np.int64)
    return rounded


def conditional_stochastic_round(v: npt.NDArray[np.floating[Any]], rng: np.random.Generator,
                                 l2_bound: float, max_tries: int = 1000) -> IntArray:
    """:func:`stochastic_round`, re-drawn until the L2 norm is at most ``l2_bound``.

    Raises RuntimeError after ``max_tries`` failed draws (with the bound from
    :func:`inflated_l2_bound` and ``||v|| <= scaled_clip``, each draw fails with
    probability at most beta, so this signals a wrong bound, not bad luck).
    """
    for _ in range(max_tries):
        q = stochastic_round(v, rng)
        as_float = q.astype(np.float64)
        if math.sqrt(float(np.dot(as_float, as_float))) <= l2_bound:
            return q
    raise RuntimeError(f"conditional rounding exceeded the L2 bound {l2_bound} in {max_tries} "
                       "draws; set beta=0 or check the clip")


def ring_dtype(bits: int) -> np.dtype[Any]:
    """numpy dtype of Z_{2^bits}: uint32 or uint64."""
    if bits == 32:
        return np.dtype(np.uint32)
    if bits == 64:
        return np.dtype(np.uint64)
    raise ValueError(f"modulus_bits must be 32 or 64, got {bits}")


def to_ring(values: IntArray, bits: int) -> npt.NDArray[np.unsignedinteger[Any]]:
    """Signed integers into Z_{2^bits} (two's complement; wraps modulo 2^bits)."""
    arr = np.asarray(values)
    if arr.dtype != np.int64:
        raise ValueError(f"expected int64 values, got {arr.dtype}")
    dtype = ring_dtype(bits)
    # int64 -> uint32 keeps the low 32 bits and int64 -> uint64 is a bit-for-bit
    # reinterpretation: both are reduction modulo 2^bits.
    return arr.astype(dtype) if bits == 32 else arr.view(dtype).copy()


def from_ring(ring: npt.ArrayLike) -> IntArray:
    """Ring elements as signed int64 in ``[-2^(k-1), 2^(k-1))`` (centred two's complement)."""
    return to_signed(np.asarray(ring))
