"""The coordinator service: an asyncio websocket driver around ``ServerProtocol``.

One websocket per peer, kept for the whole session (every round). For each
round the coordinator announces ``RoundOpen`` to the connected peers, feeds
every decoded frame, closed connection and expired deadline to a fresh
:class:`~secagg.protocol.ServerProtocol`, and carries out what it returns.
It also relays opaque peer-to-peer frames to peers that have no listener of
their own (they are AEAD-sealed end to end, so the coordinator learns nothing
from them); the protocol decides which of them it may relay
(:meth:`~secagg.protocol.ServerProtocol.relay`).

The protocol decides what every frame means, including registration, duplicate
ids and late arrivals; the coordinator maps connection tokens (``#1``, ``#2``,
...) and, once the protocol binds them, peer names to websockets, and carries
out the actions through the shared :class:`~secagg.driver.ActionLoop`. A frame
that fails ``secagg.wire`` validation, belongs to another session or round,
claims another peer's name, or is not allowed in the current phase closes that
connection with a logged, specific drop reason; the round goes on for everyone
else. Each client's outbox is bounded: a client that stops reading is dropped.

Every client costs one file descriptor, and the process has a limit on them
(``RLIMIT_NOFILE``). Past it, asyncio's accept loop gets ``EMFILE``; CPython 3.11
then logs a traceback and schedules a retry for every pending connection, tens of
thousands of lines a second, and the process cannot even open its result file.
So the coordinator accepts on a listening socket of its own
(:class:`_GuardedListener`): it admits connections while they fit under the
limit minus a reserve, closes the ones beyond at once (saying so once per
:data:`FULL_NOTICE_SECONDS`), and if ``accept()`` fails for want of descriptors
anyway (something else in the process took them) it frees a spare descriptor to
accept and close one waiting connection instead of letting the error loop. The
round goes on with the peers that are in.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
import socket
import ssl
import time
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from secagg.dp import DPConfig
from secagg.dp.accounting import epsilon
from secagg.driver import ActionLoop, Outbox, OutboxFull, close_within, start_keepalive
from secagg.errors import WireError
from secagg.graph import GraphKind
from secagg.paillier import DEFAULT_KEY_BITS
from secagg.protocol import ServerConfig, ServerOutcome, ServerProtocol
from secagg.protocol.common import Mode, ThreatModel, keepalive_seconds
from secagg.protocol.errors import DropReason
from secagg.protocol.events import (
    Bind,
    ConnectionFault,
    Disconnect,
    FrameReceived,
    MessageReceived,
    PeerConnected,
    PeerGone,
    Send,
)
from secagg.protocol.modes import round_mode, slot_layout
from secagg.protocol.server.config import BASE_PHASE_TIMEOUT
from secagg.wire import SERVER, Envelope, Forward, Limits, Rejected, decode, encode

log = logging.getLogger("secagg.coordinator")


@dataclass
class RoundResult:
    """What :meth:`Coordinator.run_round` returns; unpacks as (aggregate, contributors, stats)."""

    aggregate: np.ndarray | None
    contributors: list[str]
    stats: dict[str, Any]
    outcome: ServerOutcome

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter((self.aggregate, self.contributors, self.stats))

    @property
    def status(self) -> str:
        return self.outcome.status

    @property
    def mean(self) -> np.ndarray | None:
        """Weighted rounds: the weighted mean (``aggregate`` is the weighted sum)."""
        return self.outcome.mean


MAX_OUTBOX_FRAMES = 4096
"""Frames queued for one client before it counts as not reading (and is dropped)."""
CLOSE_FLUSH_SECONDS = 5.0
CLOSE_HANDSHAKE_SECONDS = 10.0
"""websockets' default close timeout: how long a closing handshake may take."""


DESCRIPTOR_RESERVE = 16
"""Descriptors kept free for what the process opens besides client connections (the
round's result files, log files, the resolver) beyond those open when it started."""
FULL_NOTICE_SECONDS = 10.0
"""At most one log line per this many seconds about connections refused for lack of
descriptors."""
MAX_REFUSED_PER_WAKEUP = 64
"""Waiting connections refused in one go before the event loop runs other work."""
ACCEPT_BACKOFF_SECONDS = 1.0
"""asyncio's pause after an accept() error (``asyncio.constants.ACCEPT_RETRY_DELAY``)."""
_OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def open_file_limit() -> int | None:
    """This process's soft limit on open descriptors (None: unlimited or unknown)."""
    try:
        import resource  # POSIX only
    except ImportError:  # pragma: no cover - not POSIX
        return None
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def open_descriptors() -> int | None:
    """How many descriptors this process has open (None where it cannot be told)."""
    for path in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(path))
        except OSError:
            continue
    return None


