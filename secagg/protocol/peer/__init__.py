"""The peer side of a round: one phase class per state (see ``phase.py``), a context
with what the phases share, and :class:`PeerProtocol`, which only dispatches."""

from secagg.protocol.peer.finished import FORWARD_TIMER, SHARE_TIMER
from secagg.protocol.peer.phase import PeerState, Transition
from secagg.protocol.peer.protocol import PEER_TRANSITIONS, PeerProtocol

__all__ = ["FORWARD_TIMER", "PEER_TRANSITIONS", "SHARE_TIMER", "PeerProtocol", "PeerState",
           "Transition"]
