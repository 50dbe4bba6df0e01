"""R1, sharing keys: peers exchange shares directly and report whose they lack.

U2 is the peers whose shares reached at least the share threshold of their
neighbours; who holds whose shares is kept for R4.
"""

from __future__ import annotations

from secagg.graph import NeighbourGraph
from secagg.protocol.errors import DropReason, RemoteProtocolError
from secagg.protocol.events import Action
from secagg.protocol.server.base import ServerPhase, ServerState, Step, accepts, on
from secagg.protocol.server.collect import begin_collect
from secagg.protocol.server.context import Holders, ServerContext
from secagg.protocol.server.finished import abort
from secagg.wire import AdvertiseKeys, Envelope, PeerDropped, ShareReport

_S = ServerState


class SharePhase(ServerPhase):
    """R1: waiting for every peer's share report."""

    STATE = _S.SHARING
    ACCEPTS = accepts({
        ShareReport.TYPE: on("on_share_report", _S.SHARING, _S.MASKING, _S.FINISHED),
        AdvertiseKeys.TYPE: on("reject_registration", _S.SHARING),
    })
    ON_TIMER = on("on_timer", _S.MASKING, _S.FINISHED)
    ON_PEER_GONE = on("on_peer_gone", _S.SHARING, _S.MASKING, _S.FINISHED)
    GONE_REASON = DropReason.NO_SHARE_REPORT

    def __init__(self, ctx: ServerContext, graph: NeighbourGraph) -> None:
        super().__init__(ctx)
        self.graph = graph
        self.reports: set[int] = set()
        self.missing: dict[int, frozenset[int]] = {}
        """Reporter -> the neighbours whose shares it lacks (it holds the rest of its
        neighbourhood's, its own included)."""
        self.awaited = set(range(len(ctx.names))) - ctx.gone

    def on_share_report(self, origin: str, env: Envelope) -> Step:
        report = env.body
        assert isinstance(report, ShareReport)
        u = self.ctx.index[env.sender]
        if u in self.reports:
            raise RemoteProtocolError(f"duplicate share report from {env.sender!r}",
                                      DropReason.DUPLICATE_MESSAGE)
        missing = frozenset(report.missing_from)
        graph = self.graph
        if len(missing) != len(report.missing_from):
            raise RemoteProtocolError("share report lists a peer twice",
                                      DropReason.INVALID_REPORT)
        if u in missing or not all(0 <= v < graph.n and graph.are_neighbours(u, v)
                                   for v in missing):
            raise RemoteProtocolError("share report names peers outside the neighbourhood",
                                      DropReason.INVALID_REPORT)
        self.reports.add(u)
        if missing:
            self.missing[u] = missing
        self.awaited.discard(u)
        return ([], self) if self.awaited else self.on_timer()

    def peer_left(self, u: int) -> Step:
        # Its neighbours stop waiting for its shares.
        ctx = self.ctx
        actions: list[Action] = [ctx.send(v, PeerDropped(peer=u))
                                 for v in self.graph.neighbours(u) if v != u and ctx.live(v)]
        self.awaited.discard(u)
        if self.awaited:
            return actions, self
        more, phase = self.on_timer()
        return actions + more, phase

    def on_timer(self) -> Step:
        """Close R1: U2 is who got its shares to enough neighbours."""
        ctx, graph = self.ctx, self.graph
        # u's shares are held by the reporters of its (symmetric) neighbourhood that did
        # not report them missing: set operations per peer, not a loop per share.
        reporters = frozenset(self.reports)
        missed_by: dict[int, set[int]] = {}
        for holder, missing in self.missing.items():
            for u in missing:
                missed_by.setdefault(u, set()).add(holder)
        holders: dict[int, frozenset[int]] = {}
        for u in range(len(ctx.names)):
            if u not in self.reports:
                ctx.drop(u, DropReason.NO_SHARE_REPORT)
                continue
            held = reporters.intersection(graph.neighbours(u)).difference(
                missed_by.get(u, ()))
            if len(held) < graph.share_threshold:
                ctx.drop(u, DropReason.SHARE_DELIVERY_FAILED,
                         f"shares reached {len(held)} neighbours, "
                         f"{graph.share_threshold} needed")
            else:
                holders[u] = held
        ctx.u2 = frozenset(holders)
        ctx.stats["u2"] = len(ctx.u2)
        if len(ctx.u2) < ctx.config.threshold:
            return abort(ctx, f"U2 has {len(ctx.u2)} peers, below the threshold "
                              f"{ctx.config.threshold}", self.GONE_REASON)
        shared: Holders = holders
        return begin_collect(ctx, graph, shared)
