"""asyncio websocket driver for :class:`secagg.protocol.ServerProtocol`: the coordinator."""

from server.coordinator import Coordinator, RoundResult

__all__ = ["Coordinator", "RoundResult"]
