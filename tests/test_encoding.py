"""Tests for secagg.encoding: quantization into Z_{2^k} and weighted means."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secagg.encoding import Quantizer, WeightedEncoding, to_signed
from secagg.errors import EncodingError

# Relative slack for comparing against float64 reference sums (the bounds
# themselves are exact; only the test's own float sums carry rounding).
EPS = 1e-9


def ring_sum(encodings: list[np.ndarray]) -> np.ndarray:
    """Sum ring vectors with wrapping unsigned adds, as the protocol does."""
    total = np.zeros_like(encodings[0])
    for e in encodings:
        total += e  # numpy unsigned add wraps mod 2^k
    return total


# --------------------------------------------------------------------------- basics


def test_dtype() -> None:
    assert Quantizer(clip=1.0, scale=2.0**10, modulus_bits=32).dtype == np.dtype(np.uint32)
    assert Quantizer(clip=1.0, scale=2.0**10, modulus_bits=64).dtype == np.dtype(np.uint64)


@given(
    st.integers(min_value=1, max_value=50),
    st.sampled_from([32, 64]),
    st.floats(min_value=1e-3, max_value=1e3),
    st.integers(min_value=0, max_value=2**32 - 1),
)
def test_round_trip_within_one_over_scale(d: int, bits: int, clip: float, seed: int) -> None:
    q = Quantizer.for_peers(1, clip=clip, modulus_bits=bits)
    rng = np.random.default_rng(seed)
    x = rng.uniform(-clip, clip, size=d)
    enc = q.encode(x, rng)
    assert enc.dtype == q.dtype and enc.shape == (d,)
    out = q.decode(enc)
    assert out.dtype == np.float64 and out.shape == (d,)
    assert np.all(np.abs(out - x) < 1.0 / q.scale)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=40),
    d=st.integers(min_value=1, max_value=64),
    bits=st.sampled_from([32, 64]),
    clip=st.floats(min_value=1e-2, max_value=1e2),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_sum_of_n_within_bound(n: int, d: int, bits: int, clip: float, seed: int) -> None:
    q = Quantizer.for_peers(n, clip=clip, modulus_bits=bits)
    rng = np.random.default_rng(seed)
    xs = [rng.uniform(-clip, clip, size=d) for _ in range(n)]
    total = ring_sum([q.encode(x, rng) for x in xs])
    decoded = q.decode(total)
    true = np.sum(xs, axis=0)
    bound = q.error_bound(n)
    assert bound == n / q.scale
    assert np.all(np.abs(decoded - true) <= bound + EPS * n * clip)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(min_value=2, max_value=30),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_sum_at_extremes_fits_ring(n: int, seed: int) -> None:
    # All peers at +clip or all at -clip: the largest possible sums in magnitude.
    q = Quantizer.for_peers(n, clip=1.0, modulus_bits=32)
    rng = np.random.default_rng(seed)
    for sign in (1.0, -1.0):
        total = ring_sum([q.encode(np.full(4, sign), rng) for _ in range(n)])
        assert np.all(np.abs(q.decode(total) - sign * n) <= q.error_bound(n))


def test_values_outside_clip_are_clipped() -> None:
    q = Quantizer.for_peers(3, clip=2.0)
    rng = np.random.default_rng(1)
    x = np.array([-100.0, -2.5, 2.5, 1e300, 0.5])
    out = q.decode(q.encode(x, rng))
    expected = np.array([-2.0, -2.0, 2.0, 2.0, 0.5])
    assert np.all(np.abs(out - expected) < 1.0 / q.scale)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_rejected(bad: float) -> None:
    q = Quantizer.for_peers(3)
    with pytest.raises(EncodingError, match="non-finite"):
        q.encode(np.array([0.0, bad, 1.0]), np.random.default_rng(0))


def test_encode_rejects_bad_shape() -> None:
    q = Quantizer.for_peers(3)
    with pytest.raises(EncodingError, match="1-D"):
        q.encode(np.zeros((2, 2)), np.random.default_rng(0))


def test_empty_vector() -> None:
    q = Quantizer.for_peers(3)
    enc = q.encode(np.zeros(0), np.random.default_rng(0))
    assert enc.shape == (0,) and enc.dtype == np.uint32
    assert q.decode(enc).shape == (0,)


def test_decode_rejects_wrong_dtype() -> None:
    q = Quantizer.for_peers(3)
    with pytest.raises(EncodingError, match="dtype"):
        q.decode(np.zeros(3, dtype=np.uint64))
    with pytest.raises(EncodingError, match="dtype"):
        q.decode(np.zeros(3, dtype=np.int64))


def test_negative_sums_decode_negative() -> None:
    for bits in (32, 64):
        q = Quantizer.for_peers(5, clip=1.0, modulus_bits=bits)
        rng = np.random.default_rng(7)
        xs = [np.array([-0.9, -0.1, -0.5]) for _ in range(5)]
        encs = [q.encode(x, rng) for x in xs]
        # Negative values are stored as large unsigned numbers (two's complement).
        assert np.all(encs[0] >= np.iinfo(q.dtype).max // 2)
        decoded = q.decode(ring_sum(encs))
        assert np.all(decoded < 0)
        assert np.all(np.abs(decoded - np.array([-4.5, -0.5, -2.5])) <= q.error_bound(5))


def test_to_signed() -> None:
    u32 = np.array([0, 1, 2**31 - 1, 2**31, 2**32 - 1], dtype=np.uint32)
    assert to_signed(u32).tolist() == [0, 1, 2**31 - 1, -(2**31), -1]
    assert to_signed(u32).dtype == np.int64
    u64 = np.array([0, 1, 2**63 - 1, 2**63, 2**64 - 1], dtype=np.uint64)
    assert to_signed(u64).tolist() == [0, 1, 2**63 - 1, -(2**63), -1]
    assert to_signed(u64).dtype == np.int64
    with pytest.raises(EncodingError):
        to_signed(np.zeros(2, dtype=np.int32))


def test_uint64_path() -> None:
    n = 1000
    q = Quantizer.for_peers(n, clip=3.0, modulus_bits=64)
    assert q.dtype == np.uint64
    # Far finer than anything 32 bits allows for the same n and clip.
    assert q.scale > Quantizer.for_peers(n, clip=3.0, modulus_bits=32).scale * 2**20
    rng = np.random.default_rng(3)
    xs = rng.uniform(-3.0, 3.0, size=(n, 8))
    total = ring_sum([q.encode(x, rng) for x in xs])
    assert total.dtype == np.uint64
    assert np.all(np.abs(q.decode(total) - xs.sum(axis=0)) <= q.error_bound(n) + 1e-12)


def test_uint64_explicit_large_scale_wraps_correctly() -> None:
    # A scale far beyond 2^53 is accepted when given explicitly (ring capacity only).
    q = Quantizer.for_peers(4, clip=1.0, modulus_bits=64, scale=2.0**60)
    rng = np.random.default_rng(0)
    x = np.array([1.0, -1.0, 0.25])
    total = ring_sum([q.encode(x, rng) for _ in range(4)])
    assert to_signed(total).tolist() == [2**62, -(2**62), 2**60]
    assert q.decode(total).tolist() == [4.0, -4.0, 1.0]


# --------------------------------------------------------------------------- rounding


def test_stochastic_rounding_unbiased() -> None:
    q = Quantizer(clip=1.0, scale=2.0**8, modulus_bits=32)
    rng = np.random.default_rng(12345)
    x = 0.3 / q.scale
    m = 200_000
    decoded = q.decode(q.encode(np.full(m, x), rng))
    # Each decoded value is 0 or 1/scale; their mean estimates x.
    assert set(np.unique(decoded).tolist()) <= {0.0, 1.0 / q.scale}
    sd = math.sqrt(0.3 * 0.7 / m) / q.scale
    assert abs(decoded.mean() - x) < 5 * sd


def test_stochastic_rounding_negative_unbiased() -> None:
    q = Quantizer(clip=1.0, scale=1.0, modulus_bits=32)
    rng = np.random.default_rng(99)
    m = 200_000
    decoded = q.decode(q.encode(np.full(m, -0.3), rng))
    assert set(np.unique(decoded).tolist()) <= {-1.0, 0.0}
    assert abs(decoded.mean() + 0.3) < 5 * math.sqrt(0.21 / m)


def test_integers_encode_exactly() -> None:
    q = Quantizer(clip=10.0, scale=1.0, modulus_bits=32)
    x = np.arange(-10.0, 11.0)
    assert np.array_equal(q.decode(q.encode(x, np.random.default_rng(0))), x)


def test_encode_deterministic_given_seed() -> None:
    q = Quantizer.for_peers(3)
    x = np.linspace(-1, 1, 17)
    a = q.encode(x, np.random.default_rng(42))
    b = q.encode(x, np.random.default_rng(42))
    assert np.array_equal(a, b)


# --------------------------------------------------------------------------- capacity


@given(
    n=st.integers(min_value=1, max_value=10**6),
    bits=st.sampled_from([32, 64]),
    clip=st.floats(min_value=1e-3, max_value=1e3),
)
def test_for_peers_chooses_largest_fitting_power_of_two(n: int, bits: int, clip: float) -> None:
    try:
        q = Quantizer.for_peers(n, clip=clip, modulus_bits=bits)
    except EncodingError as exc:
        assert "scale" in str(exc)
        assert n * (clip + 1) >= 2 ** min(bits - 1, 53)
        return
    s = q.scale
    assert s >= 1.0
    assert math.frexp(s)[0] == 0.5  # a power of two
    limit = 2 ** min(bits - 1, 53)
    assert n * (clip * s + 1) < limit
    assert n * (clip * 2 * s + 1) >= limit  # the next power of two does not fit
    q.check_capacity(n)  # passes
    with pytest.raises(EncodingError):
        Quantizer.for_peers(n, clip=clip, modulus_bits=bits, scale=2 * s * 2 ** max(0, bits - 53))


def test_for_peers_default_32_bit_values() -> None:
    q = Quantizer.for_peers(100)
    # 100 * (2^24 + 1) < 2^31 <= 100 * (2^25 + 1)
    assert q.scale == 2.0**24
    assert q.modulus_bits == 32 and q.clip == 1.0


def test_too_large_scale_fails_with_advice() -> None:
    with pytest.raises(EncodingError) as info:
        Quantizer.for_peers(100, clip=1.0, scale=2.0**30)
    msg = str(info.value)
    assert "--scale" in msg
    assert "100" in msg
    assert "2^31" in msg
    assert "modulus_bits to 64" in msg
    assert "fewer peers" in msg
    assert "clip" in msg


def test_too_large_scale_64_bit_does_not_suggest_64() -> None:
    with pytest.raises(EncodingError) as info:
        Quantizer.for_peers(10, clip=1.0, modulus_bits=64, scale=2.0**62)
    msg = str(info.value)
    assert "--scale" in msg and "2^63" in msg
    assert "modulus_bits to 64" not in msg


def test_check_capacity() -> None:
    q = Quantizer.for_peers(10)
    q.check_capacity(10)
    q.check_capacity(1)
    with pytest.raises(EncodingError, match="fewer peers"):
        q.check_capacity(10_000)
    with pytest.raises(EncodingError):
        q.check_capacity(0)


def test_for_peers_scale_below_one_rejected() -> None:
    with pytest.raises(EncodingError, match="scale >= 1"):
        Quantizer.for_peers(2**20, clip=2.0**12)
    # The same setup fits with 64 bits.
    assert Quantizer.for_peers(2**20, clip=2.0**12, modulus_bits=64).scale >= 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"clip": 0.0},
        {"clip": -1.0},
        {"clip": math.nan},
        {"clip": math.inf},
        {"scale": 0.0},
        {"scale": -2.0},
        {"scale": math.inf},
        {"scale": math.nan},
        {"modulus_bits": 16},
        {"modulus_bits": 63},
        {"modulus_bits": True},
    ],
)
def test_for_peers_parameter_validation(kwargs: dict[str, object]) -> None:
    with pytest.raises(EncodingError):
        Quantizer.for_peers(3, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("n", [0, -1, True, 2.0])
def test_for_peers_rejects_bad_n(n: object) -> None:
    with pytest.raises(EncodingError):
        Quantizer.for_peers(n)  # type: ignore[arg-type]


def test_constructor_validation() -> None:
    with pytest.raises(EncodingError):
        Quantizer(clip=1.0, scale=-1.0, modulus_bits=32)
    with pytest.raises(EncodingError):
        Quantizer(clip=1.0, scale=1.0, modulus_bits=48)
    with pytest.raises(EncodingError):  # not even one peer fits
        Quantizer(clip=1.0, scale=2.0**31, modulus_bits=32)
    assert isinstance(EncodingError("x"), ValueError)


# --------------------------------------------------------------------------- to/from dict


@given(
    n=st.integers(min_value=1, max_value=1000),
    bits=st.sampled_from([32, 64]),
    clip=st.floats(min_value=1e-3, max_value=1e3),
)
def test_dict_round_trip(n: int, bits: int, clip: float) -> None:
    q = Quantizer.for_peers(n, clip=clip, modulus_bits=bits)
    d = q.to_dict()
    assert d == {"clip": clip, "scale": q.scale, "modulus_bits": bits}
    assert Quantizer.from_dict(d) == q


@pytest.mark.parametrize(
    "data",
    [
        {"clip": 1.0, "scale": 16.0},
        {"clip": 1.0, "scale": 16.0, "modulus_bits": 32, "extra": 1},
        {"clip": "1.0", "scale": 16.0, "modulus_bits": 32},
        {"clip": 1.0, "scale": 16.0, "modulus_bits": 32.0},
        {"clip": 1.0, "scale": 16.0, "modulus_bits": "32"},
        {"clip": 1.0, "scale": True, "modulus_bits": 32},
        {"clip": -1.0, "scale": 16.0, "modulus_bits": 32},
        {"clip": 1.0, "scale": math.nan, "modulus_bits": 32},
        {"clip": 1.0, "scale": 16.0, "modulus_bits": 8},
        {"clip": 1.0, "scale": 2.0**40, "modulus_bits": 32},
    ],
)
def test_from_dict_validation(data: dict[str, object]) -> None:
    with pytest.raises(EncodingError):
        Quantizer.from_dict(data)


def test_from_dict_accepts_int_values() -> None:
    q = Quantizer.from_dict({"clip": 1, "scale": 256, "modulus_bits": 32})
    assert q == Quantizer(clip=1.0, scale=256.0, modulus_bits=32)
    assert isinstance(q.clip, float) and isinstance(q.scale, float)


# --------------------------------------------------------------------------- weighted


@settings(max_examples=50, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=30),
    d=st.integers(min_value=1, max_value=32),
    bits=st.sampled_from([32, 64]),
    clip=st.floats(min_value=0.1, max_value=10.0),
    max_weight=st.floats(min_value=0.5, max_value=100.0),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_weighted_mean_within_bound(
    n: int, d: int, bits: int, clip: float, max_weight: float, seed: int
) -> None:
    enc = WeightedEncoding.for_peers(n, clip=clip, max_weight=max_weight, modulus_bits=bits)
    assert enc.quantizer.clip == max(clip, 1.0) * max_weight
    rng = np.random.default_rng(seed)
    xs = rng.uniform(-2 * clip, 2 * clip, size=(n, d))  # some get clipped
    ws = rng.uniform(0.1 * max_weight, max_weight, size=n)
    encs = [enc.encode(x, float(w), rng) for x, w in zip(xs, ws, strict=True)]
    assert all(e.shape == (d + 1,) and e.dtype == enc.quantizer.dtype for e in encs)
    mean, total_weight = enc.decode_mean(ring_sum(encs))
    assert mean.shape == (d,)
    assert abs(total_weight - ws.sum()) <= enc.quantizer.error_bound(n) + EPS * ws.sum()
    clipped = np.clip(xs, -clip, clip)
    true_mean = (ws[:, None] * clipped).sum(axis=0) / ws.sum()
    bound = enc.mean_error_bound(n, total_weight)
    assert np.all(np.abs(mean - true_mean) <= bound + EPS * clip)


def test_weighted_mean_simple() -> None:
    enc = WeightedEncoding.for_peers(3, clip=1.0, max_weight=10.0)
    assert enc.quantizer.modulus_bits == 64
    rng = np.random.default_rng(0)
    total = ring_sum(
        [
            enc.encode(np.array([1.0, 0.0]), 1.0, rng),
            enc.encode(np.array([0.0, -1.0]), 3.0, rng),
            enc.encode(np.array([0.5, 5.0]), 0.0, rng),  # zero weight: ignored
        ]
    )
    mean, w = enc.decode_mean(total)
    assert abs(w - 4.0) <= enc.quantizer.error_bound(3)
    assert np.allclose(mean, [0.25, -0.75], atol=enc.mean_error_bound(3, w))


@pytest.mark.parametrize("weight", [-0.1, 10.5, math.nan, math.inf, True, "1"])
def test_weight_validation(weight: object) -> None:
    enc = WeightedEncoding.for_peers(3, max_weight=10.0)
    with pytest.raises(EncodingError, match="weight"):
        enc.encode(np.zeros(3), weight, np.random.default_rng(0))  # type: ignore[arg-type]


def test_weight_bounds_inclusive() -> None:
    enc = WeightedEncoding.for_peers(3, max_weight=10.0)
    rng = np.random.default_rng(0)
    assert enc.encode(np.zeros(3), 0.0, rng).shape == (4,)
    assert enc.encode(np.zeros(3), 10.0, rng).shape == (4,)
    assert enc.encode(np.zeros(3), 10, rng).shape == (4,)


def test_weighted_rejects_non_finite_values() -> None:
    enc = WeightedEncoding.for_peers(3)
    with pytest.raises(EncodingError, match="non-finite"):
        enc.encode(np.array([0.0, math.inf]), 0.0, np.random.default_rng(0))


def test_weighted_zero_total_weight() -> None:
    enc = WeightedEncoding.for_peers(3)
    rng = np.random.default_rng(0)
    total = ring_sum([enc.encode(np.ones(2), 0.0, rng) for _ in range(3)])
    with pytest.raises(EncodingError, match="total weight"):
        enc.decode_mean(total)


def test_weighted_small_clip_keeps_weight_coordinate() -> None:
    # clip < 1: the inner clip is still max_weight so the weight is not clipped.
    enc = WeightedEncoding.for_peers(2, clip=0.01, max_weight=5.0, modulus_bits=32)
    assert enc.quantizer.clip == 5.0
    rng = np.random.default_rng(0)
    total = ring_sum([enc.encode(np.array([0.005]), 5.0, rng) for _ in range(2)])
    mean, w = enc.decode_mean(total)
    assert abs(w - 10.0) <= enc.quantizer.error_bound(2)
    assert abs(mean[0] - 0.005) <= enc.mean_error_bound(2, w)


def test_weighted_inconsistent_quantizer_rejected() -> None:
    q = Quantizer.for_peers(3, clip=1.0)
    with pytest.raises(EncodingError, match="max_weight"):
        WeightedEncoding(quantizer=q, clip=1.0, max_weight=2.0)


def test_weighted_for_peers_errors_name_parameters() -> None:
    with pytest.raises(EncodingError) as info:
        WeightedEncoding.for_peers(10, max_weight=100.0, modulus_bits=32, scale=2.0**30)
    msg = str(info.value)
    assert "max_weight" in msg and "--scale" in msg
    with pytest.raises(EncodingError):
        WeightedEncoding.for_peers(3, max_weight=0.0)
    with pytest.raises(EncodingError):
        WeightedEncoding.for_peers(3, clip=math.nan)


def test_weighted_dict_round_trip() -> None:
    enc = WeightedEncoding.for_peers(7, clip=2.0, max_weight=3.0)
    assert WeightedEncoding.from_dict(enc.to_dict()) == enc
    bad = enc.to_dict()
    del bad["max_weight"]
    with pytest.raises(EncodingError):
        WeightedEncoding.from_dict(bad)


def test_explicit_scale_error_reports_requested_peer_count() -> None:
    # Even when a single peer would not fit, the message is about the n asked for.
    with pytest.raises(EncodingError, match="over 10 peer"):
        Quantizer.for_peers(10, clip=100.0, scale=2.0**30)
