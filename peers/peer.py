"""The embeddable peer: an asyncio websocket driver around ``PeerProtocol``.

A :class:`Peer` keeps one websocket to the coordinator for the whole session,
runs its own listener so that other peers reach it directly (R1 shares, R2
partial sums), and keeps one connection per peer it talks to, reused across
phases and rounds. A peer without a listener (behind NAT) is reached through
the coordinator, which forwards the sealed frames without being able to read
them; the coordinator keeps such peers at the leaves of the accumulation tree.

::

    async with Peer("ws://127.0.0.1:8765", "alice") as peer:
        outcome = await peer.contribute(vector, weight=1.0)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from secagg.crypto.keys import RandomBytes
from secagg.crypto.signing import SigningKey
from secagg.errors import CryptoError, EncodingError, ProtocolError, WireError
from secagg.protocol import (
    CancelTimer,
    DeliveryFailed,
    MessageReceived,
    PeerGone,
    PeerOutcome,
    PeerProtocol,
    RoundFinished,
    Send,
    SetTimer,
    TimerExpired,
)
from secagg.protocol.common import MODES, Mode, round_limits, slot_layout
from secagg.protocol.events import Action, Event
from secagg.wire import (
    SERVER,
    EncryptedShares,
    Envelope,
    Forward,
    Limits,
    PeerDropped,
    Rejected,
    RoundOpen,
    decode,
    encode,
    validate_names,
)

log = logging.getLogger("secagg.peer")

ProgressCallback = Callable[[str, int], None]
"""Called as ``progress(phase, round)`` whenever this peer's round changes phase."""

# Frames a peer accepts before it knows the round's size (its roster); the wire
# limits of the round apply on top once the roster is known.
DEFAULT_MAX_FRAME = 256 << 20
# How long the higher-named peer of a pair waits for the other to open their
# shared connection before opening one itself (R1 exchanges are symmetric).
LINK_WAIT = 5.0
MAX_EARLY_FRAMES = 4096
PEER_CONNECT_ATTEMPTS = 2

Connection = ClientConnection | ServerConnection


async def _settle(task: asyncio.Task[None], timeout: float | None = None) -> None:
    """Wait for one of our own tasks to end, whether it finishes, fails or was cancelled.

    A CancelledError raised because *our caller* is being cancelled propagates.
    """
    try:
        await asyncio.wait_for(asyncio.shield(task), timeout)
    except asyncio.CancelledError:
        if not task.cancelled():
            raise
    except Exception:  # the task's own failure was logged where it happened
        task.cancel()


class PeerError(Exception):
    """The peer cannot take part (server unreachable, rejected, closed)."""


@dataclass(eq=False)
class _Link:
    """A websocket to another peer (opened by either side) and its send queue."""

    name: str
    connection: Connection | None = None
    outbox: asyncio.Queue[tuple[bytes, Envelope] | None] = field(
        default_factory=asyncio.Queue)
    writer: asyncio.Task[None] | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    abandoned: bool = False


