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

from secagg.wire import Envelope

# --------------------------------------------------------------------------
# Events (driver -> protocol)


@dataclass(frozen=True)
class MessageReceived:
    """A decoded, validated frame arrived (from the server or from a peer)."""

    envelope: Envelope


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


Event = MessageReceived | TimerExpired | PeerGone | DeliveryFailed


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
    """Close the connection to ``name``: it misbehaved and is dropped for ``reason``."""

    name: str
    reason: str


@dataclass(frozen=True)
class RoundFinished:
    """The round ended for this party; ``outcome`` says how."""

    outcome: PeerOutcome | ServerOutcome


Action = Send | SetTimer | CancelTimer | Disconnect | RoundFinished


# --------------------------------------------------------------------------
# Outcomes and drop reasons


class DropReason(StrEnum):
    """Why a peer's input is missing from a round, or why it was cut off."""

    NOT_REGISTERED = "not_registered"
    NO_SHARE_REPORT = "no_share_report"
    SHARE_DELIVERY_FAILED = "share_delivery_failed"
    NO_MASKED_INPUT = "no_masked_input"
    SIGNATURE_MISSING = "signature_missing"
    UNMASK_SHARE_MISSING = "unmask_share_missing"
    REFUSED = "refused"
    BAD_MESSAGE = "bad_message"
    DISCONNECTED = "disconnected"


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
    stats: dict[str, Any] = field(default_factory=dict)
