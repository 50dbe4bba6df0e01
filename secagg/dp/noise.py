"""Integer noise: Skellam (default) and discrete Gaussian, vectorised in numpy.

Skellam
    ``Sk(v) = Poisson(v/2) - Poisson(v/2)``: mean 0, variance ``v``, and closed
    under sums (``Sk(a) + Sk(b) = Sk(a + b)``), so ``m`` peers each adding
    ``Sk(sigma^2 / t)`` give exactly ``Sk(m sigma^2 / t)``.  The Poisson draws use
    Hormann's PTRS transformed rejection (W. Hormann, "The transformed rejection
    method for generating Poisson random variables", Insurance: Mathematics and
    Economics 12, 1993), the algorithm numpy itself uses for lam >= 10, run on
    cache-sized blocks of candidates: most are accepted by a cheap test, the
    rest go through the log-pmf test. Two changes keep the float64 arithmetic
    accurate for the large lam that DP needs (lam ~ 2^40-2^55 is typical), where
    numpy's scalar version loses digits (``floor(... + lam)`` has ulp(lam)
    resolution; ``k log lam - lam - lgamma(k+1)`` cancels terms of size
    lam log lam): ``lam = floor(lam) + frac`` so the candidate ``k`` is formed
    in int64, and ``log p(k) = -bd0(k, lam) - stirlerr(k) - log(2 pi k)/2`` with
    Loader's stable ``bd0`` (C. Loader, "Fast and accurate computation of
    binomial probabilities", 2000). What remains is the 53-bit grid of the
    uniforms, which perturbs each probability by a relative ~2^-52 sqrt(lam)
    (1e-8 at lam = 2^50). lam < 10 goes to ``Generator.poisson`` (numpy's
    multiplication method).

Discrete Gaussian
    ``N_Z(0, s^2)``: ``P(x) ∝ exp(-x^2 / (2 s^2))`` on the integers, sampled by
    Algorithm 3 of Canonne, Kamath, Steinke, "The Discrete Gaussian for
    Differential Privacy" (NeurIPS 2020, arXiv 2004.00010): draw ``Y`` from the
    discrete Laplace with scale ``t = floor(s) + 1``, accept with probability
    ``exp(-(|Y| - s^2/t)^2 / (2 s^2))``; repeat for the rejected coordinates
    (acceptance is about 0.6-0.8 per round). CKS give an exact version in
    rational arithmetic; this one is vectorised in float64, so it is exact up to
    float rounding: the geometric part is ``floor(t * E)`` with ``E = -log(W)``
    for a 53-bit uniform ``W`` (tail cut beyond ~36.7 t, mass e^-36.7), and
    ``Bernoulli(exp(-x))`` compares a 53-bit uniform with a float64 ``exp``
    (relative error ~2^-52 per probability).

Privacy needs the noise to be unpredictable to whoever sees the sum: seed the
``Generator`` from ``os.urandom`` (e.g. ``np.random.default_rng(
int.from_bytes(os.urandom(32), "big"))``) and never reuse a seed. numpy's bit
generators are fast, not cryptographic.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

__all__ = ["discrete_gaussian", "poisson", "skellam"]

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]

# Above this, int64 candidates k ~ lam +- 40 sqrt(lam) could overflow.
MAX_LAMBDA = float(2**60)
_K_LIMIT = float(2**62)
# Candidates drawn per output still needed (inverse acceptance rate plus a margin).
_PTRS_OVERSAMPLE = 1.15
_BLOCK = 1 << 15
_CKS_OVERSAMPLE = 1.6
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
# stirlerr(k) = log k! - (k + 1/2) log k + k - log sqrt(2 pi), exact for small k.
_STIRLERR_TABLE = np.array(
    [0.0] + [math.lgamma(k + 1) - (k + 0.5) * math.log(k) + k - _LOG_SQRT_2PI
             for k in range(1, 16)])


def _stirlerr(k: IntArray) -> FloatArray:
    out = np.empty(k.shape[0])
    small = k < 16
    out[small] = _STIRLERR_TABLE[k[small]]
    big = ~small
    inv = 1.0 / k[big].astype(np.float64)
    inv2 = inv * inv
    # Stirling's series; for k >= 16 the first omitted term is below 1e-20.
    out[big] = inv * (1 / 12 - inv2 * (1 / 360 - inv2 * (1 / 1260
                                                       - inv2 * (1 / 1680 - inv2 / 1188))))
    return out


def _bd0(k: FloatArray, lam: float, delta: FloatArray) -> FloatArray:
    """``k log(k/lam) + lam - k`` without cancellation; ``delta = k - lam``."""
    out = np.empty(k.shape[0])
    total = k + lam
    near = np.abs(delta) < 0.1 * total
    v = delta[near] / total[near]
    v2 = v * v
    term = 2.0 * k[near] * v
    acc = delta[near] * v
    # Loader's series: bd0 = (k - lam) v + 2 k sum_j v^(2j+1) / (2j+1), |v| < 0.1.
    for j in range(1, 14):
        term = term * v2
        acc = acc + term / (2 * j + 1)
    out[near] = acc
    far = ~near
    kf = k[far]
    with np.errstate(divide="ignore", invalid="ignore"):
        out[far] = np.where(kf > 0, kf * np.log(kf / lam), 0.0) + lam - kf
    return out


def _log_pmf(k: IntArray, lam: float, lam_int: int, lam_frac: float) -> FloatArray:
    kf = k.astype(np.float64)
    delta = (k - lam_int).astype(np.float64) - lam_frac
    logp = -_bd0(kf, lam, delta) - _stirlerr(k) - 0.5 * np.log(np.maximum(kf, 1.0)) - _LOG_SQRT_2PI
    return np.where(k > 0, logp, -lam)


def poisson(lam: float, size: int, rng: np.random.Generator) -> IntArray:
    """``size`` independent Poisson(``lam``) draws as int64 (see the module docstring)."""
    if not 0.0 <= lam <= MAX_LAMBDA:
        raise ValueError(f"lam must be in [0, 2^60], got {lam}")
    if lam < 10.0:
        return rng.poisson(lam, size).astype(np.int64)
    out = np.empty(size, dtype=np.int64)
    # Blocks small enough that the ~20 passes over each stay in the CPU cache.
    for start in range(0, size, _BLOCK):
        _ptrs_block(out[start:start + _BLOCK], lam, rng)
    return out


def _ptrs_block(out: IntArray, lam: float, rng: np.random.Generator) -> None:
    size = out.shape[0]
    lam_int = math.floor(lam)
    lam_frac = lam - lam_int
    b = 0.931 + 2.53 * math.sqrt(lam)
    a = -0.059 + 0.02483 * b
    log_invalpha = math.log(1.1239 + 1.1328 / (b - 3.4))
    vr = 0.9277 - 3.6224 / (b - 2.0)
    filled = 0
    while filled < size:
        # PTRS accepts ~90 % of candidates: draw enough that one pass usually suffices
        # (surplus accepted draws are dropped, which leaves the kept ones i.i.d.).
        n = int((size - filled) * _PTRS_OVERSAMPLE) + 32
        uv = rng.random(2 * n)
        u, v = uv[:n], uv[n:]
        u -= 0.5
        us = np.abs(u)
        np.subtract(0.5, us, out=us)
        # k - floor(lam) = floor((2a/us + b) u + frac + 0.43), formed apart from lam so
        # that no precision is lost; in place to spare allocations. us = 0 (probability
        # 2^-53) gives -inf: the clip keeps the cast defined and the candidate is rejected.
        with np.errstate(divide="ignore"):
            offset = np.divide(2.0 * a, us)
        offset += b
        offset *= u
        offset += lam_frac + 0.43
        np.floor(offset, out=offset)
        np.clip(offset, -_K_LIMIT, _K_LIMIT, out=offset)
        k = offset.astype(np.int64)
        k += lam_int
        accept = (us >= 0.07) & (v <= vr)
        slow = np.flatnonzero(~accept)
        ks, uss, vs = k[slow], us[slow], v[slow]
        live = (ks >= 0) & ~((uss < 0.013) & (vs > uss))
        slow, ks, uss, vs = slow[live], ks[live], uss[live], vs[live]
        with np.errstate(divide="ignore"):
            lhs = np.log(vs) + log_invalpha - np.log(a / (uss * uss) + b)
        accept[slow[lhs <= _log_pmf(ks, lam, lam_int, lam_frac)]] = True
        got = k[accept][: size - filled]
        out[filled:filled + got.shape[0]] = got
        filled += got.shape[0]


def skellam(variance: float, size: int, rng: np.random.Generator) -> IntArray:
    """``size`` draws of the Skellam distribution with mean 0 and ``variance``."""
    if not (math.isfinite(variance) and variance >= 0.0):
        raise ValueError(f"variance must be finite and >= 0, got {variance}")
    if variance == 0.0:
        return np.zeros(size, dtype=np.int64)
    lam = variance / 2.0
    draws = poisson(lam, 2 * size, rng)
    return np.subtract(draws[:size], draws[size:])


def discrete_gaussian(variance: float, size: int, rng: np.random.Generator) -> IntArray:
    """``size`` draws of ``N_Z(0, variance)`` (CKS Algorithm 3, vectorised; see module)."""
    if not (math.isfinite(variance) and variance >= 0.0):
        raise ValueError(f"variance must be finite and >= 0, got {variance}")
    if variance == 0.0:
        return np.zeros(size, dtype=np.int64)
    out = np.empty(size, dtype=np.int64)
    for start in range(0, size, _BLOCK):  # cache-sized blocks, as in poisson()
        _cks_block(out[start:start + _BLOCK], variance, rng)
    return out


def _cks_block(out: IntArray, variance: float, rng: np.random.Generator) -> None:
    size = out.shape[0]
    t = math.floor(math.sqrt(variance)) + 1
    shift = variance / t
    filled = 0
    while filled < size:
        n = int((size - filled) * _CKS_OVERSAMPLE) + 32  # see poisson()
        w, sign, c = rng.random((3, n))
        # floor(t * Exp(1)) is geometric with P(x) ∝ exp(-x / t): one side of the
        # discrete Laplace(t); 1 - w is in (0, 1], so the log is finite.
        x = np.floor(-t * np.log1p(-w))
        negative = sign < 0.5
        # Zero would be counted twice (as +0 and -0): drop the -0 half.
        keep = ~(negative & (x == 0))
        gap = x - shift
        keep &= c < np.exp(-(gap * gap) / (2.0 * variance))
        y = np.where(negative, -x, x)[keep][: size - filled].astype(np.int64)
        out[filled:filled + y.shape[0]] = y
        filled += y.shape[0]
