"""A peer's websockets to other peers: one per pair, opened by either side.

Outgoing links are opened to the address a roster entry gives (so the far end
is whoever listens there; every frame on it is still authenticated by the
protocol). Incoming connections arrive anonymous: they get a token (``#1``,
``#2``, ...) and become the link of a peer only when the protocol binds them,
after a frame on them authenticated under that pair's channel key. Peers
without a listener are reached through the coordinator (``wire.Forward``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.server import ServerConnection

from secagg.driver import Outbox, OutboxFull, close_within, per_loop
from secagg.wire import Envelope

log = logging.getLogger("secagg.peer")

Connection = ClientConnection | ServerConnection
# How long the higher-named peer of a pair waits for the other to open their
# shared connection before opening one itself (R1 exchanges are symmetric).
LINK_WAIT = 5.0
PEER_CONNECT_ATTEMPTS = 2
MAX_CONCURRENT_DIALS = 32
"""Links opened at once from one event loop (by all the peers it runs). The R1
exchange opens about half the degree at the same moment; more at once only fills the
listeners' backlogs (a dropped SYN costs a 1 s retransmission) and bunches the
handshakes' work into loop iterations long enough to delay pongs for seconds."""

_dial_slots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = \
    weakref.WeakKeyDictionary()


def dial_slots() -> asyncio.Semaphore:
    """The running loop's semaphore of :data:`MAX_CONCURRENT_DIALS`."""
    return per_loop(_dial_slots, lambda: asyncio.Semaphore(MAX_CONCURRENT_DIALS))
MAX_LINK_FRAMES = 1024
"""Frames queued on one link before it counts as stuck (the other side not reading)."""
CLOSE_SECONDS = 5.0
"""How long closing a link may take before it is aborted (a stalled peer never answers)."""


@dataclass(eq=False)
class Link:
    """The connection to one peer, or the wait for it, and its bounded send queue."""

    name: str
    outbox: Outbox
    connection: Connection | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    abandoned: bool = False

    def attach(self, connection: Connection) -> None:
        """Use ``connection`` for this link from now on and start sending."""
        self.connection = connection
        self.ready.set()
        self.outbox.start()


