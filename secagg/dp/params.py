"""Distributed DP parameters: what every peer needs to encode, and what they mean.

:class:`DPConfig` is the policy (mechanism, noise multiplier ``z``, L2 clip
``c``, target delta, ring size, ...); :meth:`DPParameters.derive` turns it into
numbers for a round of ``n`` peers with threshold ``t`` and vectors of ``dim``
coordinates, or refuses with a :class:`DPParameterError` (a ``ValueError``) that
names the parameter to change.

Calibration, in the scaled integer domain (``D`` = padded dimension, ``gamma`` =
scale)::

    Delta_2 = inflated_l2_bound(c gamma, D, beta)      # >= c gamma: rounding adds up to sqrt(D)
    Delta_1 = Delta_2 min(sqrt(D), Delta_2)
    sigma   = z Delta_2                                 # central noise stddev
    local_variance = sigma^2 / t                        # what each peer adds

``z`` is thus the ratio of noise to the sensitivity of what a peer actually
adds (the clipped, scaled *and rounded* vector), so that ``z`` means what it
says for privacy; relative to the clip alone the noise is ``z Delta_2 / (c gamma)
>= z`` (reported as ``noise_multiplier_vs_clip``). Each peer adds ``sigma^2/t``,
so a sum of ``m >= t`` contributors carries ``m/t sigma^2 >= sigma^2``: dropouts
never leave a released sum under-noised (:func:`noise_report`).

Scale: the largest ``gamma`` such that ``k_stddevs`` standard deviations of an
aggregate coordinate fit in the signed ring range ``2^(bits-1)``, with the
per-coordinate variance bounded, after the random rotation, by::

    v(gamma) = (n c gamma)^2 / D  +  n / 4  +  (n / t) sigma(gamma)^2

(signal: ``n`` aligned clipped vectors, spread evenly by the rotation; rounding
errors, variance <= 1/4 each; noise of ``n`` contributors), as in Kairouz, Liu,
Steinke 2021, Sections 4.2/4.4. With a sub-Gaussian aggregate, a coordinate
wraps with probability about ``2 exp(-k^2/2)``. ``bits`` is capped at 53 so the
decoded sum is exact in float64, and the per-peer variance at 2^60 so the
samplers' int64 arithmetic cannot overflow; beyond either a larger scale buys
nothing (rounding is then far below the noise).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal, cast, get_args

import numpy as np

from secagg.dp.discretize import inflated_l2_bound, l1_bound
from secagg.dp.rotation import padded_dim
from secagg.errors import EncodingError

__all__ = ["DPConfig", "DPParameterError", "DPParameters", "Mechanism", "NoiseReport",
           "noise_report"]

Mechanism = Literal["skellam", "gaussian"]
_FORMAT_VERSION = 1
_MAX_EXACT_BITS = 53  # float64 holds every integer up to 2^53
_MAX_LOCAL_VARIANCE = float(2**60)  # noise.MAX_LAMBDA: Poisson(v/2) stays far from int64 limits
# The clipped, scaled vector's norm can exceed c gamma by float rounding (a few ulps of
# a dot product); the sensitivity is taken this much larger so that it is a true bound.
_NORM_SLACK = 1e-12
# from_dict compares announced floats with the re-derived ones to this relative tolerance.
_REL_TOL = 1e-9


class DPParameterError(EncodingError):
    """The DP configuration cannot work; ``parameter`` names what to change."""

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(message)
        self.parameter = parameter


def _require(ok: bool, parameter: str, message: str) -> None:
    if not ok:
        raise DPParameterError(parameter, message)


def _real(name: str, value: object) -> float:
    _require(isinstance(value, int | float) and not isinstance(value, bool)
             and math.isfinite(float(value)), name,
             f"{name} must be a finite number, got {value!r}")
    return float(cast(float, value))


@dataclass(frozen=True)
class DPConfig:
    """The DP policy of a session; identical on every peer and the server."""

    noise_multiplier: float
    """z: central noise stddev over the L2 sensitivity of one peer's rounded vector."""
    clip: float
    """c: each update is scaled down to L2 norm c (after the rotation, which keeps norms)."""
    mechanism: Mechanism = "skellam"
    delta: float = 1e-5
    """Target delta for the privacy reports."""
    modulus_bits: int = 32
    k_stddevs: float = 6.0
    """Aggregate stddevs that must fit in the ring (wrap chance ~2 exp(-k^2/2) per coordinate)."""
    beta: float = 0.0
    """Conditional rounding (Kairouz et al.): 0 = off; exp(-1/2) is their suggestion."""
    scale: float | None = None
    """Fix gamma instead of deriving it (refused if the aggregate would not fit)."""
    max_sensitivity_inflation: float = 1.05
    """Refuse a scale so coarse that rounding inflates the L2 sensitivity more than this."""

    def __post_init__(self) -> None:
        _require(self.mechanism in get_args(Mechanism), "mechanism",
                 f"mechanism must be one of {get_args(Mechanism)}, got {self.mechanism!r}")
        _require(_real("noise_multiplier", self.noise_multiplier) >= 0, "noise_multiplier",
                 f"noise_multiplier must be >= 0, got {self.noise_multiplier}")
        _require(_real("clip", self.clip) > 0, "clip", f"clip must be > 0, got {self.clip}")
        _require(0 < _real("delta", self.delta) < 1, "delta",
                 f"delta must be in (0, 1), got {self.delta}")
        _require(isinstance(self.modulus_bits, int) and not isinstance(self.modulus_bits, bool)
                 and self.modulus_bits in (32, 64),
                 "modulus_bits", f"modulus_bits must be 32 or 64, got {self.modulus_bits!r}")
        _require(_real("k_stddevs", self.k_stddevs) > 0, "k_stddevs",
                 f"k_stddevs must be > 0, got {self.k_stddevs}")
        _require(0 <= _real("beta", self.beta) < 1, "beta",
                 f"beta must be in [0, 1), got {self.beta}")
        _require(self.scale is None or _real("scale", self.scale) > 0, "scale",
                 f"scale must be > 0 (or None to derive it), got {self.scale}")
        _require(_real("max_sensitivity_inflation", self.max_sensitivity_inflation) >= 1,
                 "max_sensitivity_inflation",
                 f"max_sensitivity_inflation must be >= 1, got {self.max_sensitivity_inflation}")


