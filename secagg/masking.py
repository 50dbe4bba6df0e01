"""Masks: what a peer adds to its encoded input, and what the server removes.

y_u = q(x_u) + PRG(b_u) + Σ_{v ∈ U2 ∩ N(u), v > u} PRG(s_uv) − Σ_{v < u} PRG(s_uv)  (mod 2^k)

Pairwise terms cancel between two contributors; the server removes PRG(b_u) for
every contributor and, for every peer u that dropped after R1, the terms its
surviving neighbours added for the pair (u, v).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from secagg.crypto.keys import agree
from secagg.crypto.prg import MaskGenerator

SELF_MASK = "self-mask"
PAIR_MASK = "pair-mask"


def pair_sign(owner: int, other: int) -> int:
    """The sign with which ``owner`` adds the pair mask shared with ``other``."""
    if owner == other:
        raise ValueError("a peer has no pair mask with itself")
    return 1 if other > owner else -1


def pair_seed(own_mask_private: bytes | X25519PrivateKey, other_mask_public: bytes) -> bytes:
    """s_uv: the X25519 agreement of the mask keys (the PRG derives its key from it)."""
    return agree(own_mask_private, other_mask_public)


def masked_input(
    encoded: np.ndarray,
    *,
    owner: int,
    self_seed: bytes,
    pair_seeds: Iterable[tuple[int, bytes]],
    session: bytes,
    round: int,
    generator: MaskGenerator | None = None,
) -> np.ndarray:
    """Return y_u for ``owner``: ``encoded`` plus its self mask and signed pair masks.

    ``pair_seeds`` holds ``(neighbour, s_uv)`` for every neighbour in U2 other than
    ``owner``; ``encoded`` is not modified.
    """
    generator = generator or MaskGenerator(encoded.shape[0], encoded.dtype)
    masked = encoded.copy()
    generator.add_into(masked, self_seed, session=session, round=round, purpose=SELF_MASK)
    for neighbour, seed in pair_seeds:
        generator.add_into(masked, seed, session=session, round=round, purpose=PAIR_MASK,
                           sign=pair_sign(owner, neighbour))
    return masked


def remove_self_mask(
    total: np.ndarray, self_seed: bytes, *, session: bytes, round: int,
    generator: MaskGenerator,
) -> None:
    """Subtract PRG(b_u) from ``total`` in place."""
    generator.add_into(total, self_seed, session=session, round=round, purpose=SELF_MASK,
                       sign=-1)


def remove_pair_mask(
    total: np.ndarray, *, dropped: int, survivor: int, seed: bytes, session: bytes, round: int,
    generator: MaskGenerator,
) -> None:
    """Cancel the term ``survivor`` added for its pair with the ``dropped`` peer."""
    generator.add_into(total, seed, session=session, round=round, purpose=PAIR_MASK,
                       sign=-pair_sign(survivor, dropped))
