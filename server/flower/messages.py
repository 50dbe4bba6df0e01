"""The server's side of the message format shared with ``peers/flower/messages.py``
(the two packages never import each other; the format is described there): the
record's strings, and the reading of a node's reply, checked and bounded.
"""

from __future__ import annotations

import math

import msgpack

try:
    from flwr.app import ConfigRecord
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError("server.flower needs Flower: pip install 'secagg[flower]'") from exc

from secagg.flower_format import EVENT_FRAME, EVENT_GONE, EVENT_TIMER, RECORD, START, STEP

__all__ = ["EVENT_FRAME", "EVENT_GONE", "EVENT_TIMER", "MAX_TIMERS", "RECORD", "START", "STEP",
           "read_reply"]

MAX_TIMERS = 16
"""Timers one reply may set or cancel (a peer uses two)."""


def read_reply(record: ConfigRecord | None, max_frame: int, max_sends: int
               ) -> tuple[list[tuple[str, bytes]], list[tuple[str, float | None]]]:
    """A node's reply, checked: (recipient, frame) pairs and timer changes."""
    if record is None:
        raise ValueError("no 'secagg' record (is secagg_mod in the ClientApp's mods?)")
    raw_sends, raw_timers = record.get("sends"), record.get("timers")
    if not isinstance(raw_sends, bytes) or not isinstance(raw_timers, bytes):
        raise ValueError("sends and timers must be bytes")
    items = msgpack.unpackb(raw_sends, raw=False, max_array_len=max_sends, max_map_len=0,
                            max_bin_len=max_frame)
    timers = msgpack.unpackb(raw_timers, raw=False, max_array_len=MAX_TIMERS, max_map_len=0)
    sends: list[tuple[str, bytes]] = []
    if not isinstance(items, list) or not isinstance(timers, list):
        raise ValueError("sends and timers must be lists")
    for item in items:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], bytes)):
            raise ValueError("a send is not [recipient, frame]")
        sends.append((item[0], item[1]))
    changes: list[tuple[str, float | None]] = []
    for item in timers:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)
                and len(item[0]) <= 64):
            raise ValueError("a timer is not [name, delay]")
        delay = item[1]
        if delay is not None and (isinstance(delay, bool) or not isinstance(delay, int | float)
                                  or not math.isfinite(delay) or delay < 0):
            raise ValueError(f"a timer delay must be a finite number >= 0, not {delay!r}")
        changes.append((item[0], None if delay is None else float(delay)))
    return sends, changes
