"""secagg.dp.accounting: the RDP curves, sampling, composition and (epsilon, delta).

Reference values are computed here independently (closed forms written out by
hand, the zCDP conversion, dp_accounting's PLD accountant), not by the code
under test.
"""

from __future__ import annotations

import math
from itertools import pairwise

import numpy as np
import pytest

from secagg.dp import DPConfig, DPParameters

dp_accounting = pytest.importorskip("dp_accounting")

from secagg.dp import accounting  # noqa: E402  (needs dp_accounting)

DELTA = 1e-5


def params(z: float, mechanism: str = "skellam", dim: int = 1024,
           **kwargs: object) -> DPParameters:
    config = DPConfig(noise_multiplier=z, clip=1.0, mechanism=mechanism,  # type: ignore[arg-type]
                      **kwargs)  # type: ignore[arg-type]
    return DPParameters.derive(50, 30, dim, config)


def test_skellam_rdp_closed_form() -> None:
    # alpha D2^2/(2 mu) + min(((2 alpha - 1) D2^2 + 6 D1)/(4 mu^2), 3 D1/(2 mu)), by hand:
    # alpha=2:  2*4/20 + min((3*4 + 24)/400, 12/20) = 0.4 + 0.09
    # alpha=10: 10*4/20 + min((19*4 + 24)/400, 12/20) = 2 + 0.25
    curve = accounting.skellam_rdp([2, 10], l1=4.0, l2=2.0, variance=10.0)
    np.testing.assert_allclose(curve, [0.49, 2.25], rtol=1e-12)


def test_discrete_gaussian_rdp_reduces_to_gaussian_for_large_shares() -> None:
    # Share variance 100: tau = 10 sum exp(-2 pi^2 100 k/(k+1)) underflows to 0.
    curve = accounting.discrete_gaussian_rdp([2, 7], l1=30.0, l2=5.0, share_variance=100.0,
                                             shares=4, dim=64)
    np.testing.assert_allclose(curve, np.array([2, 7]) * 25.0 / (2 * 400.0), rtol=1e-12)
    # Tiny shares: tau > 0 makes it strictly worse than the Gaussian term.
    small = accounting.discrete_gaussian_rdp([2], l1=30.0, l2=5.0, share_variance=0.05,
                                             shares=4, dim=64)
    assert small[0] > 2 * 25.0 / (2 * 0.2)


def test_subsampling_bound_closed_form_at_order_two() -> None:
    orders = list(range(2, 20))
    curve = np.linspace(0.3, 5.0, len(orders))
    q = 0.05
    sampled = accounting.subsampled_rdp(orders, curve, q)
    # alpha = 2: log((1 - q)(1 + q) + q^2 e^eps(2)), by hand.
    assert sampled[0] == pytest.approx(math.log(1 - q * q + q * q * math.exp(0.3)), rel=1e-12)
    # alpha = 3: (1-q)^2 (1+2q) + 3 q^2 (1-q) e^eps(2) + 3 * q^3 e^(2 eps(3)), over alpha - 1.
    e2, e3 = curve[0], curve[1]
    by_hand = math.log((1 - q) ** 2 * (1 + 2 * q) + 3 * q * q * (1 - q) * math.exp(e2)
                       + 3 * q**3 * math.exp(2 * e3)) / 2
    assert sampled[1] == pytest.approx(min(by_hand, e3), rel=1e-12)
    assert np.all(sampled <= curve)
    np.testing.assert_array_equal(accounting.subsampled_rdp(orders, curve, 1.0), curve)
    assert np.all(accounting.subsampled_rdp(orders, curve, 0.2) >= sampled)


