"""R4, unmasking: t shares of b_u for every contributor, of s_sk_u for every member of
U2 that did not contribute, never both for one peer; then the masks come off.

Which holders are asked: every secret goes to the first holders, in one fixed
order (lowest index first), that hold its shares and are alive. On the
complete graph that is the same t holders for every secret, so the server
interpolates over one index set and pays for its Lagrange weights once, instead
of once per secret; on the sparse graph neighbourhoods differ anyway but t is
small. A holder that leaves or misses the deadline is replaced, secret by
secret, by the next one in that order.

A holder has at most one unanswered request: its answer carries no request id,
so it is matched to the one outstanding request, whatever the order of
delivery. More wanted of a holder that has not answered yet is asked once it
has.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np

from secagg.crypto import shamir
from secagg.errors import CryptoError
from secagg.graph import NeighbourGraph
from secagg.protocol.errors import DropReason, RemoteProtocolError
from secagg.protocol.events import Action, SetTimer
from secagg.protocol.server.base import PHASE_TIMER, ServerPhase, ServerState, Step, accepts, on
from secagg.protocol.server.context import Holders, ServerContext
from secagg.protocol.server.finished import abort, decode_and_finish
from secagg.protocol.server.recover import (
    MASK_KEY,
    SELF_MASK,
    UnmaskFailed,
    mask_key_check,
    recover_secrets,
    self_mask_check,
    unmask_aggregate,
)
from secagg.wire import (
    AdvertiseKeys,
    AncestorsUnreachable,
    Envelope,
    Refusal,
    RootAbort,
    ShareReport,
    SignedIndex,
    UnmaskRequest,
    UnmaskShares,
)

log = logging.getLogger("secagg.server")

_S = ServerState

SELF, KEY = 0, 1
"""Kinds of secret: a contributor's self-mask seed b_u, a dropped peer's mask key."""
Secret = tuple[int, int]
"""(kind, owner)."""
Wanted = tuple[list[int], list[int]]
"""What one request asks a holder for: (self-mask owners, mask-key owners), sorted."""


def begin_unmask(ctx: ServerContext, graph: NeighbourGraph, holders: Holders,
                 aggregate: np.ndarray, signatures: dict[int, bytes]) -> Step:
    """Ask for the shares. Every live member of U4 gets a request (possibly wanting
    nothing), so that one vanishing now is noticed and recorded."""
    phase = UnmaskPhase(ctx, graph, holders, aggregate, signatures)
    return phase.request(phase.secrets(), everyone=True)


class UnmaskPhase(ServerPhase):
    """R4: waiting for the unmasking shares."""

    STATE = _S.UNMASKING
    ACCEPTS = accepts({
        UnmaskShares.TYPE: on("on_unmask_shares", _S.UNMASKING, _S.FINISHED),
        Refusal.TYPE: on("on_refusal", _S.UNMASKING, _S.FINISHED),
        **{late.TYPE: on("ignore_late", _S.UNMASKING)
           for late in (ShareReport, AncestorsUnreachable, RootAbort)},
        AdvertiseKeys.TYPE: on("reject_registration", _S.UNMASKING),
    })
    ON_TIMER = on("on_timer", _S.UNMASKING, _S.FINISHED)
    ON_PEER_GONE = on("on_peer_gone", _S.UNMASKING, _S.FINISHED)
    GONE_REASON = DropReason.UNMASK_SHARE_MISSING

    def __init__(self, ctx: ServerContext, graph: NeighbourGraph, holders: Holders,
                 aggregate: np.ndarray, signatures: dict[int, bytes]) -> None:
        super().__init__(ctx)
        self.graph = graph
        self.holders = holders
        self.aggregate = aggregate
        self.owners: tuple[list[int], list[int]] = (sorted(ctx.u3), sorted(ctx.u2 - ctx.u3))
        self.signatures = [SignedIndex(index=u, signature=signature)
                           for u, signature in sorted(signatures.items())]
        # Under the active model, and on the complete graph, every holder sees all of U3;
        # on the sparse graph only its neighbourhood's part.
        full_u3 = graph.kind == "complete" or ctx.config.threat_model == "active"
        dropped_all = ctx.u2 - ctx.u3
        self.partition: dict[int, tuple[list[int], list[int]]] = {}
        for v in sorted(ctx.u4):
            if not ctx.live(v):
                ctx.drop(v, DropReason.UNMASK_SHARE_MISSING)  # gone before R4 began
                continue
            neighbourhood = frozenset(graph.neighbours(v))
            contributors = self.owners[SELF] if full_u3 else sorted(ctx.u3 & neighbourhood)
            self.partition[v] = (contributors, sorted(dropped_all & neighbourhood))
        self.order = sorted(self.partition)
        """The holder preference order (see the module docstring)."""
        self.asked: dict[Secret, set[int]] = {}
        self.promised: dict[Secret, set[int]] = {}
        """Holders asked for a secret's share that have not answered (and are alive)."""
        self.promises: dict[int, set[Secret]] = {}
        """The reverse: holder -> the secrets it still owes."""
        self.outstanding: dict[int, Wanted] = {}
        """Holder -> what its one unanswered request asked for."""
        self.deferred: dict[int, tuple[set[int], set[int]]] = {}
        """Holder -> what to ask it for once it has answered its outstanding request."""
        self.answered: set[int] = set()
        self.spares: dict[Secret, int] = {}
        """Secrets whose first shares failed their check -> extra shares wanted of them."""
        self.shares: tuple[dict[int, list[shamir.Share]], dict[int, list[shamir.Share]]] = \
            ({}, {})

    def secrets(self) -> list[Secret]:
        return [(kind, u) for kind in (SELF, KEY) for u in self.owners[kind]]

    # -------------------------------------------------------------- requests

    def request(self, secrets: Iterable[Secret], *, everyone: bool = False) -> Step:
        """Ask for the shares still missing of ``secrets`` (t per secret, plus any spares)."""
        ctx, threshold = self.ctx, self.graph.share_threshold
        wants: dict[int, Wanted] = {}
        for secret in secrets:
            kind, u = secret
            need = threshold + self.spares.get(secret, 0)
            promised = self.promised.setdefault(secret, set())
            deficit = need - len(self.shares[kind].get(u, ())) - len(promised)
            if deficit <= 0:
                continue
            asked = self.asked.setdefault(secret, set())
            holding = self.holders.get(u, frozenset())
            picked: list[int] = []
            for h in self.order:
                if h in holding and h not in asked and ctx.live(h):
                    picked.append(h)
                    if len(picked) == deficit:
                        break
            if len(picked) < deficit:
                what = SELF_MASK if kind == SELF else MASK_KEY
                if secret in self.spares:
                    return abort(ctx, f"cannot unmask: the shares of the {what} of "
                                      f"{ctx.names[u]!r} fail its check and no t of them "
                                      "pass it (too many wrong shares)", self.GONE_REASON)
                return abort(ctx, f"cannot unmask: too few live holders of shares of the "
                                  f"{what} of {ctx.names[u]!r} ({need} needed)",
                             self.GONE_REASON)
            for h in picked:
                asked.add(h)
                promised.add(h)
                self.promises.setdefault(h, set()).add(secret)
                wants.setdefault(h, ([], []))[kind].append(u)
        targets = set(wants)
        if everyone:
            targets.update(self.partition)
        actions: list[Action] = []
        for v in sorted(targets):
            wanted = wants.get(v, ([], []))
            if v in self.outstanding:
                later = self.deferred.setdefault(v, (set(), set()))
                later[SELF].update(wanted[SELF])
                later[KEY].update(wanted[KEY])
            else:
                actions.append(self._ask(v, wanted))
        if actions:
            return [SetTimer(PHASE_TIMER, ctx.config.phase_timeout), *actions], self
        return ([], self) if self.outstanding else self.finish()

    def _ask(self, v: int, wanted: Wanted) -> Action:
        contributors, dropped = self.partition[v]
        self.outstanding[v] = wanted
        return self.ctx.send(v, UnmaskRequest(
            contributors=contributors, dropped=dropped, total_contributors=len(self.ctx.u3),
            signatures=self.signatures, self_mask_wanted=wanted[SELF],
            secret_key_wanted=wanted[KEY]))

    def on_unmask_shares(self, origin: str, env: Envelope) -> Step:
        body = env.body
        assert isinstance(body, UnmaskShares)
        v = self.ctx.index[env.sender]
        wanted = self.outstanding.get(v)
        if wanted is None:
            raise RemoteProtocolError(
                f"unrequested or duplicate unmasking shares from {env.sender!r}",
                DropReason.DUPLICATE_MESSAGE if v in self.answered
                else DropReason.UNEXPECTED_MESSAGE)
        parsed = (_parse_shares(v, wanted[SELF], body.self_mask_shares, "self-mask"),
                  _parse_shares(v, wanted[KEY], body.secret_key_shares, "secret-key"))
        del self.outstanding[v]
        self.answered.add(v)
        owed = self.promises.get(v, set())
        for kind, received in enumerate(parsed):
            for owner, share in received:
                self.shares[kind].setdefault(owner, []).append(share)
                self.promised[(kind, owner)].discard(v)
                owed.discard((kind, owner))
        if self.ctx.record_view:
            for kind, label in ((SELF, "self_mask"), (KEY, "secret_key")):
                self.ctx.shares_received += [(label, owner, v) for owner, _ in parsed[kind]]
        later = self.deferred.pop(v, None)
        if later is not None:
            follow_up = self._ask(v, (sorted(later[SELF]), sorted(later[KEY])))
            return [SetTimer(PHASE_TIMER, self.ctx.config.phase_timeout), follow_up], self
        return ([], self) if self.outstanding else self.request(self.secrets())

    # ------------------------------------------------------------ departures

    def _give_up(self, h: int) -> set[Secret]:
        """Holder ``h`` will not answer: what it owed must come from others."""
        self.outstanding.pop(h, None)
        self.deferred.pop(h, None)
        owed = self.promises.pop(h, set())
        for secret in owed:
            self.promised[secret].discard(h)
        return owed

    def peer_left(self, u: int) -> Step:
        return self.request(sorted(self._give_up(u)))

    def on_timer(self) -> Step:
        # Holders that did not answer in time are given up; others are asked instead.
        owed: set[Secret] = set()
        for h in sorted(self.outstanding):
            self.ctx.gone.add(h)
            self.ctx.drop(h, DropReason.UNMASK_SHARE_MISSING,
                          "no answer to the unmasking request before the deadline")
            owed |= self._give_up(h)
        return self.request(sorted(owed))

    # ---------------------------------------------------------------- the end

    def finish(self) -> Step:
        ctx, threshold = self.ctx, self.graph.share_threshold
        for v in sorted(self.partition):
            if v not in self.answered:
                ctx.drop(v, DropReason.UNMASK_SHARE_MISSING)
        try:
            self_masks = recover_secrets(self.shares[SELF], self.owners[SELF],
                                         threshold=threshold, check=self_mask_check(ctx),
                                         names=ctx.names, what=SELF_MASK)
            mask_keys = recover_secrets(self.shares[KEY], self.owners[KEY],
                                        threshold=threshold, check=mask_key_check(ctx),
                                        names=ctx.names, what=MASK_KEY)
        except UnmaskFailed as exc:
            return abort(ctx, str(exc), self.GONE_REASON)
        for recovered, what in ((self_masks, SELF_MASK), (mask_keys, MASK_KEY)):
            for liar, owner in sorted(recovered.liars.items()):
                ctx.drop(liar, DropReason.WRONG_SHARE,
                         f"its share of the {what} of {ctx.names[owner]!r} is wrong")
        unresolved = [(SELF, u) for u in self_masks.unresolved] + \
                     [(KEY, u) for u in mask_keys.unresolved]
        if unresolved:
            # A wrong share among the first t: one more share per failing secret, until
            # some t of them pass the check (or the holders run out: abort).
            for secret in unresolved:
                self.spares[secret] = self.spares.get(secret, 0) + 1
                kind, u = secret
                log.warning("the %s of %s fails its check: asking for a spare share",
                            SELF_MASK if kind == SELF else MASK_KEY, ctx.names[u])
            return self.request(unresolved)
        try:
            total = unmask_aggregate(ctx, self.graph, self.aggregate, self_masks.secrets,
                                     mask_keys.secrets)
        except UnmaskFailed as exc:
            return abort(ctx, str(exc), self.GONE_REASON)
        return decode_and_finish(ctx, total, self.GONE_REASON)


def _parse_shares(v: int, owners: list[int], packed: bytes,
                  kind: str) -> list[tuple[int, shamir.Share]]:
    """Split the packed answer to a request for ``owners`` (in that order)."""
    size = shamir.SHARE_LENGTH
    if len(packed) != size * len(owners):
        raise RemoteProtocolError(f"{kind} shares: {len(packed)} bytes where {len(owners)} "
                                  f"shares of {size} bytes were requested",
                                  DropReason.INVALID_SHARES)
    parsed: list[tuple[int, shamir.Share]] = []
    for i, owner in enumerate(owners):
        try:
            parsed.append((owner, shamir.Share.from_bytes(v + 1, packed[i * size:(i + 1) * size])))
        except CryptoError as exc:
            raise RemoteProtocolError(f"malformed {kind} share: {exc}",
                                      DropReason.INVALID_SHARES) from None
    return parsed
