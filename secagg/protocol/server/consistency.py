"""R3, the consistency check (masks under the active model): U3 members sign U3.

U4 is who signed. Every peer checks at least t valid signatures before it
reveals anything in R4, so a server cannot show two U3 views to two halves.
"""

from __future__ import annotations

import numpy as np

from secagg.crypto.signing import verify
from secagg.errors import CryptoError
from secagg.graph import NeighbourGraph
from secagg.protocol.common import consistency_message
from secagg.protocol.errors import DropReason, RemoteProtocolError
from secagg.protocol.events import Action, SetTimer
from secagg.protocol.server.base import PHASE_TIMER, ServerPhase, ServerState, Step, accepts, on
from secagg.protocol.server.context import Holders, ServerContext
from secagg.protocol.server.finished import abort
from secagg.protocol.server.unmask import begin_unmask
from secagg.wire import (
    AdvertiseKeys,
    AncestorsUnreachable,
    ConsistencyRequest,
    ConsistencySignature,
    Envelope,
    Refusal,
    RootAbort,
    ShareReport,
)

_S = ServerState


def begin_consistency(ctx: ServerContext, graph: NeighbourGraph, holders: Holders,
                      aggregate: np.ndarray) -> Step:
    """Ask every live member of U3 to sign U3."""
    phase = ConsistencyPhase(ctx, graph, holders, aggregate)
    contributors = sorted(ctx.u3)
    actions: list[Action] = [SetTimer(PHASE_TIMER, ctx.config.phase_timeout)]
    actions += [ctx.send(u, ConsistencyRequest(contributors=contributors))
                for u in contributors if ctx.live(u)]
    if phase.awaited:
        return actions, phase
    more, after = phase.on_timer()
    return actions + more, after


class ConsistencyPhase(ServerPhase):
    """R3: waiting for the signatures of U3."""

    STATE = _S.CONSISTENCY
    ACCEPTS = accepts({
        ConsistencySignature.TYPE: on("on_signature", _S.CONSISTENCY, _S.UNMASKING,
                                      _S.FINISHED),
        Refusal.TYPE: on("on_refusal", _S.CONSISTENCY, _S.UNMASKING, _S.FINISHED),
        **{late.TYPE: on("ignore_late", _S.CONSISTENCY)
           for late in (ShareReport, AncestorsUnreachable, RootAbort)},
        AdvertiseKeys.TYPE: on("reject_registration", _S.CONSISTENCY),
    })
    ON_TIMER = on("on_timer", _S.UNMASKING, _S.FINISHED)
    ON_PEER_GONE = on("on_peer_gone", _S.CONSISTENCY, _S.UNMASKING, _S.FINISHED)
    GONE_REASON = DropReason.SIGNATURE_MISSING

    def __init__(self, ctx: ServerContext, graph: NeighbourGraph, holders: Holders,
                 aggregate: np.ndarray) -> None:
        super().__init__(ctx)
        self.graph = graph
        self.holders = holders
        self.aggregate = aggregate
        self.signatures: dict[int, bytes] = {}
        self.awaited = {u for u in ctx.u3 if ctx.live(u)}
        self.signed_message = consistency_message(ctx.config.session, ctx.config.round, ctx.u3)

    def on_signature(self, origin: str, env: Envelope) -> Step:
        body = env.body
        assert isinstance(body, ConsistencySignature)
        ctx = self.ctx
        u = ctx.index[env.sender]
        if u not in ctx.u3:
            raise RemoteProtocolError(f"{env.sender!r} is not in U3 and was not asked to sign",
                                      DropReason.UNEXPECTED_MESSAGE)
        if u in self.signatures:
            raise RemoteProtocolError(f"duplicate signature from {env.sender!r}",
                                      DropReason.DUPLICATE_MESSAGE)
        try:
            verify(ctx.entries[u].identity_key, self.signed_message, body.signature)
        except CryptoError as exc:
            raise RemoteProtocolError(f"invalid consistency signature: {exc}",
                                      DropReason.INVALID_SIGNATURE) from None
        self.signatures[u] = body.signature
        self.awaited.discard(u)
        return ([], self) if self.awaited else self.on_timer()

    def peer_left(self, u: int) -> Step:
        self.awaited.discard(u)
        return ([], self) if self.awaited else self.on_timer()

    def on_timer(self) -> Step:
        """Close R3: U4 is who signed."""
        ctx = self.ctx
        ctx.u4 = frozenset(self.signatures)
        ctx.stats["u4"] = len(ctx.u4)
        for u in sorted(ctx.u3 - ctx.u4):
            ctx.drop(u, DropReason.SIGNATURE_MISSING)
        if len(ctx.u4) < ctx.config.threshold:
            return abort(ctx, f"only {len(ctx.u4)} consistency signatures, threshold is "
                              f"{ctx.config.threshold}", self.GONE_REASON)
        return begin_unmask(ctx, self.graph, self.holders, self.aggregate, self.signatures)
