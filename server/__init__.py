"""asyncio websocket driver for :class:`secagg.protocol.ServerProtocol`."""
