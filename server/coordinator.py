"""The coordinator service: an asyncio websocket driver around ``ServerProtocol``.

One websocket per peer, kept for the whole session (every round). For each
round the coordinator announces ``RoundOpen`` to the connected peers, feeds
every decoded frame, closed connection and expired deadline to a fresh
:class:`~secagg.protocol.ServerProtocol`, and carries out what it returns.
It also forwards opaque peer-to-peer frames to peers that have no listener of
their own (they are AEAD-sealed end to end, so the coordinator learns nothing
from them).

A frame that fails ``secagg.wire`` validation, belongs to another session or
round, claims another peer's name, or is not allowed in the current state
closes that connection with a logged reason and drops the sender with reason
``bad_message``; the round goes on for everyone else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from secagg.errors import CryptoError, ProtocolError, WireError
from secagg.graph import GraphKind
from secagg.paillier import DEFAULT_KEY_BITS
from secagg.protocol import (
    CancelTimer,
    Disconnect,
    MessageReceived,
    PeerGone,
    RoundFinished,
    Send,
    ServerConfig,
    ServerOutcome,
    ServerProtocol,
    SetTimer,
    TimerExpired,
)
from secagg.protocol.common import Mode, ThreatModel, round_limits
from secagg.protocol.events import Action
from secagg.wire import (
    SERVER,
    AdvertiseKeys,
    Envelope,
    Forward,
    Limits,
    Rejected,
    RoundOpen,
    decode,
    encode,
)

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


@dataclass(eq=False)
class _Client:
    """One peer's connection to the coordinator."""

    connection: ServerConnection
    name: str = ""
    outbox: asyncio.Queue[bytes | None] = field(default_factory=asyncio.Queue)
    writer: asyncio.Task[None] | None = None
    closing: asyncio.Task[None] | None = None


