"""Benchmark: a peer's distributed-DP encoding, against masking the same vector in the same run.

What is timed
-------------
``dp``: one call of :func:`secagg.dp.encode_update` on a float64 update of ``d``
coordinates (L2 norm about 2, so it gets clipped): randomized Hadamard rotation
(padding to ``D = 2^ceil(log2 d)``), clip, scale, stochastic rounding, one
peer's noise share (Skellam by default) and the wrap into Z_{2^32}. Parameters
come from ``DPParameters.derive`` for ``--peers`` peers (threshold 2/3) and
``--noise-multiplier``; the rotation seed and the rounding/noise generator are
fixed per configuration.

``masking``: one call of :func:`secagg.masking.masked_input` on the resulting
ring vector (``D`` uint32 words) for a peer with ``k`` neighbours (default 10),
with precomputed pair seeds and a reused :class:`~secagg.crypto.prg.MaskGenerator`,
set up as in ``benchmarks/masking.py``: ``k + 1`` AES-256-CTR keystreams plus
the adds. This is what the peer does next with the vector, so the ratio says
how much DP adds to a peer's work per round.

``online``: the same call with the noise share drawn beforehand
(``encode_update(..., noise=sample_noise_share(params, rng))``): the share does
not depend on the update, so a peer can draw it while it waits for the share
exchange, and only rotation, clip, rounding and wrap remain on the round's
critical path. ``online_ratio`` is ``online_seconds / masking_seconds``.

``stages``: the same pipeline's main parts timed alone (best-of-N each):
``rotate`` (signs + transform), ``round`` (stochastic rounding of the scaled
vector), ``noise`` (the noise share). They do not add up exactly to ``dp``
(clip, scale and wrap are not in them).

All timings are best-of-N with :func:`time.perf_counter` after a warm-up,
alternating dp and masking in every repetition so that frequency or load drift
hits both alike. ``N`` comes from ``--budget`` unless ``--repeat`` fixes it.

Output: one JSON line per ``d`` on stdout::

    {"bench": "dp", "params": {"d": ..., "padded_dim": ..., "k": 10, "mechanism": ...,
     "noise_multiplier": ..., "peers": ..., "threshold": ..., "modulus_bits": 32},
     "seconds": ..., "masking_seconds": ..., "ratio": ..., "target_ratio": 1.0,
     "meets_target": ..., "online_seconds": ..., "online_ratio": ..., "repeat": N,
     "stages": {"rotate": ..., "round": ..., "noise": ...}}

``ratio`` is ``seconds / masking_seconds``. The script always exits 0:
benchmarks report, they do not fail.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from secagg.crypto.prg import MaskGenerator
from secagg.dp import DPConfig, DPParameters, encode_update
from secagg.dp.discretize import stochastic_round
from secagg.dp.pipeline import add_noise_share, sample_noise_share
from secagg.dp.rotation import rotate
from secagg.masking import masked_input

TARGET_RATIO = 1.0
FULL_DIMS = (100_000, 1_000_000)
QUICK_DIMS = (10_000,)
MIN_REPEAT = 5
MAX_REPEAT = 100


def _time_once(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def bench_config(d: int, *, k: int, peers: int, noise_multiplier: float, mechanism: str,
                 repeat: int | None, budget: float, seed: int = 0) -> dict[str, Any]:
    """Time encode_update and masked_input for one d; return the JSON record."""
    rng = np.random.default_rng([seed, d])
    threshold = 2 * peers // 3 + 1
    config = DPConfig(noise_multiplier=noise_multiplier, clip=1.0,
                      mechanism=mechanism)  # type: ignore[arg-type]
    params = DPParameters.derive(peers, threshold, d, config)
    update = rng.standard_normal(d) * (2.0 / np.sqrt(d))
    rotation_seed = rng.bytes(32)
    noise_rng = np.random.default_rng([seed, d, 1])
    ring, _ = encode_update(update, params, rotation_seed, noise_rng)
    owner = k // 2
    pair_seeds = [(v, rng.bytes(32)) for v in range(k + 1) if v != owner]
    self_seed, session = rng.bytes(32), rng.bytes(16)
    generator = MaskGenerator(params.padded_dim, params.dtype)
    scaled = rotate(update, rotation_seed) * (params.scale / 2.0)
    rounded = stochastic_round(scaled, noise_rng)

    def run_dp() -> object:
        return encode_update(update, params, rotation_seed, noise_rng)

    share = sample_noise_share(params, noise_rng)

    def run_online() -> object:
        return encode_update(update, params, rotation_seed, noise_rng, noise=share)

    def run_masking() -> object:
        return masked_input(ring, owner=owner, self_seed=self_seed, pair_seeds=pair_seeds,
                            session=session, round=0, generator=generator)

    stages: dict[str, Callable[[], object]] = {
        "rotate": lambda: rotate(update, rotation_seed),
        "round": lambda: stochastic_round(scaled, noise_rng),
        "noise": lambda: add_noise_share(rounded, params, noise_rng),
    }
    warm = _time_once(run_dp) + _time_once(run_masking)
    if repeat is None:
        repeat = max(MIN_REPEAT, min(MAX_REPEAT, int(budget / max(warm, 1e-9))))
    best_dp = best_mask = best_online = float("inf")
    best_stage = dict.fromkeys(stages, float("inf"))
    for _ in range(repeat):
        best_dp = min(best_dp, _time_once(run_dp))
        best_mask = min(best_mask, _time_once(run_masking))
        best_online = min(best_online, _time_once(run_online))
    for _ in range(max(MIN_REPEAT, repeat // 2)):
        for name, fn in stages.items():
            best_stage[name] = min(best_stage[name], _time_once(fn))
    ratio = best_dp / best_mask
    return {
        "bench": "dp",
        "params": {"d": d, "padded_dim": params.padded_dim, "k": k, "mechanism": mechanism,
                   "noise_multiplier": noise_multiplier, "peers": peers,
                   "threshold": threshold, "modulus_bits": config.modulus_bits},
        "seconds": best_dp,
        "masking_seconds": best_mask,
        "ratio": ratio,
        "target_ratio": TARGET_RATIO,
        "meets_target": bool(ratio <= TARGET_RATIO),
        "online_seconds": best_online,
        "online_ratio": best_online / best_mask,
        "repeat": repeat,
        "stages": best_stage,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true",
                        help=f"small sizes for the smoke test (d in {QUICK_DIMS})")
    parser.add_argument("--repeat", type=int, default=None,
                        help="repetitions per configuration (best-of-N); default: from --budget")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds per configuration when choosing N (default 3, quick 0.2)")
    parser.add_argument("--d", type=int, nargs="+", default=None, help="vector lengths")
    parser.add_argument("--k", type=int, default=10, help="neighbours of the masking peer")
    parser.add_argument("--peers", type=int, default=100, help="peers the parameters are for")
    parser.add_argument("--noise-multiplier", type=float, default=1.0)
    parser.add_argument("--mechanism", choices=("skellam", "gaussian"), default="skellam")
    args = parser.parse_args(argv)
    if args.repeat is not None and args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.k < 1 or args.peers < 2:
        parser.error("--k must be >= 1 and --peers >= 2")
    dims = args.d or (QUICK_DIMS if args.quick else FULL_DIMS)
    budget = args.budget if args.budget is not None else (0.2 if args.quick else 3.0)
    for d in dims:
        record = bench_config(d, k=args.k, peers=args.peers,
                              noise_multiplier=args.noise_multiplier,
                              mechanism=args.mechanism, repeat=args.repeat, budget=budget)
        print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
