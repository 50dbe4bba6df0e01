"""Flower server side: ``SecAggWorkflow``, a drop-in for Flower's ``SecAggPlusWorkflow``.

::

    workflow = DefaultWorkflow(fit_workflow=SecAggWorkflow(threshold=0.6))

with :data:`peers.flower.secagg_mod` on the clients. The workflow is a third driver
of :class:`~secagg.protocol.ServerProtocol`, over Flower's Grid instead of
websockets. A round is a sequence of steps: each step sends every live node that
has something to receive one train message with the frames addressed to it (from
the server protocol, or from other peers: peer-to-peer frames travel through the
Flower server AEAD-sealed end to end, as NAT peers' frames travel through the
websocket coordinator), and collects the frames each node sends. A node that does
not answer within the step's deadline, or whose ClientApp fails, is gone
(``PeerGone``): the protocol goes on without it, and the peers that exchanged
frames with it are told, as a closed connection would tell them.

Time: the step deadline is real (``phase_timeout``; the first step, which runs the
user's ``fit``, has ``fit_timeout``). Protocol timers are virtual: when every live
node has answered and nothing is left to deliver, nothing but a deadline can move
the round, so the earliest pending timer fires at once (the peers' before the
server's, in deadline order). A phase that keeps stepping without ending (peers
sending each other frames forever) gets its deadline after ``MAX_PHASE_STEPS``.

The round's result feeds the strategy's ``aggregate_fit`` as Flower's own
workflow does: every contributor's ``FitRes`` carries the weighted average (by
``num_examples``) of the contributors' parameters, so FedAvg returns exactly it.
:func:`secure_sum` is the same round for the Message API: the secure sum, and the
total weight, of the ``ArrayRecord`` the clients return.

The message format is described in ``peers/flower.py``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import msgpack
import numpy as np

try:
    import flwr.compat.common.recorddict_compat as compat
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.app.message_type import MessageType
    from flwr.common import FitRes, ndarrays_to_parameters
    from flwr.server.client_proxy import ClientProxy
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
    from flwr.serverapp.grid import Grid
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError("server.flower needs Flower: pip install 'secagg[flower]'") from exc

from secagg import wire
from secagg.driver import dispatch
from secagg.graph import GraphKind, default_threshold
from secagg.paillier import DEFAULT_KEY_BITS
from secagg.protocol import ServerConfig, ServerOutcome, ServerProtocol
from secagg.protocol.common import GRAPH_KINDS, MODES, THREAT_MODELS, Mode, ThreatModel
from secagg.protocol.errors import DropReason
from secagg.protocol.events import (
    Bind,
    CancelTimer,
    ConnectionFault,
    Disconnect,
    Event,
    FrameReceived,
    PeerGone,
    RoundFinished,
    Send,
    SetTimer,
    TimerExpired,
)
from secagg.wire import SERVER

log = logging.getLogger("secagg.flower.server")

# The message format (the same strings as in peers/flower.py).
RECORD = "secagg"
START, STEP = "start", "step"
EVENT_FRAME, EVENT_TIMER, EVENT_GONE = 0, 1, 2

MAX_PHASE_STEPS = 64
"""Steps a phase may take before its deadline is fired anyway."""
MAX_TIMERS = 16
"""Timers one reply may set or cancel (a peer uses two)."""
DEFAULT_WEIGHT_KEY = "num-examples"
"""The Message API's metric for the weight (as ``flwr.serverapp`` strategies use)."""

_LIVE, _CLOSING, _GONE = "live", "closing", "gone"


