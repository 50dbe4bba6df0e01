"""The sans-I/O protocol: peer and server state machines, their events and actions."""

from secagg.protocol.errors import DropReason, LocalProtocolError, RemoteProtocolError
from secagg.protocol.events import (
    Action,
    Bind,
    CancelTimer,
    DeliveryFailed,
    Disconnect,
    Event,
    FrameReceived,
    MessageReceived,
    PeerConnected,
    PeerGone,
    PeerOutcome,
    Phase,
    RoundFinished,
    Send,
    ServerOutcome,
    SetTimer,
    TimerExpired,
)
from secagg.protocol.modes import ROUND_MODES, RoundMode, round_mode
from secagg.protocol.peer import PEER_TRANSITIONS, PeerProtocol, PeerState
from secagg.protocol.server import SERVER_TRANSITIONS, ServerConfig, ServerProtocol, ServerState

__all__ = [
    "PEER_TRANSITIONS",
    "ROUND_MODES",
    "SERVER_TRANSITIONS",
    "Action",
    "Bind",
    "CancelTimer",
    "DeliveryFailed",
    "Disconnect",
    "DropReason",
    "Event",
    "FrameReceived",
    "LocalProtocolError",
    "MessageReceived",
    "PeerConnected",
    "PeerGone",
    "PeerOutcome",
    "PeerProtocol",
    "PeerState",
    "Phase",
    "RemoteProtocolError",
    "RoundFinished",
    "RoundMode",
    "Send",
    "ServerConfig",
    "ServerOutcome",
    "ServerProtocol",
    "ServerState",
    "SetTimer",
    "TimerExpired",
    "round_mode",
]
