"""The protocol's error model: who is at fault, and why a peer left a round.

Following h11, a :class:`LocalProtocolError` is the caller's misuse of a protocol
object (starting a round twice, feeding a non-event): it escapes ``handle()``
because only the caller can fix it. A :class:`RemoteProtocolError` is another
party's fault (a malformed, forged, replayed or out-of-order message) and
carries a :class:`DropReason`; ``handle()`` never lets it escape, but turns it
(and any :class:`~secagg.errors.CryptoError` or :class:`~secagg.errors.WireError`
raised while handling remote data) into actions at one point: the server
disconnects the sender with that reason, a peer ignores the frame or aborts.

Drop reasons follow fcp's secagg ``ClientDropReason``: one explicit code per
way of leaving a round, so a log reader knows what happened without the text.
"""

from __future__ import annotations

from enum import StrEnum

from secagg.errors import ProtocolError


class DropReason(StrEnum):
    """Why a peer's input is missing from a round, or why a party was cut off."""

    # Leaving a round by not taking part in a phase.
    NOT_REGISTERED = "not_registered"
    """Never registered (R0), or registered after registration closed."""
    NO_SHARE_REPORT = "no_share_report"
    """Gone before it reported which neighbours' shares it holds (R1)."""
    SHARE_DELIVERY_FAILED = "share_delivery_failed"
    """Its shares reached fewer neighbours than the share threshold (R1)."""
    NO_MASKED_INPUT = "no_masked_input"
    """Its masked input is not in the aggregate (R2)."""
    SIGNATURE_MISSING = "signature_missing"
    """No consistency signature (R3, active)."""
    UNMASK_SHARE_MISSING = "unmask_share_missing"
    """Gone before it answered the unmasking request (R4)."""
    DISCONNECTED = "disconnected"
    """Its connection closed while nothing was expected of it."""
    REFUSED = "refused"
    """It refused a request (a check of its own failed) and aborted."""
    WITHDREW = "withdrew"
    """It left the round on its own (its input failed a local check)."""
    # Cut off for what it sent.
    MALFORMED_MESSAGE = "malformed_message"
    """A frame that did not decode or failed its schema (WireError)."""
    UNEXPECTED_MESSAGE = "unexpected_message"
    """A message not allowed in the current phase."""
    DUPLICATE_MESSAGE = "duplicate_message"
    """A second copy of a message it may send once (a replay)."""
    WRONG_SESSION = "wrong_session"
    """A frame of another session or round (a replay, or misdirected)."""
    FORGED_SENDER = "forged_sender"
    """A frame claiming another sender than its connection's."""
    DUPLICATE_ID = "duplicate_id"
    """A registration under an id already in use."""
    NOT_ON_ROSTER = "not_on_roster"
    """A message from a peer that is not (or no longer) in the round."""
    INVALID_KEYS = "invalid_keys"
    """Advertised keys that are malformed, reused or not validly signed."""
    INVALID_SIGNATURE = "invalid_signature"
    """A consistency signature that does not verify."""
    INVALID_REPORT = "invalid_report"
    """A share report naming peers outside its neighbourhood, or twice."""
    INVALID_AGGREGATE = "invalid_aggregate"
    """An aggregate from a non-root, or with a bad contributor set or payload."""
    INVALID_SHARES = "invalid_shares"
    """Unmasking shares that are malformed or were not requested."""
    WRONG_SHARE = "wrong_share"
    """Handed the server a well-formed share that is not on the secret's polynomial: the
    secret rebuilt from it failed its check (b_u against its R0 commitment, s_sk_u against
    its public key) and spare shares showed which holder lied."""
    AUTHENTICATION_FAILED = "authentication_failed"
    """A sealed frame that did not authenticate (CryptoError)."""
    TOO_MANY_FRAMES = "too_many_frames"
    """More early frames (sent before the phase that takes them) than may be buffered."""
    FORBIDDEN_FORWARD = "forbidden_forward"
    """Kept asking the coordinator to relay frames it may not relay: to itself, to a
    peer with a listener, outside its neighbourhood or tree path, for another round,
    or more than the round needs (``secagg.protocol.server.forward``)."""
    BAD_MESSAGE = "bad_message"
    """Any other fault in what it sent."""


class LocalProtocolError(ProtocolError):
    """The caller misused a protocol object; raised out of ``start``/``handle``."""


class RemoteProtocolError(ProtocolError):
    """Another party broke the protocol. Never escapes ``handle()``."""

    def __init__(self, message: str, reason: DropReason = DropReason.BAD_MESSAGE) -> None:
        super().__init__(message)
        self.reason = reason
