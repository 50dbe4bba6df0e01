"""Flower server side: ``SecAggWorkflow``, a drop-in for Flower's ``SecAggPlusWorkflow``.

::

    workflow = DefaultWorkflow(fit_workflow=SecAggWorkflow(threshold=0.6))

with :data:`peers.flower.secagg_mod` on the clients. The workflow is a third driver
of :class:`~secagg.protocol.ServerProtocol`, over Flower's Grid instead of
websockets.

- :mod:`server.flower.settings`: :class:`SecAggSettings` and their mapping from
  ``SecAggPlusWorkflow``'s arguments (:class:`UnsupportedSetting`).
- :mod:`server.flower.grid`: :class:`GridRound`, one round driven step by step over
  the Grid, and its :class:`RoundReport`.
- :mod:`server.flower.messages`: the server's side of the message format, which is
  described in ``peers/flower/messages.py``.
- :mod:`server.flower.workflow`: :class:`SecAggWorkflow` (the legacy FedAvg path) and
  :func:`secure_sum` (the Message API).
"""

# Flower is an optional extra: each module that needs it raises an ImportError naming
# it (pip install 'secagg[flower]'). The module constants are re-exported
# explicitly (``import X as X``), outside ``__all__`` as before.
from server.flower.grid import MAX_PHASE_STEPS as MAX_PHASE_STEPS
from server.flower.grid import GridRound, RoundReport, node_name
from server.flower.messages import EVENT_FRAME as EVENT_FRAME
from server.flower.messages import EVENT_GONE as EVENT_GONE
from server.flower.messages import EVENT_TIMER as EVENT_TIMER
from server.flower.messages import MAX_TIMERS as MAX_TIMERS
from server.flower.messages import RECORD as RECORD
from server.flower.messages import START as START
from server.flower.messages import STEP as STEP
from server.flower.settings import DEFAULT_WEIGHT_KEY as DEFAULT_WEIGHT_KEY
from server.flower.settings import SecAggSettings, UnsupportedSetting
from server.flower.workflow import SecAggWorkflow, SecureSum, secure_sum

__all__ = ["GridRound", "RoundReport", "SecAggSettings", "SecAggWorkflow",
           "SecureSum", "UnsupportedSetting", "node_name", "secure_sum"]
