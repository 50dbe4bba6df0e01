"""asyncio websocket driver for :class:`secagg.protocol.PeerProtocol`: the embeddable peer."""

from peers.peer import Peer, PeerError, ProgressCallback

__all__ = ["Peer", "PeerError", "ProgressCallback"]
