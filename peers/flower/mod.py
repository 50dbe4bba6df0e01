"""The client mod: :class:`SecAggMod`, and :data:`secagg_mod` with default settings.

The mod is a third driver of :class:`~secagg.protocol.PeerProtocol`: every train
message of a round carries the frames addressed to this node (from the server, and
from other peers, relayed sealed by the Flower server), the reply carries the frames
this node sends. The first message carries the round's notice and the instructions
for the user's ``fit``, which runs once; its parameters are flattened into one vector
and its ``num_examples`` (or, with the Message API, the chosen metric) is the weight.

Flower may run each message of a node in a fresh process and keeps a node's state
only as records in ``context.state``: the peer lives there as a snapshot
(:mod:`secagg.protocol.peer.snapshot`, msgpack), deleted when the round ends. A
process that served the node's previous message keeps the live peer too (bounded),
so the snapshot is replayed only when the message lands elsewhere.

Timers: the server is the only clock. The reply reports the timers this peer set;
the workflow fires them (in deadline order) when nothing else can move the round.

The message format is in :mod:`peers.flower.messages`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

try:
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.app.message_type import MessageType
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError("peers.flower needs Flower: pip install 'secagg[flower]'") from exc

from peers.flower.messages import RECORD, START, STEP, read_events, read_start, reply_record
from secagg import wire
from secagg.crypto.signing import SigningKey
from secagg.driver import dispatch
from secagg.errors import WireError
from secagg.protocol.common import Mode
from secagg.protocol.errors import DropReason
from secagg.protocol.events import (
    Action,
    Bind,
    CancelTimer,
    Disconnect,
    PeerGone,
    RoundFinished,
    Send,
    SetTimer,
)
from secagg.protocol.peer.snapshot import RecordedPeer, SnapshotError
from secagg.wire import SERVER, Envelope, RoundOpen, Withdraw

log = logging.getLogger("secagg.flower.peer")

STATE_RECORD = "secagg.peer"
"""The config record in ``context.state`` that holds this node's peer between messages."""
LIVE_PEERS = 128
"""Peers this process keeps alive between messages (LRU); others replay their snapshot."""

ClientAppCallable = Callable[[Message, Context], Message]
Mod = Callable[[Message, Context, ClientAppCallable], Message]


@dataclass
class _Collected:
    """What one message's actions ask of this node (see :func:`secagg.driver.dispatch`)."""

    sends: list[list[Any]] = field(default_factory=list)
    timers: list[list[Any]] = field(default_factory=list)
    name: str = ""

    def send(self, action: Send) -> None:
        self.sends.append([action.recipient, wire.encode(action.envelope)])

    def set_timer(self, action: SetTimer) -> None:
        self.timers.append([action.name, float(action.delay)])

    def cancel_timer(self, action: CancelTimer) -> None:
        self.timers.append([action.name, None])

    def disconnect(self, action: Disconnect) -> None:
        if action.name != SERVER:  # a peer reached through the server: nothing to close
            log.warning("%s: ignoring %s from now on (%s): %s", self.name, action.name,
                        action.reason.value, action.detail)

    def bind(self, action: Bind) -> None:
        pass  # every frame arrives through the server; there are no connections to bind

    def finish(self, action: RoundFinished) -> None:
        pass  # the protocol's outcome is read from the protocol itself