def test_gaussian_epsilon_matches_an_independent_computation() -> None:
    z, rounds = 1.3, 7
    ours = accounting.gaussian_epsilon(z, rounds=rounds, delta=DELTA)
    # RDP of the Gaussian: rounds * alpha / (2 z^2); conversion of Canonne-Kamath-Steinke
    # 2020 (Prop. 12): eps = rdp + log((alpha-1)/alpha) - (log delta + log alpha)/(alpha-1).
    by_hand = min(rounds * a / (2 * z * z) + math.log((a - 1) / a)
                  - (math.log(DELTA) + math.log(a)) / (a - 1) for a in accounting.ORDERS)
    assert ours == pytest.approx(by_hand, rel=1e-12)
    # zCDP (Bun-Steinke Prop. 1.3): rho = rounds/(2 z^2) gives
    # eps <= rho + 2 sqrt(rho log(1/delta)).
    rho = rounds / (2 * z * z)
    assert ours <= rho + 2 * math.sqrt(rho * math.log(1 / DELTA))
    # The PLD accountant is tight for the Gaussian: RDP can only be above it, and not by much.
    pld = dp_accounting.pld.PLDAccountant()
    pld.compose(dp_accounting.GaussianDpEvent(z), rounds)
    tight = pld.get_epsilon(DELTA)
    assert tight < ours < 1.3 * tight


@pytest.mark.parametrize("mechanism", ["skellam", "gaussian"])
def test_epsilon_falls_with_noise_and_grows_with_rounds(mechanism: str) -> None:
    by_noise = [accounting.epsilon(params(z, mechanism), rounds=5) for z in (0.5, 1, 2, 4, 8)]
    assert all(a > b for a, b in pairwise(by_noise))
    by_rounds = [accounting.epsilon(params(2.0, mechanism), rounds=r) for r in (1, 2, 10, 50)]
    assert all(a < b for a, b in pairwise(by_rounds))


@pytest.mark.parametrize("mechanism", ["skellam", "gaussian"])
def test_discrete_epsilon_converges_to_the_gaussian(mechanism: str) -> None:
    # One coordinate on a grid as coarse as the clip (c gamma = 1, Delta_2 = 2): with little
    # noise the discreteness terms dominate, with much noise they vanish.
    coarse = {"scale": 1.0, "max_sensitivity_inflation": 20.0}
    ratios = []
    for z in (0.3, 1.0, 4.0, 30.0):
        p = params(z, mechanism, dim=1, **coarse)
        ratios.append(accounting.epsilon(p, rounds=3)
                      / accounting.gaussian_epsilon(z, rounds=3, delta=DELTA))
    assert all(r >= 1 - 1e-12 for r in ratios)  # never better than the Gaussian
    assert ratios[0] > 1.05  # visibly worse with little noise on a coarse grid
    assert all(a >= b for a, b in pairwise(ratios))
    assert ratios[-1] < 1.01


def test_contributors_colluders_and_per_round_counts() -> None:
    p = params(1.0)
    at_threshold = accounting.epsilon(p, rounds=4)
    assert accounting.epsilon(p, rounds=4, contributors=30) == at_threshold
    assert accounting.epsilon(p, rounds=4, contributors=45) < at_threshold
    assert accounting.epsilon(p, rounds=4, contributors=45, colluding=15) == at_threshold
    mixed = accounting.epsilon(p, contributors=[30, 45, 45, 30])
    assert accounting.epsilon(p, rounds=4, contributors=45) < mixed < at_threshold
    assert accounting.epsilon(p, rounds=1, contributors=10, colluding=10) == math.inf


def test_sampling_amplifies_and_the_gaussian_approximation_is_lower() -> None:
    p = params(1.5)
    full = accounting.epsilon(p, rounds=20)
    sampled = accounting.epsilon(p, rounds=20, sampling_rate=0.1)
    approx = accounting.gaussian_approximation_epsilon(p, rounds=20, sampling_rate=0.1)
    assert approx < sampled < full
    # Equal noise-to-sensitivity ratio: the approximation is the Gaussian's epsilon at z.
    assert approx == pytest.approx(accounting.gaussian_epsilon(1.5, rounds=20, delta=DELTA,
                                                               sampling_rate=0.1), rel=1e-9)
