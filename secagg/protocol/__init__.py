"""The sans-I/O protocol: peer and server state machines, their events and actions."""

from secagg.protocol.events import (
    Action,
    CancelTimer,
    DeliveryFailed,
    Disconnect,
    DropReason,
    Event,
    MessageReceived,
    PeerGone,
    PeerOutcome,
    Phase,
    RoundFinished,
    Send,
    ServerOutcome,
    SetTimer,
    TimerExpired,
)
from secagg.protocol.peer import PEER_TRANSITIONS, PeerProtocol, PeerState
from secagg.protocol.server import SERVER_TRANSITIONS, ServerConfig, ServerProtocol, ServerState

__all__ = [
    "PEER_TRANSITIONS",
    "SERVER_TRANSITIONS",
    "Action",
    "CancelTimer",
    "DeliveryFailed",
    "Disconnect",
    "DropReason",
    "Event",
    "MessageReceived",
    "PeerGone",
    "PeerOutcome",
    "PeerProtocol",
    "PeerState",
    "Phase",
    "RoundFinished",
    "Send",
    "ServerConfig",
    "ServerOutcome",
    "ServerProtocol",
    "ServerState",
    "SetTimer",
    "TimerExpired",
]