class UnsupportedSetting(ValueError):
    """A SecAggPlusWorkflow setting that has no counterpart here."""


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class SecAggSettings:
    """What every round of the workflow uses; checked on construction.

    ``threshold``: an int, a fraction of the round's sampled nodes (a float in
    (0, 1]), or None for the default of the threat model (more than half; more
    than two thirds under ``active``). ``fan_in`` of the accumulation tree: through
    Flower every frame passes the server anyway, so a flat tree saves steps.
    """

    threshold: int | float | None = None
    graph: GraphKind = "complete"
    mode: Mode = "masking"
    threat_model: ThreatModel = "honest-but-curious"
    phase_timeout: float = 30.0
    fit_timeout: float = 600.0
    fan_in: int = 64
    clip: float = 8.0
    max_weight: float = 1000.0
    modulus_bits: int = 32
    paillier_key_bits: int = DEFAULT_KEY_BITS
    weight_key: str = DEFAULT_WEIGHT_KEY

    def __post_init__(self) -> None:
        threshold = self.threshold
        if isinstance(threshold, bool) or not (
                threshold is None or (isinstance(threshold, int) and threshold >= 2)
                or (isinstance(threshold, float) and 0 < threshold <= 1)):
            raise ValueError(f"threshold must be an int >= 2, a fraction in (0, 1] or None, "
                             f"not {threshold!r}")
        if self.graph not in GRAPH_KINDS:
            raise ValueError(f"graph must be one of {GRAPH_KINDS}, not {self.graph!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {self.mode!r}")
        if self.threat_model not in THREAT_MODELS:
            raise ValueError(f"threat_model must be one of {THREAT_MODELS}")
        for name in ("phase_timeout", "clip", "max_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be positive and finite, got {value!r}")
        if not (math.isfinite(self.fit_timeout) and self.fit_timeout > 0):
            raise ValueError(f"fit_timeout must be positive and finite, got {self.fit_timeout}")
        if self.modulus_bits not in (32, 64):
            raise ValueError(f"modulus_bits must be 32 or 64, not {self.modulus_bits}")
        floor = 2 / 3 if self.threat_model == "active" else 1 / 2
        if isinstance(threshold, float) and threshold <= floor:
            raise ValueError(f"a threshold fraction must be above {floor:.3g} under the "
                             f"{self.threat_model} threat model, got {threshold}")
        # The rest (fan_in, key sizes, the encoding's capacity) as a round checks it.
        peers = threshold if isinstance(threshold, int) else 3
        self.config(session=bytes(wire.SESSION_BYTES), round=0, peers=peers, dim=1).encoder()

    def threshold_for(self, peers: int) -> int:
        if self.threshold is None:
            return default_threshold(peers, self.threat_model)
        if isinstance(self.threshold, float):
            return max(2, math.ceil(self.threshold * peers))
        return self.threshold

    def config(self, *, session: bytes, round: int, peers: int, dim: int) -> ServerConfig:
        """The round's ServerConfig (ValueError naming what to change if it cannot be)."""
        return ServerConfig(
            session=session, round=round, max_peers=peers, threshold=self.threshold_for(peers),
            dim=dim,
            threat_model=self.threat_model, graph=self.graph, fan_in=self.fan_in,
            clip=self.clip, modulus_bits=self.modulus_bits, weighted=True,
            max_weight=self.max_weight, phase_timeout=self.phase_timeout, mode=self.mode,
            paillier_key_bits=self.paillier_key_bits)

    @classmethod
    def from_secaggplus(cls, num_shares: int | float | None = None,
                        reconstruction_threshold: int | float | None = None,
                        **kwargs: Any) -> SecAggSettings:
        """Settings from ``SecAggPlusWorkflow``'s arguments: ``reconstruction_threshold``
        -> threshold, ``clipping_range`` -> clip, ``max_weight`` -> max weight,
        ``modulus_range`` -> modulus bits, ``timeout`` -> phase timeout; our own
        arguments pass through. Anything else is an UnsupportedSetting naming it."""
        mapped: dict[str, Any] = {}
        if num_shares is not None:
            # SecAgg+'s share count is its graph: all nodes, or a sparse neighbourhood.
            mapped["graph"] = "complete" if num_shares == 1.0 or num_shares == 1 else "sparse"
        if reconstruction_threshold is not None:
            if isinstance(reconstruction_threshold, int) and reconstruction_threshold == 1:
                reconstruction_threshold = 1.0
            mapped["threshold"] = reconstruction_threshold
        renames = {"clipping_range": "clip", "max_weight": "max_weight",
                   "timeout": "phase_timeout"}
        for key, value in kwargs.items():
            if key in renames:
                if value is None:
                    raise UnsupportedSetting(f"{key}=None: secagg waits a bounded time; give "
                                             "a timeout in seconds")
                mapped[renames[key]] = float(value)
            elif key == "modulus_range":
                bits = int(value).bit_length() - 1
                if value not in (1 << 32, 1 << 64):
                    raise UnsupportedSetting(f"modulus_range={value}: secagg masks in "
                                             "2**32 or 2**64")
                mapped["modulus_bits"] = bits
            elif key == "quantization_range":
                raise UnsupportedSetting("quantization_range: secagg picks the quantization "
                                         "scale from clip, max_weight, the node count and "
                                         "modulus bits; drop it (raise modulus_range for "
                                         "precision)")
            elif key in cls.__dataclass_fields__:
                mapped[key] = value
            else:
                raise UnsupportedSetting(f"{key}: not a SecAggPlusWorkflow setting secagg "
                                         "supports")
        return cls(**mapped)


