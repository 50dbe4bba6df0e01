"""What every phase between ``start`` and the end of the round does alike: end the
round when the server says so (RoundOutcome, Rejected) or is gone, and note peers
leaving (PeerGone, PeerDropped, DeliveryFailed) in a way each phase refines."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from secagg.protocol.events import PeerOutcome
from secagg.protocol.peer.context import RoundContext, RoundInput
from secagg.protocol.peer.finished import abort_round, finish
from secagg.protocol.peer.phase import (
    DELIVERY_FAILED,
    PEER_GONE,
    PeerPhase,
    PeerState,
    Step,
    Transition,
    to,
)
from secagg.wire import SERVER, Envelope, PeerDropped, Refusal, Rejected, RoundOutcome

_FINISHED = PeerState.FINISHED


def live_accepts(state: PeerState, own: Mapping[str, Transition]) -> Mapping[str, Transition]:
    """A live phase's ``ACCEPTS``: its own messages, and the server's that every live
    phase takes (the end of the round, and a peer's departure)."""
    return MappingProxyType({**own,
                             RoundOutcome.TYPE: to("on_outcome", _FINISHED),
                             Rejected.TYPE: to("on_rejected", _FINISHED),
                             PeerDropped.TYPE: to("on_peer_dropped", state, _FINISHED)})


def live_events(state: PeerState,
                own: Mapping[str, Transition] | None = None) -> Mapping[str, Transition]:
    """A live phase's ``EVENTS``: departures, and its own timers and ``settle``.
    A peer's departure never changes the state by itself (``settle`` does whatever
    follows from it); the server's ends the round."""
    return MappingProxyType({PEER_GONE: to("on_peer_gone", state, _FINISHED),
                             DELIVERY_FAILED: to("on_delivery_failed", state, _FINISHED),
                             **(own or {})})


class LivePhase(PeerPhase):
    """A phase of a round in progress."""

    def __init__(self, input: RoundInput, context: RoundContext | None) -> None:
        self.input = input
        self._context = context

    @property
    def context(self) -> RoundContext | None:
        return self._context

    # -------------------------------------------------------------- endings

    def on_outcome(self, outcome: RoundOutcome) -> Step:
        # "ok" only for a peer in the contributor set the server announced: a peer that
        # stalled and woke up after being dropped hears "ok" about a round that went
        # on without it. Where the list is sent, it is checked too.
        listed = not outcome.contributors or self.input.name in outcome.contributors
        included = outcome.status == "ok" and outcome.included and listed
        status, reason = outcome.status, outcome.reason
        if status == "ok" and not included:
            status = "excluded"
            reason = reason or (f"the round ended ok with {outcome.contributor_count} "
                                "contributors, without this peer's input")
        return finish(self._context, PeerOutcome(
            status=status, round=self.input.round,
            contributors=tuple(outcome.contributors),
            contributor_count=outcome.contributor_count, included=included,
            reason=reason,
            clipped=self._context.clipped if self._context is not None else 0))

    def on_rejected(self, rejected: Rejected) -> Step:
        return finish(self._context, PeerOutcome(status="rejected", round=self.input.round,
                                                 reason=rejected.reason))

    def abort(self, reason: str) -> Step:
        return abort_round(self.input, self._context, reason)

    def refuse(self, reason: str) -> Step:
        """Decline a server request that a check of this peer's failed, and abort."""
        actions, finished = self.abort(reason)
        return [self.input.to_server(Refusal(reason=reason)), *actions], finished

    # ----------------------------------------------------------- departures

    def on_peer_dropped(self, dropped: PeerDropped) -> Step:
        known = self._context is not None and dropped.peer in self._context.contacts
        return self.departed(dropped.peer) if known else ([], self)

    def on_peer_gone(self, name: str) -> Step:
        if name == SERVER:
            return self.abort("lost the connection to the server")
        index = self._context.index_of.get(name) if self._context is not None else None
        return self.departed(index) if index is not None else ([], self)

    def on_delivery_failed(self, recipient: str, envelope: Envelope) -> Step:
        if recipient == SERVER:
            return self.abort("cannot reach the server")
        index = self._context.index_of.get(recipient) if self._context is not None else None
        return self.undeliverable(index, envelope) if index is not None else ([], self)

    def departed(self, index: int) -> Step:
        """Peer ``index`` will send nothing more this round."""
        if self._context is not None:
            self._context.gone.add(index)
        return [], self

    def undeliverable(self, index: int, envelope: Envelope) -> Step:
        """``envelope`` could not reach peer ``index``: it is as good as gone."""
        return self.departed(index)
