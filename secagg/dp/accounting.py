"""Privacy accounting: epsilon at a given delta over R rounds, via Renyi DP.

Neighbouring relation: one peer's update replaced by zero while the noise
shares stay (the convention of both papers below: secure aggregation reveals
only the sum, which always carries the contributors' noise). Sensitivities are
those of the rounded vector in the scaled domain (``DPParameters``), so the
inflation from rounding is accounted for.

Per-round RDP curves (integer orders ``alpha >= 2``):

Skellam (Agarwal, Kairouz, Liu, "The Skellam Mechanism for Differentially
    Private Federated Learning", NeurIPS 2021, arXiv 2110.04995): the bound on
    the Renyi divergence of shifted Skellam distributions (Theorem 3.5 in v2)
    and its multi-dimensional form (Corollary 3.6 in v2; implementations citing
    other versions call it Corollary 4.1). For total noise ``Sk(mu)`` (variance
    ``mu = m/t sigma^2`` with ``m`` honest contributors) and L1/L2
    sensitivities ``D1, D2``::

        eps(alpha) = alpha D2^2 / (2 mu)
                     + min(((2 alpha - 1) D2^2 + 6 D1) / (4 mu^2), 3 D1 / (2 mu))

    A proven upper bound (not approximate); the first term is the Gaussian's,
    the second vanishes as the noise grows.

Distributed discrete Gaussian (Kairouz, Liu, Steinke, "The Distributed Discrete
    Gaussian Mechanism for Federated Learning with Secure Aggregation", ICML
    2021, arXiv 2102.06387): Proposition 14 / Eq. 17 (RDP of the sum of ``m``
    discrete Gaussians ``N_Z(0, s^2)``), with the inflation
    ``tau = 10 sum_{k=1}^{m-1} exp(-2 pi^2 s^2 k/(k+1))`` of their Theorem 1
    (numbering as cited by the authors' reference code, google-research/federated
    distributed_dp/accounting_utils.py);
    with ``A = D2 / sqrt(m s^2)``, ``B = D1 / sqrt(m s^2)``::

        eps(alpha) = min(alpha A^2 / 2 + tau D,
                         alpha / 2 (A^2 + 2 B tau + tau^2 D),
                         alpha / 2 (A + sqrt(D) tau)^2)

    Also a proven upper bound.

Composition over rounds adds the curves (exact for RDP). Conversion to
(epsilon, delta) is dp_accounting's ``compute_epsilon`` (Canonne, Kamath,
Steinke 2020 / Asoodeh et al. conversion; a bound, optimised over the orders).

Client sampling (``sampling_rate < 1``): the curves are amplified with the
general Poisson-subsampling upper bound of Zhu & Wang, "Poisson Subsampled
Renyi Differential Privacy", ICML 2019, Theorem 5 (valid for any mechanism;
looser than the tight Gaussian analysis, so sampled Skellam epsilons sit above
the Gaussian's even with huge noise). Amplification assumes whoever sees the
sum does not know who was sampled; a server that picks the clients or sees the
contributor set must use ``sampling_rate=1``.
:func:`gaussian_approximation_epsilon` instead feeds the effective noise
multiplier to dp_accounting's tight subsampled-Gaussian analysis: that is an
approximation for Skellam (good when the noise is large, not a proof).

:func:`gaussian_epsilon` is the continuous Gaussian mechanism (central DP
reference), computed entirely by dp_accounting (``GaussianDpEvent``,
``PoissonSampledDpEvent``, ``RdpAccountant``).

Exact, bound or approximate:

* exact: composition (RDP adds over rounds, also with per-round contributor
  counts); the Gaussian reference's RDP at each order.
* rigorous upper bounds (epsilon can only be overestimated): the Skellam and
  distributed discrete Gaussian curves, the Zhu-Wang sampling bound, the
  RDP-to-(epsilon, delta) conversion, and using the integer orders ``ORDERS``
  only (the optimum over a grid is >= the optimum over all orders).
* approximate, not a guarantee: :func:`gaussian_approximation_epsilon` (the
  sampled Skellam is treated as a sampled Gaussian).
* assumptions: the bounds are for exact samplers; ours are exact up to float64
  effects (relative ~2^-52 sqrt(lam) per probability, see :mod:`secagg.dp.noise`).
  Noise from colluding peers does not count (``colluding=``), and sampling
  amplification needs the sample to be secret.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from secagg.dp.params import DPParameters

__all__ = [
    "ORDERS",
    "discrete_gaussian_rdp",
    "epsilon",
    "gaussian_approximation_epsilon",
    "gaussian_epsilon",
    "rdp_curve",
    "rdp_to_epsilon",
    "skellam_rdp",
    "subsampled_rdp",
]

ORDERS: tuple[int, ...] = (*range(2, 257), 320, 384, 448, 512, 768, 1024)
FloatArray = npt.NDArray[np.float64]


def _dp_accounting() -> Any:
    try:
        import dp_accounting
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("secagg.dp.accounting needs dp-accounting: install the 'dp' extra "
                          "(pip install 'secagg[dp]') or pip install dp-accounting") from exc
    return dp_accounting


def skellam_rdp(orders: Sequence[int], l1: float, l2: float, variance: float) -> FloatArray:
    """Agarwal-Kairouz-Liu bound (see module) for total Skellam noise of ``variance``."""
    a = np.asarray(orders, dtype=np.float64)
    if variance <= 0:
        return np.full(a.shape, np.inf)
    mu = variance
    extra = np.minimum(((2 * a - 1) * l2**2 + 6 * l1) / (4 * mu**2), 3 * l1 / (2 * mu))
    return np.asarray(a * l2**2 / (2 * mu) + extra, dtype=np.float64)


def discrete_gaussian_rdp(orders: Sequence[int], l1: float, l2: float, share_variance: float,
                          shares: int, dim: int) -> FloatArray:
    """Kairouz-Liu-Steinke bound (see module) for a sum of ``shares`` discrete Gaussians."""
    a = np.asarray(orders, dtype=np.float64)
    if share_variance <= 0 or shares < 1:
        return np.full(a.shape, np.inf)
    k = np.arange(1, shares, dtype=np.float64)
    tau = 10.0 * float(np.sum(np.exp(-2 * math.pi**2 * share_variance * k / (k + 1))))
    total = shares * share_variance
    big_a, big_b = l2 / math.sqrt(total), l1 / math.sqrt(total)
    return np.asarray(np.minimum.reduce([
        a * big_a**2 / 2 + tau * dim,
        a / 2 * (big_a**2 + 2 * big_b * tau + tau**2 * dim),
        a / 2 * (big_a + math.sqrt(dim) * tau) ** 2]), dtype=np.float64)


def subsampled_rdp(orders: Sequence[int], curve: FloatArray, q: float,
                   at: Sequence[int] | None = None) -> FloatArray:
    """Zhu-Wang general upper bound (ICML 2019, Theorem 5) for Poisson sampling rate ``q``.

    ``curve[i]`` is the unsampled RDP at integer ``orders[i]``; the result is at the
    orders ``at`` (default ``orders``), each of which must be in ``orders``. The
    bound at order alpha needs the curve at every integer 2..alpha; an order whose
    lower integers are missing keeps its unsampled value. With eps -> 0 the bound
    tends to ``log(1 + 2 P[Binomial(alpha, q) >= 3]) / (alpha - 1)``, not 0: the
    price of a bound that holds for any mechanism.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"sampling_rate must be in [0, 1], got {q}")
    targets = list(orders if at is None else at)
    top_order = max(orders)
    eps = np.full(top_order + 1, np.nan)
    eps[np.asarray(orders)] = curve
    out = np.array(eps[np.asarray(targets)], dtype=np.float64)
    if q == 1.0:
        return out
    if q == 0.0:
        return np.zeros(len(targets))
    log_fact = np.array([math.lgamma(k + 1) for k in range(top_order + 1)])
    log_q, log_1q = math.log(q), math.log1p(-q)
    for i, alpha in enumerate(targets):
        ls = np.arange(2, alpha + 1)
        eps_l = eps[ls]
        if np.isnan(eps_l).any():
            continue
        terms = (log_fact[alpha] - log_fact[ls] - log_fact[alpha - ls] + ls * log_q
                 + (alpha - ls) * log_1q + (ls - 1) * eps_l)
        terms[1:] += math.log(3.0)  # the factor 3 on the l >= 3 terms
        head = (alpha - 1) * log_1q + math.log1p((alpha - 1) * q)  # l = 0 and l = 1
        top = max(head, float(np.max(terms)))
        if not math.isfinite(top):
            continue  # infinite RDP stays infinite
        total = math.exp(head - top) + float(np.sum(np.exp(terms - top)))
        out[i] = min((top + math.log(total)) / (alpha - 1), out[i])
    return out


