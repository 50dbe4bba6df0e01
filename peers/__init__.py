"""asyncio websocket driver for :class:`secagg.protocol.PeerProtocol`."""
