"""Snapshot a peer's round to bytes and restore it: record and replay.

A driver that cannot keep a :class:`~secagg.protocol.PeerProtocol` in memory between
two messages (Flower may run each message of a node in a fresh process, and keeps a
node's state only as records in ``context.state``) keeps a :class:`RecordedPeer`
instead and stores :meth:`RecordedPeer.snapshot` between messages.

Nothing of the peer's internals is serialised. The protocol is deterministic given
its randomness and its events: the snapshot is the constructor's settings, a fresh
256-bit seed for the peer's random source (an AES-CTR keystream), the arguments of
``start`` (session, round, input vector, weight) and every event handled so far, in
order. :meth:`RecordedPeer.restore` builds the same peer from the same seed, starts
it and handles every event again, discarding the actions: they were carried out
when the events first arrived. The secrets in a snapshot (the seed, which rebuilds
the round's keys, and the input) are those the live peer holds anyway; a driver
deletes the snapshot when the round ends.

The format is msgpack (never pickle), versioned, and bounded when read.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import msgpack
import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from secagg import wire
from secagg.crypto.signing import SigningKey
from secagg.errors import SecAggError, WireError
from secagg.graph import make_graph
from secagg.protocol.common import MODES, Mode
from secagg.protocol.errors import DropReason
from secagg.protocol.events import (
    Action,
    ConnectionFault,
    DeliveryFailed,
    Event,
    FrameReceived,
    MessageReceived,
    PeerConnected,
    PeerGone,
    TimerExpired,
)
from secagg.protocol.peer.context import GraphFactory
from secagg.protocol.peer.protocol import PeerProtocol

SNAPSHOT_VERSION = 1
SEED_BYTES = 32
MAX_SNAPSHOT_BYTES = 1 << 31
"""What :meth:`RecordedPeer.restore` reads at most (the input vector dominates)."""
MAX_EVENTS = 1 << 20
"""Events one snapshot may hold: a round of any size needs far fewer (a bound, so that a
corrupt record cannot make a restore run without end)."""

_FRAME, _TIMER, _GONE, _DELIVERY_FAILED, _FAULT, _CONNECTED, _MESSAGE = range(7)
_DROP_REASONS = {reason.value: reason for reason in DropReason}


class SnapshotError(SecAggError, ValueError):
    """A snapshot cannot be read (corrupt, of another version, or for other settings)."""


class SeededRandom:
    """A CSPRNG for one round: the AES-256-CTR keystream under a 256-bit secret seed.

    It stands in for ``os.urandom`` so that the peer's randomness can be replayed;
    a fresh seed from ``os.urandom`` per round keeps it as unpredictable.
    """

    def __init__(self, seed: bytes) -> None:
        if len(seed) != SEED_BYTES:
            raise ValueError(f"the seed must be {SEED_BYTES} bytes, got {len(seed)}")
        self._stream = Cipher(algorithms.AES(seed), modes.CTR(b"\0" * 16)).encryptor()

    def __call__(self, size: int) -> bytes:
        return self._stream.update(bytes(size))


class _Replaying(logging.Filter):
    """Silences the peer's log records on the thread that is replaying: each was
    logged when its event first arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: set[int] = set()
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread not in self.threads

    @contextmanager
    def active(self) -> Iterator[None]:
        ident = threading.get_ident()
        with self._lock:
            self.threads.add(ident)
        try:
            yield
        finally:
            with self._lock:
                self.threads.discard(ident)


_REPLAYING = _Replaying()
logging.getLogger("secagg.peer").addFilter(_REPLAYING)


def _encode_event(event: Event) -> list[Any]:
    if isinstance(event, FrameReceived):
        return [_FRAME, event.origin, event.frame]
    if isinstance(event, TimerExpired):
        return [_TIMER, event.name]
    if isinstance(event, PeerGone):
        return [_GONE, event.name]
    if isinstance(event, DeliveryFailed):
        return [_DELIVERY_FAILED, event.recipient, wire.encode(event.envelope)]
    if isinstance(event, ConnectionFault):
        return [_FAULT, event.origin, event.reason.value, event.detail]
    if isinstance(event, PeerConnected):
        return [_CONNECTED, event.connection]
    if isinstance(event, MessageReceived):
        return [_MESSAGE, event.origin, wire.encode(event.envelope)]
    raise TypeError(f"not a protocol event: {event!r}")


