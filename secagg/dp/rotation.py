"""Randomized Hadamard rotation: ``y = H S x / sqrt(D)`` and its exact inverse.

Why rotate: a model update often has a few large coordinates. Discretization and
the modular sum of secure aggregation are per coordinate, so a spiky vector
either wraps around the ring or forces a coarse scale. After multiplying by
random signs ``S`` and the Walsh-Hadamard matrix ``H`` (entries ±1), every
coordinate is a random ±1 combination of all inputs, so each is about
``||x|| / sqrt(D)`` in magnitude, whatever ``x`` looks like (Kairouz, Liu,
Steinke 2021, Section 4.2). ``H / sqrt(D)`` is symmetric and orthogonal
(``H H = D I``), so the rotation preserves L2 norms and the inverse is
``x = S H y / sqrt(D)``.

* ``D`` is ``dim`` padded with zeros to a power of two (``padded_dim``).
* The signs come from a public per-round 32-byte seed, expanded with the
  project's AES-256-CTR keystream (:class:`secagg.crypto.prg.MaskGenerator`,
  purpose ``"dp-rotation"``): bit ``j`` of keystream word ``i`` (64-bit,
  little-endian) is the sign of coordinate ``64 i + j`` (1 means -1). Every peer
  and the server derive the same signs; nothing secret is involved, the signs
  only need to be independent of the data.
* The transform is O(D log D) numpy with no Python loop over elements. Its
  butterfly stage reshapes to ``(-1, 2, h)`` and writes ``a + b`` and
  ``a - b`` into a second buffer (ping-pong) rather than in place: in place
  needs a temporary for ``a - b`` and one more pass per stage. Below 2^17
  elements every stage is such a butterfly. Above, the first log2(64) stages
  are one matrix product with the 64x64 Hadamard matrix on contiguous rows
  (tiny ``h`` makes butterflies slow); the next stages run chunk by chunk, so
  a chunk stays in the CPU cache across its stages; the last at most six
  stages, which mix chunks, are again one matrix product. On an oversubscribed
  machine OpenBLAS threads slow those products down; ``OPENBLAS_NUM_THREADS=1``
  avoids that. float64 by default; float32 halves memory traffic at ~1e-7
  relative error (the rotation needs no exactness for privacy: clipping
  happens after it).
"""

from __future__ import annotations

import functools
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from secagg.crypto.prg import MaskGenerator

__all__ = ["fwht_inplace", "hadamard_transform", "padded_dim", "rotate", "rotation_signs",
           "unrotate"]

SIGN_PURPOSE = "dp-rotation"
# The seed is already specific to one round; the session/round inputs of the KDF
# are fixed so that the signs depend on nothing but the seed.
_SIGN_SESSION = b"secagg.dp.rotation"
# 64 = 6 stages in one matrix product: big enough to amortise a BLAS call per row
# block, small enough that its 2*64 flops per element stay below the memory cost.
_LEAF = 64
# Ping-pong butterflies run over chunks of this many elements (256 KiB of float64
# per buffer), which fit in L2 with their partner buffer.
_CHUNK = 1 << 15
# The stages that mix chunks use one dense product when there are at most this
# many chunks (n/_CHUNK <= 64, i.e. D <= 2^21); above that, butterflies.
_MAX_TOP = 64
# Below this length the whole transform is butterflies: a BLAS call would cost more in
# thread start-up (OpenBLAS threads even 256x64 products) than the few stages it saves.
_MIN_BLAS = 1 << 17

FloatArray = npt.NDArray[np.floating[Any]]
_F = TypeVar("_F", bound=np.floating[Any])


def padded_dim(dim: int) -> int:
    """The smallest power of two >= ``dim`` (the rotated length)."""
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    return 1 << (dim - 1).bit_length()


@functools.lru_cache(maxsize=32)
def _hadamard_matrix(size: int, dtype: str) -> FloatArray:
    """The (Sylvester) Hadamard matrix of order ``size``; read-only, cached."""
    h = np.ones((1, 1), dtype=dtype)
    while h.shape[0] < size:
        h = np.block([[h, h], [h, -h]])
    h.setflags(write=False)
    return h


def _butterflies(src: npt.NDArray[_F], dst: npt.NDArray[_F], h: int,
                 stop: int) -> tuple[npt.NDArray[_F], npt.NDArray[_F]]:
    """Stages h, 2h, ... < stop, ping-ponging between the buffers; returns (result, spare)."""
    while h < stop:
        s = src.reshape(-1, 2, h)
        o = dst.reshape(-1, 2, h)
        np.add(s[:, 0], s[:, 1], out=o[:, 0])
        np.subtract(s[:, 0], s[:, 1], out=o[:, 1])
        src, dst = dst, src
        h *= 2
    return src, dst


