"""One round over Flower's Grid: :class:`GridRound`, a third driver of
:class:`~secagg.protocol.ServerProtocol` (with :func:`secagg.driver.dispatch`), over
the Grid instead of websockets.

A round is a sequence of steps: each step sends every live node that has something
to receive one train message with the frames addressed to it (from
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
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack

try:
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.app.message_type import MessageType
    from flwr.serverapp.grid import Grid
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError("server.flower needs Flower: pip install 'secagg[flower]'") from exc

from secagg import wire
from secagg.driver import dispatch
from secagg.protocol import ServerOutcome, ServerProtocol
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
from secagg.wire import SERVER, Envelope, Forward
from server.flower.messages import (
    EVENT_FRAME,
    EVENT_GONE,
    EVENT_TIMER,
    RECORD,
    START,
    STEP,
    read_reply,
)
from server.flower.settings import SecAggSettings

log = logging.getLogger("secagg.flower.server")

MAX_PHASE_STEPS = 64
"""Steps a phase may take before its deadline is fired anyway."""

_LIVE, _CLOSING, _GONE = "live", "closing", "gone"


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
            sends, timers = read_reply(record, self.limits.max_frame_bytes, self.max_sends)
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
        # The protocol decides, as for a NAT peer's forward through the coordinator:
        # only this round's shares to a neighbour or sums up the tree, within the
        # round's need; a node that keeps asking for more is cut off.
        config = self.protocol.config
        forward = Envelope(session=config.session, round=config.round, sender=sender.name,
                           body=Forward(recipient=recipient, frame=frame))
        actions = self.protocol.relay(sender.name, forward)
        self._feed_actions([action for action in actions if not isinstance(action, Send)])
        if not any(isinstance(action, Send) for action in actions):
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