def _decode_event(item: Any) -> Event:
    if not isinstance(item, list) or not item or not isinstance(item[0], int):
        raise SnapshotError("an event is not a tagged list")
    tag, args = item[0], item[1:]
    try:
        if tag == _FRAME:
            origin, frame = args
            return FrameReceived(_text(origin), _bytes(frame))
        if tag == _TIMER:
            (name,) = args
            return TimerExpired(_text(name))
        if tag == _GONE:
            (name,) = args
            return PeerGone(_text(name))
        if tag == _DELIVERY_FAILED:
            recipient, frame = args
            return DeliveryFailed(_text(recipient), wire.decode(_bytes(frame)))
        if tag == _FAULT:
            origin, reason, detail = args
            return ConnectionFault(_text(origin), _DROP_REASONS[reason], _text(detail))
        if tag == _CONNECTED:
            (connection,) = args
            return PeerConnected(_text(connection))
        if tag == _MESSAGE:
            origin, frame = args
            return MessageReceived(wire.decode(_bytes(frame)),
                                   None if origin is None else _text(origin))
    except (ValueError, KeyError, WireError) as exc:
        raise SnapshotError(f"an event of kind {tag} is malformed: {exc}") from None
    raise SnapshotError(f"unknown event kind {tag}")


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise SnapshotError(f"expected text, got {type(value).__name__}")
    return value


def _bytes(value: Any) -> bytes:
    if not isinstance(value, bytes):
        raise SnapshotError(f"expected bytes, got {type(value).__name__}")
    return value


