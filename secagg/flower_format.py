"""The strings and codes of the Flower message format, shared by ``peers/flower`` and
``server/flower`` (which never import each other). No Flower import: these are
plain values, described in ``peers/flower/messages.py``."""

RECORD = "secagg"
"""The config record of every message of a round, both ways."""
START, STEP = "start", "step"
EVENT_FRAME, EVENT_TIMER, EVENT_GONE = 0, 1, 2
