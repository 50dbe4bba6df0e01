"""Events that drive a protocol object, and the actions it asks its driver to take.

A protocol object is a pure state machine: a driver (the asyncio peer, the
coordinator service, the in-memory simulator) feeds it :data:`Event` values and
carries out the :data:`Action` values it returns. Time, sockets and failures
enter only as events, which is what makes every run reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np

from secagg.protocol.errors import DropReason as DropReason
from secagg.wire import Envelope

# --------------------------------------------------------------------------
# Events (driver -> protocol)


@dataclass(frozen=True)
class MessageReceived:
    """A decoded, validated frame arrived (from the server or from a peer).

    ``origin`` is as for :class:`FrameReceived`; ``None`` (tests, the simulator)
    means the connection is known to belong to ``envelope.sender``.
    """

    envelope: Envelope
    origin: str | None = None


@dataclass(frozen=True)
class FrameReceived:
    """Raw bytes arrived; the protocol decodes them with its own limits.

    ``origin`` is the name the driver has bound the connection to (``wire.SERVER``
    for a peer's coordinator link, a peer name once a link is authenticated), a
    driver token (``#1``, ``#2``, ...) for a connection nobody has yet proven to
    own, or ``""`` for a frame the coordinator forwarded (its AEAD authenticates
    the sender; there is no connection to bind).
    """

    origin: str
    frame: bytes


@dataclass(frozen=True)
class TimerExpired:
    """A timer set with :class:`SetTimer` fired."""

    name: str


@dataclass(frozen=True)
class PeerGone:
    """The connection to ``name`` closed: it will send nothing more this round."""

    name: str


@dataclass(frozen=True)
class DeliveryFailed:
    """The driver could not deliver ``envelope`` to ``recipient`` (peer unreachable)."""

    recipient: str
    envelope: Envelope


@dataclass(frozen=True)
class PeerConnected:
    """A connection opened; ``connection`` is the driver's token for it (``#...``)."""

    connection: str


@dataclass(frozen=True)
class ConnectionFault:
    """The driver cut the connection of ``origin`` off for a fault it detected itself
    (a text frame, a frame over the size limit, a reader that does not read): the
    protocol records ``reason`` for it and goes on as if it had left."""

    origin: str
    reason: DropReason
    detail: str


Event = (MessageReceived | FrameReceived | TimerExpired | PeerGone | DeliveryFailed
         | PeerConnected | ConnectionFault)


# --------------------------------------------------------------------------
# Actions (protocol -> driver)


@dataclass(frozen=True)
class Send:
    """Deliver ``envelope`` to ``recipient`` (a peer name, or ``wire.SERVER``).

    ``address`` is the recipient's advertised listener for peer-to-peer frames
    (empty for the server, or for a peer reachable only through the server).
    """

    recipient: str
    envelope: Envelope
    address: str = ""


@dataclass(frozen=True)
class SetTimer:
    """Deliver ``TimerExpired(name)`` after ``delay`` seconds (replacing any pending one)."""

    name: str
    delay: float


@dataclass(frozen=True)
class CancelTimer:
    name: str


@dataclass(frozen=True)
class Disconnect:
    """Close the connection to ``name``: it misbehaved and is dropped for ``reason``.

    ``detail`` is the human-readable cause (for the log and the close frame).
    """

    name: str
    reason: DropReason
    detail: str = ""


@dataclass(frozen=True)
class Bind:
    """The connection ``connection`` (a driver token) belongs to peer ``name`` from now
    on: it registered (server side) or a frame from it authenticated (peer side)."""

    connection: str
    name: str


def is_connection_token(name: str) -> bool:
    """Driver tokens for connections nobody has proven to own start with ``#``, which
    no peer name may contain."""
    return name.startswith("#")


@dataclass(frozen=True)
class RoundFinished:
    """The round ended for this party; ``outcome`` says how."""

    outcome: PeerOutcome | ServerOutcome


Action = Send | SetTimer | CancelTimer | Disconnect | Bind | RoundFinished


# --------------------------------------------------------------------------
# Outcomes and drop reasons


class Phase(StrEnum):
    """The phases of a round, in order (DESIGN section 2)."""

    ADVERTISE_KEYS = "advertise_keys"
    SHARE_KEYS = "share_keys"
    MASKED_INPUT = "masked_input"
    CONSISTENCY_CHECK = "consistency_check"
    UNMASKING = "unmasking"


@dataclass(frozen=True)
class PeerOutcome:
    """How a round ended, as one peer saw it."""

    status: str  # "ok" | "aborted" | "excluded" | "rejected"
    round: int
    contributors: tuple[str, ...] = ()
    """The contributors' ids (empty for rounds above wire.OUTCOME_LIST_LIMIT)."""
    reason: str = ""
    contributor_count: int = 0
    included: bool = False
    """Whether this peer's own input is in the aggregate."""
    clipped: int = 0
    """How many of this peer's own coordinates were clipped to [-clip, clip] (in a DP
    round: 1 if the input's L2 norm was clipped, else 0)."""


@dataclass(frozen=True)
class ServerOutcome:
    """The result of a round at the server: the aggregate and who is in it."""

    status: str  # "ok" | "aborted"
    round: int
    aggregate: np.ndarray | None
    contributors: tuple[str, ...]
    dropped: dict[str, str]
    threshold: int
    reason: str = ""
    total_weight: float | None = None
    """Weighted rounds: the sum of the contributors' weights (``aggregate`` is Σ w·x)."""
    stats: dict[str, Any] = field(default_factory=dict)
    clipped: int | None = None
    """How many input coordinates the contributors clipped to [-clip, clip], summed
    securely (None in rounds that do not count them, e.g. with distributed DP)."""

    @property
    def mean(self) -> np.ndarray | None:
        """The weighted mean Σ w·x / Σ w of a weighted round (else the aggregate)."""
        if self.aggregate is None or self.total_weight is None:
            return self.aggregate
        mean: np.ndarray = self.aggregate / self.total_weight
        return mean
