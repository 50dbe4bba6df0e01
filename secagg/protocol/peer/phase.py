"""The peer's states and what every phase class declares about itself.

As in fcp's secagg client, each state of a round is one class whose handlers
return the next state; as in h11's ``_state.py``, what a state accepts and where
it may go next is data: each phase class declares

- ``ACCEPTS``: message type -> :class:`Transition` (handler name, possible next states);
- ``DEFERS``: peer message types that arrived early and wait in the protocol's
  bounded buffer until a later phase accepts them;
- ``EVENTS``: the other events it reacts to (``timer:<name>``, ``peer_gone``,
  ``delivery_failed``) and ``settle``, the state-triggered transition the
  dispatcher fires after every event (h11's ``_fire_state_triggered_transitions``):
  "every awaited share is in: report", "every child's sum is in: forward".

The dispatcher (``protocol.py``) looks the event up, calls the handler, and raises
AssertionError if the handler returns a phase whose state it did not declare.
``PEER_TRANSITIONS`` is derived from these declarations and nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import TYPE_CHECKING, ClassVar, NamedTuple

from secagg.protocol.events import Action, PeerOutcome

if TYPE_CHECKING:
    from secagg.protocol.peer.context import RoundContext


class PeerState(StrEnum):
    IDLE = "idle"
    ADVERTISED = "advertised"  # keys sent, waiting for the roster
    SHARING = "sharing"  # shares sent, collecting the neighbours' shares
    REPORTED = "reported"  # share report sent, waiting for U2 and the tree
    MASKING = "masking"  # own payload computed; collecting children's partial sums
    FORWARDED = "forwarded"  # partial sum sent up (or held, waiting for a new root)
    SIGNED = "signed"  # R3 signature sent (active threat model)
    UNMASKED = "unmasked"  # unmasking shares sent, waiting for the outcome
    FINISHED = "finished"


class Transition(NamedTuple):
    """What happens on one event in one state: the handler, and where it may lead."""

    handler: str
    next_states: frozenset[PeerState]


def to(handler: str, *next_states: PeerState) -> Transition:
    return Transition(handler, frozenset(next_states))


DEFER = "defer"
"""The handler name of deferred message types in the derived table: the dispatcher
buffers the frame (it is not a method of the phase)."""
SETTLE = "settle"
PEER_GONE = "peer_gone"
DELIVERY_FAILED = "delivery_failed"


def timer(name: str) -> str:
    """The ``EVENTS`` key of timer ``name``."""
    return f"timer:{name}"


Step = tuple[list[Action], "PeerPhase"]
"""What a handler returns: the actions to carry out, and the phase to be in next
(``self`` to stay)."""


class PeerPhase:
    """One state of a peer's round. Subclasses fill in the class-level tables."""

    STATE: ClassVar[PeerState]
    ACCEPTS: ClassVar[Mapping[str, Transition]] = {}
    DEFERS: ClassVar[frozenset[str]] = frozenset()
    EVENTS: ClassVar[Mapping[str, Transition]] = {}

    @property
    def context(self) -> RoundContext | None:
        """The round's context, once the roster has been accepted."""
        return None

    @property
    def outcome(self) -> PeerOutcome | None:
        return None

    def abort(self, reason: str) -> Step:
        """Leave the round (a live phase finishes it; others have nothing to end)."""
        return [], self

    @classmethod
    def transitions(cls) -> dict[tuple[PeerState, str], Transition]:
        """This phase's rows of the peer's transition table."""
        rows = {(cls.STATE, key): transition for key, transition in cls.ACCEPTS.items()}
        rows.update({(cls.STATE, key): to(DEFER, cls.STATE) for key in cls.DEFERS})
        rows.update({(cls.STATE, key): transition for key, transition in cls.EVENTS.items()})
        return rows
