"""The end of a round: the outcome, and the secrets forgotten."""

from __future__ import annotations

import logging

from secagg.protocol.events import Action, CancelTimer, PeerOutcome, RoundFinished
from secagg.protocol.peer.context import RoundContext, RoundInput
from secagg.protocol.peer.phase import PeerPhase, PeerState, Step

log = logging.getLogger("secagg.peer")

SHARE_TIMER = "share_keys"
FORWARD_TIMER = "forward"


class FinishedPhase(PeerPhase):
    """The round is over for this peer; every further event is ignored."""

    STATE = PeerState.FINISHED

    def __init__(self, context: RoundContext | None, outcome: PeerOutcome) -> None:
        self._context = context
        self._outcome = outcome

    @property
    def context(self) -> RoundContext | None:
        return self._context

    @property
    def outcome(self) -> PeerOutcome:
        return self._outcome


def finish(context: RoundContext | None, outcome: PeerOutcome) -> Step:
    """End the round with ``outcome``: cancel the timers, forget the secrets."""
    if context is not None:
        context.forget_secrets()
    actions: list[Action] = [CancelTimer(SHARE_TIMER), CancelTimer(FORWARD_TIMER),
                             RoundFinished(outcome)]
    return actions, FinishedPhase(context, outcome)


def abort_round(input: RoundInput, context: RoundContext | None, reason: str) -> Step:
    """Leave the round without a result, saying why."""
    log.warning("%s aborts: %s", input.name, reason)
    return finish(context, PeerOutcome(status="aborted", round=input.round, reason=reason))
