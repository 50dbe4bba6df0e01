"""PeerProtocol: one peer's side of a round, as a sans-I/O state machine.

The driver calls :meth:`PeerProtocol.start` with the peer's input, then feeds
every event to :meth:`PeerProtocol.handle` and carries out the returned actions.
This module only dispatches: the current phase object (one class per state,
see ``phase.py``) says which handler takes an event and where it may lead.

It is also the one place where what a remote party did wrong becomes actions
(``handle`` never raises for it):

- a bad frame from a peer (or from a connection nobody has proven to own) is
  recorded in :attr:`PeerProtocol.rejected` and answered with ``Disconnect`` of
  that connection with a specific :class:`DropReason`; the state does not change;
- a bad frame from the server ends the round (``aborted``, naming the fault) and
  disconnects the server; a server frame of another session or round is stale and
  only recorded.

Peer-to-peer frames are authenticated here, before any phase sees them: the AEAD
must open under the pair's channel key. A connection token (``#k``) becomes the
sender's link (``Bind``) only when a fresh frame on it authenticates.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np

from secagg import wire
from secagg.crypto.keys import RandomBytes
from secagg.crypto.prg import MaskGenerator
from secagg.crypto.signing import SigningKey
from secagg.errors import CryptoError, ProtocolError, WireError
from secagg.graph import make_graph
from secagg.protocol.common import THREAT_MODELS, Mode, ThreatModel
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
    PeerOutcome,
    TimerExpired,
)
from secagg.protocol.modes import round_mode
from secagg.protocol.peer.advertise import AdvertisedPhase, IdlePhase, checked_input
from secagg.protocol.peer.consistency import SignedPhase
from secagg.protocol.peer.context import (
    AuthenticatedFrame,
    GraphFactory,
    PeerSettings,
    RoundContext,
    RoundInput,
    record_rejection,
)
from secagg.protocol.peer.early import EarlyFrames
from secagg.protocol.peer.finished import FinishedPhase
from secagg.protocol.peer.inbound import Links, check_round, drop_reason
from secagg.protocol.peer.phase import (
    DELIVERY_FAILED,
    PEER_GONE,
    SETTLE,
    PeerPhase,
    PeerState,
    Transition,
    timer,
)
from secagg.protocol.peer.share import ReportedPhase, SharingPhase
from secagg.protocol.peer.tree import ForwardedPhase, MaskingPhase
from secagg.protocol.peer.unmask import UnmaskedPhase
from secagg.wire import (
    SERVER,
    EncryptedPartialSum,
    EncryptedShares,
    Envelope,
    Limits,
)

PEER_PHASES: tuple[type[PeerPhase], ...] = (
    IdlePhase, AdvertisedPhase, SharingPhase, ReportedPhase, MaskingPhase, ForwardedPhase,
    SignedPhase, UnmaskedPhase, FinishedPhase)

PEER_TRANSITIONS: dict[tuple[PeerState, str], Transition] = {
    row: transition for phase in PEER_PHASES for row, transition in phase.transitions().items()}
"""(state, message type | "timer:<name>" | "peer_gone" | "delivery_failed" | "settle")
-> (handler name, frozenset of next states); handler "defer" buffers the frame. Derived
from the phase classes' declarations: anything else is refused."""

MAX_STALE_FRAMES = 64
"""Frames of earlier rounds one connection may send in a round before it is cut off."""

_EVENTS = (MessageReceived, FrameReceived, TimerExpired, PeerGone, DeliveryFailed,
           PeerConnected)