class Links:
    """Every peer link of one :class:`~peers.Peer`.

    ``dial(address, attempts)`` opens an outgoing websocket (None on failure);
    ``forward(name, envelope, frame)`` sends a frame through the coordinator;
    ``delivery_failed(name, envelopes)`` reports frames that never left;
    ``on_sent(size)`` counts bytes out.
    """

    def __init__(self, *, own_name: str,
                 dial: Callable[[str, int], Awaitable[ClientConnection | None]],
                 forward: Callable[[str, Envelope, bytes], None],
                 delivery_failed: Callable[[str, list[Envelope]], None],
                 reader: Callable[[str, ClientConnection], Awaitable[None]],
                 on_sent: Callable[[int], None]) -> None:
        self._own_name = own_name
        self._dial = dial
        self._forward = forward
        self._delivery_failed = delivery_failed
        self._reader = reader
        self._on_sent = on_sent
        self.by_name: dict[str, Link] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.own_address = ""
        self.patience = LINK_WAIT
        self.send_timeout: float | None = None
        self.stall_timeout: float | None = None
        """A send to a peer that takes no data for this long counts as stuck (see
        :class:`~secagg.driver.Outbox`): the peer stalled, and its link is aborted."""

    def set_timeouts(self, *, send: float, stall: float) -> None:
        """The send and stall timeouts of a round (see :class:`~secagg.driver.Outbox`),
        for the links to come and the links there are."""
        self.send_timeout, self.stall_timeout = send, stall
        for link in self.by_name.values():
            link.outbox.send_timeout, link.outbox.stall_timeout = send, stall

    def _new_link(self, name: str) -> Link:
        link: Link

        async def send(frame: bytes) -> None:
            assert link.connection is not None
            await link.connection.send(frame)

        def failed(tags: list[object]) -> None:
            self._delivery_failed(name, [t for t in tags if isinstance(t, Envelope)])

        def stuck() -> None:
            if link.connection is not None:
                link.connection.transport.abort()

        def backlog() -> int:
            connection = link.connection
            return connection.transport.get_write_buffer_size() if connection else 0

        link = Link(name=name, outbox=Outbox(send, max_frames=MAX_LINK_FRAMES,
                                             send_timeout=self.send_timeout,
                                             stall_timeout=self.stall_timeout,
                                             backlog=backlog, on_sent=self._on_sent,
                                             on_failed=failed, on_stuck=stuck,
                                             label=f"{self._own_name}: link to {name}"))
        self.by_name[name] = link
        return link

    def send(self, recipient: str, address: str, envelope: Envelope, frame: bytes,
             exchange: bool) -> None:
        """Send ``frame`` to ``recipient``, opening (or waiting for) the link if need be.

        ``exchange`` marks the symmetric R1 share exchange, where both ends send at
        once: the pair's connection is then opened by the lower-named peer, or by
        the one with a listener, and the other waits for it.
        """
        link = self.by_name.get(recipient)
        if link is None:
            if not address and not exchange:
                self._forward(recipient, envelope, frame)
                return
            if exchange and not address and not self.own_address:
                # Neither side can be dialled: the coordinator forwards, at once.
                self._forward(recipient, envelope, frame)
                return
            wait = exchange and (not address or (
                bool(self.own_address) and self._own_name > recipient))
            link = self._new_link(recipient)
            self._spawn(self._open(link, address, wait))
        try:
            link.outbox.put(frame, envelope)
        except OutboxFull as exc:
            log.warning("%s: link to %s is stuck (%s); dropping it", self._own_name,
                        recipient, exc)
            self.close_link(recipient)
            # Not now: the peer may be carrying out the protocol's actions at this moment.
            asyncio.get_running_loop().call_soon(self._delivery_failed, recipient, [envelope])

    def bind(self, name: str, connection: Connection) -> None:
        """Reuse an authenticated incoming connection for our frames to ``name``."""
        link = self.by_name.get(name)
        if link is None:
            link = self._new_link(name)
        if link.connection is None:
            link.attach(connection)

    def abandon(self, name: str | None) -> None:
        """Stop waiting for (or trying) a connection to a peer known to be gone."""
        link = self.by_name.get(name or "")
        if link is not None and link.connection is None:
            del self.by_name[link.name]
            link.abandoned = True
            link.ready.set()
            self._fail_queued(link)

    def closed(self, connection: Connection) -> list[str]:
        """Forget the links that used ``connection``; return their names."""
        gone = []
        for name, link in list(self.by_name.items()):
            if link.connection is connection:
                del self.by_name[name]
                link.outbox.close()
                gone.append(name)
        return gone

    def close_link(self, name: str) -> Connection | None:
        link = self.by_name.pop(name, None)
        if link is None:
            return None
        link.outbox.cancel()
        return link.connection

    def connections(self) -> list[Connection]:
        return [link.connection for link in self.by_name.values()
                if link.connection is not None]

    def _spawn(self, coroutine: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _fail_queued(self, link: Link) -> None:
        envelopes = [tag for _, tag in link.outbox.take_pending() if isinstance(tag, Envelope)]
        if envelopes:
            self._delivery_failed(link.name, envelopes)

    async def _open(self, link: Link, address: str, wait_for_incoming: bool) -> None:
        if wait_for_incoming:
            # Wait long: a peer that died is announced by the coordinator (PeerDropped),
            # which ends the wait; dialling early would open a second connection.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(link.ready.wait(), self.patience)
            if link.ready.is_set():
                return
        if link.abandoned:
            return
        # A peer whose listener refuses mid-round is most likely dead: retry once, briefly
        # (its children re-route to the next ancestor as soon as we give up).
        connection = None
        if address:
            async with dial_slots():
                if not link.ready.is_set() and not link.abandoned:
                    connection = await self._dial(address, PEER_CONNECT_ATTEMPTS)
        if link.ready.is_set():  # an incoming connection won the race, or the peer left
            if connection is not None:
                await close_within(connection, CLOSE_SECONDS)
            return
        if connection is None:
            if self.by_name.get(link.name) is link:
                del self.by_name[link.name]
            if not address:
                for frame, tag in link.outbox.take_pending():
                    if isinstance(tag, Envelope):
                        self._forward(link.name, tag, frame)
                return
            self._fail_queued(link)
            return
        link.attach(connection)
        self._spawn(self._reader(link.name, connection))

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        for task in list(self.tasks):
            with contextlib.suppress(BaseException):
                await task
        links = list(self.by_name.values())
        await asyncio.gather(*(link.outbox.drain(1) for link in links))
        for link in links:
            link.outbox.cancel()
        # At once: each close may wait out its timeout on a stalled peer.
        await asyncio.gather(*(close_within(link.connection, CLOSE_SECONDS)
                               for link in links if link.connection is not None))
        self.by_name.clear()

    def crash(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        for link in self.by_name.values():
            link.outbox.cancel()
