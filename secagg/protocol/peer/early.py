"""Peer frames that arrive before the phase that accepts them, held in bounded memory.

A neighbour that got the roster first sends its shares before ours arrives; a leaf
that got its MaskingStart first sends its partial sum before ours does. Such frames
cannot even be authenticated yet (the sender's keys come with the roster or the
tree), so anyone able to open a connection could fill this buffer: it is bounded
in frames and bytes, in total and per source (a connection, or the claimed sender
of a frame the coordinator forwarded). Each frame keeps its origin, so that the
connection it came on is bound to its sender only once it authenticates.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from secagg.wire import EncryptedPartialSum, EncryptedShares, Envelope

MAX_FRAMES = 256
MAX_BYTES = 64 << 20
MAX_FRAMES_PER_SOURCE = 32
MAX_BYTES_PER_SOURCE = 16 << 20


@dataclass(frozen=True)
class EarlyFrame:
    origin: str
    """Where it came from (``FrameReceived.origin``): a peer, a connection token, or ""."""
    envelope: Envelope
    size: int


class EarlyFrames:
    """A bounded FIFO of early frames, released by message type."""

    def __init__(self) -> None:
        self.max_bytes = MAX_BYTES
        self.max_bytes_per_source = MAX_BYTES_PER_SOURCE
        self._frames: list[tuple[str, EarlyFrame]] = []
        """(source, frame) in arrival order."""
        self._bytes = 0
        self._frames_of: Counter[str] = Counter()
        self._bytes_of: Counter[str] = Counter()
        self._types: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._frames)

    def fit_round(self, *, frame_bytes: int, fan_in: int) -> None:
        """Once the round is known, make room for what it may legitimately send early:
        a partial sum from each child and from the orphans of a dead one."""
        self.max_bytes = max(MAX_BYTES, (2 * fan_in + 4) * frame_bytes)
        self.max_bytes_per_source = max(MAX_BYTES_PER_SOURCE, 2 * frame_bytes)

    def hold(self, origin: str, env: Envelope, size: int | None) -> str:
        """Keep a frame from ``origin`` (``size`` bytes on the wire; None if it came
        decoded). If that would exceed a bound, drop everything from its source
        instead and say why; "" if kept."""
        if size is None:  # tests and the simulator hand over envelopes: the sealed bytes
            body = env.body
            sealed = body.ciphertext if isinstance(body, EncryptedShares |
                                                   EncryptedPartialSum) else b""
            size = len(sealed) + 256
        # Frames the coordinator forwarded all share its link: count them by claimed sender.
        source = origin or f"forwarded:{env.sender}"
        refusal = self.add(source, EarlyFrame(origin, env, size))
        if refusal:
            self.drop_source(source)
        return refusal

    def add(self, source: str, frame: EarlyFrame) -> str:
        """Keep ``frame``; or, if a bound would be exceeded, say which ("" if kept)."""
        if len(self._frames) >= MAX_FRAMES or self._bytes + frame.size > self.max_bytes:
            return (f"the early-frame buffer is full ({len(self._frames)} frames, "
                    f"{self._bytes} bytes)")
        if self._frames_of[source] >= MAX_FRAMES_PER_SOURCE or \
                self._bytes_of[source] + frame.size > self.max_bytes_per_source:
            return (f"{source!r} already has {self._frames_of[source]} early frames "
                    f"({self._bytes_of[source]} bytes) waiting")
        self._frames.append((source, frame))
        self._bytes += frame.size
        self._frames_of[source] += 1
        self._bytes_of[source] += frame.size
        self._types[frame.envelope.type] += 1
        return ""

    def release(self, deferred: frozenset[str]) -> list[EarlyFrame]:
        """Remove and return, in arrival order, the frames whose type is not ``deferred``."""
        if all(kind in deferred for kind in self._types):
            return []
        ready = [item for item in self._frames if item[1].envelope.type not in deferred]
        self._frames = [item for item in self._frames if item[1].envelope.type in deferred]
        for source, frame in ready:
            self._forget(source, frame)
        return [frame for _, frame in ready]

    def drop_source(self, source: str) -> None:
        """Discard everything ``source`` sent (it overflowed its share of the buffer)."""
        dropped = [item for item in self._frames if item[0] == source]
        self._frames = [item for item in self._frames if item[0] != source]
        for item in dropped:
            self._forget(*item)

    def clear(self) -> None:
        self._frames = []
        self._bytes = 0
        self._frames_of.clear()
        self._bytes_of.clear()
        self._types.clear()

    def _forget(self, source: str, frame: EarlyFrame) -> None:
        self._bytes -= frame.size
        self._frames_of[source] -= 1
        self._bytes_of[source] -= frame.size
        self._types[frame.envelope.type] -= 1
        if not self._frames_of[source]:
            del self._frames_of[source], self._bytes_of[source]
        if not self._types[frame.envelope.type]:
            del self._types[frame.envelope.type]