def rdp_curve(params: DPParameters, *, contributors: int | None = None, colluding: int = 0,
              sampling_rate: float = 1.0, orders: Sequence[int] = ORDERS) -> FloatArray:
    """One round's RDP at ``orders``; ``contributors`` defaults to the threshold (worst case)."""
    m = (params.threshold if contributors is None else contributors) - colluding
    # Sampling needs the curve at every integer order up to the largest one.
    dense = list(range(2, max(orders) + 1)) if sampling_rate < 1.0 else list(orders)
    if params.config.mechanism == "skellam":
        curve = skellam_rdp(dense, params.l1_sensitivity, params.l2_sensitivity,
                            max(m, 0) * params.local_variance)
    else:
        curve = discrete_gaussian_rdp(dense, params.l1_sensitivity, params.l2_sensitivity,
                                      params.local_variance, m, params.padded_dim)
    return subsampled_rdp(dense, curve, sampling_rate, at=orders)


def rdp_to_epsilon(orders: Sequence[int], rdp: FloatArray, delta: float) -> float:
    """Smallest epsilon at ``delta`` implied by the RDP curve (dp_accounting's conversion)."""
    compute = _dp_accounting().rdp.rdp_privacy_accountant.compute_epsilon
    if not np.all(np.isfinite(rdp)):
        finite = np.isfinite(rdp)
        if not finite.any():
            return math.inf
        orders, rdp = [o for o, f in zip(orders, finite, strict=True) if f], rdp[finite]
    return float(compute(list(orders), list(rdp), delta)[0])


