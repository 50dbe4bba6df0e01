"""Fixed-point encoding of float vectors into the ring Z_{2^k} (k = 32 or 64).

A peer's vector ``x`` (float64, shape ``(d,)``) is encoded coordinate-wise as::

    v = s * clip(x, -c, c)                # c = Quantizer.clip, s = Quantizer.scale
    q = floor(v + U),  U ~ Uniform[0, 1)  # stochastic rounding
    e = q mod 2^k                         # two's complement, numpy uint32 / uint64

The caller sums the encodings of ``n`` peers with wrapping unsigned adds (plain
numpy ``+`` on uint32/uint64 arrays wraps). :meth:`Quantizer.decode` reads the
ring element as a signed integer in ``[-2^(k-1), 2^(k-1))`` and divides by ``s``.

Stochastic rounding is unbiased
    With ``f = v - floor(v)``, ``q = floor(v) + 1`` with probability ``f`` and
    ``floor(v)`` otherwise, so ``E[q] = v`` (up to the 2^-53 resolution of
    ``Generator.random``). It is implemented as ``floor(v) + (U < f)``, which is
    exact in float64. The rounding noise is *not* a privacy mask, so a seeded
    :class:`numpy.random.Generator` supplied by the caller is appropriate; the
    legacy ``np.random`` functions are never used.

Error bound
    Each encoded value differs from ``s * clip(x)`` by strictly less than 1
    (``q - v`` is ``-f`` or ``1 - f``), and ``|q| <= ceil(c * s) < c * s + 1``.
    If ``n * (c * s + 1) < 2^(k-1)`` (checked by :meth:`Quantizer.check_capacity`
    and at setup by :meth:`Quantizer.for_peers`), the integer sum of ``n``
    encodings lies inside the signed range, so the wrapped ring sum decodes to
    exactly that integer sum. Hence, per coordinate::

        |decode(sum of n encodings) - sum_i clip(x_i)|  <  n / s

    (:meth:`Quantizer.error_bound`). This is exact when ``s`` is a power of two
    (as :meth:`Quantizer.for_peers` chooses) and the decoded integer has
    magnitude at most 2^53; otherwise the float64 arithmetic adds a relative
    rounding error of about 2^-53 (relevant only for k = 64 with a very large
    explicit scale; see :func:`to_signed`).

Weighted mean
    A peer with weight ``0 <= w <= W`` (``W`` public) sends ``(w * clip(x), w)``;
    the weight rides as one more coordinate. With ``S = sum_i w_i clip(x_i)``,
    ``T = sum_i w_i`` and decoded ``S', T'`` (each within ``n/s``), the decoded
    mean ``m' = S'/T'`` satisfies, since ``m' - m = ((S' - S) - m (T' - T)) / T'``
    and ``|m| <= c``::

        |m' - m|  <  (n / s) * (1 + c) / T'

    per coordinate (:meth:`WeightedEncoding.mean_error_bound`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from secagg.errors import EncodingError

__all__ = ["Quantizer", "WeightedEncoding", "to_signed"]

_MODULUS_BITS = (32, 64)
_DTYPES: dict[int, np.dtype[Any]] = {
    32: np.dtype(np.uint32),
    64: np.dtype(np.uint64),
}
# Integers of magnitude up to 2^53 convert to float64 exactly. ``for_peers``
# never picks a scale whose decoded sums could exceed this, so that the error
# bound above holds exactly in float64 even for k = 64.
_FLOAT_EXACT_BITS = 53


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise EncodingError(f"{name} must be a real number, got {value!r}")
    return float(value)


def _positive_finite(name: str, value: object) -> float:
    result = _real(name, value)
    if not math.isfinite(result) or result <= 0.0:
        raise EncodingError(f"{name} must be positive and finite, got {value!r}")
    return result


def _modulus_bits(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise EncodingError(f"modulus_bits must be 32 or 64, got {value!r}")
    bits = int(value)
    if bits not in _MODULUS_BITS:
        raise EncodingError(f"modulus_bits must be 32 or 64, got {bits}")
    return bits


def _peer_count(n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, int | np.integer):
        raise EncodingError(f"number of peers must be an integer, got {n!r}")
    if int(n) < 1:
        raise EncodingError(f"number of peers must be >= 1, got {n}")
    return int(n)


def _finite_vector(values: np.ndarray, what: str = "values") -> np.ndarray:
    """Return ``values`` as a 1-D float64 array, rejecting NaN and infinities."""
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise EncodingError(f"{what} must be a real float vector: {exc}") from exc
    if arr.ndim != 1:
        raise EncodingError(f"{what} must be a 1-D vector, got shape {arr.shape}")
    bad = ~np.isfinite(arr)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise EncodingError(
            f"{what} contain {int(bad.sum())} non-finite entr(y/ies) (NaN or inf); "
            f"first at index {first}: {arr[first]!r}"
        )
    return arr


def _pow2(e: int) -> Fraction:
    return Fraction(2**e) if e >= 0 else Fraction(1, 2**-e)


def to_signed(total: np.ndarray) -> np.ndarray:
    """Interpret ring elements as two's-complement signed integers, as int64.

    ``uint32`` values are widened (``v >= 2^31`` becomes ``v - 2^32``);
    ``uint64`` values are reinterpreted bit for bit as int64 (a copy, not a view).

    64-bit limit: the result is int64, which holds every signed 64-bit value,
    but :meth:`Quantizer.decode` then converts to float64, which represents
    integers exactly only up to 2^53 in magnitude; larger sums are rounded to
    53 significant bits (relative error <= 2^-53).
    """
    arr = np.asarray(total)
    if arr.dtype == np.uint32:
        return arr.view(np.int32).astype(np.int64)
    if arr.dtype == np.uint64:
        return arr.astype(np.int64)
    raise EncodingError(f"ring elements must be uint32 or uint64, got dtype {arr.dtype}")


@dataclass(frozen=True)
class Quantizer:
    """Clip, scale and stochastically round floats into Z_{2^modulus_bits}.

    Construction validates ``clip`` and ``scale`` (positive, finite),
    ``modulus_bits`` (32 or 64) and that at least one peer fits
    (``clip * scale + 1 < 2^(modulus_bits-1)``). Use :meth:`for_peers` to pick or
    check the scale for a given number of peers.
    """

    clip: float
    scale: float
    modulus_bits: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "clip", _positive_finite("clip", self.clip))
        object.__setattr__(self, "scale", _positive_finite("scale", self.scale))
        object.__setattr__(self, "modulus_bits", _modulus_bits(self.modulus_bits))
        _check_capacity(self.clip, self.scale, self.modulus_bits, 1)

    @property
    def dtype(self) -> np.dtype[Any]:
        """The numpy dtype of ring elements: uint32 or uint64."""
        return _DTYPES[self.modulus_bits]

    @classmethod
    def for_peers(
        cls,
        n: int,
        *,
        clip: float = 1.0,
        modulus_bits: int = 32,
        scale: float | None = None,
    ) -> Quantizer:
        """A quantizer whose sums over ``n`` peers decode exactly (within n/scale).

        With ``scale=None`` the largest power of two ``s`` with
        ``n * (clip * s + 1) < 2^min(modulus_bits - 1, 53)`` is chosen (the 2^53
        cap keeps decoded sums exact in float64; it only matters for 64 bits).
        An explicit ``scale`` is checked against ``2^(modulus_bits - 1)``.
        Raises :class:`EncodingError` if the parameters do not fit or the
        chosen scale would be below 1.
        """
        n = _peer_count(n)
        clip = _positive_finite("clip", clip)
        bits = _modulus_bits(modulus_bits)
        if scale is not None:
            scale = _positive_finite("scale", scale)
            _check_capacity(clip, scale, bits, n)  # before construction: report n, not 1
            return cls(clip=clip, scale=scale, modulus_bits=bits)

        limit_bits = min(bits - 1, _FLOAT_EXACT_BITS)
        # Need clip * s < 2^limit_bits / n - 1 (exact rational arithmetic).
        room = Fraction(2**limit_bits, n) - 1
        exact_clip = Fraction(clip)
        if room <= exact_clip:  # even s = 1 does not fit
            raise EncodingError(
                f"cannot choose a scale >= 1 for {n} peers with clip={clip} and "
                f"modulus_bits={bits}: need n * (clip * scale + 1) < 2^{limit_bits}, "
                f"which allows scale < {float(room / exact_clip):.6g}; "
                + _advice(bits, scale_hint=False)
            )
        e = max(0, math.floor(math.log2(float(room / exact_clip))))
        while exact_clip * _pow2(e) >= room:
            e -= 1
        while exact_clip * _pow2(e + 1) < room:
            e += 1
        return cls(clip=clip, scale=math.ldexp(1.0, e), modulus_bits=bits)

    def check_capacity(self, n: int) -> None:
        """Raise :class:`EncodingError` unless ``n * (clip*scale + 1) < 2^(k-1)``."""
        _check_capacity(self.clip, self.scale, self.modulus_bits, _peer_count(n))

    def error_bound(self, n: int) -> float:
        """Per-coordinate bound on |decoded sum of n peers - sum of clipped inputs|.

        The true error is strictly below ``n / scale``.
        """
        return _peer_count(n) / self.scale

    def encode(self, values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Encode a float vector ``(d,)`` into ring elements ``(d,)`` of :attr:`dtype`.

        Values are clipped to ``[-clip, clip]``; NaN and infinities are rejected.
        """
        arr = _finite_vector(values)
        v = np.clip(arr, -self.clip, self.clip) * self.scale
        vmax = self._max_scaled()
        np.clip(v, -vmax, vmax, out=v)  # guards float rounding of clip*scale
        low = np.floor(v)
        frac = v - low  # exact in float64, in [0, 1)
        up = rng.random(arr.shape[0]) < frac
        q = low.astype(np.int64) + up
        encoded: np.ndarray = q.astype(self.dtype)  # integer casts wrap: mod 2^k
        return encoded

    def decode(self, total: np.ndarray) -> np.ndarray:
        """Decode a (summed) ring vector ``(d,)`` to float64 ``(d,)``: signed / scale."""
        arr = np.asarray(total)
        if arr.dtype != self.dtype:
            raise EncodingError(f"expected ring dtype {self.dtype}, got {arr.dtype}")
        if arr.ndim != 1:
            raise EncodingError(f"expected a 1-D ring vector, got shape {arr.shape}")
        decoded: np.ndarray = to_signed(arr).astype(np.float64) / self.scale
        return decoded

    def to_dict(self) -> dict[str, float | int]:
        """Parameters for publication (e.g. in a roster message)."""
        return {"clip": self.clip, "scale": self.scale, "modulus_bits": self.modulus_bits}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> Quantizer:
        """Inverse of :meth:`to_dict`; validates keys, types and values."""
        if not isinstance(data, Mapping):
            raise EncodingError(f"quantizer parameters must be a mapping, got {type(data)}")
        expected = {"clip", "scale", "modulus_bits"}
        keys = set(data)
        if keys != expected:
            raise EncodingError(
                f"quantizer parameters must have exactly the keys {sorted(expected)}; "
                f"missing {sorted(map(str, expected - keys))}, "
                f"unexpected {sorted(map(str, keys - expected))}"
            )
        if isinstance(data["modulus_bits"], float):
            raise EncodingError(f"modulus_bits must be an integer, got {data['modulus_bits']!r}")
        return cls(
            clip=_positive_finite("clip", data["clip"]),
            scale=_positive_finite("scale", data["scale"]),
            modulus_bits=_modulus_bits(data["modulus_bits"]),
        )

    def _max_scaled(self) -> float:
        """The largest float64 not above the exact product clip * scale."""
        prod = self.clip * self.scale
        if Fraction(prod) > Fraction(self.clip) * Fraction(self.scale):
            prod = float(np.nextafter(prod, 0.0))
        return prod


