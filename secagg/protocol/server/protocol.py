"""ServerProtocol: the coordinator's side of a round, as a sans-I/O state machine.

This module only dispatches: an event goes to the current phase object (one
per state, ``register`` .. ``finished``), the phase returns actions and the
phase to continue in, and every step is checked against what the phase
declared. It is also the one place where another party's fault becomes
actions: a :class:`RemoteProtocolError`, :class:`WireError` or
:class:`CryptoError` raised while handling what ``X`` sent disconnects ``X``
with a specific :class:`DropReason`, records it, and lets the phase deal with
``X`` being gone. Nothing a remote party does makes ``handle()`` raise.

``Forward`` frames (sealed peer-to-peer frames the coordinator relays to peers
without a listener) belong to no phase: :meth:`ServerProtocol.relay` judges them
(:mod:`secagg.protocol.server.forward`) in every state, finished included.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from secagg.crypto.keys import RandomBytes
from secagg.errors import CryptoError, ProtocolError, WireError
from secagg.graph import AccumulationTree, NeighbourGraph
from secagg.paillier import PaillierKeyPair, SlotLayout
from secagg.protocol.common import Encoder, check_envelope, round_limits
from secagg.protocol.errors import DropReason, LocalProtocolError, RemoteProtocolError
from secagg.protocol.events import (
    Action,
    ConnectionFault,
    DeliveryFailed,
    Disconnect,
    Event,
    FrameReceived,
    MessageReceived,
    PeerConnected,
    PeerGone,
    ServerOutcome,
    TimerExpired,
    is_connection_token,
)
from secagg.protocol.server.base import PHASE_TIMER, ServerPhase, ServerState, Step, Transition
from secagg.protocol.server.config import ServerConfig
from secagg.protocol.server.context import ServerContext
from secagg.protocol.server.forward import ForwardGate
from secagg.protocol.server.register import begin_registration, round_open
from secagg.wire import SERVER, AdvertiseKeys, Envelope, Forward, Limits, Withdraw, decode

log = logging.getLogger("secagg.server")


class IdlePhase(ServerPhase):
    """Before ``start()``: no event is expected."""

    STATE = ServerState.IDLE
    STARTED = False


class ServerProtocol:
    """The coordinator of one round."""

    def __init__(self, config: ServerConfig, *, random_bytes: RandomBytes = os.urandom,
                 record_view: bool = False, paillier_keys: PaillierKeyPair | None = None) -> None:
        """``paillier_keys`` is the round's key pair in the modes that encrypt; a fresh
        one of ``config.paillier_key_bits`` is generated if it is not given."""
        self.config = config
        self._ctx = ServerContext.create(config, random_bytes=random_bytes,
                                         record_view=record_view, paillier_keys=paillier_keys)
        self.phase: ServerPhase = IdlePhase(self._ctx)
        self._forwards = ForwardGate(self._ctx)

    # ------------------------------------------------------------------ API

    def start(self, connected: int | None = None) -> list[Action]:
        """Open registration (R0). ``connected`` is how many peers the driver told of
        the round (its open connections); with it, once one of them withdrew or left,
        registration also closes when each has registered, withdrawn or left (and at
        least the threshold registered), instead of waiting for the deadline. The
        driver then reports every connection that closes, named or not (``PeerGone``
        with its token), and every one that opens (``PeerConnected``)."""
        if self.phase.STARTED:
            raise LocalProtocolError("round already started")
        actions, self.phase = begin_registration(self._ctx, connected)
        return actions

    def handle(self, event: Event) -> list[Action]:
        if not self.phase.STARTED:
            raise LocalProtocolError(f"{type(event).__name__} before start(): the round has "
                                     "not begun")
        if isinstance(event, MessageReceived):
            origin = event.envelope.sender if event.origin is None else event.origin
            return self._receive(origin, event.envelope)
        if isinstance(event, FrameReceived):
            return self._receive_frame(event.origin, event.frame)
        if isinstance(event, TimerExpired):
            if event.name != PHASE_TIMER:
                return []
            return self._step(self.phase.ON_TIMER, self.phase.on_timer())
        if isinstance(event, PeerGone):
            return self._peer_gone(event.name)
        if isinstance(event, ConnectionFault):
            return self._cut_off(event.origin, event.reason, event.detail)
        if isinstance(event, DeliveryFailed):
            return self._peer_gone(event.recipient)
        if isinstance(event, PeerConnected):
            if not is_connection_token(event.connection):
                raise LocalProtocolError(f"connection tokens start with '#', not "
                                         f"{event.connection!r}")
            return self.phase.on_connected(event.connection)
        raise TypeError(f"not a protocol event: {event!r}")

    def relay(self, origin: str, env: Envelope) -> list[Action]:
        """A ``Forward`` that the peer on connection ``origin`` asks us to relay: the
        Send that relays it (the inner frame untouched, the forward relabelled with
        ``origin`` so the recipient knows who sent it), nothing (refused, logged), or
        ``origin``'s disconnection once it kept sending forwards it may not send.

        Any state after ``start()``, finished included (a flood does not stop between
        rounds). A connection token is cut off at once: only registered peers forward.
        """
        if not self.phase.STARTED:
            raise LocalProtocolError("relay() before start(): the round has not begun")
        if is_connection_token(origin):
            return self._cut_off(origin, DropReason.NOT_REGISTERED,
                                 "a forward before registration")
        body = env.body
        if not isinstance(body, Forward):
            raise LocalProtocolError(f"relay() takes forward frames, not {env.type}")
        verdict = self._forwards.judge(self.state, origin, env, self.limits())
        if verdict.recipient:
            return [self._ctx.send_to(verdict.recipient,
                                      Forward(recipient=origin, frame=body.frame))]
        level = logging.WARNING if verdict.forbidden else logging.INFO
        log.log(level, "refusing a forward from %r to %r: %s", origin, body.recipient,
                verdict.refused)
        if self._forwards.over_limit(origin):
            strikes = self._forwards.strikes(origin)
            return self._cut_off(origin, DropReason.FORBIDDEN_FORWARD,
                                 f"{strikes} forwards the coordinator may not relay; the "
                                 f"last: {verdict.refused}")
        return []

    def round_open(self) -> Envelope:
        """The RoundOpen notice for every peer, whenever it connects."""
        return round_open(self._ctx)

    def limits(self) -> Limits:
        """Decoding limits for frames arriving at this server."""
        ctx = self._ctx
        return round_limits(peers=self.config.max_peers, dim=self.config.wire_dim,
                            modulus_bits=self.config.modulus_bits,
                            payload_bytes=ctx.codec.byte_length)

    # ----------------------------------------------------------- dispatching

    def _step(self, transition: Transition, step: Step) -> list[Action]:
        actions, phase = step
        if phase.STATE not in transition.next_states:
            raise AssertionError(f"{type(self.phase).__name__}.{transition.handler} went to "
                                 f"{phase.STATE}, not one of its declared "
                                 f"{sorted(transition.next_states)}")
        self.phase = phase
        return actions

    def _receive_frame(self, origin: str, frame: bytes) -> list[Action]:
        try:
            env = decode(frame, self.limits())
        except WireError as exc:
            return self._cut_off(origin, DropReason.MALFORMED_MESSAGE, f"malformed frame: {exc}")
        return self._receive(origin, env)

    def _receive(self, origin: str, env: Envelope) -> list[Action]:
        if not origin:
            # Only a peer takes frames relayed for someone else; every frame at the
            # server arrives on a connection the driver can name.
            raise LocalProtocolError("a frame at the server needs the connection it came on")
        if isinstance(env.body, Forward):
            return self.relay(origin, env)
        phase = self.phase
        try:
            transition = self._admit(origin, env)
            step = getattr(phase, transition.handler)(origin, env)
        except RemoteProtocolError as exc:
            return self._cut_off(origin, exc.reason, str(exc))
        except WireError as exc:
            return self._cut_off(origin, DropReason.MALFORMED_MESSAGE, str(exc))
        except CryptoError as exc:
            return self._cut_off(origin, DropReason.AUTHENTICATION_FAILED, str(exc))
        actions = self._step(transition, step)
        if self._ctx.record_view:
            self._ctx.view.append(env)
        return actions

    def _admit(self, origin: str, env: Envelope) -> Transition:
        """Who may send what, checked before any handler runs; the transition to take."""
        if env.sender == SERVER:
            raise RemoteProtocolError("a peer may not claim to be the server (forged sender)",
                                      DropReason.FORGED_SENDER)
        unbound = is_connection_token(origin)
        if not unbound and env.sender != origin:
            raise RemoteProtocolError(f"frame claims sender {env.sender!r} on the connection "
                                      f"of {origin!r} (forged sender)", DropReason.FORGED_SENDER)
        if unbound and env.type not in (AdvertiseKeys.TYPE, Withdraw.TYPE):
            raise RemoteProtocolError(f"first frame must be advertise_keys, got {env.type}",
                                      DropReason.NOT_REGISTERED)
        try:
            check_envelope(env, self.config.session, self.config.round)
        except ProtocolError as exc:
            detail = f"registration for this round is closed: {exc}" if unbound else str(exc)
            raise RemoteProtocolError(detail, DropReason.WRONG_SESSION) from None
        transition = self.phase.ACCEPTS.get(env.type)
        if transition is None and env.type == Withdraw.TYPE:
            # Whoever withdraws after registration closed was not waited for anyway.
            return Transition("ignore_late", frozenset({self.phase.STATE}))
        if transition is None:
            raise RemoteProtocolError(f"server in state {self.phase.STATE} cannot accept "
                                      f"{env.type} from {env.sender!r}",
                                      DropReason.UNEXPECTED_MESSAGE)
        self.phase.check_sender(env)
        return transition

    def _cut_off(self, origin: str, reason: DropReason, detail: str) -> list[Action]:
        """Disconnect ``origin`` for what it sent; the phase goes on without it."""
        log.warning("dropping %r (%s): %s", origin, reason.value, detail)
        if is_connection_token(origin):
            # Nobody is registered on it: it is told why, and closed.
            return [self._ctx.rejection(origin, detail), Disconnect(origin, reason, detail)]
        actions: list[Action] = [Disconnect(origin, reason, detail)]
        return actions + self._step(self.phase.ON_PEER_GONE,
                                    self.phase.cut_off(origin, reason, detail))

    def _peer_gone(self, name: str) -> list[Action]:
        # An unregistered connection (a token) too: registration waits for every
        # connection told of the round, so it needs to know when one is gone.
        return self._step(self.phase.ON_PEER_GONE, self.phase.on_peer_gone(name))

    # ------------------------------------------------------- read-only state

    @property
    def state(self) -> ServerState:
        return self.phase.STATE

    @property
    def finished(self) -> bool:
        return self._ctx.outcome is not None

    @property
    def outcome(self) -> ServerOutcome | None:
        return self._ctx.outcome

    @property
    def encoder(self) -> Encoder:
        return self._ctx.encoder

    @property
    def slot_layout(self) -> SlotLayout | None:
        """How ciphertexts pack ring elements (None unless the mode encrypts): for
        ``max_peers`` until registration closes, then for the roster."""
        return self._ctx.slot_layout

    @property
    def stats(self) -> dict[str, Any]:
        return self._ctx.stats

    @property
    def names(self) -> list[str]:
        """U1, the roster, in index order (empty until registration closes)."""
        return self._ctx.names

    @property
    def dropped(self) -> dict[str, DropReason]:
        return self._ctx.dropped

    @property
    def drop_details(self) -> dict[str, str]:
        return self._ctx.drop_details

    @property
    def view(self) -> list[Envelope]:
        """With ``record_view``: every message this server accepted."""
        return self._ctx.view

    @property
    def shares_received(self) -> list[tuple[str, int, int]]:
        """With ``record_view``: (kind, owner, holder) of every unmasking share received."""
        return self._ctx.shares_received

    @property
    def u2(self) -> frozenset[int]:
        return self._ctx.u2

    @property
    def u3(self) -> frozenset[int]:
        return self._ctx.u3

    @property
    def u4(self) -> frozenset[int]:
        return self._ctx.u4

    @property
    def graph(self) -> NeighbourGraph | None:
        """The neighbour graph, once registration has closed."""
        return self._ctx.graph

    @property
    def tree(self) -> AccumulationTree | None:
        """The accumulation tree, once R2 has begun."""
        return self._ctx.tree

    @property
    def root(self) -> int:
        """The current root of the tree (a new one if it was replaced); -1 before R2."""
        return self._ctx.root

    def index_of(self, name: str) -> int | None:
        """``name``'s index on the roster (None if it is not on it)."""
        return self._ctx.index_of(name)
