"""R4's arithmetic: secrets from Shamir shares, then the masks off the aggregate.

The server asks the same holders for as many secrets as it can (see
``unmask.py``), so the shares of many secrets share one index set; the secrets
are reconstructed in one batch, which computes the Lagrange weights once per
distinct index set (``shamir.reconstruct_many``).

Every secret is checked before it is used: b_u against the commitment u made in
R0, s_sk_u against u's public mask key. A holder that returns a well-formed but
wrong share therefore cannot make the round end ok with a wrong aggregate: the
check fails, spare shares are fetched, a t-subset that passes is found, and the
holder of the share off its polynomial is dropped as a liar.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from itertools import combinations

import numpy as np

from secagg.crypto import shamir
from secagg.crypto.keys import agree, load_private, public_from_private
from secagg.crypto.prg import MaskGenerator
from secagg.errors import CryptoError, ShamirError
from secagg.graph import NeighbourGraph
from secagg.masking import remove_pair_mask, remove_self_mask
from secagg.protocol.common import self_mask_commitment
from secagg.protocol.server.context import ServerContext

SELF_MASK = "self mask"
MASK_KEY = "mask key"


class UnmaskFailed(Exception):
    """The shares at hand do not give the masks: the round aborts with this reason."""


MAX_SUBSETS = 512
"""t-subsets tried per secret when its first t shares fail its check. One wrong share
among t + 1 needs at most t + 1 tries; this bounds what many colluding liars can make
the server compute (it then asks for more spare shares, or aborts)."""

SecretCheck = Callable[[int, bytes], bool]
"""(owner, candidate secret) -> whether it is the owner's secret."""


@dataclass
class Recovered:
    """The outcome of :func:`recover_secrets` for one kind of secret."""

    secrets: dict[int, bytes] = field(default_factory=dict)
    liars: dict[int, int] = field(default_factory=dict)
    """Holder index -> an owner whose secret it gave a share off the polynomial of."""
    unresolved: list[int] = field(default_factory=list)
    """Owners whose shares at hand contain no t-subset that passes the check: spare shares
    are needed."""


def self_mask_check(ctx: ServerContext) -> SecretCheck:
    """b_u must match the commitment u made in R0."""
    session, round_number = ctx.config.session, ctx.config.round

    def check(owner: int, secret: bytes) -> bool:
        entry = ctx.entries[owner]
        return self_mask_commitment(session, round_number, entry.name, secret) == \
            entry.self_mask_commitment
    return check


def mask_key_check(ctx: ServerContext) -> SecretCheck:
    """s_sk_u must be the private half of the public key u advertised in R0."""
    def check(owner: int, secret: bytes) -> bool:
        try:
            return public_from_private(secret) == ctx.entries[owner].mask_key
        except CryptoError:
            return False
    return check


def recover_secrets(shares: Mapping[int, Sequence[shamir.Share]], owners: Sequence[int],
                    *, threshold: int, check: SecretCheck, names: Sequence[str],
                    what: str) -> Recovered:
    """The secret of each of ``owners`` from its shares (at least ``threshold`` each), each
    checked with ``check``.

    The fast path rebuilds every secret from its first t shares in one batch. A secret
    that fails its check, or whose extra shares are not on its polynomial, is searched:
    t-subsets of all its shares until one passes the check; the holders of the shares off
    that polynomial are the liars. A secret with no passing subset among the shares at
    hand is left unresolved, for the caller to fetch spare shares.
    """
    share_lists: list[list[shamir.Share]] = []
    for u in owners:
        # Lowest holder index first: the same t holders give the same index set.
        ordered = sorted(shares.get(u, ()), key=lambda share: share.index)
        if len(ordered) < threshold:
            raise UnmaskFailed(f"cannot unmask: {len(ordered)} shares of the {what} of "
                               f"{names[u]!r}, {threshold} needed")
        share_lists.append(ordered)
    result = Recovered()
    first = shamir.reconstruct_many([lst[:threshold] for lst in share_lists],
                                    threshold=threshold)
    for u, ordered, secret in zip(owners, share_lists, first, strict=True):
        if check(u, secret) and _all_on(ordered, threshold):
            result.secrets[u] = secret
            continue
        found = _search(ordered, threshold, partial(check, u))
        if found is None:
            result.unresolved.append(u)
            continue
        result.secrets[u], off = found
        for share in off:
            result.liars.setdefault(share.index - 1, u)
    return result


def _all_on(shares: Sequence[shamir.Share], threshold: int) -> bool:
    """Whether every share lies on the polynomial of the first ``threshold``."""
    if len(shares) == threshold:
        return True
    try:
        shamir.reconstruct_checked(shares, threshold=threshold)
    except ShamirError:
        return False
    return True


def _search(shares: Sequence[shamir.Share], threshold: int,
            check: Callable[[bytes], bool]) -> tuple[bytes, list[shamir.Share]] | None:
    """A secret from a t-subset of ``shares`` that passes ``check``, and the shares off
    its polynomial; None if no subset tried (at most :data:`MAX_SUBSETS`) passes."""
    for tried, subset in enumerate(combinations(shares, threshold)):
        if tried >= MAX_SUBSETS:
            return None
        secret = shamir.reconstruct(subset, threshold=threshold)
        if not check(secret):
            continue
        chosen = {share.index for share in subset}
        off = [share for share in shares if share.index not in chosen
               and not _all_on([*subset, share], threshold)]
        return secret, off
    return None


def unmask_aggregate(ctx: ServerContext, graph: NeighbourGraph, aggregate: np.ndarray,
                     self_masks: Mapping[int, bytes], mask_keys: Mapping[int, bytes]
                     ) -> np.ndarray:
    """The aggregate without the contributors' self masks and without the pair masks
    that contributors added with dropped peers (``mask_keys``: dropped -> secret key)."""
    session, round_number = ctx.config.session, ctx.config.round
    # Every key was checked against its public key in recover_secrets.
    checked_keys = [(u, load_private(secret)) for u, secret in sorted(mask_keys.items())]
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