class Peer:
    """A secure-aggregation peer, embeddable in an asyncio application."""

    def __init__(
        self,
        server_url: str,
        peer_id: str,
        *,
        listen: tuple[str, int] | None = ("127.0.0.1", 0),
        advertise_host: str | None = None,
        listener_ssl: ssl.SSLContext | None = None,
        client_ssl: ssl.SSLContext | None = None,
        identity: SigningKey | None = None,
        trusted_identities: dict[str, bytes] | None = None,
        progress: ProgressCallback | None = None,
        connect_attempts: int = 5,
        backoff: float = 0.2,
        max_frame_bytes: int = DEFAULT_MAX_FRAME,
        link_wait: float = LINK_WAIT,
        random_bytes: RandomBytes = os.urandom,
        mode: Mode | None = None,
    ) -> None:
        """``mode`` restricts this peer to rounds of that mode ("masking", "paillier"
        or "hybrid"); with None it takes part in whatever mode the coordinator runs."""
        validate_names([peer_id])
        if mode is not None and mode not in MODES:
            raise ValueError(f"mode must be one of {MODES} or None, not {mode!r}")
        self.mode = mode
        self.server_url = server_url
        self.peer_id = peer_id
        self._listen = listen
        self._advertise_host = advertise_host
        self._listener_ssl = listener_ssl
        self._client_ssl = client_ssl
        self._identity = identity
        self._trusted = trusted_identities
        self._progress = progress
        self._attempts = max(1, connect_attempts)
        self._backoff = backoff
        self._max_frame = max_frame_bytes
        self._frame_limit = max_frame_bytes
        self._link_wait = link_wait
        self._random_bytes = random_bytes
        self.address = ""
        self._listener: Server | None = None
        self._server: ClientConnection | None = None
        self._server_reader: asyncio.Task[None] | None = None
        self._server_outbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._server_writer: asyncio.Task[None] | None = None
        self._links: dict[str, _Link] = {}
        self._link_tasks: set[asyncio.Task[None]] = set()
        self._incoming: set[ServerConnection] = set()
        self._round_open: Envelope | None = None
        self._round_event = asyncio.Event()
        self._rejected: str | None = None
        self._server_closed = False
        self._protocol: PeerProtocol | None = None
        self._outcome: asyncio.Future[PeerOutcome] | None = None
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._early: list[tuple[bytes, Connection | None]] = []
        self._last_round = -1
        self._reported_state = ""
        self.bytes_sent = 0
        self.bytes_received = 0

    # ---------------------------------------------------------- lifecycle

    async def __aenter__(self) -> Peer:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        if self._listen is not None:
            host, port = self._listen
            self._listener = await serve(
                self._serve_link, host, port, compression=None, max_size=self._max_frame,
                ssl=self._listener_ssl)
            bound = next(iter(self._listener.sockets)).getsockname()
            scheme = "wss" if self._listener_ssl else "ws"
            self.address = f"{scheme}://{self._advertise_host or host}:{bound[1]}"
        self._server = await self._connect(self.server_url)
        if self._server is None:
            raise PeerError(f"cannot reach the coordinator at {self.server_url}")
        self._server_reader = asyncio.create_task(self._read_server(self._server))
        self._server_writer = asyncio.create_task(self._write_server(self._server))

    def crash(self) -> None:
        """Die abruptly, as a killed process would: abort every socket, say nothing.

        For tests and dropout scenarios inside one event loop; the other parties see
        the connections reset, exactly as with SIGKILL. Call :meth:`close` afterwards
        to release the tasks.
        """
        self._protocol = None
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        connections: list[Connection] = [*self._incoming]
        if self._server is not None:
            connections.append(self._server)
        connections += [link.connection for link in self._links.values()
                        if link.connection is not None]
        for connection in connections:
            connection.transport.abort()
        # Nothing queued or half-connected may leave after death.
        for task in [*self._link_tasks, self._server_writer,
                     *(link.writer for link in self._links.values())]:
            if task is not None:
                task.cancel()
        if self._listener is not None:
            self._listener.close()
        if self._outcome is not None and not self._outcome.done():
            self._outcome.cancel()

    async def close(self) -> None:
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        self._server_outbox.put_nowait(None)
        if self._server_writer is not None:
            await _settle(self._server_writer, timeout=2)
        if self._server is not None:
            await self._server.close()
        if self._server_reader is not None:
            self._server_reader.cancel()
            await _settle(self._server_reader)
        for link in list(self._links.values()):
            link.outbox.put_nowait(None)
        for task in list(self._link_tasks):
            task.cancel()
        for task in list(self._link_tasks):
            await _settle(task)
        for link in list(self._links.values()):
            if link.writer is not None:
                link.writer.cancel()
                await _settle(link.writer)
            if link.connection is not None:
                await link.connection.close()
        self._links.clear()
        for incoming in list(self._incoming):
            await incoming.close()
        if self._listener is not None:
            self._listener.close()
            await self._listener.wait_closed()
            self._listener = None
        if self._outcome is not None and not self._outcome.done():
            self._outcome.cancel()

    # ---------------------------------------------------------------- API

    async def contribute(self, vector: np.ndarray, weight: float = 1.0) -> PeerOutcome:
        """Take part in the next round with ``vector``; return how the round ended."""
        if self._protocol is not None and not self._protocol.finished:
            raise PeerError("a round is already in progress for this peer")
        vector = np.asarray(vector, dtype=np.float64)
        open_round = await self._next_round()
        if open_round is None:
            reason = self._rejected or "the coordinator closed the connection"
            return PeerOutcome(status="rejected", round=self._last_round + 1, reason=reason)
        notice = open_round.body
        assert isinstance(notice, RoundOpen)
        if vector.ndim != 1 or vector.shape[0] != notice.dim:
            raise ValueError(f"the round expects a vector of {notice.dim} coordinates, got "
                             f"shape {vector.shape}")
        self._last_round = open_round.round
        if self.mode is not None and notice.mode != self.mode:
            # Decline before registering, so the round is not held up by a peer that
            # would only abort when the roster comes.
            reason = (f"the round runs in {notice.mode} mode, this peer takes part only in "
                      f"{self.mode} mode")
            log.warning("%s: declines round %d: %s", self.peer_id, open_round.round, reason)
            return PeerOutcome(status="aborted", round=open_round.round, reason=reason)
        protocol = PeerProtocol(self.peer_id, address=self.address,
                                random_bytes=self._random_bytes, identity=self._identity,
                                trusted_identities=self._trusted, mode=self.mode)
        self._protocol = protocol
        self._outcome = asyncio.get_running_loop().create_future()
        self._report_progress()
        self._apply(protocol.start(open_round.session, open_round.round, vector, weight))
        early, self._early = self._early, []
        for frame, connection in early:
            self._on_peer_frame(frame, connection)
        return await self._outcome

    # ------------------------------------------------------ the server link

    async def _connect(self, url: str, attempts: int | None = None) -> ClientConnection | None:
        """Open a websocket with bounded retries and exponential backoff; None on failure."""
        attempts = self._attempts if attempts is None else attempts
        delay = self._backoff
        for attempt in range(attempts):
            try:
                return await connect(url, compression=None, max_size=self._max_frame,
                                     ssl=self._client_ssl if url.startswith("wss") else None,
                                     proxy=None, open_timeout=10)
            except InvalidURI as exc:
                raise PeerError(f"invalid URL {url!r}: {exc}") from None
            except (OSError, InvalidHandshake, TimeoutError) as exc:
                log.debug("%s: connecting to %s failed (%s), attempt %d", self.peer_id, url,
                          exc, attempt + 1)
                if attempt + 1 < attempts:
                    await asyncio.sleep(delay)
                    delay *= 2
        return None

    async def _read_server(self, connection: ClientConnection) -> None:
        try:
            async for frame in connection:
                if isinstance(frame, bytes):
                    self.bytes_received += len(frame)
                    self._on_server_frame(frame)
        except ConnectionClosed:
            pass
        finally:
            self._server_closed = True
            self._round_event.set()
            self._feed(PeerGone(SERVER))

    async def _write_server(self, connection: ClientConnection) -> None:
        while True:
            frame = await self._server_outbox.get()
            if frame is None:
                return
            try:
                await connection.send(frame)
                self.bytes_sent += len(frame)
            except ConnectionClosed:
                return

    def _round_frame_limit(self, notice: RoundOpen) -> int:
        """The largest peer-to-peer frame of the announced round (worst case: weighted,
        64-bit ring, encrypted in the paillier and hybrid modes)."""
        peers, dim = max(notice.max_peers, 1), notice.dim + 1
        layout = None
        if notice.mode != "masking":
            try:
                layout = slot_layout(key_bits=notice.paillier_key_bits, modulus_bits=64,
                                     peers=peers)
            except EncodingError as exc:
                log.warning("%s: the round notice has unusable Paillier parameters (%s)",
                            self.peer_id, exc)
                return self._max_frame
        return round_limits(peers=peers, dim=dim, modulus_bits=64,
                            layout=layout).max_frame_bytes

    def _on_server_frame(self, frame: bytes) -> None:
        protocol = self._protocol
        # Server frames carry no vectors: generic limits, the protocol checks the rest
        # (a finished round's roster size must not constrain the next round's notices).
        try:
            env = decode(frame, Limits(max_frame_bytes=self._max_frame))
        except WireError as exc:
            log.warning("%s: malformed frame from the coordinator: %s", self.peer_id, exc)
            if protocol is not None and not protocol.finished:
                self._apply(protocol.handle(PeerGone(SERVER)))
            return
        if env.sender != SERVER:
            log.warning("%s: frame on the coordinator link claims sender %r", self.peer_id,
                        env.sender)
            return
        body = env.body
        if isinstance(body, RoundOpen):
            # Size the peer links' frame limit from the round (the wire limits of the
            # round apply on top once the roster is known).
            self._frame_limit = self._round_frame_limit(body)
            for connection in self._peer_connections():
                self._limit_frames(connection)
            self._round_open = env
            self._round_event.set()
            return
        if isinstance(body, Forward):
            self._on_peer_frame(body.frame, None)
            return
        if isinstance(body, PeerDropped) and protocol is not None:
            self._abandon_link(protocol.name_of(body.peer))
        if isinstance(body, Rejected) and (protocol is None or protocol.finished):
            log.warning("%s: rejected by the coordinator: %s", self.peer_id, body.reason)
            self._rejected = body.reason
            self._round_event.set()
            return
        if protocol is None or env.round != protocol.round:
            log.info("%s: ignoring %s for round %d", self.peer_id, env.type, env.round)
            return
        self._feed(MessageReceived(env))

    async def _next_round(self) -> Envelope | None:
        while True:
            if self._rejected is not None or self._server_closed:
                return None
            env = self._round_open
            if env is not None and env.round > self._last_round:
                self._round_open = None
                return env
            self._round_event.clear()
            await self._round_event.wait()

    # ------------------------------------------------------- peer links

    def _peer_connections(self) -> list[Connection]:
        links = [link.connection for link in self._links.values()
                 if link.connection is not None]
        return [*self._incoming, *links]

    def _limit_frames(self, connection: Connection) -> None:
        connection.protocol.max_message_size = self._frame_limit

    async def _serve_link(self, connection: ServerConnection) -> None:
        self._incoming.add(connection)
        self._limit_frames(connection)
        try:
            async for frame in connection:
                if isinstance(frame, str):
                    log.warning("%s: text frame on a peer link; closing it", self.peer_id)
                    break
                self.bytes_received += len(frame)
                if not self._on_peer_frame(frame, connection):
                    break
        except ConnectionClosed:
            pass
        finally:
            self._incoming.discard(connection)
            self._on_link_closed(connection)

    def _on_peer_frame(self, frame: bytes, connection: Connection | None) -> bool:
        """Handle a frame from a peer (direct, or forwarded by the coordinator)."""
        protocol = self._protocol
        if protocol is None or protocol.finished:
            # A neighbour is already in the next round: keep the frame until ours starts.
            if len(self._early) < MAX_EARLY_FRAMES:
                self._early.append((frame, connection))
            return True
        try:
            env = decode(frame, protocol.limits())
        except WireError as exc:
            log.warning("%s: malformed peer frame: %s", self.peer_id, exc)
            return False
        if env.sender == SERVER or env.sender == self.peer_id:
            log.warning("%s: peer frame with impossible sender %r", self.peer_id, env.sender)
            return False
        if env.round > protocol.round:
            self._early.append((frame, connection))
            return True
        try:
            actions = protocol.handle(MessageReceived(env))
        except (ProtocolError, CryptoError, WireError) as exc:
            log.warning("%s: rejected %s from %r: %s", self.peer_id, env.type, env.sender, exc)
            return False
        except Exception:
            log.exception("%s: internal error handling %s from %r", self.peer_id, env.type,
                          env.sender)
            return False
        if connection is not None:
            self._bind(env.sender, connection)
        self._apply(actions)
        return True

    def _bind(self, name: str, connection: Connection) -> None:
        """Reuse an authenticated incoming connection for our frames to ``name``."""
        link = self._links.get(name)
        if link is None:
            link = _Link(name=name)
            self._links[name] = link
        if link.connection is None:
            link.connection = connection
            link.writer = asyncio.create_task(self._write_link(link))
            link.ready.set()

    def _abandon_link(self, name: str | None) -> None:
        """Stop waiting for (or trying) a connection to a peer known to be gone."""
        link = self._links.get(name or "")
        if link is not None and link.connection is None:
            del self._links[link.name]
            link.abandoned = True
            link.ready.set()
            self._fail_queued(link)

    def _on_link_closed(self, connection: Connection) -> None:
        for name, link in list(self._links.items()):
            if link.connection is connection:
                del self._links[name]
                link.outbox.put_nowait(None)
                self._feed(PeerGone(name))

    def _send_to_peer(self, action: Send) -> None:
        frame = encode(action.envelope)
        link = self._links.get(action.recipient)
        if link is None:
            exchange = isinstance(action.envelope.body, EncryptedShares)
            if not action.address and not exchange:
                self._forward_via_server(action.recipient, action.envelope, frame)
                return
            # One connection per pair. In the symmetric R1 exchange the pair's
            # connection is opened by the lower-named peer, or by the one without a
            # listener (the only one that can); the other waits for it.
            if exchange and not action.address and not self.address:
                # Neither side can be dialled: the coordinator forwards, at once.
                self._forward_via_server(action.recipient, action.envelope, frame)
                return
            wait = exchange and (not action.address or (
                bool(self.address) and self.peer_id > action.recipient))
            link = _Link(name=action.recipient)
            self._links[action.recipient] = link
            task = asyncio.create_task(self._open_link(link, action.address, wait))
            self._link_tasks.add(task)
            task.add_done_callback(self._link_tasks.discard)
        link.outbox.put_nowait((frame, action.envelope))

    def _forward_via_server(self, recipient: str, envelope: Envelope, frame: bytes) -> None:
        # The recipient has no listener: the coordinator forwards the sealed frame.
        self._send_to_server(Envelope(session=envelope.session, round=envelope.round,
                                      sender=self.peer_id,
                                      body=Forward(recipient=recipient, frame=frame)))

    async def _open_link(self, link: _Link, address: str, wait_for_incoming: bool) -> None:
        if wait_for_incoming:
            # Wait long: a peer that died is announced by the coordinator (PeerDropped),
            # which ends the wait; dialling early would open a second connection.
            patience = self._link_wait
            if self._protocol is not None:
                patience = max(patience, 0.6 * self._protocol.phase_timeout)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(link.ready.wait(), patience)
            if link.ready.is_set():
                return
        if link.abandoned:
            return
        # A peer whose listener refuses mid-round is most likely dead: retry once, briefly
        # (its children re-route to the next ancestor as soon as we give up).
        connection = await self._connect(address, PEER_CONNECT_ATTEMPTS) if address else None
        if link.ready.is_set():  # an incoming connection won the race, or the peer left
            if connection is not None:
                await connection.close()
            return
        if connection is None:
            if self._links.get(link.name) is link:
                del self._links[link.name]
            if not address:
                while not link.outbox.empty():
                    item = link.outbox.get_nowait()
                    if item is not None:
                        self._forward_via_server(link.name, item[1], item[0])
                return
            self._fail_queued(link)
            return
        link.connection = connection
        self._limit_frames(connection)
        link.writer = asyncio.create_task(self._write_link(link))
        link.ready.set()
        reader = asyncio.create_task(self._read_link(link.name, connection))
        self._link_tasks.add(reader)
        reader.add_done_callback(self._link_tasks.discard)

    async def _read_link(self, name: str, connection: ClientConnection) -> None:
        try:
            async for frame in connection:
                if isinstance(frame, bytes):
                    self.bytes_received += len(frame)
                    if not self._on_peer_frame(frame, connection):
                        break
        except ConnectionClosed:
            pass
        finally:
            self._on_link_closed(connection)
            await connection.close()

    async def _write_link(self, link: _Link) -> None:
        assert link.connection is not None
        while True:
            item = await link.outbox.get()
            if item is None:
                return
            frame, envelope = item
            try:
                await link.connection.send(frame)
                self.bytes_sent += len(frame)
            except ConnectionClosed:
                self._feed(DeliveryFailed(link.name, envelope))
                self._fail_queued(link)
                return

    def _fail_queued(self, link: _Link) -> None:
        while not link.outbox.empty():
            item = link.outbox.get_nowait()
            if item is not None:
                self._feed(DeliveryFailed(link.name, item[1]))

    # ------------------------------------------------------------ actions

    def _feed(self, event: Event) -> None:
        protocol = self._protocol
        if protocol is None or protocol.finished:
            return
        try:
            actions = protocol.handle(event)
        except (ProtocolError, CryptoError, WireError) as exc:
            log.warning("%s: %s", self.peer_id, exc)
            if isinstance(event, MessageReceived) and event.envelope.sender == SERVER:
                # We cannot follow the coordinator any more: leave the round.
                actions = protocol.handle(PeerGone(SERVER))
            else:
                return
        except Exception:
            log.exception("%s: internal error handling %r", self.peer_id, type(event).__name__)
            actions = protocol.handle(PeerGone(SERVER))
        self._apply(actions)

    def _apply(self, actions: list[Action]) -> None:
        protocol = self._protocol
        for action in actions:
            if isinstance(action, Send):
                if action.recipient == SERVER:
                    self._send_to_server(action.envelope)
                else:
                    self._send_to_peer(action)
            elif isinstance(action, SetTimer):
                self._set_timer(action.name, action.delay)
            elif isinstance(action, CancelTimer):
                handle = self._timers.pop(action.name, None)
                if handle is not None:
                    handle.cancel()
            elif isinstance(action, RoundFinished):
                assert isinstance(action.outcome, PeerOutcome)
                if self._outcome is not None and not self._outcome.done():
                    self._outcome.set_result(action.outcome)
        if protocol is not None and protocol.state != self._reported_state:
            self._report_progress()

    def _send_to_server(self, envelope: Envelope) -> None:
        self._server_outbox.put_nowait(encode(envelope))

    def _set_timer(self, name: str, delay: float) -> None:
        old = self._timers.pop(name, None)
        if old is not None:
            old.cancel()
        protocol = self._protocol

        def fire() -> None:
            self._timers.pop(name, None)
            if protocol is self._protocol:
                self._feed(TimerExpired(name))

        self._timers[name] = asyncio.get_running_loop().call_later(delay, fire)

    def _report_progress(self) -> None:
        if self._protocol is not None:
            self._reported_state = str(self._protocol.state)
        if self._progress is not None and self._protocol is not None:
            try:
                self._progress(str(self._protocol.state), self._protocol.round)
            except Exception:  # an app's callback must not break the round
                log.exception("%s: progress callback failed", self.peer_id)