def epsilon(params: DPParameters, *, rounds: int = 1,
            contributors: int | Sequence[int] | None = None, colluding: int = 0,
            sampling_rate: float = 1.0, delta: float | None = None) -> float:
    """Epsilon at ``delta`` (default ``params.config.delta``) after ``rounds`` rounds.

    ``contributors`` is the threshold (the least the protocol releases) by default,
    one count for every round, or one count per round (then ``rounds`` is ignored).
    """
    counts = Counter([contributors] * rounds if contributors is None
                     or isinstance(contributors, int) else list(contributors))
    total = np.zeros(len(ORDERS))
    for count, times in counts.items():  # rounds with equal counts share one curve
        total += times * rdp_curve(params, contributors=count, colluding=colluding,
                                   sampling_rate=sampling_rate)
    return rdp_to_epsilon(ORDERS, total, params.config.delta if delta is None else delta)


def gaussian_epsilon(noise_multiplier: float, *, rounds: int = 1, delta: float,
                     sampling_rate: float = 1.0) -> float:
    """Continuous Gaussian mechanism (noise stddev = ``noise_multiplier`` x sensitivity)."""
    dpa = _dp_accounting()
    if noise_multiplier <= 0:
        return math.inf
    event = dpa.GaussianDpEvent(noise_multiplier)
    if sampling_rate < 1.0:
        event = dpa.PoissonSampledDpEvent(sampling_rate, event)
    accountant = dpa.rdp.RdpAccountant(orders=list(ORDERS))  # the orders our curves use
    accountant.compose(event, rounds)
    return float(accountant.get_epsilon(delta))


def gaussian_approximation_epsilon(params: DPParameters, *, rounds: int = 1,
                                   contributors: int | None = None, colluding: int = 0,
                                   sampling_rate: float = 1.0,
                                   delta: float | None = None) -> float:
    """APPROXIMATE: the Gaussian mechanism with the same noise-to-sensitivity ratio.

    Ignores the discreteness terms of the bounds above; use it to see what the
    tight subsampled-Gaussian analysis would give, not as a guarantee.
    """
    m = (params.threshold if contributors is None else contributors) - colluding
    z = math.sqrt(max(m, 0) * params.local_variance) / params.l2_sensitivity
    return gaussian_epsilon(z, rounds=rounds, sampling_rate=sampling_rate,
                            delta=params.config.delta if delta is None else delta)