class Coordinator:
    """Runs secure-aggregation rounds for the peers that connect to it.

    ``async with Coordinator(port=0, min_peers=10, threshold=6, dim=1000) as c:``
    then ``aggregate, contributors, stats = await c.run_round()`` once per round.
    ``progress(phase, round)`` is called whenever a round enters a new phase.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        min_peers: int,
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
    ) -> None:
        self.host, self.port = host, port
        self.session = session or os.urandom(16)
        # Validate everything now, so a bad parameter fails before any peer connects.
        self._template = ServerConfig(
            session=self.session, round=0, min_peers=min_peers, threshold=threshold, dim=dim,
            threat_model=threat_model, graph=graph, fan_in=fan_in, clip=clip, scale=scale,
            modulus_bits=modulus_bits, weighted=weighted, max_weight=max_weight,
            phase_timeout=phase_timeout, mode=mode, paillier_key_bits=paillier_key_bits)
        self._template.encoder()
        self._ssl = ssl_context
        self._progress = progress
        self._limits: Limits = round_limits(peers=min_peers, dim=self._template.wire_dim,
                                            modulus_bits=modulus_bits,
                                            layout=self._template.slot_layout())
        self._server: Server | None = None
        self._clients: dict[str, _Client] = {}
        self._anonymous: set[_Client] = set()
        self._round_number = -1
        self._protocol: ServerProtocol | None = None
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._finished: asyncio.Future[ServerOutcome] | None = None
        self._bytes_in = 0
        self._bytes_out = 0
        self._phase_started = 0.0
        self._phase_times: dict[str, float] = {}
        self._last_state = ""

    # ---------------------------------------------------------- lifecycle

    async def __aenter__(self) -> Coordinator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        self._server = await serve(
            self._serve_connection, self.host, self.port, compression=None,
            max_size=self._limits.max_frame_bytes, ssl=self._ssl, ping_interval=20,
            ping_timeout=20)
        sock = next(iter(self._server.sockets))
        self.port = sock.getsockname()[1]
        log.info("coordinator listening on %s", self.url)

    @property
    def url(self) -> str:
        scheme = "wss" if self._ssl else "ws"
        return f"{scheme}://{self.host}:{self.port}"

    async def close(self) -> None:
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for client in list(self._clients.values()) + list(self._anonymous):
            await self._stop_writer(client)

    # --------------------------------------------------------------- rounds

    async def run_round(self) -> RoundResult:
        """Open a round, run it to the end, and return its result."""
        if self._server is None:
            raise RuntimeError("start the coordinator first (async with Coordinator(...))")
        self._round_number += 1
        config = ServerConfig(**{**self._template.__dict__, "round": self._round_number})
        protocol = ServerProtocol(config)
        self._protocol = protocol
        self._finished = asyncio.get_running_loop().create_future()
        self._bytes_in = self._bytes_out = 0
        self._phase_times = {}
        self._phase_started = time.perf_counter()
        self._last_state = protocol.state
        log.info("round %d: registration open", self._round_number)
        self._apply(protocol.start())
        notice = self._frame(RoundOpen(
            dim=config.dim, weighted=config.weighted, max_peers=config.min_peers,
            mode=config.mode,
            paillier_key_bits=0 if config.mode == "masking" else config.paillier_key_bits))
        for client in list(self._clients.values()) + list(self._anonymous):
            self._enqueue(client, notice)
        outcome = await self._finished
        # Let the outcome notices drain before the next round starts.
        await asyncio.sleep(0)
        stats = dict(outcome.stats)
        stats.update(phase_seconds=dict(self._phase_times), bytes_in=self._bytes_in,
                     bytes_out=self._bytes_out, status=outcome.status, reason=outcome.reason,
                     dropped=dict(outcome.dropped))
        log.info("round %d: %s %s (%d contributors)", self._round_number, outcome.status,
                 outcome.reason, len(outcome.contributors))
        return RoundResult(aggregate=outcome.aggregate, contributors=list(outcome.contributors),
                           stats=stats, outcome=outcome)

    # ------------------------------------------------------- connections

    async def _serve_connection(self, connection: ServerConnection) -> None:
        client = _Client(connection)
        client.writer = asyncio.create_task(self._write(client))
        self._anonymous.add(client)
        protocol = self._protocol
        if protocol is not None and self._finished is not None and not self._finished.done():
            if protocol.state != "collecting_keys":
                # Mid-round: the peer is told so and can leave cleanly.
                self._anonymous.discard(client)
                self._reject(client, f"registration for round {self._round_number} is closed")
                await client.connection.wait_closed()
                return
            self._enqueue(client, self._frame(RoundOpen(
                dim=protocol.config.dim, weighted=protocol.config.weighted,
                max_peers=protocol.config.min_peers)))
        try:
            async for frame in connection:
                if isinstance(frame, str):
                    self._drop_client(client, "text frames are not part of the protocol")
                    break
                self._bytes_in += len(frame)
                if not self._on_frame(client, frame):
                    break
        except ConnectionClosed:
            pass
        finally:
            self._on_closed(client)
            if client.closing is not None:
                # Deliver the queued notice and close with the reason before returning
                # (returning from the handler closes the connection at once).
                with contextlib.suppress(Exception):
                    await client.closing

    def _on_frame(self, client: _Client, frame: bytes) -> bool:
        """Handle one frame; False when the connection must close."""
        try:
            env = decode(frame, self._limits)
        except WireError as exc:
            self._drop_client(client, f"malformed frame: {exc}")
            return False
        if client.name and env.sender != client.name:
            self._drop_client(client, f"frame claims sender {env.sender!r} on the connection "
                                      f"of {client.name!r} (forged sender)")
            return False
        if isinstance(env.body, Forward):
            return self._forward(client, env)
        protocol = self._protocol
        if not client.name:
            if not isinstance(env.body, AdvertiseKeys):
                self._drop_client(client, f"first frame must be advertise_keys, got {env.type}")
                return False
            if env.sender in self._clients:
                self._reject(client, f"peer id {env.sender!r} is already connected "
                                     "(duplicate id)")
                return False
            if protocol is None or protocol.state != "collecting_keys" or \
                    env.session != self.session or env.round != self._round_number:
                self._reject(client, "registration for this round is closed")
                return False
            client.name = env.sender
            self._anonymous.discard(client)
            self._clients[client.name] = client
        if protocol is None:
            return True
        try:
            actions = protocol.handle(MessageReceived(env))
        except (ProtocolError, CryptoError) as exc:
            self._apply(protocol.reject(client.name, str(exc)))
            return client.name in self._clients
        except Exception:
            # A bug, not bad input: keep serving the others, but say so loudly.
            log.exception("internal error handling %s from %r", env.type, client.name)
            self._apply(protocol.reject(client.name, "internal error (see server log)"))
            return client.name in self._clients
        self._apply(actions)
        return True

    def _forward(self, client: _Client, env: Envelope) -> bool:
        body = env.body
        assert isinstance(body, Forward)
        if not client.name:
            self._drop_client(client, "forward before registration")
            return False
        target = self._clients.get(body.recipient)
        if target is None:
            log.info("cannot forward from %s to %s: not connected", client.name,
                     body.recipient)
            return True
        # Re-label the sender so the recipient knows who relayed: the inner frame is
        # sealed end to end and names its true sender.
        self._enqueue(target, encode(Envelope(session=env.session, round=env.round,
                                              sender=SERVER, body=Forward(
                                                  recipient=client.name, frame=body.frame))))
        return True

    def _on_closed(self, client: _Client) -> None:
        self._anonymous.discard(client)
        if client.name and self._clients.get(client.name) is client:
            del self._clients[client.name]
            if self._protocol is not None:
                self._apply(self._protocol.handle(PeerGone(client.name)))
        with contextlib.suppress(Exception):
            client.outbox.put_nowait(None)

    def _reject(self, client: _Client, reason: str) -> None:
        log.warning("rejecting a connection: %s", reason)
        self._enqueue(client, encode(Envelope(session=self.session,
                                              round=max(self._round_number, 0), sender=SERVER,
                                              body=Rejected(reason=reason))))
        self._close_after_flush(client, reason)

    def _drop_client(self, client: _Client, reason: str) -> None:
        name = client.name or "an unregistered connection"
        log.warning("dropping %s: %s", name, reason)
        if client.name and self._protocol is not None:
            self._apply(self._protocol.reject(client.name, reason))
        else:
            self._close_after_flush(client, reason)

    def _close_after_flush(self, client: _Client, reason: str) -> None:
        client.outbox.put_nowait(None)

        async def close_later() -> None:
            if client.writer is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(client.writer), 5)
            await client.connection.close(code=1008, reason=reason[:120])

        if client.closing is None:
            client.closing = asyncio.get_running_loop().create_task(close_later())

    # ------------------------------------------------------------ actions

    def _apply(self, actions: list[Action]) -> None:
        protocol = self._protocol
        for action in actions:
            if isinstance(action, Send):
                client = self._clients.get(action.recipient)
                if client is not None:
                    self._enqueue(client, encode(action.envelope))
            elif isinstance(action, SetTimer):
                self._set_timer(action.name, action.delay)
            elif isinstance(action, CancelTimer):
                handle = self._timers.pop(action.name, None)
                if handle is not None:
                    handle.cancel()
            elif isinstance(action, Disconnect):
                client = self._clients.pop(action.name, None)
                if client is not None:
                    self._close_after_flush(client, action.reason)
            elif isinstance(action, RoundFinished):
                assert isinstance(action.outcome, ServerOutcome)
                if self._finished is not None and not self._finished.done():
                    self._finished.set_result(action.outcome)
        if protocol is not None and protocol.state != self._last_state:
            now = time.perf_counter()
            self._phase_times[str(self._last_state)] = round(now - self._phase_started, 6)
            self._phase_started = now
            self._last_state = protocol.state
            if self._progress is not None:
                try:
                    self._progress(str(protocol.state), self._round_number)
                except Exception:  # an app's callback must not break the round
                    log.exception("progress callback failed")

    def _set_timer(self, name: str, delay: float) -> None:
        old = self._timers.pop(name, None)
        if old is not None:
            old.cancel()
        protocol = self._protocol

        def fire() -> None:
            self._timers.pop(name, None)
            if protocol is self._protocol and protocol is not None:
                self._apply(protocol.handle(TimerExpired(name)))

        self._timers[name] = asyncio.get_running_loop().call_later(delay, fire)

    def _frame(self, body: Any) -> bytes:
        return encode(Envelope(session=self.session, round=self._round_number, sender=SERVER,
                               body=body))

    def _enqueue(self, client: _Client, frame: bytes) -> None:
        client.outbox.put_nowait(frame)

    async def _write(self, client: _Client) -> None:
        while True:
            frame = await client.outbox.get()
            if frame is None:
                return
            try:
                await client.connection.send(frame)
                self._bytes_out += len(frame)
            except ConnectionClosed:
                return

    async def _stop_writer(self, client: _Client) -> None:
        client.outbox.put_nowait(None)
        if client.writer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.writer, 2)
        await client.connection.close()