def fwht_inplace(buf: npt.NDArray[_F], spare: npt.NDArray[_F]) -> npt.NDArray[_F]:
    """Unnormalised Walsh-Hadamard transform of ``buf``; both buffers are clobbered.

    Returns whichever of the two holds the result. ``len(buf)`` must be a power of two.
    """
    n = buf.shape[0]
    if n < _MIN_BLAS:
        return _butterflies(buf, spare, 1, n)[0]
    leaf = min(_LEAF, n)
    np.matmul(buf.reshape(-1, leaf), _hadamard_matrix(leaf, buf.dtype.str),
              out=spare.reshape(-1, leaf))
    src, dst = spare, buf
    chunk = min(_CHUNK, n)
    if leaf < chunk:
        for start in range(0, n, chunk):
            _butterflies(src[start:start + chunk], dst[start:start + chunk], leaf, chunk)
        # Every chunk ran the same number of stages, so all ended in the same buffer.
        if (chunk.bit_length() - leaf.bit_length()) % 2:
            src, dst = dst, src
    top = n // chunk
    if top == 1:
        return src
    if top <= _MAX_TOP:
        np.matmul(_hadamard_matrix(top, buf.dtype.str), src.reshape(top, chunk),
                  out=dst.reshape(top, chunk))
        return dst
    return _butterflies(src, dst, chunk, n)[0]


def hadamard_transform(x: npt.ArrayLike, dtype: npt.DTypeLike = np.float64) -> FloatArray:
    """``H x`` (unnormalised, so ``H H x = len(x) x``); ``len(x)`` must be a power of two."""
    arr = np.array(x, dtype=dtype)  # a copy: the transform works in place
    n = arr.shape[0]
    if arr.ndim != 1 or n & (n - 1) or n == 0:
        raise ValueError(f"need a 1-D vector whose length is a power of two, got {arr.shape}")
    return fwht_inplace(arr, np.empty_like(arr))


def rotation_signs(seed: bytes, size: int) -> npt.NDArray[np.bool_]:
    """``size`` pseudorandom sign bits from ``seed`` (True = multiply by -1)."""
    if len(seed) != 32:
        raise ValueError(f"the rotation seed must be 32 bytes, got {len(seed)}")
    words = MaskGenerator(-(-size // 64), np.uint64).mask(
        seed, session=_SIGN_SESSION, round=0, purpose=SIGN_PURPOSE)
    # Bit j of word i, independent of the platform's byte order.
    as_bytes = words.astype("<u8", copy=False).view(np.uint8)
    return np.unpackbits(as_bytes, bitorder="little")[:size].view(np.bool_)


def _check_vector(x: npt.ArrayLike, what: str) -> npt.NDArray[Any]:
    arr = np.asarray(x)
    if arr.ndim != 1 or arr.shape[0] == 0:
        raise ValueError(f"{what} must be a non-empty 1-D vector, got shape {arr.shape}")
    return arr


def rotate(x: npt.ArrayLike, seed: bytes, dtype: npt.DTypeLike = np.float64) -> FloatArray:
    """``H S x_pad / sqrt(D)``: length ``padded_dim(len(x))``, same L2 norm as ``x``."""
    arr = _check_vector(x, "x")
    n = padded_dim(arr.shape[0])
    buf = np.zeros(n, dtype=dtype)
    buf[: arr.shape[0]] = arr
    np.negative(buf, out=buf, where=rotation_signs(seed, n))
    out = fwht_inplace(buf, np.empty_like(buf))
    out *= 1.0 / np.sqrt(n)
    return out


def unrotate(y: npt.ArrayLike, seed: bytes, dim: int) -> npt.NDArray[np.float64]:
    """Inverse of :func:`rotate`: ``(S H y / sqrt(D))[:dim]`` as float64."""
    arr = _check_vector(y, "y")
    n = arr.shape[0]
    if n != padded_dim(dim):
        raise ValueError(f"a rotated vector of dim {dim} has length {padded_dim(dim)}, got {n}")
    buf = np.array(arr, dtype=np.float64)
    out = fwht_inplace(buf, np.empty_like(buf))
    out *= 1.0 / np.sqrt(n)
    np.negative(out, out=out, where=rotation_signs(seed, n))
    return out[:dim]
