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
from collections.abc import Callable, Mapping

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from peers.links import LINK_WAIT, Connection, Links
from secagg.crypto.keys import RandomBytes
from secagg.crypto.signing import SigningKey
from secagg.driver import (
    ActionLoop,
    Outbox,
    OutboxFull,
    close_within,
    set_keepalive,
    start_keepalive,
    turn,
)
from secagg.errors import EncodingError, WireError
from secagg.protocol import (
    DeliveryFailed,
    MessageReceived,
    PeerGone,
    PeerOutcome,
    PeerProtocol,
)
from secagg.protocol.common import MODES, Mode, ThreatModel, keepalive_seconds, round_limits
from secagg.protocol.events import Action, Bind, Disconnect, FrameReceived, Send
from secagg.protocol.modes import round_mode, slot_layout
from secagg.wire import (
    SERVER,
    EncryptedShares,
    Envelope,
    Forward,
    Limits,
    MaskingStart,
    NewRoot,
    PeerDropped,
    Rejected,
    RoundOpen,
    Withdraw,
    decode,
    encode,
    validate_names,
)

log = logging.getLogger("secagg.peer")

ProgressCallback = Callable[[str, int], None]
"""Called as ``progress(phase, round)`` whenever this peer's round changes phase."""

# The largest frame a peer accepts at all; each round's notice lowers it to what the
# round can carry, and the wire limits of the round apply on top once the roster is known.
DEFAULT_MAX_FRAME = 256 << 20
# Until a round is announced nothing large may arrive on a peer link.
IDLE_FRAME_LIMIT = 64 << 10
# Connections other peers may hold to our listener: the round's peers plus slack
# (a roster of n peers has at most n - 1 neighbours and tree relatives).
INCOMING_SLACK = 16
MAX_EARLY_FRAMES = 256
MAX_EARLY_BYTES = 64 << 20
"""Frames of a round this peer has not started yet, kept until it starts (bounded)."""
MAX_SERVER_OUTBOX = 1024
IDLE_KEEPALIVE = 2.0  # the floor of secagg.protocol.common.keepalive_seconds
IDLE_SEND_TIMEOUT = 30.0
OPEN_TIMEOUT = 10.0
"""How long opening a websocket (TCP and handshake) may take, at least; in a round, at
least one keepalive interval: a listener on a busy machine answers late, not never."""
ROUND_NOTICE_WAIT = 600.0
"""How long ``contribute`` waits for the coordinator to open a round, by default."""
ROUND_DEADLINES = 8
"""How many phase deadlines ``contribute`` waits for an open round to end, by default:
five phases, deadlines staggered within R2, and slack for the coordinator's follow-ups."""
SERVER_SILENCE_DEADLINES = 2.0
"""In a round, how many phase deadlines this peer waits for the coordinator's next frame
before it gives up on it (as on a lost connection). The coordinator ends each phase
within one deadline and then tells every peer still in the round what comes next; two
allow for a phase restarted once (a new root). A coordinator that is stopped is noticed
sooner, by the keepalive; this catches one that answers pings and sends nothing."""
CLOSE_SECONDS = 5.0
"""How long closing one connection may take before it is aborted."""


def clipped_by(vector: np.ndarray, notice: RoundOpen) -> str:
    """What the announced round would clip of ``vector`` ("" if nothing)."""
    if notice.clip <= 0:
        return ""
    if notice.dp_noise_multiplier > 0:
        norm = float(np.linalg.norm(vector))
        return (f"the input's L2 norm {norm:.6g} exceeds the round's clip {notice.clip:g}"
                if norm > notice.clip else "")
    count = int(np.count_nonzero(np.abs(vector) > notice.clip))
    return (f"{count} of {vector.shape[0]} coordinates lie outside the round's clipping "
            f"range [-{notice.clip:g}, {notice.clip:g}]" if count else "")


