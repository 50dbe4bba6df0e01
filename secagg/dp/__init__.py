"""Distributed differential privacy for secure aggregation (DESIGN.md section 10).

Each peer rotates, clips, scales, rounds and adds a share of discrete noise to
its update before masking; the server decodes the noisy sum. Privacy of the
sum holds against the server, whose view is only that sum.

* :mod:`~secagg.dp.params`: :class:`DPConfig` (the policy), :class:`DPParameters`
  (derived per round; ``to_dict``/``from_dict`` for the wire), :func:`noise_report`.
* :mod:`~secagg.dp.pipeline`: :func:`encode_update` (client), :func:`decode_sum` (server).
* :mod:`~secagg.dp.rotation`, :mod:`~secagg.dp.discretize`, :mod:`~secagg.dp.noise`:
  the building blocks.
* :mod:`~secagg.dp.accounting`: epsilon over rounds (needs the ``dp`` extra,
  ``pip install 'secagg[dp]'``; imported lazily).

Example::

    config = DPConfig(noise_multiplier=1.0, clip=1.0)
    params = DPParameters.derive(n=100, threshold=67, dim=model_size, config=config)
    ring, clipped = encode_update(update, params, round_seed, rng)   # on each peer
    total = decode_sum(ring_sum, params, round_seed)                  # on the server
"""

from secagg.dp.params import DPConfig, DPParameterError, DPParameters, NoiseReport, noise_report
from secagg.dp.pipeline import decode_sum, encode_update, sample_noise_share

__all__ = [
    "DPConfig",
    "DPParameterError",
    "DPParameters",
    "NoiseReport",
    "decode_sum",
    "encode_update",
    "noise_report",
    "sample_noise_share",
]