# --------------------------------------------------------------------------- one round


@dataclass
class _Node:
    node_id: int
    name: str
    state: str = _LIVE
    inbox: list[list[Any]] = field(default_factory=list)
    timers: dict[str, float] = field(default_factory=dict)
    """Timer name -> virtual deadline."""
    links: set[str] = field(default_factory=set)
    """Peers it exchanged frames with: told when it goes (as a closed connection is)."""
    told_gone: set[str] = field(default_factory=set)


@dataclass
class RoundReport:
    """How a round over the Grid went."""

    outcome: ServerOutcome
    replies: dict[int, RecordDict]
    """The first reply of every node that sent one: its fit result, arrays removed."""
    failures: list[BaseException]
    names: dict[int, str]
    steps: int = 0
    bytes_in: int = 0
    """Protocol frames the nodes sent to the server (to it, or to relay to a peer)."""
    bytes_out: int = 0
    """Protocol frames the server sent to the nodes (its own, and relayed ones)."""
    seconds: float = 0.0
    step_seconds: list[float] = field(default_factory=list)
    """Wall time of each step (sending, waiting for the replies, handling them)."""

    def contributor_ids(self) -> list[int]:
        by_name = {name: node_id for node_id, name in self.names.items()}
        return [by_name[name] for name in self.outcome.contributors]


def node_name(node_id: int) -> str:
    """The peer name of a Flower node in the protocol."""
    return f"node-{node_id}"


