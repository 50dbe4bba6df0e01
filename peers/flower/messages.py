"""The message format shared with ``server/flower/`` (the two packages never import
each other), and its writing and reading on this side, checked and bounded.

The ``RECORD`` config record with ``stage`` "start" (``notice``, ``name``,
``max_weight``, ``weight_key``) or "step" (``session``, ``round``, ``events``:
msgpack list of ``[0, from_server, frame]``, ``[1, timer]``, ``[2, gone peer]``);
the reply's ``RECORD`` has ``sends`` (msgpack list of ``[recipient, frame]``),
``timers`` (``[name, delay or None]``), ``state`` and ``status``.
"""

from __future__ import annotations

from typing import Any

import msgpack

try:
    from flwr.app import ConfigRecord
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError("peers.flower needs Flower: pip install 'secagg[flower]'") from exc

from secagg import wire
from secagg.flower_format import EVENT_FRAME, EVENT_GONE, EVENT_TIMER, RECORD, START, STEP
from secagg.protocol.events import Event, FrameReceived, PeerGone, TimerExpired
from secagg.wire import SERVER, Envelope, Limits, RoundOpen

__all__ = ["EVENT_FRAME", "EVENT_GONE", "EVENT_TIMER", "MAX_EVENTS", "RECORD", "START", "STEP",
           "read_events", "read_start", "reply_record"]

MAX_EVENTS = 1 << 16
"""Events one server message may carry (a round needs a few per roster peer)."""


def reply_record(sends: list[list[Any]], timers: list[list[Any]], state: str,
                 status: str) -> ConfigRecord:
    return ConfigRecord({"sends": msgpack.packb(sends, use_bin_type=True),
                         "timers": msgpack.packb(timers, use_bin_type=True),
                         "state": state, "status": status})


def read_start(record: ConfigRecord) -> tuple[str, Envelope, RoundOpen, float, str]:
    name, frame = record.get("name"), record.get("notice")
    max_weight, weight_key = record.get("max_weight"), record.get("weight_key")
    if not isinstance(name, str) or not isinstance(frame, bytes):
        raise ValueError("the start record needs a name and a notice")
    wire.validate_names([name])
    if not isinstance(max_weight, float) or not isinstance(weight_key, str):
        raise ValueError("the start record needs max_weight and weight_key")
    notice = wire.decode(frame, Limits(max_frame_bytes=64 << 10))
    if notice.sender != SERVER or not isinstance(notice.body, RoundOpen):
        raise ValueError(f"the notice is a {notice.type} from {notice.sender!r}, not the "
                         "server's round_open")
    return name, notice, notice.body, max_weight, weight_key


def read_events(data: Any) -> list[Event]:
    if not isinstance(data, bytes):
        raise TypeError("the step carries no events")
    items = msgpack.unpackb(data, raw=False, max_array_len=MAX_EVENTS, max_map_len=0)
    if not isinstance(items, list):
        raise ValueError("events are not a list")
    events: list[Event] = []
    for item in items:
        if not isinstance(item, list) or len(item) < 2:
            raise ValueError("an event is not a tagged list")
        kind = item[0]
        if kind == EVENT_FRAME and len(item) == 3 and isinstance(item[1], bool) \
                and isinstance(item[2], bytes):
            # A frame the server forwarded for a peer has no origin: its AEAD speaks.
            events.append(FrameReceived(SERVER if item[1] else "", item[2]))
        elif kind == EVENT_TIMER and len(item) == 2 and isinstance(item[1], str):
            events.append(TimerExpired(item[1]))
        elif kind == EVENT_GONE and len(item) == 2 and isinstance(item[1], str):
            events.append(PeerGone(item[1]))
        else:
            raise ValueError(f"malformed event of kind {str(kind)[:20]!r}")
    return events
