"""R3 ConsistencyCheck (active threat model): sign U3, so that a server showing
different U3s to different peers is caught in R4."""

from __future__ import annotations

from secagg.crypto.signing import sign
from secagg.protocol.common import consistency_message
from secagg.protocol.errors import DropReason, RemoteProtocolError
from secagg.protocol.peer.context import RoundContext
from secagg.protocol.peer.live import LivePhase, live_accepts, live_events
from secagg.protocol.peer.phase import PeerState, Step, to
from secagg.protocol.peer.unmask import answer_unmask_request, check_contributors
from secagg.wire import ConsistencyRequest, ConsistencySignature, UnmaskRequest

_S = PeerState


def answer_consistency_request(phase: LivePhase, context: RoundContext,
                               survivors: frozenset[int], request: ConsistencyRequest) -> Step:
    """Check U3 against what this peer saw and sign it (or refuse and abort)."""
    if not context.mode.checks_consistency(context.roster.threat_model):
        raise RemoteProtocolError("a consistency request in a round without a consistency "
                                  "check", DropReason.UNEXPECTED_MESSAGE)
    refusal = check_contributors(context, survivors, request.contributors,
                                 len(request.contributors))
    if refusal:
        return phase.refuse(refusal)
    identity = context.settings.identity
    if identity is None:
        return phase.refuse("the round runs under the active threat model but this peer "
                            "has no identity key")
    signed_u3 = tuple(sorted(request.contributors))
    signature = sign(identity, consistency_message(context.input.session,
                                                   context.input.round, signed_u3))
    return ([context.to_server(ConsistencySignature(signature=signature))],
            SignedPhase(context, survivors, signed_u3))


class SignedPhase(LivePhase):
    """U3 signed; waiting for the unmask request that must carry the same U3."""

    STATE = _S.SIGNED
    ACCEPTS = live_accepts(STATE, {
        UnmaskRequest.TYPE: to("on_unmask_request", _S.UNMASKED, _S.FINISHED)})
    EVENTS = live_events(STATE)

    def __init__(self, context: RoundContext, survivors: frozenset[int],
                 signed_u3: tuple[int, ...]) -> None:
        super().__init__(context.input, context)
        self.ctx = context
        self.survivors = survivors
        self.signed_u3 = signed_u3

    def on_unmask_request(self, request: UnmaskRequest) -> Step:
        return answer_unmask_request(self, self.ctx, self.survivors, self.signed_u3, request)