class PeerProtocol:
    """One peer's participation in one round."""

    def __init__(
        self,
        name: str,
        *,
        address: str = "",
        random_bytes: RandomBytes = os.urandom,
        identity: SigningKey | None = None,
        trusted_identities: Mapping[str, bytes] | None = None,
        graph_factory: GraphFactory = make_graph,  # type: ignore[assignment]
        mask_generator: MaskGenerator | None = None,
        mode: Mode | None = None,
        min_noise_multiplier: float | None = None,
        threat_model: ThreatModel | None = None,
    ) -> None:
        """``mode``, ``threat_model`` and ``min_noise_multiplier`` are this peer's own
        floor: it declines rounds of another mode or threat model, or with less
        distributed-DP noise than that.

        ``threat_model`` defaults to ``"active"`` when this peer holds an ``identity``
        key or pins ``trusted_identities``: a peer that signs its keys and checks the
        others' must not be silently downgraded to honest-but-curious, where nobody
        checks a signature. Pass ``"honest-but-curious"`` to follow such rounds anyway.

        ``trusted_identities`` (name -> Ed25519 public key) is closed: a roster entry of
        a name not in it, or under another identity key, ends the round. It needs this
        peer's own ``identity`` (which it trusts under its own name) and must not pin
        this peer's name to another key (ValueError).
        """
        if min_noise_multiplier is not None and not min_noise_multiplier >= 0:
            raise ValueError(f"min_noise_multiplier must be >= 0, got {min_noise_multiplier}")
        if threat_model is not None and threat_model not in THREAT_MODELS:
            raise ValueError(f"threat_model must be one of {THREAT_MODELS} or None, not "
                             f"{threat_model!r}")
        pins = dict(trusted_identities or {})
        if pins:
            if identity is None:
                raise ValueError("trusted_identities needs this peer's own identity key "
                                 "(identity=): the roster's entry of this peer is checked "
                                 "against the pin list like every other")
            own = pins.setdefault(name, identity.public_bytes)
            if own != identity.public_bytes:
                raise ValueError(f"trusted_identities pins {name!r}, this peer, under "
                                 "another key than its identity key")
        if threat_model is None and (identity is not None or pins):
            threat_model = "active"
        self.name = name
        self.address = address
        self._settings = PeerSettings(
            name=name, address=address, random_bytes=random_bytes, identity=identity,
            trusted_identities=pins, graph_factory=graph_factory,
            mask_generator=mask_generator,
            required_mode=round_mode(mode) if mode is not None else None,
            min_noise_multiplier=min_noise_multiplier,
            required_threat_model=threat_model)
        self.rejected: list[str] = []
        """Reasons for every frame this peer refused or ignored (for logs and tests)."""
        self._phase: PeerPhase = IdlePhase(self._settings)
        self._input: RoundInput | None = None
        self._context: RoundContext | None = None
        self._early = EarlyFrames()
        self._links = Links()
        self._stale_frames: Counter[str] = Counter()

    # ------------------------------------------------------------------ API

    def start(self, session: bytes, round: int, vector: np.ndarray,
              weight: float = 1.0) -> list[Action]:
        """Begin a round with this peer's input: generate keys and advertise them (R0).

        ValueError (before anything is sent) unless ``vector`` is 1-D and finite and
        ``weight`` finite and non-negative; LocalProtocolError if already started.
        """
        idle = self._phase
        if not isinstance(idle, IdlePhase):
            raise LocalProtocolError(f"peer {self.name!r} already started (state "
                                     f"{self.state})")
        values, checked_weight = checked_input(vector, weight)
        actions, advertised = idle.start(session, round, values, checked_weight, self.rejected)
        self._input = advertised.input
        self._phase = advertised
        return actions

    def handle(self, event: Event) -> list[Action]:
        """Process one event; return the actions the driver must carry out."""
        if not isinstance(event, _EVENTS):
            raise TypeError(f"not a protocol event: {event!r}")
        if isinstance(self._phase, IdlePhase):
            raise LocalProtocolError(f"peer {self.name!r} has not started a round")
        if self.finished:
            return []
        actions = self._on_event(event)
        return actions + self._settle()

    def limits(self) -> Limits:
        """Decoding limits for frames addressed to this peer in the current round."""
        return self._context.limits if self._context is not None else Limits()

    @property
    def state(self) -> PeerState:
        return self._phase.STATE

    @property
    def phase(self) -> PeerPhase:
        """The current phase object (see ``phase.py``)."""
        return self._phase

    @property
    def finished(self) -> bool:
        return self._phase.STATE is PeerState.FINISHED

    @property
    def outcome(self) -> PeerOutcome | None:
        return self._phase.outcome

    @property
    def required_mode(self) -> str | None:
        """The only mode this peer takes part in (None: whatever the server runs)."""
        required = self._settings.required_mode
        return required.name if required is not None else None

    @property
    def required_threat_model(self) -> ThreatModel | None:
        """The only threat model this peer takes part in (None: whatever the server runs);
        ``"active"`` by default for a peer with an identity key or pinned identities."""
        return self._settings.required_threat_model

    @property
    def mode(self) -> str:
        """The round's mode, as announced in the roster ("" before it arrives)."""
        return self._context.mode.name if self._context is not None else ""

    @property
    def phase_timeout(self) -> float:
        """The round's phase timeout (0 before the roster arrives)."""
        return self._context.roster.phase_timeout if self._context is not None else 0.0

    @property
    def session(self) -> bytes:
        return self._input.session if self._input is not None else b""

    @property
    def round(self) -> int:
        return self._input.round if self._input is not None else 0

    @property
    def index(self) -> int:
        """This peer's roster index (-1 before the roster arrives)."""
        return self._context.index if self._context is not None else -1

    def name_of(self, index: int) -> str | None:
        return self._context.name_of(index) if self._context is not None else None

    def neighbour_names(self) -> frozenset[str]:
        """The names of this round's graph neighbours, itself excluded (none before
        the roster): the peers a round of the same roster exchanges shares with."""
        context = self._context
        if context is None:
            return frozenset()
        names = (context.name_of(v) for v in context.neighbours if v != context.index)
        return frozenset(name for name in names if name is not None)

    # ------------------------------------------------------------ dispatch

    def _on_event(self, event: Event) -> list[Action]:
        if isinstance(event, MessageReceived):
            env = event.envelope
            origin = event.origin if event.origin is not None else env.sender
            return self._receive(origin, env, None)
        if isinstance(event, FrameReceived):
            try:
                env = wire.decode(event.frame, self.limits())
            except WireError as exc:
                return self._fault(event.origin, None, DropReason.MALFORMED_MESSAGE,
                                   f"malformed frame: {exc}", authenticated=False)
            return self._receive(event.origin, env, len(event.frame))
        if isinstance(event, TimerExpired):
            return self._fire(timer(event.name))  # a stale timer does nothing
        if isinstance(event, PeerGone):
            return self._fire(PEER_GONE, event.name)
        if isinstance(event, ConnectionFault):
            # The driver closed that connection itself; whoever it was is gone to us.
            record_rejection(self.rejected, self.name,
                             f"connection of {event.origin!r} closed: {event.reason.value}: "
                             f"{event.detail}")
            return self._fire(PEER_GONE, event.origin)
        if isinstance(event, DeliveryFailed):
            return self._fire(DELIVERY_FAILED, event.recipient, event.envelope)
        return []  # PeerConnected: a connection proves nothing until a frame authenticates

    def _fire(self, key: str, *args: Any) -> list[Action]:
        transition = self._phase.EVENTS.get(key)
        if transition is None:
            return []
        return self._run(transition, args)

    def _run(self, transition: Transition, args: tuple[Any, ...]) -> list[Action]:
        phase = self._phase
        actions: list[Action]
        actions, next_phase = getattr(phase, transition.handler)(*args)
        if next_phase.STATE not in transition.next_states:
            raise AssertionError(
                f"{type(phase).__name__}.{transition.handler} moved to {next_phase.STATE}, "
                f"not one of its declared next states {sorted(transition.next_states)}")
        self._enter(next_phase)
        return actions

    def _enter(self, phase: PeerPhase) -> None:
        self._phase = phase
        if self._context is None and phase.context is not None:
            self._context = phase.context
            self._early.fit_round(frame_bytes=phase.context.limits.max_frame_bytes,
                                  fan_in=phase.context.roster.fan_in)
        if isinstance(phase, FinishedPhase):
            self._early.clear()

    def _settle(self) -> list[Action]:
        """After an event: hand buffered frames to the phase that now accepts them, and
        fire the state-triggered transitions (report, forward) until nothing changes."""
        actions: list[Action] = []
        while not self.finished:
            phase = self._phase
            for frame in self._early.release(phase.DEFERS):
                actions += self._receive(frame.origin, frame.envelope, frame.size)
            settle = phase.EVENTS.get(SETTLE)
            if self._phase is phase and settle is not None:
                actions += self._run(settle, ())
            if self._phase is phase:
                return actions
        return actions

    # ------------------------------------------------------------ receiving

    def _receive(self, origin: str, env: Envelope, size: int | None) -> list[Action]:
        if self.finished:
            return []
        actions: list[Action] = []
        authenticated = False
        try:
            self._links.check_route(origin, env)
            if origin != SERVER and env.session == self.session and env.round < self.round:
                return self._stale(origin, env)
            check_round(env, self.session, self.round)
            phase = self._phase
            if env.type in phase.DEFERS:
                return self._defer(origin, env, size)
            transition = phase.ACCEPTS.get(env.type)
            if transition is None:
                raise RemoteProtocolError(f"peer {self.name!r} in state {phase.STATE} cannot "
                                          f"accept {env.type} from {env.sender!r}",
                                          DropReason.UNEXPECTED_MESSAGE)
            argument: object = env.body
            body = env.body
            if isinstance(body, EncryptedShares | EncryptedPartialSum):
                authentic = self._authenticate(env, body.ciphertext)
                authenticated = True
                actions += self._links.bind(origin, authentic.name)
                argument = authentic
            return actions + self._run(transition, (argument,))
        except LocalProtocolError:
            raise
        except (ProtocolError, CryptoError, WireError) as exc:
            return actions + self._fault(origin, env, drop_reason(exc), str(exc),
                                         authenticated=authenticated)

    def _authenticate(self, env: Envelope, ciphertext: bytes) -> AuthenticatedFrame:
        if self._context is None:  # no phase before the roster accepts peer frames
            raise RemoteProtocolError(f"{env.type} before the roster",
                                      DropReason.UNEXPECTED_MESSAGE)
        return self._context.open(env, ciphertext)

    def _stale(self, origin: str, env: Envelope) -> list[Action]:
        """A frame of an earlier round of this session from a peer: ignored. Links
        outlive rounds, so a neighbour that lagged behind (its shares of a round that
        aborted, say) is not an attack on this round, which it cannot touch, and the
        link stays for the rounds to come. More than MAX_STALE_FRAMES from one
        connection is a flood, not lag."""
        self._stale_frames[origin] += 1
        detail = f"{env.type} from {env.sender!r} of round {env.round} ignored: this is " \
            f"round {self.round} (late)"
        if self._stale_frames[origin] == 1:
            self._note(detail)
        if origin and self._stale_frames[origin] > MAX_STALE_FRAMES:
            return [Disconnect(origin, DropReason.TOO_MANY_FRAMES,
                               f"more than {MAX_STALE_FRAMES} frames of earlier rounds")]
        return []

    def _defer(self, origin: str, env: Envelope, size: int | None) -> list[Action]:
        refusal = self._early.hold(origin, env, size)
        if not refusal:
            return []
        detail = f"{env.type} from {env.sender!r} dropped: {refusal}"
        self._note(detail)
        return [Disconnect(origin, DropReason.TOO_MANY_FRAMES, detail)] if origin else []

    # ------------------------------------------------------------ faults

    def _fault(self, origin: str, env: Envelope | None, reason: DropReason, detail: str, *,
               authenticated: bool) -> list[Action]:
        what = f"{env.type} from {env.sender!r}" if env is not None else \
            f"frame from {origin!r}"
        if origin == SERVER:
            if reason is DropReason.WRONG_SESSION:
                # Stale: it cannot speak for this round, so it cannot derail it either.
                self._note(f"{what} ignored: {detail}")
                return []
            return self._server_fault(env, reason, detail)
        text = f"{what} rejected: {detail}"
        self._note(text)
        # A forwarded frame ("" origin) that did not authenticate proves nothing about
        # its claimed sender: nobody is cut off for it.
        culprit = origin or (env.sender if authenticated and env is not None else "")
        return [Disconnect(culprit, reason, text)] if culprit else []

    def _server_fault(self, env: Envelope | None, reason: DropReason,
                      detail: str) -> list[Action]:
        kind = env.type if env is not None else "frame"
        why = f"bad {kind} from the server ({reason.value}): {detail}"
        self._note(why)
        actions, finished = self._phase.abort(why)
        self._enter(finished)
        return [*actions, Disconnect(SERVER, reason, detail)]

    def _note(self, reason: str) -> None:
        record_rejection(self.rejected, self.name, reason)