class RecordedPeer:
    """A :class:`PeerProtocol` that records what it needs to be rebuilt from bytes.

    Use it exactly as the protocol: ``start`` once, then ``handle`` every event; the
    live protocol object is :attr:`protocol`. ``identity``, ``trusted_identities``,
    ``graph_factory`` and ``mask_generator`` are not part of a snapshot (a long-term
    signing key does not belong in per-round state): pass the same to ``restore``.
    """

    def __init__(self, name: str, *, address: str = "", seed: bytes | None = None,
                 identity: SigningKey | None = None,
                 trusted_identities: Mapping[str, bytes] | None = None,
                 graph_factory: GraphFactory = make_graph,  # type: ignore[assignment]
                 mode: Mode | None = None,
                 min_noise_multiplier: float | None = None) -> None:
        self.seed = os.urandom(SEED_BYTES) if seed is None else seed
        self._mode = mode
        self._min_noise_multiplier = min_noise_multiplier
        self._identity_key = identity.public_bytes if identity is not None else b""
        self.protocol = PeerProtocol(
            name, address=address, random_bytes=SeededRandom(self.seed), identity=identity,
            trusted_identities=trusted_identities, graph_factory=graph_factory, mode=mode,
            min_noise_multiplier=min_noise_multiplier)
        self._start: tuple[bytes, int, np.ndarray, float] | None = None
        self._events: list[list[Any]] = []

    @property
    def events(self) -> int:
        """How many events were handled (and recorded) so far."""
        return len(self._events)

    def start(self, session: bytes, round: int, vector: np.ndarray,
              weight: float = 1.0) -> list[Action]:
        actions = self.protocol.start(session, round, vector, weight)
        # Recorded after start accepted it: float64 as the protocol holds it.
        self._start = (session, round, np.asarray(vector, dtype=np.float64).copy(),
                       float(weight))
        return actions

    def handle(self, event: Event) -> list[Action]:
        encoded = _encode_event(event)  # TypeError for a non-event, before anything changes
        actions = self.protocol.handle(event)
        self._events.append(encoded)
        return actions

    def snapshot(self) -> bytes:
        """Everything needed to rebuild this peer as it is now, as msgpack bytes."""
        if self._start is None:
            raise SnapshotError("the peer has not started a round: nothing to snapshot")
        session, round, vector, weight = self._start
        protocol = self.protocol
        narrow = _fits_float32(vector)
        packed: bytes = msgpack.packb({
            "v": SNAPSHOT_VERSION,
            "name": protocol.name,
            "address": protocol.address,
            "seed": self.seed,
            "mode": self._mode,
            "min_noise": self._min_noise_multiplier,
            "identity_key": self._identity_key,
            "session": session,
            "round": round,
            "vector": vector.astype("<f4" if narrow else "<f8").tobytes(),
            "f4": narrow,
            "weight": weight,
            "events": self._events,
        }, use_bin_type=True)
        return packed

    @classmethod
    def restore(cls, data: bytes, *, identity: SigningKey | None = None,
                trusted_identities: Mapping[str, bytes] | None = None,
                graph_factory: GraphFactory = make_graph,  # type: ignore[assignment]
                ) -> RecordedPeer:
        """Rebuild the peer ``data`` describes: same seed, same start, same events.

        SnapshotError if ``data`` is not a readable snapshot, or if ``identity`` is not
        the one the peer was built with.
        """
        fields = _read(data)
        own_key = identity.public_bytes if identity is not None else b""
        if own_key != fields["identity_key"]:
            raise SnapshotError("the snapshot was taken with another identity key")
        peer = cls(fields["name"], address=fields["address"], seed=fields["seed"],
                   identity=identity, trusted_identities=trusted_identities,
                   graph_factory=graph_factory, mode=fields["mode"],
                   min_noise_multiplier=fields["min_noise"])
        events = [_decode_event(item) for item in fields["events"]]
        vector = np.frombuffer(fields["vector"], dtype="<f4" if fields["f4"] else "<f8"
                               ).astype(np.float64)
        with _REPLAYING.active():
            try:
                peer.start(fields["session"], fields["round"], vector, fields["weight"])
                for event in events:
                    peer.handle(event)
            except (ValueError, SecAggError) as exc:
                raise SnapshotError(f"the snapshot does not replay: {exc}") from exc
        return peer


def _fits_float32(vector: np.ndarray) -> bool:
    """Whether float32 holds ``vector`` exactly (a float32 model: half the bytes)."""
    narrow = vector.astype(np.float32)
    return bool(np.array_equal(narrow.astype(np.float64), vector))


def _read(data: bytes) -> dict[str, Any]:
    if not isinstance(data, bytes) or len(data) > MAX_SNAPSHOT_BYTES:
        raise SnapshotError("a snapshot is at most 2 GiB of bytes")
    try:
        fields = msgpack.unpackb(data, raw=False, strict_map_key=True,
                                 max_array_len=MAX_EVENTS, max_map_len=64)
    except (ValueError, msgpack.UnpackException) as exc:
        raise SnapshotError(f"not a snapshot: {exc}") from None
    if not isinstance(fields, dict) or fields.get("v") != SNAPSHOT_VERSION:
        raise SnapshotError(f"not a snapshot of version {SNAPSHOT_VERSION}")
    expected: dict[str, tuple[type, ...]] = {
        "name": (str,), "address": (str,), "seed": (bytes,), "mode": (str, type(None)),
        "min_noise": (float, int, type(None)), "identity_key": (bytes,), "session": (bytes,),
        "round": (int,), "vector": (bytes,), "f4": (bool,), "weight": (float, int),
        "events": (list,)}
    for key, types in expected.items():
        value = fields.get(key)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise SnapshotError(f"snapshot field {key!r} is missing or of the wrong type")
    if len(fields["seed"]) != SEED_BYTES or len(fields["vector"]) % (4 if fields["f4"] else 8):
        raise SnapshotError("snapshot seed or vector has the wrong length")
    if fields["mode"] is not None and fields["mode"] not in MODES:
        raise SnapshotError(f"unknown mode {fields['mode']!r}")
    return fields
