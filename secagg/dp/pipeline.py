"""The client and server ends of distributed DP around secure aggregation.

Client, :func:`encode_update` (Kairouz, Liu, Steinke 2021, Algorithm 1; Agarwal,
Kairouz, Liu 2021, Algorithm 1)::

    x --rotate(seed)--> y --clip to c--> --* gamma--> --stochastic round--> q
      --+ noise share (variance sigma^2 / t)--> --mod 2^k--> ring vector

The rotation comes first and the clip is applied to the rotated vector, so the
norm bound that privacy rests on holds for exactly what is rounded, whatever
the float error of the transform. The ring vector then goes into masking
(:func:`secagg.masking.masked_input`) like any encoded input; ring vectors sum
with plain wrapping adds.

Server, :func:`decode_sum`: read the ring sum as centred signed integers, divide
by ``gamma``, rotate back, drop the padding. The result is the sum of the
contributors' clipped updates plus the noise (``m/t sigma^2`` for ``m``
contributors, in scaled units) plus the rounding errors (zero mean, variance
<= 1/4 per scaled coordinate each), as long as no coordinate wrapped (see
:mod:`secagg.dp.params`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

from secagg.dp.discretize import conditional_stochastic_round, from_ring, stochastic_round, to_ring
from secagg.dp.noise import discrete_gaussian, skellam
from secagg.dp.params import DPParameters
from secagg.dp.rotation import fwht_inplace, rotation_signs, unrotate

__all__ = ["add_noise_share", "decode_sum", "encode_update", "sample_noise_share"]

# Elements per block in encode_update (256 KiB of float64): fits in L2 with its temporaries.
_BLOCK = 1 << 15


def sample_noise_share(params: DPParameters, rng: np.random.Generator) -> npt.NDArray[np.int64]:
    """One peer's noise share: ``padded_dim`` integers of variance ``params.local_variance``.

    It does not depend on the update, so a peer can draw it ahead of time (while
    waiting for the share exchange) and pass it to :func:`encode_update`; sampling
    is the most expensive step of the pipeline. A share must never be used twice.
    """
    sample = skellam if params.config.mechanism == "skellam" else discrete_gaussian
    return sample(params.local_variance, params.padded_dim, rng)


def add_noise_share(q: npt.NDArray[np.int64], params: DPParameters,
                    rng: np.random.Generator) -> None:
    """In place: add a freshly drawn noise share to the rounded vector ``q``."""
    q += sample_noise_share(params, rng)


def encode_update(x: npt.ArrayLike, params: DPParameters, rotation_seed: bytes,
                  rng: np.random.Generator, *, noise: npt.NDArray[np.int64] | None = None,
                  ) -> tuple[npt.NDArray[np.unsignedinteger[Any]], bool]:
    """One peer's DP-encoded update: ``(ring vector of length padded_dim, clipped?)``.

    ``x`` has ``params.dim`` finite coordinates. ``rotation_seed`` is the round's
    public 32-byte seed (the same for every peer and the server); ``rng`` supplies
    the rounding and noise randomness and must be private to this peer (seed it
    from ``os.urandom``; see :mod:`secagg.dp.noise`). ``noise`` is a share drawn
    beforehand with :func:`sample_noise_share` (default: drawn here). ``clipped``
    says whether the update's L2 norm exceeded the clip (useful for adaptive
    clipping, but reporting it unnoised leaks one bit per peer).
    """
    arr = np.asarray(x, dtype=np.float64)
    if arr.shape != (params.dim,):
        raise ValueError(f"expected a vector of shape ({params.dim},), got {arr.shape}")
    d = params.padded_dim
    if noise is not None and (noise.shape != (d,) or noise.dtype != np.int64):
        raise ValueError(f"noise must be int64 of shape ({d},), got {noise.dtype} {noise.shape}")
    buf = np.zeros(d)
    buf[: params.dim] = arr
    np.negative(buf, out=buf, where=rotation_signs(rotation_seed, d))
    y = fwht_inplace(buf, np.empty_like(buf))  # unnormalised: ||y|| = sqrt(d) ||x||
    norm = math.sqrt(float(np.dot(y, y)) / d)
    if not math.isfinite(norm):
        raise ValueError("the update has a non-finite coordinate (or its norm overflows)")
    clip = params.config.clip
    clipped = norm > clip
    # One multiply: the rotation's 1/sqrt(d), the clip factor and the scale.
    factor = params.scale / math.sqrt(d) * (clip / norm if clipped else 1.0)
    bits = params.config.modulus_bits
    if params.config.beta > 0:  # the re-draw looks at the whole vector's norm
        y *= factor
        q = conditional_stochastic_round(y, rng, params.rounding_bound)
        q += sample_noise_share(params, rng) if noise is None else noise
        return to_ring(q, bits), clipped
    # Scale, round, add noise and wrap block by block, so that each block's passes
    # stay in the CPU cache.
    ring = np.empty(d, dtype=params.dtype)
    sample = skellam if params.config.mechanism == "skellam" else discrete_gaussian
    for start in range(0, d, _BLOCK):
        block = y[start:start + _BLOCK]
        block *= factor
        q = stochastic_round(block, rng)
        stop = start + q.shape[0]
        q += sample(params.local_variance, q.shape[0], rng) if noise is None else noise[start:stop]
        ring[start:stop] = to_ring(q, bits)
    return ring, clipped


def decode_sum(ring_sum: npt.ArrayLike, params: DPParameters, rotation_seed: bytes,
               dim: int | None = None) -> npt.NDArray[np.float64]:
    """The float64 sum (length ``dim``, default ``params.dim``) from the ring sum."""
    arr = np.asarray(ring_sum)
    if arr.dtype != params.dtype or arr.shape != (params.padded_dim,):
        raise ValueError(f"expected a {params.dtype} ring vector of length {params.padded_dim}, "
                         f"got {arr.dtype} {arr.shape}")
    signed = from_ring(arr).astype(np.float64)
    signed /= params.scale
    return unrotate(signed, rotation_seed, params.dim if dim is None else dim)