class _AcceptGate:
    """Counts the coordinator's client sockets and decides, at ``accept()``, whether a
    new one fits under the open-file limit (see the module docstring)."""

    def __init__(self, capacity: int | None, limit: int | None) -> None:
        self.capacity = capacity
        """Client connections that fit (None: no limit)."""
        self.limit = limit
        self.open = 0
        self.refused = 0
        """Connections closed at once, since the last notice."""
        self._noticed_at: float | None = None
        self._backoff_until = 0.0
        self._spare: int | None = None
        self._take_spare()

    def accept(self, raw_accept: Callable[[], tuple[socket.socket, Any]]
               ) -> tuple[socket.socket, Any]:
        """``raw_accept()`` once the new connection fits; closes the ones that do not.
        Raises BlockingIOError when nothing is to be handed to asyncio now."""
        if time.monotonic() < self._backoff_until:
            raise BlockingIOError(errno.EAGAIN, "accepting is paused")
        for _ in range(MAX_REFUSED_PER_WAKEUP):
            try:
                conn, address = raw_accept()
            except OSError as exc:
                if exc.errno not in _OUT_OF_DESCRIPTORS:
                    raise
                if self._out_of_descriptors(raw_accept, exc):
                    raise BlockingIOError(errno.EAGAIN, "out of descriptors") from None
                # No spare either: asyncio's own back-off (it stops reading the socket
                # for a second) beats a busy loop; it logs this one error.
                self._backoff_until = time.monotonic() + ACCEPT_BACKOFF_SECONDS
                raise
            if self.capacity is None or self.open < self.capacity:
                return self._admit(conn), address
            conn.close()
            self._refuse()
        raise BlockingIOError(errno.EAGAIN, "refused enough for now")

    def _admit(self, conn: socket.socket) -> socket.socket:
        counted = _CountedSocket(conn.family, conn.type, conn.proto, fileno=conn.detach())
        self.open += 1
        # Released when asyncio closes the socket, or when it is collected unclosed.
        counted.release = weakref.finalize(counted, self._release)
        return counted

    def _release(self) -> None:
        self.open -= 1

    def _refuse(self) -> None:
        self.refused += 1
        now = time.monotonic()
        if self._noticed_at is not None and now - self._noticed_at < FULL_NOTICE_SECONDS:
            return
        self._noticed_at = now
        log.warning("refusing new connections: %d are open, as many as fit under the "
                    "open-file limit of %s (%d refused since the last notice; raise the "
                    "limit with ulimit -n)", self.open, self.limit, self.refused)
        self.refused = 0

    def _out_of_descriptors(self, raw_accept: Callable[[], tuple[socket.socket, Any]],
                            exc: OSError) -> bool:
        """accept() failed for want of descriptors: refuse one waiting connection with
        the spare descriptor. False if there is no spare (any more)."""
        if self._spare is None:
            return False
        os.close(self._spare)
        self._spare = None
        with contextlib.suppress(OSError):
            conn, _ = raw_accept()
            conn.close()
        self._take_spare()
        now = time.monotonic()
        self.refused += 1
        if self._noticed_at is None or now - self._noticed_at >= FULL_NOTICE_SECONDS:
            self._noticed_at = now
            log.warning("refusing new connections: accept() found no free descriptor "
                        "(%s) with %d connections open (%d refused since the last notice)",
                        os.strerror(exc.errno or 0), self.open, self.refused)
            self.refused = 0
        return self._spare is not None

    def _take_spare(self) -> None:
        try:
            self._spare = os.open(os.devnull, os.O_RDONLY)
        except OSError:
            self._spare = None

    def close(self) -> None:
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None


class _CountedSocket(socket.socket):
    """An accepted client socket that gives its slot back when it is closed."""

    release: weakref.finalize | None = None  # type: ignore[type-arg]

    def close(self) -> None:
        super().close()
        if self.release is not None:
            self.release()