class _LivePeers:
    """Peers kept in this process between messages, each with the digest of the snapshot
    it matches: a hit skips the replay, anything else replays ``context.state``."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._peers: OrderedDict[tuple[int, int], tuple[bytes, RecordedPeer]] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, key: tuple[int, int], snapshot: bytes) -> RecordedPeer | None:
        with self._lock:
            entry = self._peers.pop(key, None)  # taken out while in use: see put
        if entry is None or entry[0] != hashlib.sha256(snapshot).digest():
            return None
        return entry[1]

    def put(self, key: tuple[int, int], snapshot: bytes, peer: RecordedPeer) -> None:
        with self._lock:
            self._peers[key] = (hashlib.sha256(snapshot).digest(), peer)
            while len(self._peers) > self.size:
                self._peers.popitem(last=False)

    def drop(self, key: tuple[int, int]) -> None:
        with self._lock:
            self._peers.pop(key, None)


_LIVE = _LivePeers(LIVE_PEERS)


class SecAggMod:
    """The client mod; :data:`secagg_mod` is one with default settings.

    ``identity`` (an Ed25519 key, with the others' public keys pinned in
    ``trusted_identities``) is needed for rounds under the ``active`` threat model;
    ``mode`` and ``min_noise_multiplier`` are this node's own floor (it declines
    rounds of another mode, or with less distributed-DP noise).
    """

    def __init__(self, *, identity: SigningKey | None = None,
                 trusted_identities: Mapping[str, bytes] | None = None,
                 mode: Mode | None = None, min_noise_multiplier: float | None = None) -> None:
        self.identity = identity
        self.trusted_identities = dict(trusted_identities or {})
        self.mode: Mode | None = mode
        self.min_noise_multiplier = min_noise_multiplier

    def __call__(self, msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, context)
        record = msg.content.config_records.get(RECORD)
        if record is None:
            # Refuse, as secaggplus_mod does: this node's update never leaves in the clear.
            raise ValueError("secagg_mod: this train message does not come from "
                             "SecAggWorkflow (no 'secagg' record); the update is not sent "
                             "in the clear")
        stage = record.get("stage")
        if stage == START:
            return self._start(msg, record, context, call_next)
        if stage == STEP:
            return self._step(msg, record, context)
        detail = f"unknown stage {str(stage)[:40]!r}"
        log.warning("node %d: message from the server rejected (%s): %s",
                    msg.metadata.dst_node_id, DropReason.MALFORMED_MESSAGE.value, detail)
        return self._abandon(msg, context)

    # ------------------------------------------------------------- the first message

    def _start(self, msg: Message, record: ConfigRecord, context: Context,
               call_next: ClientAppCallable) -> Message:
        key = (context.run_id, context.node_id)
        self._forget(context, key)  # a round that never told us its end is over now
        try:
            name, notice, round_open, max_weight, weight_key = read_start(record)
        except (WireError, ValueError, TypeError) as exc:
            log.warning("node %d: round notice rejected (%s): %s", context.node_id,
                        DropReason.MALFORMED_MESSAGE.value, exc)
            return self._abandon(msg, context)
        del msg.content.config_records[RECORD]
        fitted = call_next(msg, context)
        if fitted.has_error():
            return fitted  # the user's fit failed: Flower reports it, the round goes on
        content = fitted.content
        vector, weight, problem = _flatten(content, weight_key, round_open, max_weight)
        for array_record in content.array_records.values():
            array_record.clear()  # nothing of the update leaves in the clear
        if problem:
            log.error("%s: withdraws from round %d: %s", name, notice.round, problem)
            withdraw = Envelope(session=notice.session, round=notice.round, sender=name,
                                body=Withdraw(reason=problem[:500]))
            content.config_records[RECORD] = reply_record(
                [[SERVER, wire.encode(withdraw)]], [], "withdrawn", "withdrawn")
            return Message(content, reply_to=msg)
        peer = RecordedPeer(name, identity=self.identity,
                            trusted_identities=self.trusted_identities, mode=self.mode,
                            min_noise_multiplier=self.min_noise_multiplier)
        actions = peer.start(notice.session, notice.round, vector, weight)
        content.config_records[RECORD] = self._carry_out(peer, actions, context, key)
        return Message(content, reply_to=msg)

    # ------------------------------------------------------------- later messages

    def _step(self, msg: Message, record: ConfigRecord, context: Context) -> Message:
        key = (context.run_id, context.node_id)
        stored = context.state.config_records.get(STATE_RECORD)
        snapshot = stored.get("snapshot") if stored is not None else None
        if not isinstance(snapshot, bytes):
            log.info("node %d: a step of a round this node is not in; ignored",
                     context.node_id)
            return Message(RecordDict({RECORD: reply_record([], [], "idle", "")}),
                           reply_to=msg)
        peer = _LIVE.take(key, snapshot)
        if peer is None:
            try:
                peer = RecordedPeer.restore(snapshot, identity=self.identity,
                                            trusted_identities=self.trusted_identities)
            except SnapshotError as exc:
                log.error("node %d: cannot restore its round: %s", context.node_id, exc)
                self._forget(context, key)
                return Message(RecordDict({RECORD: reply_record([], [], "finished",
                                                                "aborted")}), reply_to=msg)
        protocol = peer.protocol
        if record.get("session") != protocol.session or record.get("round") != protocol.round:
            # Stale (or for a round this node is not in): the current round is untouched.
            log.info("%s: a step of another round ignored", protocol.name)
            _LIVE.put(key, snapshot, peer)
            return Message(RecordDict({RECORD: reply_record([], [], str(protocol.state),
                                                            "")}), reply_to=msg)
        try:
            events = read_events(record.get("events"))
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            # The server's fault: the round ends for this peer, as on a bad server frame.
            log.warning("%s: step from the server rejected (%s): %s", protocol.name,
                        DropReason.MALFORMED_MESSAGE.value, exc)
            events = [PeerGone(SERVER)]
        actions: list[Action] = []
        for event in events:
            actions += peer.handle(event)
            if protocol.finished:
                break
        return Message(RecordDict({RECORD: self._carry_out(peer, actions, context, key)}),
                       reply_to=msg)

    # ------------------------------------------------------------- helpers

    def _carry_out(self, peer: RecordedPeer, actions: list[Action], context: Context,
                   key: tuple[int, int]) -> ConfigRecord:
        protocol = peer.protocol
        collected = _Collected(name=protocol.name)
        dispatch(actions, collected)
        status = ""
        if protocol.finished:
            self._forget(context, key)
            outcome = protocol.outcome
            status = outcome.status if outcome is not None else "aborted"
            log.info("%s: round %d ended: %s %s", protocol.name, protocol.round, status,
                     outcome.reason if outcome is not None else "")
        else:
            snapshot = peer.snapshot()
            context.state.config_records[STATE_RECORD] = ConfigRecord({"snapshot": snapshot})
            _LIVE.put(key, snapshot, peer)
        return reply_record(collected.sends, collected.timers, str(protocol.state), status)

    def _forget(self, context: Context, key: tuple[int, int]) -> None:
        _LIVE.drop(key)
        if STATE_RECORD in context.state.config_records:
            del context.state.config_records[STATE_RECORD]

    def _abandon(self, msg: Message, context: Context) -> Message:
        """End whatever round this node was in (the server sent something unusable)."""
        self._forget(context, (context.run_id, context.node_id))
        return Message(RecordDict({RECORD: reply_record([], [], "finished", "aborted")}),
                       reply_to=msg)


secagg_mod: Mod = SecAggMod()
"""The client mod with default settings: ``ClientApp(client_fn=..., mods=[secagg_mod])``."""


def _flatten(content: RecordDict, weight_key: str, notice: RoundOpen,
             max_weight: float) -> tuple[np.ndarray, float, str]:
    """The fit result as (vector, weight, problem); ``problem`` is "" if it can be sent."""
    records = list(content.array_records.values())
    if len(records) != 1:
        return np.zeros(0), 0.0, (f"fit must return one set of parameters, got "
                                  f"{len(records)} array records")
    arrays = records[0].to_numpy_ndarrays()
    vector = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays]) \
        if arrays else np.zeros(0)
    weight = _weight(content, weight_key)
    if weight is None:
        return vector, 0.0, f"fit returned no weight ({weight_key!r} in its metrics)"
    if vector.shape[0] != notice.dim:
        return vector, weight, (f"fit returned {vector.shape[0]} parameters, the round "
                                f"expects {notice.dim} (the global model's size)")
    if not np.isfinite(vector).all():
        return vector, weight, "fit returned non-finite parameters (NaN or inf)"
    if not (math.isfinite(weight) and 0 <= weight <= max_weight):
        return vector, weight, (f"the weight {weight} is not within [0, max_weight="
                                f"{max_weight}]: raise SecAggWorkflow(max_weight=...)")
    return vector, weight, ""


def _weight(content: RecordDict, weight_key: str) -> float | None:
    legacy = content.metric_records.get("fitres.num_examples")
    if legacy is not None:  # the legacy FitRes: num_examples
        value = legacy.get("num_examples")
    else:
        found = [record[weight_key] for record in content.metric_records.values()
                 if weight_key in record]
        value = found[0] if len(found) == 1 else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)
