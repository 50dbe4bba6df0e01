"""secagg.dp: rotation, ring, rounding, noise, parameters, the pipeline and the accountant.

Statistical tests use fixed seeds; each tolerance is stated next to it in units of
the estimator's standard error, so a correct implementation fails with negligible
probability and a wrong variance (off by a few percent) fails for sure.
"""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secagg.dp import (
    DPConfig,
    DPParameterError,
    DPParameters,
    decode_sum,
    discretize,
    encode_update,
    noise,
    pipeline,
    rotation,
)
from secagg.dp.params import noise_report

SEED = bytes(range(32))


def sylvester(n: int) -> np.ndarray:
    """Independent reference: H_n = H_2 kron ... kron H_2."""
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.kron(np.array([[1.0, 1.0], [1.0, -1.0]]), h)
    return h


# ----------------------------------------------------------------- rotation


@pytest.mark.parametrize(("leaf", "chunk", "min_blas"),
                         [(64, 1 << 15, 1 << 17), (64, 1 << 15, 1), (4, 16, 1), (2, 4, 1),
                          (8, 8, 1)])
@pytest.mark.parametrize("n", [1, 2, 8, 64, 256, 1024])
def test_hadamard_transform_is_the_dense_matrix(n: int, leaf: int, chunk: int, min_blas: int,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # Small leaf/chunk sizes exercise every path (dense top product, butterfly top) on small n.
    monkeypatch.setattr(rotation, "_LEAF", leaf)
    monkeypatch.setattr(rotation, "_CHUNK", chunk)
    monkeypatch.setattr(rotation, "_MIN_BLAS", min_blas)
    x = np.random.default_rng(n).standard_normal(n)
    np.testing.assert_allclose(rotation.hadamard_transform(x), sylvester(n) @ x,
                               rtol=1e-12, atol=1e-12 * n)


def test_rotation_matrix_is_orthogonal() -> None:
    d = 100
    basis = np.stack([rotation.rotate(e, SEED) for e in np.eye(d)], axis=1)  # (128, 100)
    np.testing.assert_allclose(basis.T @ basis, np.eye(d), atol=1e-12)


@settings(max_examples=60)
@given(d=st.integers(1, 3000), seed=st.binary(min_size=32, max_size=32),
       data_seed=st.integers(0, 2**32 - 1))
def test_rotation_inverse_and_norm(d: int, seed: bytes, data_seed: int) -> None:
    rng = np.random.default_rng(data_seed)
    x, z = rng.standard_normal(d), rng.standard_normal(d)
    y = rotation.rotate(x, seed)
    assert y.shape == (rotation.padded_dim(d),)
    assert math.isclose(np.linalg.norm(y), np.linalg.norm(x), rel_tol=1e-12)
    assert math.isclose(float(y @ rotation.rotate(z, seed)), float(x @ z),
                        rel_tol=1e-9, abs_tol=1e-9 * np.linalg.norm(x) * np.linalg.norm(z))
    np.testing.assert_allclose(rotation.unrotate(y, seed, d), x, rtol=0,
                               atol=1e-12 * max(1.0, float(np.abs(x).max())))


def test_rotation_spreads_a_spike_and_depends_on_the_seed() -> None:
    d = 1000
    spike = np.zeros(d)
    spike[3] = 1.0
    y = rotation.rotate(spike, SEED)
    np.testing.assert_allclose(np.abs(y), 1 / math.sqrt(1024), rtol=1e-12)
    signs = rotation.rotation_signs(SEED, 100_000)
    assert abs(signs.mean() - 0.5) < 5 * 0.5 / math.sqrt(100_000)  # 5 standard errors
    assert not np.array_equal(signs, rotation.rotation_signs(bytes(32), 100_000))
    np.testing.assert_array_equal(signs[:1000], rotation.rotation_signs(SEED, 1000))


# ------------------------------------------------------------- ring, rounding


@settings(max_examples=80)
@given(bits=st.sampled_from([32, 64]), data=st.data())
def test_ring_round_trip_and_exact_sums(bits: int, data: st.DataObject) -> None:
    half = 2 ** (bits - 1)
    peers = data.draw(st.integers(1, 6))
    # Each summand within half/peers, so the integer sum stays in the signed range.
    bound = half // peers - 1
    rows = data.draw(st.lists(st.lists(st.integers(-bound, bound), min_size=5, max_size=5),
                              min_size=peers, max_size=peers))
    values = np.array(rows, dtype=np.int64)
    rings = [discretize.to_ring(row, bits) for row in values]
    for ring, row in zip(rings, values, strict=True):
        assert ring.dtype == discretize.ring_dtype(bits)
        np.testing.assert_array_equal(discretize.from_ring(ring), row)
    total = np.zeros(5, dtype=discretize.ring_dtype(bits))
    for ring in rings:
        total += ring  # wrapping adds, as secure aggregation does
    expected = [sum(int(v) for v in column) for column in values.T]
    assert discretize.from_ring(total).tolist() == expected


def test_ring_wraps_outside_the_signed_range() -> None:
    total = discretize.to_ring(np.array([2**31 - 1], dtype=np.int64), 32)
    total += discretize.to_ring(np.array([1], dtype=np.int64), 32)
    assert discretize.from_ring(total).tolist() == [-(2**31)]


def test_stochastic_rounding_is_unbiased_and_moves_less_than_one() -> None:
    rng = np.random.default_rng(7)
    v = np.full(200_000, 2.3)
    q = discretize.stochastic_round(v, rng)
    assert set(np.unique(q).tolist()) == {2, 3}
    assert abs(q.mean() - 2.3) < 5 * math.sqrt(0.3 * 0.7 / v.size)  # 5 standard errors
    w = np.random.default_rng(8).uniform(-1e6, 1e6, 50_000)
    assert np.all(np.abs(discretize.stochastic_round(w, rng) - w) < 1)


def test_conditional_rounding_meets_its_bound() -> None:
    rng = np.random.default_rng(9)
    d, beta = 4096, math.exp(-0.5)
    v = rng.standard_normal(d)
    v *= 20.0 / np.linalg.norm(v)
    bound = discretize.inflated_l2_bound(20.0, d, beta)
    assert bound < 20.0 + math.sqrt(d)  # tighter than the unconditional bound here
    for _ in range(20):
        q = discretize.conditional_stochastic_round(v, rng, bound)
        assert np.linalg.norm(q.astype(np.float64)) <= bound


# ----------------------------------------------------------------------- noise


def chi_square(samples: np.ndarray, support: np.ndarray, pmf: np.ndarray) -> tuple[float, int]:
    counts = np.array([(samples == k).sum() for k in support])
    keep = pmf * samples.size > 5
    expected = pmf[keep] * samples.size
    return float(((counts[keep] - expected) ** 2 / expected).sum()), int(keep.sum())


@pytest.mark.parametrize("lam", [12.5, 1000.3])
def test_poisson_matches_its_pmf(lam: float) -> None:
    samples = noise.poisson(lam, 200_000, np.random.default_rng(11))
    support = np.arange(max(0, int(lam - 7 * math.sqrt(lam))), int(lam + 7 * math.sqrt(lam)))
    pmf = np.exp(support * math.log(lam) - lam - np.array([math.lgamma(k + 1) for k in support]))
    stat, dof = chi_square(samples, support, pmf)
    assert stat < dof + 6 * math.sqrt(2 * dof)  # mean dof, sd sqrt(2 dof)


@pytest.mark.parametrize("variance", [0.5, 3.0])
def test_discrete_gaussian_matches_its_pmf(variance: float) -> None:
    samples = noise.discrete_gaussian(variance, 200_000, np.random.default_rng(12))
    support = np.arange(-30, 31)
    weights = np.exp(-(support.astype(np.float64) ** 2) / (2 * variance))
    stat, dof = chi_square(samples, support, weights / weights.sum())
    assert stat < dof + 6 * math.sqrt(2 * dof)


@pytest.mark.parametrize("sampler", [noise.skellam, noise.discrete_gaussian])
@pytest.mark.parametrize("variance", [40.0, 3.0e9, 2.0**58])
def test_noise_mean_and_variance(sampler: object, variance: float) -> None:
    n = 200_000
    x = sampler(variance, n, np.random.default_rng(13)).astype(np.float64)  # type: ignore[operator]
    assert abs(x.mean()) < 5 * math.sqrt(variance / n)
    # sd of the sample variance is about variance * sqrt(2/n) = 0.3 %.
    assert x.var() == pytest.approx(variance, rel=0.02)


# ------------------------------------------------------------------ parameters


def test_derived_scale_is_the_largest_that_fits() -> None:
    config = DPConfig(noise_multiplier=1.5, clip=0.5)
    params = DPParameters.derive(50, 30, 5000, config)
    assert params.range_bits == pytest.approx(32.0, abs=1e-6)
    assert params.central_stddev == pytest.approx(1.5 * params.l2_sensitivity)
    assert params.local_variance == pytest.approx(params.central_stddev**2 / 30)
    assert params.l2_sensitivity == pytest.approx(0.5 * params.scale + math.sqrt(8192))
    bigger = DPConfig(noise_multiplier=1.5, clip=0.5, scale=params.scale * 1.001)
    with pytest.raises(DPParameterError) as info:
        DPParameters.derive(50, 30, 5000, bigger)
    assert info.value.parameter == "scale"


@pytest.mark.parametrize(("kwargs", "derive", "parameter"), [
    ({"noise_multiplier": 1.0, "clip": 0.0}, (10, 6, 100), "clip"),
    ({"noise_multiplier": -1.0, "clip": 1.0}, (10, 6, 100), "noise_multiplier"),
    ({"noise_multiplier": 1.0, "clip": 1.0, "modulus_bits": 16}, (10, 6, 100), "modulus_bits"),
    ({"noise_multiplier": 1.0, "clip": 1.0, "modulus_bits": 32.0}, (10, 6, 100), "modulus_bits"),
    ({"noise_multiplier": 1.0, "clip": 1.0, "mechanism": "laplace"}, (10, 6, 100), "mechanism"),
    ({"noise_multiplier": 1.0, "clip": 1.0, "delta": 1.0}, (10, 6, 100), "delta"),
    ({"noise_multiplier": 1.0, "clip": 1.0}, (10, 11, 100), "threshold"),
    ({"noise_multiplier": 1.0, "clip": 1.0}, (10, 6, 0), "dim"),
    # 10^7 peers with heavy noise: only a scale so coarse that rounding dominates fits.
    ({"noise_multiplier": 1e4, "clip": 1.0}, (10**7, 10**6, 10**6), "modulus_bits"),
    ({"noise_multiplier": 1e9, "clip": 1.0}, (10**6, 10**6, 10**6), "modulus_bits"),
])
def test_refusals_name_the_parameter(kwargs: dict[str, object], derive: tuple[int, int, int],
                                     parameter: str) -> None:
    with pytest.raises(ValueError, match=parameter) as info:
        DPParameters.derive(*derive, DPConfig(**kwargs))  # type: ignore[arg-type]
    assert isinstance(info.value, DPParameterError) and info.value.parameter == parameter


def test_parameters_travel_as_plain_msgpack_and_are_checked() -> None:
    params = DPParameters.derive(30, 20, 1000, DPConfig(noise_multiplier=0.8, clip=2.0,
                                                       mechanism="gaussian", beta=0.6))
    wire = msgpack.unpackb(msgpack.packb(params.to_dict()))
    assert DPParameters.from_dict(wire) == params
    forged = dict(wire, central_stddev=wire["central_stddev"] / 2)
    with pytest.raises(DPParameterError, match="central_stddev") as info:
        DPParameters.from_dict(forged)
    assert info.value.parameter == "central_stddev"
    with pytest.raises(DPParameterError, match="version"):
        DPParameters.from_dict(dict(wire, version=99))


def test_noise_report_counts_contributors_and_colluders() -> None:
    params = DPParameters.derive(30, 20, 1000, DPConfig(noise_multiplier=2.0, clip=1.0))
    sigma2 = params.central_stddev**2
    full = noise_report(params, 20)
    assert full.noise_variance == pytest.approx(sigma2) and full.meets_floor
    assert full.effective_noise_multiplier == pytest.approx(2.0)
    more = noise_report(params, 27)
    assert more.noise_variance == pytest.approx(27 / 20 * sigma2)
    assert more.noise_stddev == pytest.approx(math.sqrt(27 / 20 * sigma2) / params.scale)
    colluded = noise_report(params, 27, colluding=10)
    assert colluded.noise_variance == pytest.approx(17 / 20 * sigma2)
    assert not colluded.meets_floor


# ------------------------------------------------------------------- pipeline


def _sum_rings(rings: list[np.ndarray], dtype: np.dtype[np.unsignedinteger]) -> np.ndarray:
    total = np.zeros(rings[0].shape, dtype=dtype)
    for ring in rings:
        total += ring
    return total


@pytest.mark.parametrize("mechanism", ["skellam", "gaussian"])
def test_summed_noise_has_variance_sigma2_at_threshold_and_more_above(mechanism: str) -> None:
    params = DPParameters.derive(20, 12, 16_384, DPConfig(noise_multiplier=1.0, clip=1.0,
                                                          mechanism=mechanism))  # type: ignore[arg-type]
    rng = np.random.default_rng(21)
    zero = np.zeros(params.dim)
    rings = [encode_update(zero, params, SEED, rng)[0] for _ in range(20)]
    sigma2 = params.central_stddev**2
    for m in (12, 20):
        total = discretize.from_ring(_sum_rings(rings[:m], params.dtype)).astype(np.float64)
        assert abs(total.mean()) < 5 * math.sqrt(m / 12 * sigma2 / total.size)
        # sd of a sample variance over 16384 coordinates: sqrt(2/16384) = 1.1 %.
        assert total.var() == pytest.approx(m / 12 * sigma2, rel=0.06)


@pytest.mark.parametrize(("block", "beta"), [(1 << 15, 0.0), (1000, 0.0), (1 << 15, 0.6)])
def test_decoded_sum_is_clipped_sum_plus_the_reported_noise(
        block: int, beta: float, monkeypatch: pytest.MonkeyPatch) -> None:
    # A small block size runs the blockwise path over many (and a partial) blocks.
    monkeypatch.setattr(pipeline, "_BLOCK", block)
    params = DPParameters.derive(16, 10, 12_000, DPConfig(noise_multiplier=0.5, clip=1.0,
                                                          beta=beta))
    rng = np.random.default_rng(22)
    # Norms about 0.5 .. 1.5: some updates are clipped, some not.
    updates = rng.standard_normal((14, params.dim)) / math.sqrt(params.dim)
    updates *= np.linspace(0.5, 1.5, 14)[:, None]
    seed = bytes(range(100, 132))
    rings, clipped = zip(*(encode_update(u, params, seed, rng) for u in updates), strict=True)
    norms = np.linalg.norm(updates, axis=1)
    assert list(clipped) == (norms > 1.0).tolist() and 0 < sum(clipped) < 14
    decoded = decode_sum(_sum_rings(list(rings), params.dtype), params, seed)
    expected = sum(u * min(1.0, 1.0 / n) for u, n in zip(updates, norms, strict=True))
    error = decoded - expected
    # The error is the rotated-back noise (plus rounding, variance <= 14/4 / scale^2).
    variance = noise_report(params, 14).noise_stddev ** 2
    assert abs(error.mean()) < 5 * math.sqrt(variance / error.size)
    assert error.var() == pytest.approx(variance, rel=0.06)


def test_without_noise_the_decoded_sum_is_exact_up_to_rounding() -> None:
    params = DPParameters.derive(8, 5, 3000, DPConfig(noise_multiplier=0.0, clip=1.0))
    rng = np.random.default_rng(23)
    updates = rng.uniform(-0.01, 0.01, (8, params.dim))
    rings = [encode_update(u, params, SEED, rng)[0] for u in updates]
    decoded = decode_sum(_sum_rings(rings, params.dtype), params, SEED)
    # Each rotated coordinate is off by < 8 / scale; the rotation back keeps the L2 norm.
    bound = 8 / params.scale * math.sqrt(params.padded_dim)
    assert np.linalg.norm(decoded - updates.sum(axis=0)) < bound
    assert np.linalg.norm(decoded - updates.sum(axis=0)) > 0  # rounding did happen


def test_a_precomputed_noise_share_replaces_the_sampled_one() -> None:
    params = DPParameters.derive(8, 5, 3000, DPConfig(noise_multiplier=3.0, clip=1.0))
    rng = np.random.default_rng(26)
    update = rng.uniform(-0.01, 0.01, params.dim)
    quiet = np.zeros(params.padded_dim, dtype=np.int64)
    decoded = decode_sum(encode_update(update, params, SEED, rng, noise=quiet)[0], params, SEED)
    assert np.linalg.norm(decoded - update) < math.sqrt(params.padded_dim) / params.scale
    share = pipeline.sample_noise_share(params, rng)
    assert share.var() == pytest.approx(params.local_variance, rel=0.06)  # sd 1.6 %
    noisy = decode_sum(encode_update(update, params, SEED, rng, noise=share)[0], params, SEED)
    shift = rotation.unrotate(share.astype(np.float64) / params.scale, SEED, params.dim)
    np.testing.assert_allclose(noisy - update, shift,
                               atol=2 * math.sqrt(params.padded_dim) / params.scale)
    with pytest.raises(ValueError, match="noise"):
        encode_update(update, params, SEED, rng, noise=share[:-1])


def test_a_long_update_is_clipped_to_c() -> None:
    params = DPParameters.derive(1, 1, 500, DPConfig(noise_multiplier=0.0, clip=0.7))
    update = np.random.default_rng(24).standard_normal(params.dim) * 5.0  # norm ~110
    ring, clipped = encode_update(update, params, SEED, np.random.default_rng(25))
    assert clipped
    decoded = decode_sum(ring, params, SEED)
    np.testing.assert_allclose(decoded, update * (0.7 / np.linalg.norm(update)),
                               atol=math.sqrt(params.padded_dim) / params.scale)


def test_encode_update_refuses_bad_input() -> None:
    params = DPParameters.derive(4, 3, 10, DPConfig(noise_multiplier=1.0, clip=1.0))
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="shape"):
        encode_update(np.zeros(11), params, SEED, rng)
    with pytest.raises(ValueError, match="non-finite"):
        encode_update(np.full(10, np.nan), params, SEED, rng)
    with pytest.raises(ValueError, match="ring vector"):
        decode_sum(np.zeros(16, dtype=np.uint64), params, SEED)
