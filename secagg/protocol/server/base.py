"""The shape every phase of the server's round has (fcp's ``SecAggServerState``).

A phase is one object per round state. It declares, as class-level data, which
messages it accepts and into which states each may lead (h11's tables as
data); :data:`secagg.protocol.server.SERVER_TRANSITIONS` is derived from these
declarations, and the dispatcher checks every step against them. A handler
validates before it changes anything, raises :class:`RemoteProtocolError` for
another party's fault, and otherwise returns ``(actions, next phase)``: itself
to stay, or a new phase object built with what that phase needs.

What a phase does when a peer leaves (``peer_left``) or its deadline passes
(``on_timer``) is the phase's own business, as fcp's ``HandleAbortClient``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import ClassVar

from secagg.protocol.errors import DropReason, RemoteProtocolError
from secagg.protocol.events import Action, is_connection_token
from secagg.protocol.server.context import ServerContext
from secagg.wire import AdvertiseKeys, Envelope, Refusal

log = logging.getLogger("secagg.server")

PHASE_TIMER = "phase"
"""The one timer the server sets: the current phase's deadline."""
PEER_GONE = "peer_gone"
"""The transition-table key of a peer's departure (closed connection, or cut off)."""


class ServerState(StrEnum):
    IDLE = "idle"
    COLLECTING_KEYS = "collecting_keys"  # R0
    SHARING = "sharing"  # R1
    MASKING = "masking"  # R2
    CONSISTENCY = "consistency"  # R3 (active only)
    UNMASKING = "unmasking"  # R4
    FINISHED = "finished"


@dataclass(frozen=True)
class Transition:
    """A handler (a method name of the phase) and the states it may lead to."""

    handler: str
    next_states: frozenset[ServerState]


def on(handler: str, *next_states: ServerState) -> Transition:
    return Transition(handler, frozenset(next_states))


def accepts(table: Mapping[str, Transition]) -> Mapping[str, Transition]:
    """A phase's message table, read-only: it is the class's declaration, not state."""
    return MappingProxyType(dict(table))


Step = tuple[list[Action], "ServerPhase"]
"""What a handler returns: the actions to carry out and the phase to continue in."""


class ServerPhase:
    """One state of the round. Subclasses fill in the class-level declarations."""

    STATE: ClassVar[ServerState]
    STARTED: ClassVar[bool] = True
    """False only before ``start()``: events then are the caller's mistake."""
    ACCEPTS: ClassVar[Mapping[str, Transition]] = MappingProxyType({})
    """Message type -> (handler, next states). Any other type is an unexpected message."""
    ON_TIMER: ClassVar[Transition]
    """What the phase deadline leads to (handler ``on_timer``)."""
    ON_PEER_GONE: ClassVar[Transition]
    """What a departure leads to (handler ``on_peer_gone``; also after a cut-off or a
    refusal)."""
    GONE_REASON: ClassVar[DropReason | None] = None
    """Why the peers gone so far are dropped if the round aborts in this phase."""

    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.STATE}>"

    # ----------------------------------------------------------- connections

    def on_connected(self, token: str) -> list[Action]:
        """A new connection once registration has closed: it is told so, and kept for the
        next round (its frames meanwhile are judged like any unregistered connection's;
        the driver bounds how many connections it holds)."""
        return [self.ctx.rejection(token, self.ctx.registration_closed)]

    def check_sender(self, env: Envelope) -> None:
        """After registration only the live roster speaks (registrations are judged by
        their handler)."""
        if env.type == AdvertiseKeys.TYPE:
            return
        u = self.ctx.index.get(env.sender)
        if u is None:
            raise RemoteProtocolError(f"{env.type} from {env.sender!r}, who is not on the "
                                      "roster", DropReason.NOT_ON_ROSTER)
        if u in self.ctx.gone:
            raise RemoteProtocolError(f"{env.type} from {env.sender!r}, already dropped",
                                      DropReason.NOT_ON_ROSTER)

    # ------------------------------------------------------------ departures

    def on_timer(self) -> Step:
        """The phase deadline passed. Every phase with a deadline overrides this; a
        phase without one (before ``start``) has nothing to do when a stale timer fires."""
        return [], self

    def on_peer_gone(self, name: str) -> Step:
        u = self.ctx.index.get(name)
        if u is None or u in self.ctx.gone:
            return [], self
        self.ctx.gone.add(u)
        return self.peer_left(u)

    def peer_left(self, u: int) -> Step:
        """Roster member ``u`` (now in ``ctx.gone``) will send nothing more."""
        return [], self

    def cut_off(self, name: str, reason: DropReason, detail: str) -> Step:
        """``name`` was disconnected for what it sent: it is dropped for ``reason`` and
        then gone, with this phase's consequences of a departure."""
        u = self.ctx.index.get(name)
        if u is not None:
            self.ctx.drop(u, reason, detail)
        return self.on_peer_gone(name)

    # ------------------------------------------------- handlers of any phase

    def ignore_late(self, origin: str, env: Envelope) -> Step:
        # A message of an earlier phase that crossed the phase change: harmless.
        log.info("ignoring late %s from %r", env.type, env.sender)
        return [], self

    def on_refusal(self, origin: str, env: Envelope) -> Step:
        """The peer refused a request (a check of its own failed) and left the round."""
        body = env.body
        assert isinstance(body, Refusal)
        log.warning("%s refused: %s", env.sender, body.reason)
        self.ctx.drop(self.ctx.index[env.sender], DropReason.REFUSED, body.reason)
        return self.on_peer_gone(env.sender)

    def reject_registration(self, origin: str, env: Envelope) -> Step:
        """A registration after registration closed."""
        ctx = self.ctx
        if env.sender in ctx.index and not is_connection_token(origin):
            raise RemoteProtocolError(f"second registration from {env.sender!r}, who is "
                                      "already on the roster", DropReason.DUPLICATE_MESSAGE)
        return self.turn_away(origin, env, ctx.registration_closed)

    def turn_away(self, origin: str, env: Envelope, closed: str) -> Step:
        """Refuse a registration from someone not on the roster, saying why."""
        if is_connection_token(origin) and env.sender in self.ctx.index:
            # Told why and closed by the dispatcher, like any bad first frame.
            raise RemoteProtocolError(f"peer id {env.sender!r} is already registered in "
                                      "this round (duplicate id)", DropReason.DUPLICATE_ID)
        # Merely late (it heard of the round while registration was open): the notice
        # ends its round, and its connection stays for the next one, as a connection
        # opened after registration closed does.
        return [self.ctx.rejection(origin, closed)], self