class GridRound:
    """One secure-aggregation round over a Grid: drives a ServerProtocol step by step.

    ``starts`` maps each sampled node to the content of its first message (the fit
    instructions); the round's settings are added to it.
    """

    def __init__(self, grid: Grid, settings: SecAggSettings, starts: dict[int, RecordDict], *,
                 round: int, dim: int, group_id: str) -> None:
        self.grid = grid
        self.settings = settings
        self.starts = starts
        self.group_id = group_id
        config = settings.config(session=os.urandom(wire.SESSION_BYTES), round=round,
                                 peers=len(starts), dim=dim)
        self.config = config
        self.protocol = ServerProtocol(config)
        self.limits = self.protocol.limits()
        self.nodes = {node_id: _Node(node_id, node_name(node_id)) for node_id in starts}
        self.by_name = {node.name: node for node in self.nodes.values()}
        self.max_sends = 4 * len(starts) + 64
        self.max_inbox = 8 * len(starts) + 256
        self.now = 0.0
        """Virtual time: it moves only when a timer fires."""
        self.steps = 0
        self.server_timers: dict[str, tuple[float, int]] = {}
        """Timer name -> (virtual deadline, step it was set at)."""
        self.outcome: ServerOutcome | None = None
        self.replies: dict[int, RecordDict] = {}
        self.failures: list[BaseException] = []
        self.bytes_in = 0
        self.bytes_out = 0
        self.step_seconds: list[float] = []

    # ------------------------------------------------------------------ running

    def run(self) -> RoundReport:
        started = time.perf_counter()
        self._feed_actions(self.protocol.start(connected=len(self.nodes)))
        notice = wire.encode(self.protocol.round_open())
        self._exchange(list(self.nodes.values()), notice=notice)
        while self.outcome is None:
            targets = [node for node in self._sorted() if node.state != _GONE and node.inbox]
            if targets:
                self._exchange(targets)
                self._fire_overdue()
            elif not self._fire_due_timers():
                raise RuntimeError("secure aggregation stalled: no frame to deliver and no "
                                   "deadline pending (a bug in secagg)")
        # Tell everyone still there how the round ended (and let them drop their state).
        # Nothing depends on their answers, so the round does not wait for them: a node
        # that gets the next round's first message before this one drops the state then.
        final = [node for node in self._sorted() if node.state != _GONE and node.inbox]
        if final:
            self.grid.push_messages([self._step_message(node) for node in final])
        return RoundReport(outcome=self.outcome, replies=self.replies, failures=self.failures,
                           names={node_id: node.name for node_id, node in self.nodes.items()},
                           steps=self.steps, bytes_in=self.bytes_in, bytes_out=self.bytes_out,
                           seconds=time.perf_counter() - started,
                           step_seconds=self.step_seconds)

    def _sorted(self) -> list[_Node]:
        return sorted(self.nodes.values(), key=lambda node: node.name)

    def _step_message(self, node: _Node) -> Message:
        """The frames and events waiting for ``node``, as one train message."""
        self.bytes_out += sum(len(item[-1]) for item in node.inbox if item[0] == EVENT_FRAME)
        content = RecordDict({RECORD: ConfigRecord({
            "stage": STEP, "session": self.config.session, "round": self.config.round,
            "events": msgpack.packb(node.inbox, use_bin_type=True)})})
        node.inbox = []
        return Message(content, dst_node_id=node.node_id, message_type=MessageType.TRAIN,
                       group_id=self.group_id)

    def _exchange(self, targets: list[_Node], *, notice: bytes | None = None) -> None:
        """One step: a message to each target, and what comes back by the deadline."""
        self.steps += 1
        started = time.perf_counter()
        messages = []
        for node in targets:
            if notice is not None:
                content = self.starts[node.node_id]
                content.config_records[RECORD] = ConfigRecord({
                    "stage": START, "notice": notice, "name": node.name,
                    "max_weight": float(self.settings.max_weight),
                    "weight_key": self.settings.weight_key})
                self.bytes_out += len(notice)
                messages.append(Message(content, dst_node_id=node.node_id,
                                        message_type=MessageType.TRAIN,
                                        group_id=self.group_id))
            else:
                messages.append(self._step_message(node))
        timeout = self.settings.fit_timeout if notice is not None else \
            self.settings.phase_timeout
        answers: dict[int, Message] = {}
        for answer in self.grid.send_and_receive(messages, timeout=timeout):
            answers.setdefault(answer.metadata.src_node_id, answer)
        for node in targets:
            if node.state == _CLOSING:  # cut off: told so, and nothing more is taken
                node.state = _GONE
                continue
            reply = answers.get(node.node_id)
            if reply is None:
                self._fail(node, TimeoutError(f"{node.name} sent no reply within the step "
                                              f"deadline of {timeout:g} s"))
            elif reply.has_error():
                self._fail(node, RuntimeError(f"{node.name}: the ClientApp failed: "
                                              f"{reply.error.reason}"))
            else:
                self._take(node, reply.content, first=notice is not None)
        self.step_seconds.append(time.perf_counter() - started)

    def _take(self, node: _Node, content: RecordDict, *, first: bool) -> None:
        record = content.config_records.get(RECORD)
        try:
            sends, timers = _read_reply(record, self.limits.max_frame_bytes, self.max_sends)
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            self._cut_off(node, DropReason.MALFORMED_MESSAGE, f"malformed reply: {exc}")
            return
        if first:
            del content.config_records[RECORD]
            self.replies[node.node_id] = content
        for name, delay in timers:
            if delay is None:
                node.timers.pop(name, None)
            else:
                node.timers[name] = self.now + delay
        for recipient, frame in sends:
            if node.state != _LIVE:
                return  # cut off for an earlier frame of this reply
            self.bytes_in += len(frame)
            if recipient == SERVER:
                self._feed(FrameReceived(node.name, frame))
            else:
                self._relay(node, recipient, frame)

    def _relay(self, sender: _Node, recipient: str, frame: bytes) -> None:
        """A sealed peer-to-peer frame: pass it on (the server cannot open it)."""
        target = self.by_name.get(recipient)
        if target is None or target is sender:
            log.info("%s sent a frame to %r, not a peer of this round: dropped", sender.name,
                     recipient[:70])
            return
        sender.links.add(target.name)
        target.links.add(sender.name)
        if target.state != _LIVE:
            self._tell_gone(sender, target.name)
            return
        if len(target.inbox) >= self.max_inbox:
            log.warning("%s: more than %d frames wait for it; one from %s dropped",
                        target.name, self.max_inbox, sender.name)
            return
        target.inbox.append([EVENT_FRAME, False, frame])

    # ------------------------------------------------------------------ departures

    def _fail(self, node: _Node, why: BaseException) -> None:
        log.warning("%s is gone: %s", node.name, why)
        self.failures.append(why)
        self._gone(node)
        self._feed(PeerGone(node.name))

    def _cut_off(self, node: _Node, reason: DropReason, detail: str) -> None:
        log.warning("dropping %s (%s): %s", node.name, reason.value, detail)
        self.failures.append(ValueError(f"{node.name}: {detail}"))
        self._feed(ConnectionFault(node.name, reason, detail))
        if node.state == _LIVE:  # the protocol did not disconnect it (it was not on the roster)
            self._gone(node)

    def _gone(self, node: _Node, *, closing: bool = False) -> None:
        if node.state != _LIVE:
            return
        node.state = _CLOSING if closing else _GONE
        node.timers.clear()
        for name in sorted(node.links):
            self._tell_gone(self.by_name[name], node.name)

    def _tell_gone(self, node: _Node, name: str) -> None:
        if node.state == _LIVE and name not in node.told_gone:
            node.told_gone.add(name)
            node.inbox.append([EVENT_GONE, name])

    # ------------------------------------------------------------------ time

    def _fire_due_timers(self) -> bool:
        """Nothing is in flight: fire the earliest deadline (peers' before the server's)."""
        pending = [deadline for node in self.nodes.values() if node.state == _LIVE
                   for deadline in node.timers.values()]
        pending += [deadline for deadline, _ in self.server_timers.values()]
        if not pending:
            return False
        due = min(pending)
        self.now = max(self.now, due)
        fired = False
        for node in self._sorted():
            if node.state != _LIVE:
                continue
            for name, deadline in sorted(node.timers.items()):
                if deadline <= due:
                    del node.timers[name]
                    node.inbox.append([EVENT_TIMER, name])
                    fired = True
        if fired:
            return True
        for name, (deadline, _) in sorted(self.server_timers.items()):
            if deadline <= due:
                del self.server_timers[name]
                self._feed(TimerExpired(name))
        return True

    def _fire_overdue(self) -> None:
        for name, (_, step) in sorted(self.server_timers.items()):
            if self.steps - step >= MAX_PHASE_STEPS and self.outcome is None:
                log.warning("phase deadline after %d steps", MAX_PHASE_STEPS)
                del self.server_timers[name]
                self._feed(TimerExpired(name))

    # ------------------------------------------------------------------ the protocol

    def _feed(self, event: Event) -> None:
        if self.outcome is None:
            self._feed_actions(self.protocol.handle(event))

    def _feed_actions(self, actions: list[Any]) -> None:
        dispatch(actions, self)

    # Transport (secagg.driver.dispatch)

    def send(self, action: Send) -> None:
        node = self.by_name.get(action.recipient)
        if node is not None and node.state != _GONE:
            node.inbox.append([EVENT_FRAME, True, wire.encode(action.envelope)])

    def set_timer(self, action: SetTimer) -> None:
        self.server_timers[action.name] = (self.now + action.delay, self.steps)

    def cancel_timer(self, action: CancelTimer) -> None:
        self.server_timers.pop(action.name, None)

    def disconnect(self, action: Disconnect) -> None:
        node = self.by_name.get(action.name)
        if node is None or node.state != _LIVE:
            return
        log.warning("dropping %s: %s: %s", node.name, action.reason.value, action.detail)
        # What is queued for it still goes (a rejection says why), then nothing more.
        node.inbox.append([EVENT_GONE, SERVER])
        self._gone(node, closing=True)

    def bind(self, action: Bind) -> None:
        pass  # each node registers under the name its Flower node id gives it

    def finish(self, action: RoundFinished) -> None:
        outcome = action.outcome
        assert isinstance(outcome, ServerOutcome)
        self.outcome = outcome


