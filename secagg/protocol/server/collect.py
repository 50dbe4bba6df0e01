"""R2, collecting the aggregate: the accumulation tree, its repair, and the root's sum.

The server builds a tree over the live members of U2 and tells each peer its
place in it. It never sees a single input: only the root's combined payload,
sent once at least t contributions are in it. When a peer goes, whoever now
collects for it learns so; when the root's connection to the server is gone, a
peer that reported it unreachable becomes the new root. A report alone never
demotes a connected root. U3 is the root's contributor set.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from secagg.errors import CryptoError, EncodingError
from secagg.graph import AccumulationTree, NeighbourGraph, build_tree
from secagg.protocol.common import stall_detection_seconds
from secagg.protocol.errors import DropReason, RemoteProtocolError
from secagg.protocol.events import Action, SetTimer
from secagg.protocol.server.base import PHASE_TIMER, ServerPhase, ServerState, Step, accepts, on
from secagg.protocol.server.consistency import begin_consistency
from secagg.protocol.server.context import Holders, ServerContext
from secagg.protocol.server.finished import abort, decode_and_finish
from secagg.protocol.server.unmask import begin_unmask
from secagg.wire import (
    AdvertiseKeys,
    AncestorsUnreachable,
    Envelope,
    MaskingStart,
    NewRoot,
    PeerDropped,
    Refusal,
    RootAbort,
    RootAggregate,
    RoundOutcome,
    ShareReport,
)

log = logging.getLogger("secagg.server")

MAX_ANCESTOR_REPORTS = 8
"""AncestorsUnreachable reports one peer may send in a round. An honest peer sends one per
ancestor it loses (at most the tree's depth, a handful), plus one when a new root it was
pointed at goes too; more is a peer trying to make the server work or re-route."""

_S = ServerState


def begin_collect(ctx: ServerContext, graph: NeighbourGraph, holders: Holders) -> Step:
    """Build the tree over the live members of U2 and start R2."""
    config = ctx.config
    tree_seed = ctx.random_bytes(32)
    # Route only through peers still connected: a dead relay would make its
    # children wait for a deadline to learn what we already know.
    alive = [u for u in sorted(ctx.u2) if ctx.live(u)]
    if not alive:
        return abort(ctx, "every member of U2 is gone", CollectPhase.GONE_REASON)
    tree = _build_tree(ctx, alive, tree_seed)
    ctx.tree, ctx.root = tree, tree.root()
    ctx.stats["tree_depth"] = tree.max_depth
    ctx.stats["root"] = ctx.names[ctx.root]
    actions: list[Action] = [SetTimer(PHASE_TIMER, config.phase_timeout)]
    for u in alive:
        descendants = tree.subtree(u)[1:]
        ancestors = tree.ancestors(u)
        parents = [tree.parent(d) for d in descendants]
        survivors = [v for v in ctx.mode.neighbourhood(graph.neighbours(u), u) if v in ctx.u2]
        forward_after = forward_deadline(config.phase_timeout, tree.max_depth, tree.depth(u))
        actions.append(ctx.send(u, MaskingStart(
            survivors=survivors, total_survivors=len(ctx.u2), tree_seed=tree_seed,
            ancestors=list(ancestors), descendants=list(descendants),
            descendant_parents=[p for p in parents if p is not None],
            contacts=[ctx.entries[p] for p in (*ancestors, *descendants)],
            forward_after=forward_after)))
    for u in range(len(ctx.names)):
        if u not in ctx.u2 and ctx.live(u):
            ctx.told_outcome.add(u)
            actions.append(ctx.send(u, RoundOutcome(
                status="excluded", contributor_count=0, included=False, contributors=[],
                reason=f"not in U2: {ctx.drop_details.get(ctx.names[u], '')}"[:512])))
    return actions, CollectPhase(ctx, graph, holders, tree)


def forward_deadline(phase_timeout: float, max_depth: int, depth: int) -> float:
    """Seconds after MaskingStart at which a peer at ``depth`` sends its subtree's sum up
    without the sums still missing (the root: to the server).

    Deeper relays give up earlier, so that a relay's deadline falls before its parent's.
    The root's comes a stall-detection delay after the last relay's: a relay that stalls
    (stays connected, sends nothing) just before its own deadline is noticed by its
    children within that delay, and their re-sent sums still reach the root. Every
    deadline falls before the server's own (``phase_timeout``).
    """
    detect = min(stall_detection_seconds(phase_timeout), phase_timeout / 2)
    relays = phase_timeout - detect
    slots = max_depth + 2
    if depth == 0:
        return relays * (max_depth + 1) / slots + detect
    return relays * (max_depth - depth + 1) / slots


def _build_tree(ctx: ServerContext, alive: list[int], seed: bytes) -> AccumulationTree:
    fan_in = ctx.config.fan_in
    listening = [u for u in alive if ctx.entries[u].address]
    unreachable = [u for u in alive if not ctx.entries[u].address]
    if unreachable and listening:
        # Peers without a listener go last in the heap order: they are leaves as
        # long as there are enough listening peers to carry them.
        order = build_tree(listening, seed, fan_in).order + \
            build_tree(unreachable, seed, fan_in).order
        return AccumulationTree(order=order, fan_in=fan_in)
    return build_tree(alive, seed, fan_in)


class CollectPhase(ServerPhase):
    """R2: masking, waiting for the root's aggregate."""

    STATE = _S.MASKING
    ACCEPTS = accepts({
        RootAggregate.TYPE: on("on_root_aggregate", _S.CONSISTENCY, _S.UNMASKING,
                               _S.FINISHED),
        RootAbort.TYPE: on("on_root_abort", _S.FINISHED),
        AncestorsUnreachable.TYPE: on("on_ancestors_unreachable", _S.MASKING),
        Refusal.TYPE: on("on_refusal", _S.MASKING),
        ShareReport.TYPE: on("ignore_late", _S.MASKING),
        AdvertiseKeys.TYPE: on("reject_registration", _S.MASKING),
    })
    ON_TIMER = on("on_timer", _S.FINISHED)
    ON_PEER_GONE = on("on_peer_gone", _S.MASKING)
    GONE_REASON = DropReason.NO_MASKED_INPUT

    def __init__(self, ctx: ServerContext, graph: NeighbourGraph, holders: Holders,
                 tree: AccumulationTree) -> None:
        super().__init__(ctx)
        self.graph = graph
        self.holders = holders
        self.tree = tree
        self.pointed_to: dict[int, int] = {}
        """Reporter of unreachable ancestors -> the root it was last pointed at."""
        self.reports: dict[int, int] = {}
        """Reporter -> how many AncestorsUnreachable it sent this round (bounded)."""
        self.waiting_reporters: set[int] = set()
        """Reporters that could not reach a root still connected to us: if that root goes,
        one of them becomes the new root and the others follow it."""

    # ---------------------------------------------------------- tree repair

    def peer_left(self, u: int) -> Step:
        """Tell whoever collects in ``u``'s place that it, and its gone children, are gone."""
        ctx, tree = self.ctx, self.tree
        if u not in tree:
            return [], self
        if u == ctx.root:
            reporters = [r for r in sorted(self.waiting_reporters) if ctx.live(r)]
            if reporters:
                # A reporter that could not reach the root was right after all.
                return self._name_new_root(reporters[0])
        # The nearest live ancestor is who collects u's children now.
        ancestor = tree.nearest_live_ancestor(u, ctx.live)
        waiting = [ancestor] if ancestor is not None else []
        if ctx.root != tree.root() and ctx.root not in (u, ancestor):
            waiting.append(ctx.root)  # a named new root waits for everyone
        # Dead children of u were announced to u alone; whoever takes u's place must
        # learn of them too, or it waits for their sums until its deadline. (Peers
        # that shared keys see each other go; without masks tree relatives may never
        # have been connected.)
        below_gone, orphans = self._below(u)
        gone = [u, *below_gone]
        # And whoever sent its sum to u must send it again, higher up. A child whose
        # relay died sees the link close; one whose relay stalled sees nothing (peer
        # links carry no keepalive: only we ping), so we tell it.
        return [*(ctx.send(v, PeerDropped(peer=g)) for v in waiting if ctx.live(v)
                  for g in gone),
                *(ctx.send(c, PeerDropped(peer=u)) for c in orphans)], self

    def _below(self, u: int) -> tuple[list[int], list[int]]:
        """Below ``u``, down to the first live peer on each path: the gone peers (its
        gone children, theirs, and so on), and the live ones, sorted (the orphans,
        whose sums went to ``u``, straight or re-routed past the dead)."""
        live, tree = self.ctx.live, self.tree
        gone: list[int] = []
        orphans: list[int] = []
        stack = list(tree.children(u))
        while stack:
            child = stack.pop()
            if live(child):
                orphans.append(child)
                continue
            if child in self.ctx.gone:
                gone.append(child)
            stack += tree.children(child)
        return gone, sorted(orphans)

    def on_ancestors_unreachable(self, origin: str, env: Envelope) -> Step:
        ctx = self.ctx
        u = ctx.index[env.sender]
        if u not in ctx.u2:
            raise RemoteProtocolError(f"{env.sender!r} is not in U2", DropReason.NOT_ON_ROSTER)
        self.reports[u] = self.reports.get(u, 0) + 1
        if self.reports[u] > MAX_ANCESTOR_REPORTS:
            raise RemoteProtocolError(
                f"{env.sender!r} reported unreachable ancestors {self.reports[u]} times "
                f"(at most {MAX_ANCESTOR_REPORTS} per round)", DropReason.TOO_MANY_FRAMES)
        if u == ctx.root:
            # A repeat that crossed our NewRoot naming u: nothing more to do.
            log.info("ignoring a repeated ancestor report from the root %r", env.sender)
            return [], self
        current = ctx.root
        if ctx.live(current):
            # Never demote a connected root on another peer's word: one malicious
            # reporter would take over the aggregate (and, in paillier mode, could
            # then publish a single input as the sum). Point the reporter at the root
            # once; if the root really is gone, its connection closes (or stops
            # answering keepalives) and peer_left names a reporter then.
            self.waiting_reporters.add(u)
            if self.pointed_to.get(u) == current:
                log.info("%r still cannot reach the root %r, which is connected; waiting "
                         "for the root to finish or go", env.sender, ctx.names[current])
                return [], self
            self.pointed_to[u] = current
            return [ctx.send(u, NewRoot(root=ctx.entries[current], expected=[], contacts=[],
                                        forward_after=0.0))], self
        return self._name_new_root(u)

    def _name_new_root(self, u: int) -> Step:
        """The root is gone (its connection closed): ``u``, alive and holding a partial
        sum it could not deliver, becomes the root."""
        ctx = self.ctx
        current = ctx.root
        ctx.gone.add(current)
        ctx.root = u
        self.waiting_reporters.discard(u)
        # The new root does not know the dead root's subtree: it waits for every live
        # member of U2 to be accounted for (inside some partial sum, or gone).
        expected = [v for v in sorted(ctx.u2) if v != u and ctx.live(v)]
        log.info("root %s gone; %s is the new root", ctx.names[current], ctx.names[u])
        ctx.stats["new_root"] = ctx.names[u]
        # The new root gets a root's patience, not a leaf's: relays below it may still be
        # waiting out a stalled child. The phase deadline restarts with it (at most once
        # per root that goes, so bounded by the roster).
        timeout = ctx.config.phase_timeout
        actions: list[Action] = [SetTimer(PHASE_TIMER, timeout), ctx.send(u, NewRoot(
            root=ctx.entries[u], expected=expected, contacts=[ctx.entries[c] for c in expected],
            forward_after=forward_deadline(timeout, self.tree.max_depth, 0)))]
        # Reporters that were told to keep trying the old root now follow the new one.
        for other in sorted(self.waiting_reporters):
            if ctx.live(other):
                self.pointed_to[other] = u
                actions.append(ctx.send(other, NewRoot(root=ctx.entries[u], expected=[],
                                                       contacts=[], forward_after=0.0)))
        self.waiting_reporters.clear()
        return actions, self

    # ---------------------------------------------------------- the root's sum

    def _check_root(self, env: Envelope) -> None:
        if self.ctx.index[env.sender] != self.ctx.root:
            raise RemoteProtocolError(f"{env.sender!r} is not the root and may not send "
                                      f"{env.type}", DropReason.INVALID_AGGREGATE)

    def on_root_abort(self, origin: str, env: Envelope) -> Step:
        body = env.body
        assert isinstance(body, RootAbort)
        self._check_root(env)
        return abort(self.ctx, f"only {body.contributor_count} masked inputs reached the root, "
                               f"threshold is {self.ctx.config.threshold}", self.GONE_REASON)

    def on_root_aggregate(self, origin: str, env: Envelope) -> Step:
        body = env.body
        assert isinstance(body, RootAggregate)
        ctx = self.ctx
        self._check_root(env)
        contributors = frozenset(body.contributors)
        if len(contributors) != len(body.contributors):
            raise RemoteProtocolError("aggregate lists a contributor twice",
                                      DropReason.INVALID_AGGREGATE)
        if not contributors <= ctx.u2:
            raise RemoteProtocolError("aggregate names contributors outside U2",
                                      DropReason.INVALID_AGGREGATE)
        if len(contributors) < ctx.config.threshold:
            raise RemoteProtocolError(f"aggregate has {len(contributors)} contributors, below "
                                      f"the threshold {ctx.config.threshold}",
                                      DropReason.INVALID_AGGREGATE)
        if ctx.slot_layout is not None:
            try:  # contributors <= U2 <= n: a bug if not, but never decrypt a carried slot
                ctx.slot_layout.check_summands(len(contributors))
            except EncodingError as exc:
                raise RemoteProtocolError(str(exc), DropReason.INVALID_AGGREGATE) from None
        payload = ctx.codec.from_bytes(body.payload)
        private_key = ctx.paillier_keys.private if ctx.paillier_keys is not None else None
        started = time.perf_counter()
        try:
            total = ctx.codec.to_ring(payload, private_key)
        except (CryptoError, EncodingError) as exc:
            raise RemoteProtocolError(f"the aggregate does not decrypt: {exc}",
                                      DropReason.INVALID_AGGREGATE) from None
        if ctx.mode.encrypts:
            ctx.stats["decrypt_seconds"] = time.perf_counter() - started
        return self._accept(total, contributors)

    def _accept(self, total: np.ndarray, contributors: frozenset[int]) -> Step:
        """U3 is fixed: unmask the ring sum, or decode it when nothing is masked."""
        ctx = self.ctx
        ctx.u3 = contributors
        ctx.stats["u3"] = len(contributors)
        actions: list[Action] = []
        for u in sorted(ctx.u2 - contributors):
            ctx.drop(u, DropReason.NO_MASKED_INPUT)
            if ctx.live(u):
                # Told now, not when the round ends: a peer hearing nothing for two
                # phase deadlines takes the server for lost.
                ctx.told_outcome.add(u)
                actions.append(ctx.send(u, RoundOutcome(
                    status="excluded", contributor_count=len(contributors), included=False,
                    contributors=[], reason="its masked input did not reach the root in "
                                            "time")))
        step = self._after_u3(total, contributors)
        return [*actions, *step[0]], step[1]

    def _after_u3(self, total: np.ndarray, contributors: frozenset[int]) -> Step:
        ctx = self.ctx
        if not ctx.mode.unmasks:
            # Nothing is masked and nothing is revealed later, so no R3 or R4.
            ctx.u4 = contributors
            return decode_and_finish(ctx, total, self.GONE_REASON)
        if ctx.mode.checks_consistency(ctx.config.threat_model):
            return begin_consistency(ctx, self.graph, self.holders, total)
        ctx.u4 = contributors
        return begin_unmask(ctx, self.graph, self.holders, total, signatures={})

    def on_timer(self) -> Step:
        return abort(self.ctx, "no aggregate reached the server before the deadline",
                     self.GONE_REASON)