class _GuardedListener(socket.socket):
    """A listening socket whose ``accept()`` (called by asyncio's accept loop) goes
    through an :class:`_AcceptGate`."""

    gate: _AcceptGate | None = None

    def accept(self) -> tuple[socket.socket, Any]:
        if self.gate is None:
            return super().accept()
        return self.gate.accept(super().accept)


def _listening_socket(host: str, port: int) -> _GuardedListener:
    """A bound TCP socket for ``host``:``port`` (an IPv4 address preferred when the name
    has several; every interface, IPv6 included where possible, for "" or "::")."""
    address: tuple[Any, ...]
    if host in ("", "::") and socket.has_dualstack_ipv6():
        family, address = socket.AF_INET6, ("::", port)
    else:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
        info = min(infos, key=lambda item: item[0] != socket.AF_INET)
        family, address = info[0], info[4]
    sock = _GuardedListener(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and address[0] == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: "
                                 f"{exc.strerror or exc}") from None
    return sock


@dataclass(eq=False)
class _Client:
    """One websocket to the coordinator: an anonymous token until it registers."""

    connection: ServerConnection
    token: str
    outbox: Outbox
    name: str = ""
    closing: asyncio.Task[None] | None = None

    @property
    def label(self) -> str:
        return self.name or f"unregistered connection {self.token}"


async def _discard_frames(connection: ServerConnection) -> None:
    """Read (and ignore) what a connection being closed still sends, until it closes."""
    with contextlib.suppress(ConnectionClosed):
        async for _ in connection:
            pass


