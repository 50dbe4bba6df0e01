"""Flower client side: ``secagg_mod``, a drop-in for Flower's ``secaggplus_mod``.

::

    app = ClientApp(client_fn=client_fn, mods=[secagg_mod])

with :class:`server.flower.SecAggWorkflow` on the server.

- :mod:`peers.flower.mod`: :class:`SecAggMod` (and :data:`secagg_mod`, one with default
  settings), a third driver of :class:`~secagg.protocol.PeerProtocol`, inside a
  ClientApp.
- :mod:`peers.flower.messages`: the message format shared with ``server/flower/``.
"""

# Flower is an optional extra: each module that needs it raises an ImportError naming
# it (pip install 'secagg[flower]'). Re-exported explicitly (``import X as X``).
from peers.flower.messages import EVENT_FRAME as EVENT_FRAME
from peers.flower.messages import EVENT_GONE as EVENT_GONE
from peers.flower.messages import EVENT_TIMER as EVENT_TIMER
from peers.flower.messages import MAX_EVENTS as MAX_EVENTS
from peers.flower.messages import RECORD as RECORD
from peers.flower.messages import START as START
from peers.flower.messages import STEP as STEP
from peers.flower.mod import LIVE_PEERS as LIVE_PEERS
from peers.flower.mod import STATE_RECORD as STATE_RECORD
from peers.flower.mod import ClientAppCallable as ClientAppCallable
from peers.flower.mod import Mod as Mod
from peers.flower.mod import SecAggMod as SecAggMod
from peers.flower.mod import secagg_mod as secagg_mod