def _check_capacity(clip: float, scale: float, bits: int, n: int) -> None:
    half = 2 ** (bits - 1)
    need = n * (Fraction(clip) * Fraction(scale) + 1)
    if need < half:
        return
    max_scale = (Fraction(half, n) - 1) / Fraction(clip)
    hint = (
        f"the largest scale that fits is just below {float(max_scale):.6g}"
        if max_scale > 0
        else "no scale fits this many peers"
    )
    raise EncodingError(
        f"the sum over {n} peer(s) can overflow the {bits}-bit ring: "
        f"n * (clip * scale + 1) = {n} * ({clip} * {scale} + 1) = "
        f"{float(need):.6g} must be < 2^{bits - 1} = {half} "
        f"({hint}); " + _advice(bits, scale_hint=True)
    )


def _advice(bits: int, *, scale_hint: bool) -> str:
    options = ["lower --scale or clip" if scale_hint else "lower clip"]
    if bits < 64:
        options.append("raise modulus_bits to 64")
    options.append("use fewer peers")
    return "to fix: " + ", ".join(options[:-1]) + ", or " + options[-1]


@dataclass(frozen=True)
class WeightedEncoding:
    """Encoding for a weighted mean: a peer sends ``(w * clip(x), w)``.

    ``clip`` bounds ``x`` itself; ``max_weight`` is the public bound on any
    peer's weight. The inner quantizer's clip must be at least
    ``max(clip, 1) * max_weight`` so neither ``w * clip(x)`` nor ``w`` is clipped.
    """

    quantizer: Quantizer
    clip: float
    max_weight: float

    def __post_init__(self) -> None:
        if not isinstance(self.quantizer, Quantizer):
            raise EncodingError(f"quantizer must be a Quantizer, got {type(self.quantizer)}")
        object.__setattr__(self, "clip", _positive_finite("clip", self.clip))
        object.__setattr__(self, "max_weight", _positive_finite("max_weight", self.max_weight))
        needed = max(self.clip, 1.0) * self.max_weight
        if self.quantizer.clip < needed:
            raise EncodingError(
                f"inner quantizer clip {self.quantizer.clip} is below "
                f"max(clip, 1) * max_weight = {needed}; the weighted values or the "
                f"weight coordinate would be clipped"
            )

    @classmethod
    def for_peers(
        cls,
        n: int,
        *,
        clip: float = 1.0,
        max_weight: float = 1.0,
        modulus_bits: int = 64,
        scale: float | None = None,
    ) -> WeightedEncoding:
        """Weighted encoding for ``n`` peers; the inner clip is ``max(clip,1)*max_weight``."""
        clip = _positive_finite("clip", clip)
        max_weight = _positive_finite("max_weight", max_weight)
        inner_clip = max(clip, 1.0) * max_weight
        try:
            quantizer = Quantizer.for_peers(
                n, clip=inner_clip, modulus_bits=modulus_bits, scale=scale
            )
        except EncodingError as exc:
            raise EncodingError(
                f"weighted encoding (inner clip = max(clip, 1) * max_weight = "
                f"max({clip}, 1) * {max_weight} = {inner_clip}; lowering max_weight "
                f"also helps): {exc}"
            ) from exc
        return cls(quantizer=quantizer, clip=clip, max_weight=max_weight)

    def encode(self, values: np.ndarray, weight: float, rng: np.random.Generator) -> np.ndarray:
        """Encode ``(d,)`` values with ``weight`` into ``(d+1,)`` ring elements."""
        arr = _finite_vector(values)
        w = _real("weight", weight)
        if not math.isfinite(w) or not 0.0 <= w <= self.max_weight:
            raise EncodingError(
                f"weight must be finite and in [0, max_weight={self.max_weight}], got {weight!r}"
            )
        payload = np.empty(arr.shape[0] + 1, dtype=np.float64)
        np.multiply(np.clip(arr, -self.clip, self.clip), w, out=payload[:-1])
        payload[-1] = w
        return self.quantizer.encode(payload, rng)

    def decode_mean(self, total: np.ndarray) -> tuple[np.ndarray, float]:
        """Decode a summed ``(d+1,)`` ring vector to (weighted mean ``(d,)``, total weight)."""
        decoded = self.quantizer.decode(total)
        if decoded.shape[0] < 1:
            raise EncodingError("weighted total must have at least the weight coordinate")
        total_weight = float(decoded[-1])
        if total_weight <= 0.0:
            raise EncodingError(
                f"total weight decoded as {total_weight} <= 0: no peer contributed a "
                f"positive weight, so the weighted mean is undefined"
            )
        return decoded[:-1] / total_weight, total_weight

    def mean_error_bound(self, n: int, total_weight: float) -> float:
        """Per-coordinate bound on |decoded mean - true weighted mean of clipped x|.

        ``total_weight`` is the decoded total weight returned by :meth:`decode_mean`.
        """
        if not math.isfinite(total_weight) or total_weight <= 0.0:
            raise EncodingError(f"total_weight must be positive and finite, got {total_weight}")
        return self.quantizer.error_bound(n) * (1.0 + self.clip) / total_weight

    def to_dict(self) -> dict[str, float | int]:
        """Parameters for publication: the quantizer's plus ``value_clip`` and ``max_weight``."""
        d = self.quantizer.to_dict()
        d["value_clip"] = self.clip
        d["max_weight"] = self.max_weight
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> WeightedEncoding:
        """Inverse of :meth:`to_dict`; validates."""
        if not isinstance(data, Mapping):
            raise EncodingError(f"encoding parameters must be a mapping, got {type(data)}")
        missing = {"value_clip", "max_weight"} - set(data)
        if missing:
            raise EncodingError(f"weighted encoding parameters missing {sorted(missing)}")
        inner = {k: v for k, v in data.items() if k not in ("value_clip", "max_weight")}
        return cls(
            quantizer=Quantizer.from_dict(inner),
            clip=_positive_finite("value_clip", data["value_clip"]),
            max_weight=_positive_finite("max_weight", data["max_weight"]),
        )
