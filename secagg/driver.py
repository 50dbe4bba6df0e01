"""The one action loop under every driver of a protocol object.

A protocol object (``PeerProtocol`` or ``ServerProtocol``) turns events into
actions and never performs I/O. Carrying the actions out is the same job for
the websocket :class:`~peers.Peer`, the websocket :class:`~server.Coordinator`,
the in-memory simulator and the tests' network, as websockets'
``asyncio/connection.py`` sits under both its client and its server:

- :func:`dispatch` is the pure part: it routes each action to a callback of a
  :class:`Transport`. The simulator and the tests use it with their own clocks.
- :class:`ActionLoop` is the asyncio part the two websocket drivers share:
  timers with ``call_later``, ``feed(event)``, a hook called on every phase
  change (progress callbacks and phase timing), and the round's outcome as a
  future. A driver only maps names to sockets.
- :class:`Outbox` is the bounded writer every connection uses: a queue drained
  by one task, so a slow reader never blocks the loop and never makes us
  buffer without limit.
- :func:`start_keepalive` pings a connection and cuts it off when a pong is
  late; with the outbox's check that sends make progress, it is how a stalled
  party (connected, silent) is noticed, whatever is being sent to it.
- :func:`turn` hands out one protocol event at a time per event loop, so that a
  process running many parties (a simulation, a test, a benchmark) answers pings
  between their steps instead of after all of them.

This module imports neither ``peers`` nor ``server``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar

from websockets.exceptions import ConnectionClosed

from secagg.protocol.events import (
    Action,
    Bind,
    CancelTimer,
    Disconnect,
    Event,
    PeerOutcome,
    RoundFinished,
    Send,
    ServerOutcome,
    SetTimer,
    TimerExpired,
)

log = logging.getLogger("secagg.driver")

Outcome = PeerOutcome | ServerOutcome


class Party(Protocol):
    """What a driver needs of a protocol object."""

    @property
    def state(self) -> Any: ...

    @property
    def finished(self) -> bool: ...

    def handle(self, event: Event) -> list[Action]: ...


class Transport(Protocol):
    """Where :func:`dispatch` sends each kind of action."""

    def send(self, action: Send) -> None: ...

    def set_timer(self, action: SetTimer) -> None: ...

    def cancel_timer(self, action: CancelTimer) -> None: ...

    def disconnect(self, action: Disconnect) -> None: ...

    def bind(self, action: Bind) -> None: ...

    def finish(self, action: RoundFinished) -> None: ...


def dispatch(actions: list[Action], transport: Transport) -> None:
    """Carry out ``actions`` in order through ``transport``."""
    for action in actions:
        if isinstance(action, Send):
            transport.send(action)
        elif isinstance(action, SetTimer):
            transport.set_timer(action)
        elif isinstance(action, CancelTimer):
            transport.cancel_timer(action)
        elif isinstance(action, Disconnect):
            transport.disconnect(action)
        elif isinstance(action, Bind):
            transport.bind(action)
        elif isinstance(action, RoundFinished):
            transport.finish(action)
        else:  # pragma: no cover - the Action union is closed
            raise TypeError(f"not an action: {action!r}")


PhaseHook = Callable[[str, str, float], None]
"""Called as ``hook(old_state, new_state, seconds_spent_in_old_state)``."""


class ActionLoop:
    """Runs one protocol object at a time on the running asyncio loop.

    The driver supplies how to send, disconnect and bind (``transport``); the loop
    owns the timers, the phase hook and the outcome future. ``feed`` is the only
    entry for events; an exception out of ``handle`` is a bug in secagg (remote
    faults are actions), so it is logged with its traceback and the round is ended
    for this party through ``on_internal_error``.
    """

    def __init__(self, label: str, *, send: Callable[[Send], None],
                 disconnect: Callable[[Disconnect], None],
                 bind: Callable[[Bind], None] | None = None,
                 on_phase: PhaseHook | None = None,
                 on_internal_error: Callable[[], list[Action]] | None = None) -> None:
        self.label = label
        self._send = send
        self._disconnect = disconnect
        self._bind = bind
        self._on_phase = on_phase
        self._on_internal_error = on_internal_error
        self.protocol: Party | None = None
        self.outcome: asyncio.Future[Outcome] | None = None
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._state = ""
        self._state_since = 0.0

    def begin(self, protocol: Party, actions: list[Action]) -> asyncio.Future[Outcome]:
        """Run ``protocol`` from now on; ``actions`` are those its start returned."""
        self.stop()
        self.protocol = protocol
        self.outcome = asyncio.get_running_loop().create_future()
        self._state = str(protocol.state)
        self._state_since = time.perf_counter()
        self._report_phase("")
        self.apply(actions)
        return self.outcome

    def feed(self, event: Event) -> None:
        """Hand ``event`` to the current protocol and carry out what it returns."""
        protocol = self.protocol
        if protocol is None or protocol.finished:
            return
        try:
            actions = protocol.handle(event)
        except Exception:
            log.exception("%s: internal error handling %s", self.label, type(event).__name__)
            actions = self._on_internal_error() if self._on_internal_error else []
        self.apply(actions)

    def apply(self, actions: list[Action]) -> None:
        protocol = self.protocol
        dispatch(actions, self._transport)
        if protocol is not None and protocol is self.protocol:
            state = str(protocol.state)
            if state != self._state:
                self._report_phase(state)

    def stop(self) -> None:
        """Cancel every timer (the protocol is finished with or abandoned)."""
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()

    def abandon(self) -> None:
        """Forget the protocol: nothing it asked for happens any more (a crash)."""
        self.stop()
        self.protocol = None
        if self.outcome is not None and not self.outcome.done():
            self.outcome.cancel()

    # -------------------------------------------------------------- internals

    @property
    def _transport(self) -> Transport:
        return _LoopTransport(self)

    def _report_phase(self, new_state: str) -> None:
        """Tell the hook the protocol entered ``new_state`` ("" at the start of a round:
        the hook then sees ("", first state, 0.0))."""
        now = time.perf_counter()
        if new_state:
            old_state, spent = self._state, now - self._state_since
            self._state, self._state_since = new_state, now
        else:
            old_state, spent = "", 0.0
        if self._on_phase is None:
            return
        try:
            self._on_phase(old_state, self._state, spent)
        except Exception:  # an app's callback must not break the round
            log.exception("%s: phase callback failed", self.label)

    def _set_timer(self, name: str, delay: float) -> None:
        old = self._timers.pop(name, None)
        if old is not None:
            old.cancel()
        protocol = self.protocol

        def fire() -> None:
            self._timers.pop(name, None)
            if protocol is self.protocol:
                self.feed(TimerExpired(name))

        self._timers[name] = asyncio.get_running_loop().call_later(delay, fire)

    def _cancel_timer(self, name: str) -> None:
        handle = self._timers.pop(name, None)
        if handle is not None:
            handle.cancel()

    def _finish(self, outcome: Outcome) -> None:
        if self.outcome is not None and not self.outcome.done():
            self.outcome.set_result(outcome)


class _LoopTransport:
    """Adapts an :class:`ActionLoop` to the :class:`Transport` of :func:`dispatch`."""

    def __init__(self, loop: ActionLoop) -> None:
        self._loop = loop

    def send(self, action: Send) -> None:
        self._loop._send(action)

    def set_timer(self, action: SetTimer) -> None:
        self._loop._set_timer(action.name, action.delay)

    def cancel_timer(self, action: CancelTimer) -> None:
        self._loop._cancel_timer(action.name)

    def disconnect(self, action: Disconnect) -> None:
        self._loop._disconnect(action)

    def bind(self, action: Bind) -> None:
        if self._loop._bind is not None:
            self._loop._bind(action)

    def finish(self, action: RoundFinished) -> None:
        self._loop._finish(action.outcome)


_Shared = TypeVar("_Shared")


def per_loop(registry: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Shared],
             make: Callable[[], _Shared]) -> _Shared:
    """The running loop's entry of ``registry``, made on first use: what every party
    driven by one event loop shares (its turn, its dialling slots)."""
    loop = asyncio.get_running_loop()
    shared = registry.get(loop)
    if shared is None:
        shared = registry[loop] = make()
    return shared


_turns: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = \
    weakref.WeakKeyDictionary()


@contextlib.asynccontextmanager
async def turn() -> AsyncIterator[None]:
    """Handle one received frame, then let the event loop run before the next party's.

    asyncio runs every callback that is ready before it polls its sockets again, so
    when a frame reaches many parties of one loop at once (a roster to every peer of
    a benchmark's worker: key agreements and secret sharing, tens of ms each), a pong
    waits behind all of them: seconds, on a loaded machine, which the other side's
    keepalive takes for a stall. Holding the loop's lock until the next iteration
    lets one party step per iteration, with the loop's I/O (pings, pongs, handshakes)
    in between. A loop with one party (a peer process) only pays one iteration per
    frame."""
    async with per_loop(_turns, asyncio.Lock):
        yield
        await asyncio.sleep(0)


_keepalives: set[asyncio.Task[None]] = set()
"""Running keepalive tasks (held here so that they are not collected while running)."""


def set_keepalive(connection: Any, seconds: float) -> None:
    """Ping ``connection`` every ``seconds`` and wait as long for each pong, from the next
    ping on (:func:`~secagg.protocol.common.keepalive_seconds` of the round's phase
    deadline). The keepalive of :func:`start_keepalive` reads these attributes of the
    websockets connection before every ping; so does the library's own, for a
    connection that runs it."""
    connection.ping_interval = seconds
    connection.ping_timeout = seconds


def start_keepalive(connection: Any, seconds: float, label: str) -> None:
    """Ping ``connection`` (a websockets connection opened with ``ping_interval=None``)
    every ``seconds`` and abort it when a pong has not come ``seconds`` after its ping.

    websockets' own keepalive does the same, but on a missed pong it starts a closing
    handshake and waits ``close_timeout`` (10 s by default) for the silent party to
    answer it before the connection counts as closed; a stalled party never answers.
    Aborting at once makes the whole delay one ping interval plus one pong timeout,
    ``2 * seconds``, what the protocol's deadlines allow for noticing a stall
    (:func:`~secagg.protocol.common.stall_detection_seconds`). A ping queued behind a
    send that makes no progress waits for it; the :class:`Outbox` aborts such a send.
    ``label`` names the other party in the log.
    """
    set_keepalive(connection, seconds)
    task = asyncio.get_running_loop().create_task(_keepalive(connection, label))
    _keepalives.add(task)
    task.add_done_callback(_keepalives.discard)


async def _keepalive(connection: Any, label: str) -> None:
    closed = asyncio.ensure_future(connection.wait_closed())
    try:
        while True:
            # Returns as soon as the connection closes; its ping interval may change
            # meanwhile (a round's notice sets it), and is read again each time.
            done, _ = await asyncio.wait({closed}, timeout=connection.ping_interval)
            if done:
                return
            timeout = connection.ping_timeout
            pong = await connection.ping()
            if not await _pong_within(pong, timeout):
                log.warning("%s answered no ping for %g s: closing the connection", label,
                            timeout)
                connection.transport.abort()
                return
    except ConnectionClosed:
        return
    finally:
        closed.cancel()


async def _pong_within(pong: asyncio.Future[float], timeout: float) -> bool:
    """Whether ``pong`` came within ``timeout`` of this process's own time.

    A busy event loop (cryptography, many peers in one process) is not the other
    party's stall: when the timeout fires, the loop first reads what arrived while it
    was busy; and if the timeout itself fired late because this loop was blocked, the
    other party gets one more ``timeout`` from now, so the time counted against it is
    time this process was able to hear it."""
    loop = asyncio.get_running_loop()
    for attempt in range(2):
        started = loop.time()
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(pong)
            return True
        except TimeoutError:
            for _ in range(3):  # a few loop iterations: the selector reads pending pongs
                await asyncio.sleep(0)
            if pong.done() and not pong.cancelled():
                return True
            if attempt or loop.time() - started < 1.5 * timeout:
                return False  # the timer fired on time: the silence is the other side's
    return False


class OutboxFull(Exception):
    """A connection's reader fell too far behind: it holds more than the bound."""


class Outbox:
    """The bounded send queue of one connection, drained by one writer task.

    ``send`` is the connection's send coroutine. ``on_sent(size)`` counts bytes
    out; ``on_failed(items)`` receives the queued items that could not be sent
    when the connection fails (for delivery-failure events). A ``put`` beyond
    ``max_frames`` or ``max_bytes`` raises :class:`OutboxFull`: the driver then
    drops the connection instead of buffering for a reader that does not read.
    A send that is stuck counts as a failure too, and ``on_stuck()`` is called so
    that the driver can abort the connection: a keepalive ping queued behind a
    blocked send waits for it, so only the outbox notices a party that stopped
    reading (a stalled process whose socket buffers are full). A send is stuck when
    ``backlog()`` (the bytes written but not yet taken by the operating system)
    has not shrunk for ``stall_timeout`` seconds (checked every ``stall_timeout``
    seconds, so noticed within twice that), or when it takes longer than
    ``send_timeout`` in all. A slow reader that keeps reading is not stuck.
    ``label`` names the connection in the log.
    """

    def __init__(self, send: Callable[[bytes], Awaitable[None]], *,
                 max_frames: int = 4096, max_bytes: int = 1 << 30,
                 send_timeout: float | None = None,
                 stall_timeout: float | None = None,
                 backlog: Callable[[], int] | None = None,
                 on_sent: Callable[[int], None] | None = None,
                 on_failed: Callable[[list[Any]], None] | None = None,
                 on_stuck: Callable[[], None] | None = None, label: str = "outbox") -> None:
        self._send = send
        self.label = label
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self.send_timeout = send_timeout
        self.stall_timeout = stall_timeout
        self._backlog = backlog
        self._on_sent = on_sent
        self._on_failed = on_failed
        self._on_stuck = on_stuck
        self._queue: deque[tuple[bytes, Any]] = deque()
        self._queued_bytes = 0
        self._wakeup = asyncio.Event()
        self._closing = False
        self.failed = False
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._run())

    @property
    def pending(self) -> int:
        return len(self._queue)

    def put(self, frame: bytes, tag: Any = None) -> None:
        """Queue ``frame`` (with ``tag``, handed back on failure)."""
        if self._closing or self.failed:
            if self._on_failed is not None:
                self._on_failed([tag])
            return
        if len(self._queue) >= self.max_frames or \
                self._queued_bytes + len(frame) > self.max_bytes:
            raise OutboxFull(f"{len(self._queue)} frames ({self._queued_bytes} bytes) are "
                             "waiting for a reader that is not reading")
        self._queue.append((frame, tag))
        self._queued_bytes += len(frame)
        self._wakeup.set()

    def close(self) -> None:
        """Send what is queued, then stop."""
        self._closing = True
        self._wakeup.set()

    def take_pending(self) -> list[tuple[bytes, Any]]:
        """Remove and return everything not yet sent."""
        items = list(self._queue)
        self._queue.clear()
        self._queued_bytes = 0
        return items

    async def drain(self, timeout: float) -> None:
        """Wait (at most ``timeout``) until the writer has sent everything and stopped."""
        self.close()
        if self.task is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self.task), timeout)

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()

    async def _run(self) -> None:
        while True:
            while self._queue:
                frame, tag = self._queue[0]
                try:
                    await self._send_watched(frame)
                except Exception as exc:
                    if isinstance(exc, TimeoutError):
                        log.warning("%s: the send is stuck (%s); giving up on the connection",
                                    self.label, str(exc) or "a frame of "
                                    f"{len(frame)} bytes took over {self.send_timeout:g} s")
                        if self._on_stuck is not None:
                            self._on_stuck()
                    else:
                        log.debug("%s: send failed (%s)", self.label, type(exc).__name__)
                    self.failed = True
                    failed = [tag] + [t for _, t in self.take_pending()[1:]]
                    if self._on_failed is not None:
                        self._on_failed(failed)
                    return
                self._queue.popleft()
                self._queued_bytes -= len(frame)
                if self._on_sent is not None:
                    self._on_sent(len(frame))
            if self._closing:
                return
            self._wakeup.clear()
            await self._wakeup.wait()

    async def _send_watched(self, frame: bytes) -> None:
        """``send(frame)``; TimeoutError if it is stuck (see the class docstring).

        The send runs in this task, so a frame is written as soon as the writer runs; a
        timer checks the backlog meanwhile and ends the send when it stopped shrinking.
        """
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.send_timeout):
            stall_timeout = self.stall_timeout
            if stall_timeout is None or self._backlog is None:
                await self._send(frame)
                return
            backlog = self._backlog
            check: asyncio.TimerHandle | None = None
            left = 0
            try:
                async with asyncio.timeout(None) as stalled:
                    def watch(last: int | None, due: float) -> None:
                        nonlocal check, left
                        left = backlog()
                        # Judged only over an interval in which this loop ran: a check
                        # that comes late had no chance to see the socket drain. Nothing
                        # left to hand over (0) means the wait is not the socket's.
                        on_time = loop.time() - due < stall_timeout / 2
                        if last is not None and on_time and 0 < last <= left:
                            stalled.reschedule(loop.time())  # ends the send now
                            return
                        check = loop.call_later(stall_timeout, watch, left,
                                                loop.time() + stall_timeout)

                    check = loop.call_later(stall_timeout, watch, None,
                                            loop.time() + stall_timeout)
                    await self._send(frame)
            except TimeoutError:
                if not stalled.expired():
                    raise
                raise TimeoutError(f"a frame of {len(frame)} bytes made no progress for "
                                   f"{stall_timeout:g} s ({left} bytes still to send)"
                                   ) from None
            finally:
                if check is not None:
                    check.cancel()


async def close_within(connection: Any, seconds: float, code: int = 1000,
                       reason: str = "") -> None:
    """Close a websockets connection with a closing handshake if it completes within
    ``seconds``, else abort it. ``close()`` alone can wait without end: its close frame
    queues behind unsent data, and a stalled party takes none."""
    try:
        async with asyncio.timeout(seconds):
            await connection.close(code=code, reason=reason)
    except TimeoutError:
        connection.transport.abort()