def check_input(vector: np.ndarray, weight: float) -> np.ndarray:
    """The input as a float64 vector; ValueError naming the problem if it cannot be sent."""
    values = np.asarray(vector, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"the input must be a 1-D vector, got shape {values.shape}")
    finite = np.isfinite(values)
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        raise ValueError(f"the input has {int((~finite).sum())} non-finite coordinate(s) "
                         f"(NaN or inf), the first at index {bad}: {values[bad]}")
    if not (np.isfinite(weight) and weight >= 0):
        raise ValueError(f"the weight must be finite and non-negative, got {weight}")
    return values


class PeerError(Exception):
    """The peer cannot take part (server unreachable, rejected, closed)."""


class Peer:
    """A secure-aggregation peer, embeddable in an asyncio application.

    Liveness: only the coordinator connection is pinged (every
    :func:`~secagg.protocol.common.keepalive_seconds` of the round's deadline). Peer
    links carry no pings: the coordinator pings every peer, so it is the one that
    notices a stalled peer and tells those who wait on it (``PeerDropped``), and a
    send to a peer that stopped reading is caught by the link's outbox. Pinging every
    link too would cost each peer one ping per neighbour per interval: at 1,000 peers
    of degree 54, thousands of pings a second on one machine, for nothing the
    coordinator's do not already tell.
    """

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
        trusted_identities: Mapping[str, bytes] | None = None,
        progress: ProgressCallback | None = None,
        connect_attempts: int = 5,
        backoff: float = 0.2,
        max_frame_bytes: int = DEFAULT_MAX_FRAME,
        link_wait: float = LINK_WAIT,
        random_bytes: RandomBytes = os.urandom,
        mode: Mode | None = None,
        min_noise_multiplier: float | None = None,
        threat_model: ThreatModel | None = None,
    ) -> None:
        """``mode`` restricts this peer to rounds of that mode ("masking", "paillier"
        or "hybrid"); with None it takes part in whatever mode the coordinator runs.
        ``min_noise_multiplier`` is this peer's distributed-DP floor: it declines
        rounds that add less noise (or none).

        ``identity`` is this peer's Ed25519 signing key and ``trusted_identities``
        (peer id -> public key) the closed list of peers it accepts in a roster (its
        own id may be left out). ``threat_model`` restricts it to rounds of that threat
        model; it defaults to ``"active"`` for a peer with an identity key or pinned
        identities (a peer that signs and checks keys is not silently downgraded to
        honest-but-curious, where no signature is checked), to any otherwise. A round
        of another threat model is declined when its roster arrives (the outcome is
        ``aborted``, naming both models)."""
        if min_noise_multiplier is not None and not min_noise_multiplier >= 0:
            raise ValueError(f"min_noise_multiplier must be >= 0, got {min_noise_multiplier}")
        self.min_noise_multiplier = min_noise_multiplier
        validate_names([peer_id])
        if mode is not None and mode not in MODES:
            raise ValueError(f"mode must be one of {MODES} or None, not {mode!r}")
        self.mode = mode
        # Each round builds its own PeerProtocol; this one only checks the identity
        # settings now (ValueError here, not at the first round) and resolves the default.
        self.threat_model = PeerProtocol(
            peer_id, identity=identity, trusted_identities=trusted_identities,
            threat_model=threat_model).required_threat_model
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
        self._frame_limit = min(IDLE_FRAME_LIMIT, max_frame_bytes)
        self._max_incoming = INCOMING_SLACK
        self._link_wait = link_wait
        self._random_bytes = random_bytes
        self.address = ""
        # Until a round says how long its phases are, pings go every IDLE_KEEPALIVE s.
        self._keepalive = IDLE_KEEPALIVE
        self._send_timeout = IDLE_SEND_TIMEOUT
        self._open_timeout = OPEN_TIMEOUT
        self._listener: Server | None = None
        self._server: ClientConnection | None = None
        self._server_reader: asyncio.Task[None] | None = None
        self._server_outbox: Outbox | None = None
        self._links = Links(own_name=peer_id, dial=self._connect, forward=self._forward_via_server,
                            delivery_failed=self._delivery_failed, reader=self._read_link,
                            on_sent=self._count_out)
        self._incoming: dict[str, Connection] = {}
        """Connections other peers opened to our listener, by token (``#1``, ...)."""
        self._bound: dict[str, str] = {}
        """Token of an incoming connection -> the peer the protocol bound it to."""
        self._next_token = 0
        self._server_heard = 0.0
        """Event-loop time of the last frame from the coordinator."""
        self._round_open: Envelope | None = None
        self._round_event = asyncio.Event()
        self._rejected: str | None = None
        """Why the coordinator last turned this peer away outside a round of its own."""
        self._rejected_round = -1
        """The round it was turned away from: news for ``contribute`` while later than
        the last round reported."""
        self._server_closed = False
        self._protocol: PeerProtocol | None = None
        self._loop = ActionLoop(peer_id, send=self._send, disconnect=self._disconnect,
                                bind=self._bind, on_phase=self._on_phase,
                                on_internal_error=self._internal_error)
        self._early: list[tuple[bytes, str]] = []
        self._early_bytes = 0
        self._last_round = -1
        self.bytes_sent = 0
        self.bytes_received = 0
        self.frames_sent = 0
        self.links_dialled = 0
        """Connections this peer opened to other peers' listeners (monitoring)."""

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
                ssl=self._listener_ssl, ping_interval=None)  # see the class docstring
            bound = next(iter(self._listener.sockets)).getsockname()
            scheme = "wss" if self._listener_ssl else "ws"
            self.address = f"{scheme}://{self._advertise_host or host}:{bound[1]}"
            self._links.own_address = self.address
        self._server = await self._connect(self.server_url)
        if self._server is None:
            raise PeerError(f"cannot reach the coordinator at {self.server_url}")
        server = self._server
        self._server_outbox = Outbox(server.send, max_frames=MAX_SERVER_OUTBOX,
                                     send_timeout=self._send_timeout,
                                     stall_timeout=self._keepalive,
                                     backlog=server.transport.get_write_buffer_size,
                                     on_sent=self._count_out,
                                     on_stuck=server.transport.abort,
                                     label=f"{self.peer_id}: the coordinator")
        self._server_outbox.start()
        self._server_reader = asyncio.create_task(self._read_server(server))

    def crash(self) -> None:
        """Die abruptly, as a killed process would: abort every socket, say nothing.

        For tests and dropout scenarios inside one event loop; the other parties see
        the connections reset, exactly as with SIGKILL. Call :meth:`close` afterwards
        to release the tasks.
        """
        self._protocol = None
        self._loop.abandon()
        connections: list[Connection] = [*self._incoming.values(),
                                         *self._links.connections()]
        if self._server is not None:
            connections.append(self._server)
        for connection in connections:
            connection.transport.abort()
        # Nothing queued or half-connected may leave after death.
        self._links.crash()
        if self._server_outbox is not None:
            self._server_outbox.cancel()
        if self._listener is not None:
            self._listener.close()

    async def close(self) -> None:
        self._loop.stop()
        if self._server_outbox is not None:
            await self._server_outbox.drain(2)
        if self._server is not None:
            await close_within(self._server, CLOSE_SECONDS)
        if self._server_reader is not None:
            self._server_reader.cancel()
            with contextlib.suppress(BaseException):
                await self._server_reader
        await self._links.close()
        await asyncio.gather(*(close_within(incoming, CLOSE_SECONDS)
                               for incoming in list(self._incoming.values())))
        if self._listener is not None:
            self._listener.close()
            await self._listener.wait_closed()
            self._listener = None
        self._loop.abandon()

    # ---------------------------------------------------------------- API

    async def contribute(self, vector: np.ndarray, weight: float = 1.0, *,
                         timeout: float | None = None, strict: bool = False) -> PeerOutcome:
        """Take part in the next round with ``vector``; return how the round ended.

        ``vector`` must be 1-D and finite and ``weight`` finite and non-negative
        (ValueError before anything is sent). If the announced round expects another
        length, the peer withdraws from it (the coordinator drops it at once instead
        of waiting for it) and raises ValueError.

        Coordinates outside the round's clipping range are clipped (the outcome's
        ``clipped`` says how many, and a warning is logged); with ``strict`` the peer
        withdraws instead and raises ValueError.

        ``timeout`` bounds the whole call (TimeoutError). By default the peer waits
        at most ``ROUND_NOTICE_WAIT`` seconds for a round to open and then at most
        ``ROUND_DEADLINES`` phase deadlines of that round for its end.
        """
        if self._protocol is not None and not self._protocol.finished:
            raise PeerError("a round is already in progress for this peer")
        vector = check_input(vector, weight)
        try:
            async with asyncio.timeout(timeout) as limit:
                return await self._contribute(vector, weight, bounded=timeout is None,
                                              strict=strict)
        except TimeoutError:
            self._give_up()
            if not limit.expired():
                raise  # one of _contribute's own limits, with its own message
            raise TimeoutError(f"{self.peer_id}: no round ended within the {timeout} s "
                               "allowed (timeout=)") from None

    async def _contribute(self, vector: np.ndarray, weight: float, *,
                          bounded: bool, strict: bool) -> PeerOutcome:
        try:
            async with asyncio.timeout(ROUND_NOTICE_WAIT if bounded else None):
                open_round = await self._next_round()
        except TimeoutError:
            raise TimeoutError(f"{self.peer_id}: the coordinator opened no round within "
                               f"{ROUND_NOTICE_WAIT:.0f} s (pass timeout= to wait longer)"
                               ) from None
        if open_round is None:
            # A rejection older than a round taken part in since is no news.
            reason = self._rejected if self._rejected_round >= self._last_round else None
            if reason is None:
                return PeerOutcome(status="aborted", round=self._last_round + 1,
                                   reason="lost the connection to the coordinator")
            round_number = max(self._rejected_round, self._last_round + 1)
            self._last_round = max(self._last_round, self._rejected_round)
            if not self._server_closed:
                # Turned away from this round only (its registration had closed): the
                # connection stays, and the next call waits for a later round.
                self._rejected = None
            return PeerOutcome(status="rejected", round=round_number, reason=reason)
        notice = open_round.body
        assert isinstance(notice, RoundOpen)
        self._last_round = open_round.round
        if vector.shape[0] != notice.dim:
            reason = (f"the round expects a vector of {notice.dim} coordinates, got "
                      f"{vector.shape[0]}")
            self._withdraw(open_round, reason)
            raise ValueError(reason)
        if strict:
            outside = clipped_by(vector, notice)
            if outside:
                self._withdraw(open_round, f"strict: {outside}")
                raise ValueError(f"{outside}; raise the round's clip or scale the input "
                                 "(strict=True refuses to clip)")
        if self.min_noise_multiplier is not None and \
                notice.dp_noise_multiplier < self.min_noise_multiplier:
            reason = (f"the round adds distributed-DP noise of multiplier "
                      f"{notice.dp_noise_multiplier:g}, below this peer's floor "
                      f"min_noise_multiplier={self.min_noise_multiplier:g}")
            log.warning("%s: declines round %d: %s", self.peer_id, open_round.round, reason)
            self._withdraw(open_round, reason)
            return PeerOutcome(status="aborted", round=open_round.round, reason=reason)
        if self.mode is not None and notice.mode != self.mode:
            # Decline before registering, so the round is not held up by a peer that
            # would only abort when the roster comes.
            reason = (f"the round runs in {notice.mode} mode, this peer takes part only in "
                      f"{self.mode} mode")
            log.warning("%s: declines round %d: %s", self.peer_id, open_round.round, reason)
            self._withdraw(open_round, reason)
            return PeerOutcome(status="aborted", round=open_round.round, reason=reason)
        if self.threat_model is not None and notice.threat_model and \
                notice.threat_model != self.threat_model:
            reason = (f"the round runs under the {notice.threat_model} threat model, this "
                      f"peer takes part only under {self.threat_model}")
            log.warning("%s: declines round %d: %s", self.peer_id, open_round.round, reason)
            self._withdraw(open_round, reason)
            return PeerOutcome(status="aborted", round=open_round.round, reason=reason)
        protocol = PeerProtocol(self.peer_id, address=self.address,
                                random_bytes=self._random_bytes, identity=self._identity,
                                trusted_identities=self._trusted, mode=self.mode,
                                min_noise_multiplier=self.min_noise_multiplier,
                                threat_model=self.threat_model)
        self._protocol = protocol
        # Wait long for the other end of a pair to open the shared connection: a peer
        # that died is announced by the coordinator, which ends the wait sooner.
        self._links.patience = max(self._link_wait, 0.6 * notice.phase_timeout)
        finished = self._loop.begin(protocol, protocol.start(
            open_round.session, open_round.round, vector, weight))
        early, self._early, self._early_bytes = self._early, [], 0
        for frame, origin in early:
            self._on_peer_frame(frame, origin)
        round_limit = None
        if bounded and notice.phase_timeout > 0:
            round_limit = ROUND_DEADLINES * notice.phase_timeout
        watchdog = None
        if notice.phase_timeout > 0:
            watchdog = asyncio.ensure_future(self._watch_server(
                open_round.round, SERVER_SILENCE_DEADLINES * notice.phase_timeout))
        try:
            async with asyncio.timeout(round_limit):
                outcome = await asyncio.shield(finished)
        except TimeoutError:
            raise TimeoutError(f"{self.peer_id}: round {open_round.round} did not end within "
                               f"{ROUND_DEADLINES} phase deadlines ({round_limit:.0f} s)"
                               ) from None
        finally:
            if watchdog is not None:
                watchdog.cancel()
        assert isinstance(outcome, PeerOutcome)
        if protocol.index >= 0:  # (a round that never had a roster says nothing of them)
            self._keep_links_to(protocol.neighbour_names())
        return outcome

    def _keep_links_to(self, names: frozenset[str]) -> None:
        """Close every peer link but those to ``names``, this round's graph neighbours.

        The next round of the same roster has the same graph (the seed is the
        session's), so these are the links it reuses; tree relatives change every
        round and are dialled again if needed. Without this a peer would keep a
        link to everyone it ever shared with, up to n - 1 descriptors over rounds
        whose rosters differ, where the sparse graph promises about its degree."""
        doomed: dict[int, Connection] = {}
        for name in [name for name in self._links.by_name if name not in names]:
            connection = self._links.close_link(name)
            if connection is not None:
                doomed[id(connection)] = connection
        for token, connection in list(self._incoming.items()):
            if self._bound.get(token) not in names:
                del self._incoming[token]
                self._bound.pop(token, None)
                doomed[id(connection)] = connection
        for connection in doomed.values():
            self._close_soon(connection)

    async def _watch_server(self, round_number: int, silence: float) -> None:
        """Give up on a coordinator that sends nothing for ``silence`` seconds of a round:
        abort the connection, which ends the round as a lost connection does."""
        loop = asyncio.get_running_loop()
        # Counted from this round's start at the earliest (the notice may be older).
        self._server_heard = max(self._server_heard, loop.time())
        while (quiet := loop.time() - self._server_heard) < silence:
            await asyncio.sleep(silence - quiet)
        log.warning("%s: round %d: the coordinator has sent nothing for %.0f s (%g phase "
                    "deadlines); giving up on it", self.peer_id, round_number, silence,
                    SERVER_SILENCE_DEADLINES)
        if self._server is not None:
            self._server.transport.abort()

    def _withdraw(self, open_round: Envelope, reason: str) -> None:
        """Tell the coordinator not to wait for us in this round."""
        self._send_to_server(Envelope(session=open_round.session, round=open_round.round,
                                      sender=self.peer_id, body=Withdraw(reason=reason[:500])))

    def _give_up(self) -> None:
        """Leave a round we stopped waiting for: forget it, as a crash would locally."""
        protocol = self._protocol
        if protocol is not None and not protocol.finished:
            self._loop.abandon()
            self._protocol = None  # the next contribute() starts afresh

    # ------------------------------------------------------ the server link

    async def _connect(self, url: str, attempts: int | None = None) -> ClientConnection | None:
        """Open a websocket with bounded retries and exponential backoff; None on failure."""
        attempts = self._attempts if attempts is None else attempts
        delay = self._backoff
        for attempt in range(attempts):
            try:
                connection = await connect(
                    url, compression=None, max_size=self._max_frame,
                    ssl=self._client_ssl if url.startswith("wss") else None, proxy=None,
                    open_timeout=self._open_timeout, ping_interval=None)
                if url == self.server_url:
                    # Our own keepalive (see Peer docstring: peer links carry none).
                    start_keepalive(connection, self._keepalive,
                                    f"{self.peer_id}: the coordinator")
                else:
                    self.links_dialled += 1
                return connection
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
        loop = asyncio.get_running_loop()
        try:
            async for frame in connection:
                self._server_heard = loop.time()
                if isinstance(frame, bytes):
                    self.bytes_received += len(frame)
                    async with turn():
                        self._on_server_frame(frame)
        except ConnectionClosed:
            pass
        finally:
            self._server_closed = True
            self._round_event.set()
            self._loop.feed(PeerGone(SERVER))

    def _round_frame_limit(self, notice: RoundOpen) -> int:
        """The largest peer-to-peer frame of the announced round (worst case: weighted,
        64-bit ring, encrypted in the paillier and hybrid modes)."""
        peers, dim = max(notice.max_peers, 1), notice.dim + 1
        payload_bytes = None
        try:
            if round_mode(notice.mode).encrypts:
                layout = slot_layout(key_bits=notice.paillier_key_bits, modulus_bits=64,
                                     peers=peers)
                payload_bytes = layout.ciphertext_count(dim) * layout.ciphertext_bytes
        except (EncodingError, ValueError) as exc:
            log.warning("%s: the round notice has unusable parameters (%s)", self.peer_id, exc)
            return self._max_frame
        return round_limits(peers=peers, dim=dim, modulus_bits=64,
                            payload_bytes=payload_bytes).max_frame_bytes

    def _on_server_frame(self, frame: bytes) -> None:
        protocol = self._protocol
        # Server frames carry no vectors: generic limits, the protocol checks the rest
        # (a finished round's roster size must not constrain the next round's notices).
        try:
            env = decode(frame, Limits(max_frame_bytes=self._max_frame))
        except WireError:
            self._loop.feed(FrameReceived(SERVER, frame))  # the protocol says what is wrong
            return
        if env.sender != SERVER:
            log.warning("%s: frame on the coordinator link claims sender %r", self.peer_id,
                        env.sender)
            return
        body = env.body
        if isinstance(body, RoundOpen):
            # Size the peer links' frame limit from the round (the wire limits of the
            # round apply on top once the roster is known).
            self._frame_limit = min(self._round_frame_limit(body), self._max_frame)
            self._max_incoming = body.max_peers + INCOMING_SLACK
            if body.phase_timeout > 0:
                self._keepalive = keepalive_seconds(body.phase_timeout)
                self._send_timeout = body.phase_timeout
                self._links.set_timeouts(send=body.phase_timeout, stall=self._keepalive)
                if self._server_outbox is not None:
                    self._server_outbox.send_timeout = body.phase_timeout
                    self._server_outbox.stall_timeout = self._keepalive
            self._open_timeout = max(OPEN_TIMEOUT, self._keepalive)
            if self._server is not None:
                set_keepalive(self._server, self._keepalive)
            for connection in self._peer_connections():
                self._limit_frames(connection)
            self._round_open = env
            self._round_event.set()
            return
        if isinstance(body, Forward):
            self._on_peer_frame(body.frame, "")
            return
        if isinstance(body, PeerDropped) and protocol is not None:
            self._links.abandon(protocol.name_of(body.peer))
        if isinstance(body, Rejected) and (protocol is None or protocol.finished):
            log.warning("%s: rejected by the coordinator: %s", self.peer_id, body.reason)
            self._rejected = body.reason
            self._rejected_round = env.round
            self._round_event.set()
            return
        if protocol is None or env.round != protocol.round:
            log.info("%s: ignoring %s for round %d", self.peer_id, env.type, env.round)
            return
        self._log_tree_place(env)
        self._loop.feed(MessageReceived(env, origin=SERVER))

    def _log_tree_place(self, env: Envelope) -> None:
        """Say (with -v) where the coordinator put this peer in the accumulation tree:
        an operator watching a round that stalls needs to know who relays for whom.
        The server names every peer's relatives to them anyway; nothing here is secret."""
        body = env.body
        if isinstance(body, MaskingStart):
            depth, below = len(body.ancestors), len(body.descendants)
            role = "the root" if depth == 0 else "a relay" if below else "a leaf"
            log.info("%s: round %d: in the accumulation tree as %s (depth %d, %d peers "
                     "below)", self.peer_id, env.round, role, depth, below)
        elif isinstance(body, NewRoot) and body.root.name == self.peer_id:
            log.info("%s: round %d: named the new root of the accumulation tree",
                     self.peer_id, env.round)

    async def _next_round(self) -> Envelope | None:
        """The notice of the next round to take part in; None once the connection is
        gone, or when the coordinator turned this peer away from a round that
        ``contribute`` has not reported yet (and no later round has opened since)."""
        while True:
            if self._server_closed:
                return None
            env = self._round_open
            if env is not None and env.round > max(self._last_round, self._rejected_round):
                self._round_open = None
                return env
            if self._rejected is not None and self._rejected_round > self._last_round:
                return None
            self._round_event.clear()
            await self._round_event.wait()

    # ------------------------------------------------------- peer links

    def _peer_connections(self) -> list[Connection]:
        return [*self._incoming.values(), *self._links.connections()]

    def _limit_frames(self, connection: Connection) -> None:
        connection.protocol.max_message_size = self._frame_limit

    async def _serve_link(self, connection: ServerConnection) -> None:
        if len(self._incoming) >= self._max_incoming:
            log.warning("%s: refusing a peer connection: %d are open already", self.peer_id,
                        len(self._incoming))
            await connection.close(code=1013, reason="too many connections")
            return
        self._next_token += 1
        token = f"#{self._next_token}"
        self._incoming[token] = connection
        self._limit_frames(connection)
        try:
            async for frame in connection:
                if isinstance(frame, str):
                    log.warning("%s: text frame on a peer link; closing it", self.peer_id)
                    break
                self.bytes_received += len(frame)
                async with turn():
                    self._on_peer_frame(frame, self._origin_of(token))
                if token not in self._incoming:
                    break  # the protocol cut it off
        except ConnectionClosed:
            pass
        finally:
            self._incoming.pop(token, None)
            self._bound.pop(token, None)
            self._on_link_closed(connection)

    def _origin_of(self, token: str) -> str:
        """The name a connection is bound to, else its token."""
        return self._bound.get(token, token)

    async def _read_link(self, name: str, connection: ClientConnection) -> None:
        try:
            async for frame in connection:
                if isinstance(frame, bytes):
                    self.bytes_received += len(frame)
                    async with turn():
                        self._on_peer_frame(frame, name)
                    if self._links.by_name.get(name) is None:
                        break  # the protocol cut it off
        except ConnectionClosed:
            pass
        finally:
            self._on_link_closed(connection)
            await close_within(connection, CLOSE_SECONDS)

    def _on_peer_frame(self, frame: bytes, origin: str) -> None:
        """Handle a frame from a peer (direct, or forwarded by the coordinator: origin "")."""
        protocol = self._protocol
        if protocol is None or protocol.finished:
            self._keep_early(frame, origin)
            return
        try:
            env = decode(frame, protocol.limits())
        except WireError:
            self._loop.feed(FrameReceived(origin, frame))  # the protocol says what is wrong
            return
        if env.round > protocol.round and env.session == protocol.session:
            self._keep_early(frame, origin)
            return
        self._loop.feed(MessageReceived(env, origin=origin))

    def _keep_early(self, frame: bytes, origin: str) -> None:
        # A neighbour is already in the next round: keep the frame until ours starts.
        if len(self._early) >= MAX_EARLY_FRAMES or \
                self._early_bytes + len(frame) > MAX_EARLY_BYTES:
            log.warning("%s: too many frames for a round not started yet; dropping one from "
                        "%s", self.peer_id, origin or "the coordinator")
            return
        self._early.append((frame, origin))
        self._early_bytes += len(frame)

    def _on_link_closed(self, connection: Connection) -> None:
        for name in self._links.closed(connection):
            self._loop.feed(PeerGone(name))

    def _delivery_failed(self, name: str, envelopes: list[Envelope]) -> None:
        for envelope in envelopes:
            self._loop.feed(DeliveryFailed(name, envelope))

    def _forward_via_server(self, recipient: str, envelope: Envelope, frame: bytes) -> None:
        # The recipient has no listener: the coordinator forwards the sealed frame.
        self._send_to_server(Envelope(session=envelope.session, round=envelope.round,
                                      sender=self.peer_id,
                                      body=Forward(recipient=recipient, frame=frame)))

    # ------------------------------------------------------------ actions

    def _send(self, action: Send) -> None:
        if action.recipient == SERVER:
            self._send_to_server(action.envelope)
            return
        self._links.send(action.recipient, action.address, action.envelope,
                         encode(action.envelope),
                         exchange=isinstance(action.envelope.body, EncryptedShares))

    def _send_to_server(self, envelope: Envelope) -> None:
        if self._server_outbox is None:
            return
        try:
            self._server_outbox.put(encode(envelope))
        except OutboxFull as exc:
            log.warning("%s: the coordinator is not reading (%s)", self.peer_id, exc)
            # Not now: we may be carrying out the protocol's actions at this moment.
            asyncio.get_running_loop().call_soon(self._loop.feed, PeerGone(SERVER))

    def _disconnect(self, action: Disconnect) -> None:
        log.warning("%s: closing the connection of %s: %s: %s", self.peer_id, action.name,
                    action.reason.value, action.detail)
        if action.name == SERVER:
            return  # the protocol ended the round; the session link stays for the next
        connection = self._incoming.pop(action.name, None) or \
            self._links.close_link(action.name)
        if connection is not None:
            self._close_soon(connection, code=1008, reason=(action.detail or "")[:120])

    def _close_soon(self, connection: Connection, code: int = 1000, reason: str = "") -> None:
        """Close ``connection`` in the background (held with the links' tasks, so that
        closing the peer waits for it or cancels it)."""
        closing = asyncio.ensure_future(close_within(connection, CLOSE_SECONDS, code=code,
                                                     reason=reason))
        self._links.tasks.add(closing)
        closing.add_done_callback(self._links.tasks.discard)

    def _bind(self, action: Bind) -> None:
        connection = self._incoming.get(action.connection)
        if connection is not None:
            self._bound[action.connection] = action.name
            self._links.bind(action.name, connection)

    def _on_phase(self, old: str, new: str, seconds: float) -> None:
        protocol = self._protocol
        if self._progress is not None and protocol is not None:
            self._progress(new, protocol.round)

    def _internal_error(self) -> list[Action]:
        # A bug in secagg, not bad input: leave this round (the log has the traceback).
        protocol = self._protocol
        return protocol.handle(PeerGone(SERVER)) if protocol is not None else []

    def _count_out(self, size: int) -> None:
        self.bytes_sent += size
        self.frames_sent += 1