class Coordinator:
    """Runs secure-aggregation rounds for the peers that connect to it.

    ``async with Coordinator(port=0, max_peers=10, threshold=6, dim=1000) as c:``
    then ``aggregate, contributors, stats = await c.run_round()`` once per round.
    ``progress(phase, round)`` is called whenever a round enters a new phase.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        max_peers: int | None = None,
        threshold: int,
        dim: int,
        graph: GraphKind = "complete",
        threat_model: ThreatModel = "honest-but-curious",
        fan_in: int = 8,
        clip: float = 1.0,
        scale: float | None = None,
        modulus_bits: int = 32,
        weighted: bool = False,
        max_weight: float = 1.0,
        phase_timeout: float | None = None,
        ssl_context: ssl.SSLContext | None = None,
        session: bytes | None = None,
        progress: Callable[[str, int], None] | None = None,
        mode: Mode = "masking",
        paillier_key_bits: int = DEFAULT_KEY_BITS,
        dp: DPConfig | None = None,
        min_peers: int | None = None,
    ) -> None:
        """``dp`` runs every round with distributed differential privacy: each peer
        adds its share of the noise, and each round's stats report the noise present
        and the privacy spent so far in the session (``stats["dp"]``). ``phase_timeout``
        None derives the deadline from the round's size
        (``ServerConfig.derived_phase_timeout``)."""
        if min_peers is not None:
            warnings.warn("Coordinator(min_peers=) is now max_peers=: it is the most peers "
                          "a round admits (registration closes when that many registered)",
                          DeprecationWarning, stacklevel=2)
            max_peers = min_peers if max_peers is None else max_peers
        if max_peers is None:
            raise TypeError("Coordinator() needs max_peers=: registration closes when that "
                            "many peers registered, or at the phase deadline with at least "
                            "threshold")
        self.max_peers = max_peers
        self.host, self.port = host, port
        self.session = session or os.urandom(16)
        # Validate everything now, so a bad parameter fails before any peer connects.
        self._template = ServerConfig(
            session=self.session, round=0, max_peers=max_peers, threshold=threshold, dim=dim,
            threat_model=threat_model, graph=graph, fan_in=fan_in, clip=clip, scale=scale,
            modulus_bits=modulus_bits, weighted=weighted, max_weight=max_weight,
            phase_timeout=phase_timeout or BASE_PHASE_TIMEOUT, mode=mode,
            paillier_key_bits=paillier_key_bits, dp=dp)
        self._template.encoder()
        if phase_timeout is None:
            self._template = dataclasses.replace(
                self._template, phase_timeout=self._template.derived_phase_timeout())
        self.phase_timeout = self._template.phase_timeout
        self._dp_rounds: list[int] = []
        """Contributors of every released DP round so far (for the privacy spent)."""
        self._ssl = ssl_context
        self._progress = progress
        # The largest frame any round of this session can legitimately carry.
        payload_bytes = None
        if round_mode(mode).encrypts:
            layout = slot_layout(key_bits=paillier_key_bits, modulus_bits=modulus_bits,
                                 peers=max_peers)
            payload_bytes = layout.ciphertext_count(self._template.wire_dim) * \
                layout.ciphertext_bytes
        self._max_frame = Limits.for_round(
            max_peers=max_peers, dim=self._template.wire_dim, modulus_bits=modulus_bits,
            payload_bytes=payload_bytes).max_frame_bytes
        # A stalled peer keeps its connection open: pings find it within a fraction
        # of a phase (secagg.protocol.common.keepalive_seconds), and so does a send that
        # stops making progress (secagg.driver.Outbox).
        self._keepalive = keepalive_seconds(self.phase_timeout)
        self._server: Server | None = None
        self._gate: _AcceptGate | None = None
        self._connections: dict[str, _Client] = {}
        """Every open connection, by token and (once registered) by name."""
        self._next_token = 0
        self._round_number = -1
        self._protocol: ServerProtocol | None = None
        self._loop = ActionLoop("coordinator", send=self._send, disconnect=self._disconnect,
                                bind=self._bind, on_phase=self._on_phase)
        self._bytes_in = 0
        self._bytes_out = 0
        self._phase_times: dict[str, float] = {}

    # ---------------------------------------------------------- lifecycle

    async def __aenter__(self) -> Coordinator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        listener = _listening_socket(self.host, self.port)
        limit = open_file_limit()
        capacity = None
        gate = _AcceptGate(None, limit)  # holds the spare descriptor from now on
        if limit is not None:
            in_use = open_descriptors()
            in_use = in_use if in_use is not None else 32  # unknown: a typical start
            capacity = max(0, limit - in_use - DESCRIPTOR_RESERVE)
            gate.capacity = capacity
        listener.gate = gate
        try:
            self._server = await serve(
                self._serve_connection, sock=listener, compression=None,
                max_size=self._max_frame, ssl=self._ssl,
                ping_interval=None)  # secagg.driver.start_keepalive, per connection
        except BaseException:
            listener.close()
            gate.close()
            raise
        self._gate = gate
        self.port = listener.getsockname()[1]
        log.info("coordinator listening on %s (room for %s connections under the open-file "
                 "limit of %s)", self.url, capacity if capacity is not None else "any number",
                 limit if limit is not None else "none")
        if capacity is not None and capacity < self.max_peers:
            log.warning("the open-file limit of %d leaves room for %d connections, fewer "
                        "than max_peers %d: raise it (ulimit -n) or rounds go on with the "
                        "peers that fit", limit, capacity, self.max_peers)

    @property
    def url(self) -> str:
        scheme = "wss" if self._ssl else "ws"
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def connected_names(self) -> frozenset[str]:
        """The peers connected under a registered name (in this round or an earlier one
        of the session): a test's barrier for "the coordinator knows this peer"."""
        return frozenset(c.name for c in self._clients() if c.name and c.closing is None)

    async def close(self) -> None:
        self._loop.stop()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        if self._gate is not None:
            self._gate.close()
            self._gate = None
        # All at once: a stalled client makes each step wait out its timeout.
        clients = self._clients()
        await asyncio.gather(*(client.outbox.drain(2) for client in clients))
        await asyncio.gather(*(close_within(client.connection, CLOSE_HANDSHAKE_SECONDS)
                               for client in clients))

    # --------------------------------------------------------------- rounds

    async def run_round(self) -> RoundResult:
        """Open a round, run it to the end, and return its result."""
        if self._server is None:
            raise RuntimeError("start the coordinator first (async with Coordinator(...))")
        self._round_number += 1
        config = dataclasses.replace(self._template, round=self._round_number)
        protocol = ServerProtocol(config)
        self._protocol = protocol
        self._bytes_in = self._bytes_out = 0
        self._phase_times = {}
        log.info("round %d: registration open", self._round_number)
        finished = self._loop.begin(protocol, protocol.start(connected=len(self._clients())))
        # Everyone connected hears of the round alike (late connections get the same
        # notice from the protocol when they arrive).
        notice = encode(protocol.round_open())
        for client in self._clients():
            self._enqueue(client, notice)
        outcome = await finished
        assert isinstance(outcome, ServerOutcome)
        # Let the outcome notices drain before the next round starts.
        await asyncio.sleep(0)
        stats = dict(outcome.stats)
        stats.update(phase_seconds=dict(self._phase_times), bytes_in=self._bytes_in,
                     bytes_out=self._bytes_out, status=outcome.status, reason=outcome.reason,
                     dropped=dict(outcome.dropped))
        if outcome.status == "ok" and "dp" in stats:
            self._dp_rounds.append(len(outcome.contributors))
            stats["dp"] = {**stats["dp"], **self._privacy_spent(protocol)}
        log.info("round %d: %s %s (%d contributors)", self._round_number, outcome.status,
                 outcome.reason, len(outcome.contributors))
        return RoundResult(aggregate=outcome.aggregate, contributors=list(outcome.contributors),
                           stats=stats, outcome=outcome)

    def _privacy_spent(self, protocol: ServerProtocol) -> dict[str, Any]:
        """Epsilon at the round's delta over every released round of the session."""
        params = protocol.encoder.dp
        if params is None:
            return {}
        try:
            spent = epsilon(params, contributors=self._dp_rounds)
        except ImportError as exc:  # the accounting needs the dp extra
            return {"epsilon": None, "epsilon_note": str(exc)}
        return {"epsilon": spent, "rounds": len(self._dp_rounds)}

    # ------------------------------------------------------- connections

    def _clients(self) -> list[_Client]:
        return list({id(c): c for c in self._connections.values()}.values())

    async def _serve_connection(self, connection: ServerConnection) -> None:
        self._next_token += 1
        token = f"#{self._next_token}"
        client = _Client(connection, token, Outbox(
            connection.send, max_frames=MAX_OUTBOX_FRAMES,
            send_timeout=self._template.phase_timeout, stall_timeout=self._keepalive,
            backlog=connection.transport.get_write_buffer_size, on_sent=self._count_out,
            on_stuck=connection.transport.abort, label=f"coordinator: connection {token}"))
        client.outbox.start()
        start_keepalive(connection, self._keepalive, f"coordinator: connection {token}")
        self._connections[token] = client
        protocol = self._protocol
        if protocol is not None and not protocol.finished:
            self._loop.feed(PeerConnected(token))
        fault: tuple[DropReason, str] | None = None
        try:
            async for frame in connection:
                if isinstance(frame, str):
                    fault = (DropReason.MALFORMED_MESSAGE,
                             "text frames are not part of the protocol")
                    break
                self._bytes_in += len(frame)
                self._on_frame(client, frame)
                if client.closing is not None:
                    break
        except ConnectionClosed as exc:
            if exc.sent is not None and exc.sent.code == 1009:
                fault = (DropReason.MALFORMED_MESSAGE,
                         f"frame over the size limit of {self._max_frame} bytes")
        finally:
            self._on_closed(client, fault)
            if client.closing is not None:
                # Deliver the queued notice and close with the reason before returning
                # (returning from the handler closes the connection at once). Frames
                # still coming are read and discarded meanwhile: unread, they would fill
                # websockets' receive queue, it would stop reading the socket, and the
                # closing handshake behind them would wait out its timeout.
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(CLOSE_FLUSH_SECONDS + CLOSE_HANDSHAKE_SECONDS):
                        await asyncio.gather(client.closing, _discard_frames(connection))
                connection.transport.abort()  # a no-op once closed

    def _on_frame(self, client: _Client, frame: bytes) -> None:
        origin = client.name or client.token
        protocol = self._protocol
        limits = protocol.limits() if protocol is not None else Limits(
            max_frame_bytes=self._max_frame)
        try:
            env = decode(frame, limits)
        except WireError:
            if protocol is None:
                self._drop(client, DropReason.MALFORMED_MESSAGE, "malformed frame")
            else:  # the protocol decodes it again and says precisely what is wrong
                self._loop.feed(FrameReceived(origin, frame))
            return
        if isinstance(env.body, Forward):
            self._relay(client, env)
            return
        if not client.name and env.sender in self._connections:
            # One live connection per name: the first keeps it.
            self._reject(client, DropReason.DUPLICATE_ID,
                         f"peer id {env.sender!r} is already connected (duplicate id)")
            return
        if protocol is None:
            self._reject(client, DropReason.NOT_REGISTERED,
                         "no round is open; wait for the round notice")
            return
        self._loop.feed(MessageReceived(env, origin=origin))

    def _relay(self, client: _Client, env: Envelope) -> None:
        """A peer asks us to relay a sealed frame: the round's protocol decides (in any
        state, between rounds too, so that a flood is cut off whenever it comes)."""
        protocol = self._protocol
        if protocol is None:
            self._reject(client, DropReason.NOT_REGISTERED,
                         "no round is open; wait for the round notice")
            return
        try:
            actions = protocol.relay(client.name or client.token, env)
        except Exception:  # a bug in secagg, not the sender's fault: keep serving
            log.exception("coordinator: internal error relaying a forward from %s",
                          client.label)
            return
        # The relayed frame goes to a bound name; an unknown one is not connected.
        self._loop.apply(actions)

    def _on_closed(self, client: _Client, fault: tuple[DropReason, str] | None) -> None:
        for key in (client.token, client.name):
            if key and self._connections.get(key) is client:
                del self._connections[key]
        client.outbox.close()
        if fault is not None:
            log.warning("dropping %s: %s", client.label, fault[1])
        if self._protocol is None:
            return
        if not client.name:
            # Registration waits for every connection told of the round: it must hear
            # of one that closed unregistered (its process died) to stop waiting for it.
            self._loop.feed(PeerGone(client.token))
        elif fault is not None:
            self._loop.feed(ConnectionFault(client.name, *fault))
        else:
            self._loop.feed(PeerGone(client.name))

    # ------------------------------------------------------------ actions

    def _send(self, action: Send) -> None:
        client = self._connections.get(action.recipient)
        if client is not None:
            self._enqueue(client, encode(action.envelope))

    def _disconnect(self, action: Disconnect) -> None:
        client = self._connections.get(action.name)
        if client is None:
            return
        log.warning("dropping %s: %s: %s", client.label, action.reason.value, action.detail)
        self._close_after_flush(client, action.detail or action.reason.value)

    def _bind(self, action: Bind) -> None:
        client = self._connections.get(action.connection)
        if client is None:
            return
        client.name = action.name
        self._connections[action.name] = client

    def _on_phase(self, old: str, new: str, seconds: float) -> None:
        if old:
            self._phase_times[old] = round(seconds, 6)
        if self._progress is not None:
            self._progress(new, self._round_number)

    def _count_out(self, size: int) -> None:
        self._bytes_out += size

    def _enqueue(self, client: _Client, frame: bytes) -> None:
        try:
            client.outbox.put(frame)
        except OutboxFull as exc:
            detail = f"not reading: {exc}"
            self._drop(client, DropReason.DISCONNECTED, detail)
            if client.name and self._protocol is not None:
                # Not now: we may be carrying out the protocol's actions at this moment.
                asyncio.get_running_loop().call_soon(self._loop.feed, ConnectionFault(
                    client.name, DropReason.DISCONNECTED, detail))

    def _drop(self, client: _Client, reason: DropReason, detail: str) -> None:
        """Cut a connection off for what it sent (or did not read)."""
        log.warning("dropping %s: %s: %s", client.label, reason.value, detail)
        self._close_after_flush(client, detail)

    def _reject(self, client: _Client, reason: DropReason, detail: str) -> None:
        log.warning("rejecting %s: %s", client.label, detail)
        self._enqueue(client, encode(Envelope(session=self.session,
                                              round=max(self._round_number, 0), sender=SERVER,
                                              body=Rejected(reason=detail))))
        self._close_after_flush(client, detail)

    def _close_after_flush(self, client: _Client, reason: str) -> None:
        if client.closing is not None:
            return

        async def close_later() -> None:
            await client.outbox.drain(CLOSE_FLUSH_SECONDS)
            await client.connection.close(code=1008, reason=reason[:120])

        client.closing = asyncio.get_running_loop().create_task(close_later())
