"""R4's arithmetic: secrets from Shamir shares, then the masks off the aggregate.

The server asks the same holders for as many secrets as it can (see
``unmask.py``), so the shares of many secrets share one index set; the secrets
are reconstructed in one batch, which computes the Lagrange weights once per
distinct index set (``shamir.reconstruct_many``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from secagg.crypto import shamir
from secagg.crypto.keys import agree, load_private, public_from_private
from secagg.crypto.prg import MaskGenerator
from secagg.errors import CryptoError
from secagg.graph import NeighbourGraph
from secagg.masking import remove_pair_mask, remove_self_mask
from secagg.protocol.server.context import ServerContext

SELF_MASK = "self mask"
MASK_KEY = "mask key"


class UnmaskFailed(Exception):
    """The shares at hand do not give the masks: the round aborts with this reason."""


def recover_secrets(ctx: ServerContext, shares: Mapping[int, Sequence[shamir.Share]],
                    owners: Sequence[int], *, threshold: int, what: str) -> dict[int, bytes]:
    """The secret of each of ``owners`` from its shares (at least ``threshold`` each).

    t shares suffice. A wrong mask key is caught against its public key in
    :func:`unmask_aggregate`; under the active model extra shares, if any, are
    checked as well.
    """
    share_lists: list[list[shamir.Share]] = []
    for u in owners:
        # Lowest holder index first: the same t holders give the same index set.
        ordered = sorted(shares.get(u, ()), key=lambda share: share.index)
        if len(ordered) < threshold:
            raise UnmaskFailed(f"cannot unmask: {len(ordered)} shares of the {what} of "
                               f"{ctx.names[u]!r}, {threshold} needed")
        share_lists.append(ordered)
    batch = shamir.reconstruct_many_checked if ctx.config.threat_model == "active" \
        else shamir.reconstruct_many
    try:
        secrets = batch(share_lists, threshold=threshold)
    except shamir.ReconstructionError as exc:
        name = ctx.names[owners[exc.position]]
        cause = str(exc).removeprefix(f"secret {exc.position}: ")
        raise UnmaskFailed(f"shares of the {what} of {name!r} are inconsistent: "
                           f"{cause}") from None
    return dict(zip(owners, secrets, strict=True))


def unmask_aggregate(ctx: ServerContext, graph: NeighbourGraph, aggregate: np.ndarray,
                     self_masks: Mapping[int, bytes], mask_keys: Mapping[int, bytes]
                     ) -> np.ndarray:
    """The aggregate without the contributors' self masks and without the pair masks
    that contributors added with dropped peers (``mask_keys``: dropped -> secret key)."""
    session, round_number = ctx.config.session, ctx.config.round
    checked_keys = []
    for u, secret in sorted(mask_keys.items()):
        if public_from_private(secret) != ctx.entries[u].mask_key:
            raise UnmaskFailed(f"reconstructed mask key of {ctx.names[u]!r} does not match "
                               "its advertised public key")
        checked_keys.append((u, load_private(secret)))
    total = aggregate.copy()  # a failed attempt must leave the masked sum intact
    generator = MaskGenerator(total.shape[0], total.dtype)
    for _, seed in sorted(self_masks.items()):
        remove_self_mask(total, seed, session=session, round=round_number, generator=generator)
    for u, private in checked_keys:
        for v in graph.neighbours(u):
            if v in ctx.u3:
                try:
                    seed = agree(private, ctx.entries[v].mask_key)
                except CryptoError as exc:  # a contributor advertised an unusable key
                    raise UnmaskFailed(f"cannot remove the pair mask of {ctx.names[u]!r} and "
                                       f"{ctx.names[v]!r}: {exc}") from None
                remove_pair_mask(total, dropped=u, survivor=v, seed=seed, session=session,
                                 round=round_number, generator=generator)
    return total
