"""Where a frame may come from, and what its connection becomes once it authenticates.

Frames reach a peer on its coordinator link (origin ``wire.SERVER``), on a peer
link bound to a name, on a connection nobody has yet proven to own (a ``#k``
token), or forwarded by the coordinator (origin ""). Server messages must come on
the server link and peer messages must not; a bound link speaks for one sender
only. A token becomes a peer's link only after a fresh frame on it opened under
that pair's channel key.
"""

from __future__ import annotations

from secagg.errors import CryptoError, ProtocolError, WireError
from secagg.protocol.common import check_envelope
from secagg.protocol.errors import DropReason, RemoteProtocolError
from secagg.protocol.events import Action, Bind, is_connection_token
from secagg.wire import (
    SERVER,
    ConsistencyRequest,
    Envelope,
    MaskingStart,
    NewRoot,
    PeerDropped,
    Rejected,
    Roster,
    RoundOutcome,
    UnmaskRequest,
)

SERVER_MESSAGES = frozenset({Roster.TYPE, MaskingStart.TYPE, NewRoot.TYPE, PeerDropped.TYPE,
                             ConsistencyRequest.TYPE, UnmaskRequest.TYPE, RoundOutcome.TYPE,
                             Rejected.TYPE})


class Links:
    """The connection tokens bound so far, each to the peer that authenticated on it."""

    def __init__(self) -> None:
        self._owner: dict[str, str] = {}

    def owner(self, origin: str) -> str:
        """Whom frames from ``origin`` must claim as sender ("" if anyone may)."""
        return self._owner.get(origin, "") if is_connection_token(origin) else origin

    def bind(self, origin: str, name: str) -> list[Action]:
        """A fresh frame on ``origin`` authenticated as ``name``: bind it, once."""
        if not is_connection_token(origin) or origin in self._owner:
            return []
        self._owner[origin] = name
        return [Bind(origin, name)]

    def check_route(self, origin: str, env: Envelope) -> None:
        """RemoteProtocolError unless ``env`` may arrive from ``origin``."""
        if origin == SERVER:
            if env.sender != SERVER:
                raise RemoteProtocolError(f"{env.type} on the server link claims sender "
                                          f"{env.sender!r}", DropReason.FORGED_SENDER)
            if env.type not in SERVER_MESSAGES:
                raise RemoteProtocolError(f"{env.type} must come from a peer",
                                          DropReason.UNEXPECTED_MESSAGE)
            return
        if env.sender == SERVER:
            raise RemoteProtocolError(f"{env.type} claims to come from the server on a peer "
                                      "connection", DropReason.FORGED_SENDER)
        if env.type in SERVER_MESSAGES:
            raise RemoteProtocolError(f"{env.type} may only come from the server, not from "
                                      f"{env.sender!r}", DropReason.UNEXPECTED_MESSAGE)
        owner = self.owner(origin)
        if owner and owner != env.sender:
            raise RemoteProtocolError(f"{env.type} on the connection of {owner!r} claims "
                                      f"sender {env.sender!r}", DropReason.FORGED_SENDER)


def check_round(env: Envelope, session: bytes, round: int) -> None:
    """RemoteProtocolError (WRONG_SESSION) for a frame of another session or round."""
    try:
        check_envelope(env, session, round)
    except ProtocolError as exc:
        raise RemoteProtocolError(str(exc), DropReason.WRONG_SESSION) from None


def drop_reason(exc: Exception) -> DropReason:
    """The DropReason of an error raised while handling a remote party's frame."""
    if isinstance(exc, RemoteProtocolError):
        return exc.reason
    if isinstance(exc, CryptoError):
        return DropReason.AUTHENTICATION_FAILED
    if isinstance(exc, WireError):
        return DropReason.MALFORMED_MESSAGE
    return DropReason.BAD_MESSAGE