def _read_reply(record: ConfigRecord | None, max_frame: int, max_sends: int
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


# --------------------------------------------------------------------------- arrays


@dataclass(frozen=True)
class _Layout:
    """Names, shapes and dtypes of the arrays a vector stands for."""

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[np.dtype[Any], ...]

    @classmethod
    def of(cls, record: ArrayRecord) -> _Layout:
        arrays = record.to_numpy_ndarrays()
        return cls(tuple(record.keys()), tuple(a.shape for a in arrays),
                   tuple(a.dtype for a in arrays))

    @property
    def dim(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes)

    def split(self, vector: np.ndarray) -> list[np.ndarray]:
        arrays, start = [], 0
        for shape, dtype in zip(self.shapes, self.dtypes, strict=True):
            size = math.prod(shape)
            arrays.append(vector[start:start + size].reshape(shape).astype(dtype))
            start += size
        return arrays

    def record(self, vector: np.ndarray) -> ArrayRecord:
        return ArrayRecord(dict(zip(self.keys, [Array(a) for a in self.split(vector)],
                                    strict=True)))


# --------------------------------------------------------------------------- the workflow


class SecAggWorkflow:
    """Secure aggregation for Flower's legacy FedAvg path: a drop-in for
    ``SecAggPlusWorkflow`` (``DefaultWorkflow(fit_workflow=SecAggWorkflow(...))``).

    Arguments are those of :class:`SecAggSettings`. If a round aborts (fewer than
    ``threshold`` nodes stay to the end) the global model is left unchanged, as
    ``SecAggPlusWorkflow`` leaves it when it halts.
    """

    def __init__(self, threshold: int | float | None = None, **settings: Any) -> None:
        self.settings = SecAggSettings(threshold=threshold, **settings)
        self.reports: list[RoundReport] = []
        """One per round run (for measurements and tests)."""

    @classmethod
    def from_secaggplus(cls, num_shares: int | float | None = None,
                        reconstruction_threshold: int | float | None = None,
                        **kwargs: Any) -> SecAggWorkflow:
        """The workflow for ``SecAggPlusWorkflow``'s arguments (see
        :meth:`SecAggSettings.from_secaggplus`)."""
        settings = SecAggSettings.from_secaggplus(num_shares, reconstruction_threshold,
                                                  **kwargs)
        return cls(**dataclasses.asdict(settings))

    def __call__(self, grid: Grid, context: Any) -> None:
        if not isinstance(context, LegacyContext):
            raise TypeError(f"SecAggWorkflow runs in a DefaultWorkflow (a LegacyContext), "
                            f"got {type(context).__name__}")
        cfg = context.state.config_records[MAIN_CONFIGS_RECORD]
        current_round = cast(int, cfg["current_round"])
        global_record = context.state.array_records[MAIN_PARAMS_RECORD]
        parameters = compat.arrayrecord_to_parameters(global_record, keep_input=True)
        instructions = context.strategy.configure_fit(current_round, parameters,
                                                      context.client_manager)
        if not instructions:
            log.info("configure_fit: no clients selected, cancel")
            return
        if len(instructions) < 2:
            log.error("secure aggregation needs at least 2 sampled nodes, got %d",
                      len(instructions))
            return
        proxies = {proxy.node_id: proxy for proxy, _ in instructions}
        starts = {proxy.node_id: compat.fitins_to_recorddict(fitins, True)
                  for proxy, fitins in instructions}
        layout = _Layout.of(compat.parameters_to_arrayrecord(parameters, keep_input=True))
        try:
            grid_round = GridRound(grid, self.settings, starts, round=current_round,
                                   dim=layout.dim, group_id=str(current_round))
        except ValueError as exc:  # e.g. fewer nodes sampled than the threshold
            log.error("secure aggregation round %d cannot run: %s", current_round, exc)
            return
        report = grid_round.run()
        self.reports.append(report)
        outcome = report.outcome
        log.info("secure aggregation round %d: %s %s (%d contributors of %d, %d steps)",
                 current_round, outcome.status, outcome.reason, len(outcome.contributors),
                 len(starts), report.steps)
        if outcome.status != "ok" or outcome.mean is None:
            return
        mean = ndarrays_to_parameters(layout.split(outcome.mean))
        results: list[tuple[ClientProxy, FitRes]] = []
        for node_id in report.contributor_ids():
            fitres = compat.recorddict_to_fitres(report.replies[node_id], keep_input=True)
            fitres.parameters = mean
            results.append((proxies[node_id], fitres))
        aggregated, metrics = context.strategy.aggregate_fit(
            current_round, results, report.failures)  # type: ignore[arg-type]
        if aggregated is not None:
            context.state.array_records[MAIN_PARAMS_RECORD] = \
                compat.parameters_to_arrayrecord(aggregated, True)
            context.history.add_metrics_distributed_fit(server_round=current_round,
                                                        metrics=metrics)


# --------------------------------------------------------------------------- Message API


@dataclass
class SecureSum:
    """The secure sum of the ``ArrayRecord`` the contributors returned."""

    arrays: ArrayRecord | None
    """Σ w·x over the contributors (None if the round aborted)."""
    total_weight: float
    contributors: list[int]
    """Node ids whose input is in the sum."""
    metrics: dict[int, list[MetricRecord]]
    """Each contributor's metric records (as it returned them)."""
    report: RoundReport

    def mean(self) -> ArrayRecord | None:
        """The weighted mean Σ w·x / Σ w (None if the round aborted)."""
        outcome = self.report.outcome
        if self.arrays is None or outcome.mean is None:
            return None
        layout = _Layout.of(self.arrays)
        return layout.record(np.asarray(outcome.mean, dtype=np.float64))


def secure_sum(grid: Grid, node_ids: Iterable[int], message: Message | RecordDict, *,
               round: int | None = None, settings: SecAggSettings | None = None
               ) -> SecureSum:
    """Run one secure-aggregation round with the Message API (``flwr.serverapp``).

    ``message`` is the round's train message (or its content): one ``ArrayRecord``
    (the global model) and any config records. Every node in ``node_ids`` gets a copy;
    its ClientApp (with :data:`peers.flower.secagg_mod`) replies with one
    ``ArrayRecord`` of the same layout and a metric ``settings.weight_key`` (default
    "num-examples") as its weight. Returns the secure sum of the contributors'
    arrays weighted by that metric, and the total weight.
    """
    settings = settings or SecAggSettings()
    content = message.content if isinstance(message, Message) else message
    group_id = message.metadata.group_id if isinstance(message, Message) else ""
    if round is None:
        round = int(group_id) if group_id.isdigit() else 0
    records = list(content.array_records.values())
    if len(records) != 1:
        raise ValueError(f"the round's message must hold one ArrayRecord, not {len(records)}")
    layout = _Layout.of(records[0])
    ids = list(dict.fromkeys(node_ids))
    if len(ids) < 2:
        raise ValueError(f"secure aggregation needs at least 2 nodes, got {len(ids)}")
    starts = {node_id: _copy(content) for node_id in ids}
    report = GridRound(grid, settings, starts, round=round, dim=layout.dim,
                       group_id=group_id or str(round)).run()
    outcome = report.outcome
    contributors = report.contributor_ids() if outcome.status == "ok" else []
    arrays = None
    if outcome.status == "ok" and outcome.aggregate is not None:
        arrays = layout.record(np.asarray(outcome.aggregate, dtype=np.float64))
    metrics = {node_id: list(report.replies[node_id].metric_records.values())
               for node_id in contributors}
    return SecureSum(arrays=arrays, total_weight=float(outcome.total_weight or 0.0),
                     contributors=contributors, metrics=metrics, report=report)


def _copy(content: RecordDict) -> RecordDict:
    copied = RecordDict()
    for key, record in content.items():
        if isinstance(record, ArrayRecord):
            copied[key] = ArrayRecord(dict(record.items()))
        elif isinstance(record, ConfigRecord):
            copied[key] = ConfigRecord(dict(record.items()))
        else:
            copied[key] = MetricRecord(dict(record.items()))
    return copied


__all__ = ["GridRound", "RoundReport", "SecAggSettings", "SecAggWorkflow",
                          "SecureSum", "UnsupportedSetting", "node_name", "secure_sum"]