@dataclass(frozen=True)
class DPParameters:
    """Everything a peer needs to encode and the server to decode one round (scaled domain)."""

    config: DPConfig
    peers: int
    threshold: int
    dim: int
    padded_dim: int
    scale: float
    l2_sensitivity: float
    l1_sensitivity: float
    central_stddev: float
    local_variance: float
    range_bits: float
    """log2 of 2 k_stddevs aggregate stddevs: the bits the aggregate actually needs."""

    @property
    def dtype(self) -> np.dtype[Any]:
        return np.dtype(np.uint32 if self.config.modulus_bits == 32 else np.uint64)

    @property
    def rounding_bound(self) -> float:
        """L2 bound every rounded vector satisfies (by construction, or by re-drawing)."""
        return inflated_l2_bound(self.config.clip * self.scale, self.padded_dim, self.config.beta)

    @classmethod
    def derive(cls, n: int, threshold: int, dim: int, config: DPConfig) -> DPParameters:
        """Parameters for ``n`` peers, threshold ``t`` and ``dim`` coordinates (see module)."""
        for name, value in (("n", n), ("threshold", threshold), ("dim", dim)):
            _require(isinstance(value, int | np.integer) and not isinstance(value, bool)
                     and value >= 1, name, f"{name} must be an integer >= 1, got {value!r}")
        _require(threshold <= n, "threshold", f"threshold={threshold} exceeds n={n} peers")
        d = padded_dim(int(dim))
        budget = _Budget(int(n), int(threshold), d, config)
        scale = config.scale if config.scale is not None else budget.largest_scale()
        budget.check(scale)
        return budget.parameters(scale, int(dim))

    def to_dict(self) -> dict[str, Any]:
        """Plain ints/floats/strs (msgpack-friendly) to announce the parameters."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "config"}
        return {"version": _FORMAT_VERSION, "config": asdict(self.config), **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DPParameters:
        """Rebuild announced parameters, re-derive them and refuse any inconsistency."""
        version = data.get("version") if isinstance(data, dict) else data
        _require(version == _FORMAT_VERSION, "version",
                 f"unsupported DP parameter format version: {version!r}")
        raw = data.get("config")
        known = {f.name for f in fields(DPConfig)}
        _require(isinstance(raw, dict) and set(raw) <= known, "config",
                 f"config must be a dict with keys among {sorted(known)}")
        config = DPConfig(**cast(dict[str, Any], raw))
        derived = cls.derive(data.get("peers"), data.get("threshold"), data.get("dim"),  # type: ignore[arg-type]
                             replace(config, scale=_real("scale", data.get("scale"))))
        derived = replace(derived, config=config)
        for f in fields(cls):
            if f.name == "config":
                continue
            ours, theirs = getattr(derived, f.name), data.get(f.name)
            same = (ours == theirs if isinstance(ours, int)
                    else isinstance(theirs, int | float)
                    and math.isclose(ours, theirs, rel_tol=_REL_TOL))
            _require(same, f.name, f"announced {f.name}={theirs!r} but the config implies {ours!r}")
        return derived


class _Budget:
    """The constraints on gamma for one (n, t, D, config)."""

    def __init__(self, n: int, t: int, d: int, config: DPConfig) -> None:
        self.n, self.t, self.d, self.config = n, t, d, config
        self.bits = min(config.modulus_bits, _MAX_EXACT_BITS)
        self.half_range = 2.0 ** (self.bits - 1)

    def sensitivity(self, scale: float) -> float:
        bound = inflated_l2_bound(self.config.clip * scale, self.d, self.config.beta)
        return bound * (1.0 + _NORM_SLACK)

    def variance(self, scale: float) -> float:
        cfg, n = self.config, self.n
        sigma = cfg.noise_multiplier * self.sensitivity(scale)
        return (n * cfg.clip * scale) ** 2 / self.d + n / 4.0 + n / self.t * sigma**2

    def fits(self, scale: float) -> bool:
        sigma = self.config.noise_multiplier * self.sensitivity(scale)
        return (self.config.k_stddevs * math.sqrt(self.variance(scale)) <= self.half_range
                and sigma**2 / self.t <= _MAX_LOCAL_VARIANCE)

    def largest_scale(self) -> float:
        cfg = self.config
        _require(self.fits(0.0), "modulus_bits",
                 f"modulus_bits={cfg.modulus_bits} cannot hold the sum of n={self.n} peers even "
                 f"at the coarsest scale (k_stddevs={cfg.k_stddevs}, "
                 f"noise_multiplier={cfg.noise_multiplier}, padded dim {self.d}): raise "
                 "modulus_bits, or lower k_stddevs or noise_multiplier")
        hi = 1.0
        while self.fits(hi):
            hi *= 2.0
        lo = 0.0
        for _ in range(200):  # bisection; v(gamma) is increasing, so fits() is monotone
            mid = 0.5 * (lo + hi)
            if mid in (lo, hi):
                break
            lo, hi = (mid, hi) if self.fits(mid) else (lo, mid)
        return lo

    def check(self, scale: float) -> None:
        cfg = self.config
        if cfg.scale is not None:
            _require(self.fits(scale), "scale",
                     f"scale={scale:g} makes {cfg.k_stddevs} stddevs of the aggregate of "
                     f"n={self.n} peers exceed 2^{self.bits - 1}: lower scale or raise "
                     "modulus_bits")
        _require(scale > 0, "modulus_bits",
                 f"modulus_bits={cfg.modulus_bits} leaves no usable scale for n={self.n} peers")
        inflation = self.sensitivity(scale) / (cfg.clip * scale)
        _require(inflation <= cfg.max_sensitivity_inflation,
                 "scale" if cfg.scale is not None else "modulus_bits",
                 f"modulus_bits={cfg.modulus_bits} allows only scale={scale:.4g}, at which "
                 f"rounding inflates the L2 sensitivity {inflation:.3f}x "
                 f"(> max_sensitivity_inflation={cfg.max_sensitivity_inflation}): raise "
                 "modulus_bits, or lower noise_multiplier, k_stddevs or the number of peers")

    def parameters(self, scale: float, dim: int) -> DPParameters:
        l2 = self.sensitivity(scale)
        sigma = self.config.noise_multiplier * l2
        return DPParameters(
            config=self.config, peers=self.n, threshold=self.t, dim=dim, padded_dim=self.d,
            scale=scale, l2_sensitivity=l2, l1_sensitivity=l1_bound(l2, self.d),
            central_stddev=sigma, local_variance=sigma**2 / self.t,
            range_bits=math.log2(2.0 * self.config.k_stddevs * math.sqrt(self.variance(scale))))


@dataclass(frozen=True)
class NoiseReport:
    """The noise actually present in a released sum (scaled domain unless said otherwise)."""

    contributors: int
    colluding: int
    threshold: int
    noise_variance: float
    """(contributors - colluding) / t * sigma^2: the noise no coalition member knows."""
    noise_stddev: float
    """sqrt(noise_variance) / scale: in the units of the updates."""
    effective_noise_multiplier: float
    """Noise stddev over the (rounded) L2 sensitivity: the z the accountant sees."""
    noise_multiplier_vs_clip: float
    """Noise stddev over the clip c (both in update units)."""
    meets_floor: bool
    """True when the unknown noise is at least sigma^2 (>= t honest contributors)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def noise_report(params: DPParameters, contributors: int, colluding: int = 0) -> NoiseReport:
    """Noise in a sum of ``contributors`` peers, of whom ``colluding`` reveal their noise."""
    _require(contributors >= 0 and colluding >= 0, "contributors",
             f"contributors ({contributors}) and colluding ({colluding}) must be >= 0")
    honest = max(contributors - colluding, 0)
    variance = honest * params.local_variance
    stddev = math.sqrt(variance)
    clip_scaled = params.config.clip * params.scale
    return NoiseReport(
        contributors=contributors, colluding=colluding, threshold=params.threshold,
        noise_variance=variance, noise_stddev=stddev / params.scale,
        effective_noise_multiplier=stddev / params.l2_sensitivity,
        noise_multiplier_vs_clip=stddev / clip_scaled,
        meets_floor=honest >= params.threshold)
