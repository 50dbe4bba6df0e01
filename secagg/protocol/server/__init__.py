"""The server's side of a round: one phase object per state, a shared context, and a
protocol object that dispatches events to the current phase.

The transition table is data derived from the phases' own declarations::

    SERVER_TRANSITIONS[(state, key)] == (handler name, frozenset of next states)

where ``key`` is a wire message type, ``"timer:phase"`` (the phase deadline) or
``"peer_gone"`` (a departure: a closed connection, a cut-off or a refusal).
A message type without an entry for the current state is an unexpected message.
"""

from secagg.protocol.server.base import (
    PEER_GONE,
    PHASE_TIMER,
    ServerPhase,
    ServerState,
    Transition,
)
from secagg.protocol.server.collect import CollectPhase
from secagg.protocol.server.config import ServerConfig
from secagg.protocol.server.consistency import ConsistencyPhase
from secagg.protocol.server.finished import FinishedPhase
from secagg.protocol.server.protocol import ServerProtocol
from secagg.protocol.server.register import RegisterPhase
from secagg.protocol.server.share import SharePhase
from secagg.protocol.server.unmask import UnmaskPhase

SERVER_PHASES: dict[ServerState, type[ServerPhase]] = {
    phase.STATE: phase for phase in (RegisterPhase, SharePhase, CollectPhase,
                                     ConsistencyPhase, UnmaskPhase, FinishedPhase)
}
"""The phase class of every state after ``start()``."""


def _derive_transitions() -> dict[tuple[ServerState, str], tuple[str, frozenset[ServerState]]]:
    table: dict[tuple[ServerState, str], tuple[str, frozenset[ServerState]]] = {}
    for state, phase in SERVER_PHASES.items():
        declared: dict[str, Transition] = {**phase.ACCEPTS, f"timer:{PHASE_TIMER}": phase.ON_TIMER,
                                           PEER_GONE: phase.ON_PEER_GONE}
        for key, transition in declared.items():
            table[(state, key)] = (transition.handler, transition.next_states)
    return table


SERVER_TRANSITIONS = _derive_transitions()
"""(state, message type | "timer:phase" | "peer_gone") -> (handler, next states)."""

__all__ = [
    "PHASE_TIMER",
    "SERVER_PHASES",
    "SERVER_TRANSITIONS",
    "ServerConfig",
    "ServerProtocol",
    "ServerState",
]
