"""The coordinator service: an asyncio websocket driver around ``ServerProtocol``.

One websocket per peer, kept for the whole session (every round). For each
round the coordinator announces ``RoundOpen`` to the connected peers, feeds
every decoded frame, closed connection and expired deadline to a fresh
:class:`~secagg.protocol.ServerProtocol`, and carries out what it returns.
It also forwards opaque peer-to-peer frames to peers that have no listener of
their own (they are AEAD-sealed end to end, so the coordinator learns nothing
from them).

The protocol decides what every frame means, including registration, duplicate
ids and late arrivals; the coordinator maps connection tokens (``#1``, ``#2``,
...) and, once the protocol binds them, peer names to websockets, and carries
out the actions through the shared :class:`~secagg.driver.ActionLoop`. A frame
that fails ``secagg.wire`` validation, belongs to another session or round,
claims another peer's name, or is not allowed in the current phase closes that
connection with a logged, specific drop reason; the round goes on for everyone
else. Each client's outbox is bounded: a client that stops reading is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import ssl
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from secagg.dp import DPConfig
from secagg.dp.accounting import epsilon
from secagg.driver import ActionLoop, Outbox, OutboxFull, keepalive_seconds
from secagg.errors import WireError
from secagg.graph import GraphKind
from secagg.paillier import DEFAULT_KEY_BITS
from secagg.protocol import ServerConfig, ServerOutcome, ServerProtocol
from secagg.protocol.common import Mode, ThreatModel
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
        phase_timeout: float = 30.0,
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
        and the privacy spent so far in the session (``stats["dp"]``)."""
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
            phase_timeout=phase_timeout, mode=mode, paillier_key_bits=paillier_key_bits,
            dp=dp)
        self._template.encoder()
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
        # of a phase (see secagg.driver.keepalive_seconds).
        self._keepalive = keepalive_seconds(phase_timeout)
        self._server: Server | None = None
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
        self._server = await serve(
            self._serve_connection, self.host, self.port, compression=None,
            max_size=self._max_frame, ssl=self._ssl, ping_interval=self._keepalive,
            ping_timeout=self._keepalive)
        sock = next(iter(self._server.sockets))
        self.port = sock.getsockname()[1]
        log.info("coordinator listening on %s", self.url)

    @property
    def url(self) -> str:
        scheme = "wss" if self._ssl else "ws"
        return f"{scheme}://{self.host}:{self.port}"

    async def close(self) -> None:
        self._loop.stop()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for client in self._clients():
            await client.outbox.drain(2)
            await client.connection.close()

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
            send_timeout=self._template.phase_timeout, on_sent=self._count_out,
            on_stuck=connection.transport.abort))
        client.outbox.start()
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
                # (returning from the handler closes the connection at once).
                with contextlib.suppress(Exception):
                    await client.closing

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
            self._forward(client, env)
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

    def _forward(self, client: _Client, env: Envelope) -> None:
        body = env.body
        assert isinstance(body, Forward)
        if not client.name:
            self._drop(client, DropReason.UNEXPECTED_MESSAGE, "forward before registration")
            return
        target = self._connections.get(body.recipient)
        if target is None or not target.name:
            log.info("cannot forward from %s to %s: not connected", client.name,
                     body.recipient)
            return
        # Re-label the sender so the recipient knows who relayed: the inner frame is
        # sealed end to end and names its true sender.
        self._enqueue(target, encode(Envelope(session=env.session, round=env.round,
                                              sender=SERVER, body=Forward(
                                                  recipient=client.name, frame=body.frame))))

    def _on_closed(self, client: _Client, fault: tuple[DropReason, str] | None) -> None:
        for key in (client.token, client.name):
            if key and self._connections.get(key) is client:
                del self._connections[key]
        client.outbox.close()
        if fault is not None:
            log.warning("dropping %s: %s", client.label, fault[1])
        if client.name and self._protocol is not None:
            if fault is not None:
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
