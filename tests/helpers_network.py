"""Shared helpers for the network tests: peer swarms with scripted crashes, a raw
wire-level client, tolerances and exact-sum checks.

Everything binds 127.0.0.1 with port 0 (or a port the kernel just handed out), so
test files can run in parallel without colliding.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from peers.peer import Peer
from secagg.crypto.keys import generate_keypair
from secagg.errors import WireError
from secagg.protocol import PeerOutcome
from secagg.protocol.common import Encoder
from secagg.wire import AdvertiseKeys, Envelope, Message, RoundOpen, decode, encode

HOST = "127.0.0.1"
# Every wait in these tests is bounded; a bounded wait that runs out is a failure.
ROUND_TIMEOUT = 90.0


# ------------------------------------------------------------------ inputs


def peer_names(n: int, prefix: str = "p") -> list[str]:
    return [f"{prefix}{i:03d}" for i in range(n)]


def make_inputs(names: Sequence[str], dim: int, seed: int = 0,
                clip: float = 1.0) -> dict[str, np.ndarray]:
    """One vector per peer, uniform in [-clip, clip] (so nothing is clipped)."""
    rng = np.random.default_rng(seed)
    return {name: rng.uniform(-clip, clip, dim) for name in names}


def tolerance(n: int, dim: int, *, clip: float = 1.0, modulus_bits: int = 32) -> float:
    """Quantization error bound of a sum over at most ``n`` peers: n / scale (+ slack).

    ``n`` must be the coordinator's ``max_peers``: the scale is chosen for it.
    """
    encoder = Encoder.create(n=n, dim=dim, clip=clip, scale=None, modulus_bits=modulus_bits,
                             weighted=False, max_weight=1.0)
    return n / encoder.quantizer.scale + 1e-9


def weighted_tolerance(n: int, dim: int, *, max_weight: float, total_weight: float,
                       clip: float = 1.0, modulus_bits: int = 32) -> float:
    """Error bound of a weighted mean over at most ``n`` peers (see secagg.encoding)."""
    encoder = Encoder.create(n=n, dim=dim, clip=clip, scale=None, modulus_bits=modulus_bits,
                             weighted=True, max_weight=max_weight)
    assert encoder.weighted is not None
    return encoder.weighted.mean_error_bound(n, total_weight) + 1e-9


def expected_sum(inputs: Mapping[str, np.ndarray], contributors: Iterable[str]) -> np.ndarray:
    members = list(contributors)
    assert members, "no contributors"
    total: np.ndarray = np.sum([inputs[name] for name in members], axis=0)
    return total


def assert_exact_sum(aggregate: np.ndarray | None, inputs: Mapping[str, np.ndarray],
                     contributors: Iterable[str], tol: float) -> None:
    """``aggregate`` is the sum of exactly the contributors' inputs, within ``tol``."""
    assert aggregate is not None, "no aggregate"
    expected = expected_sum(inputs, contributors)
    assert aggregate.shape == expected.shape
    error = float(np.max(np.abs(np.asarray(aggregate, dtype=np.float64) - expected)))
    assert error <= tol, f"aggregate off by {error} > tolerance {tol}"


def free_port() -> int:
    """A port the kernel just handed out on 127.0.0.1 (for processes that need a number)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def port_refuses(port: int) -> bool:
    """True when nothing accepts TCP connections on 127.0.0.1:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(2.0)
        try:
            sock.connect((HOST, port))
        except ConnectionRefusedError:
            return True
        return False


# ------------------------------------------------------------------ swarms

Hook = Callable[["Swarm", str, str, int], None]
"""``hook(swarm, peer, state, round)``, called on every progress report of every peer."""


def crash_on(states: Mapping[str, str]) -> Hook:
    """Crash each named peer when it first reports the given state."""
    def hook(swarm: Swarm, name: str, state: str, round_number: int) -> None:
        if states.get(name) == state:
            swarm.crash_soon(name)
    return hook


def crash_first(state: str, count: int, *, among: Iterable[str] | None = None) -> Hook:
    """Crash the first ``count`` peers (optionally only ``among``) that report ``state``."""
    allowed = None if among is None else set(among)
    chosen: list[str] = []

    def hook(swarm: Swarm, name: str, reached: str, round_number: int) -> None:
        if reached == state and len(chosen) < count and (allowed is None or name in allowed):
            chosen.append(name)
            swarm.crash_soon(name)
    return hook


@dataclass
class Swarm:
    """Peers in this event loop, their progress, and crashes scripted on it.

    ``hook`` sees every progress report and may call :meth:`crash_soon`, which
    schedules the crash with ``loop.call_soon`` (never inside the callback's own
    stack). ``crashed[name]`` is the last state the peer reported before it died.
    Crashed peers are closed with the others at the end.
    """

    url: str
    names: Sequence[str]
    listen: Callable[[str], tuple[str, int] | None] = lambda name: (HOST, 0)
    hook: Hook | None = None
    peers: dict[str, Peer] = field(default_factory=dict)
    states: dict[str, list[tuple[int, str]]] = field(default_factory=dict)
    crashed: dict[str, str] = field(default_factory=dict)
    doomed: set[str] = field(default_factory=set)

    async def __aenter__(self) -> Swarm:
        try:
            for name in self.names:
                peer = Peer(self.url, name, listen=self.listen(name),
                            progress=self._progress_of(name))
                self.peers[name] = peer
            await asyncio.gather(*(peer.start() for peer in self.peers.values()))
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await asyncio.gather(*(peer.close() for peer in self.peers.values()),
                             return_exceptions=True)

    def _progress_of(self, name: str) -> Callable[[str, int], None]:
        def progress(state: str, round_number: int) -> None:
            self.states.setdefault(name, []).append((round_number, state))
            if self.hook is not None:
                self.hook(self, name, state, round_number)
        return progress

    def last_state(self, name: str) -> str:
        history = self.states.get(name, [])
        return history[-1][1] if history else ""

    def crash_soon(self, name: str) -> None:
        """Crash ``name`` on the next loop iteration (once)."""
        if name not in self.doomed:
            self.doomed.add(name)
            asyncio.get_running_loop().call_soon(self.crash_now, name)

    def crash_now(self, name: str) -> None:
        """Crash ``name`` at once, recording the state it had reached."""
        self.doomed.add(name)
        self.crashed[name] = self.last_state(name)
        self.peers[name].crash()

    async def wait_state(self, name: str, states: Iterable[str],
                         timeout: float = 30.0) -> str:
        """Wait until ``name`` last reported one of ``states``; return that state."""
        wanted = set(states)
        async with asyncio.timeout(timeout):
            while self.last_state(name) not in wanted:
                await asyncio.sleep(0.005)
        return self.last_state(name)

    def seen(self, name: str, round_number: int = 0) -> list[str]:
        """The states ``name`` reported in ``round_number``, in order."""
        return [s for r, s in self.states.get(name, []) if r == round_number]

    async def contribute(self, inputs: Mapping[str, np.ndarray],
                         weights: Mapping[str, float] | None = None,
                         ) -> dict[str, PeerOutcome | BaseException]:
        """Every peer contributes; return each outcome (or the exception it ended with)."""
        tasks = {name: asyncio.create_task(peer.contribute(
            inputs[name], weight=1.0 if weights is None else weights[name]))
            for name, peer in self.peers.items()}
        await asyncio.wait(tasks.values())
        results: dict[str, PeerOutcome | BaseException] = {}
        for name, task in tasks.items():
            if task.cancelled():
                results[name] = asyncio.CancelledError()
            else:
                exc = task.exception()
                results[name] = exc if exc is not None else task.result()
        return results


async def run_round(coordinator: Any, swarm: Swarm, inputs: Mapping[str, np.ndarray],
                    weights: Mapping[str, float] | None = None,
                    ) -> tuple[Any, dict[str, PeerOutcome | BaseException]]:
    """Start ``coordinator.run_round()`` first, then let every peer contribute."""
    async with asyncio.timeout(ROUND_TIMEOUT):
        round_task = asyncio.create_task(coordinator.run_round())
        try:
            outcomes = await swarm.contribute(inputs, weights)
            result = await round_task
        finally:
            if not round_task.done():
                round_task.cancel()
                with contextlib.suppress(BaseException):
                    await round_task
    return result, outcomes


# ------------------------------------------------------------ raw clients


class RawClient:
    """A websocket client that speaks the wire format by hand (or not at all).

    For bad-input tests: it can register like a peer (with real fresh keys and no
    listener), then stay silent, send anything, and report how its connection ended.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.ws: ClientConnection | None = None
        self.received: list[Envelope] = []
        self.session = b""
        self.round = 0
        self.name = ""

    async def __aenter__(self) -> RawClient:
        self.ws = await connect(self.url, compression=None, max_size=None, proxy=None,
                                open_timeout=10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.ws is not None:
            await self.ws.close()

    async def send(self, frame: bytes | str) -> None:
        assert self.ws is not None
        await self.ws.send(frame)

    async def send_message(self, body: Message, *, sender: str | None = None,
                           session: bytes | None = None, round_number: int | None = None) -> None:
        await self.send(encode(Envelope(
            session=self.session if session is None else session,
            round=self.round if round_number is None else round_number,
            sender=self.name if sender is None else sender, body=body)))

    async def receive(self, timeout: float = 30.0) -> Envelope:
        assert self.ws is not None
        frame = await asyncio.wait_for(self.ws.recv(), timeout)
        assert isinstance(frame, bytes)
        env = decode(frame)
        self.received.append(env)
        return env

    async def wait_for(self, type_name: str, timeout: float = 30.0) -> Envelope:
        """Read frames until one of ``type_name`` arrives."""
        async with asyncio.timeout(timeout):
            while True:
                env = await self.receive(timeout)
                if env.type == type_name:
                    return env

    async def open_round(self, timeout: float = 30.0) -> Envelope:
        env = await self.wait_for(RoundOpen.TYPE, timeout)
        self.session, self.round = env.session, env.round
        return env

    def advertise_frame(self, name: str, address: str = "",
                        round_number: int | None = None) -> bytes:
        """A valid AdvertiseKeys frame (for the current session and round by default)."""
        channel, mask = generate_keypair(), generate_keypair()
        return encode(Envelope(session=self.session,
                               round=self.round if round_number is None else round_number,
                               sender=name,
                               body=AdvertiseKeys(address=address,
                                                  channel_key=channel.public_bytes,
                                                  mask_key=mask.public_bytes,
                                                  self_mask_commitment=os.urandom(32))))

    async def register(self, name: str, timeout: float = 30.0) -> bytes:
        """Wait for the round to open and register as ``name``; return the frame sent."""
        if not self.session:
            await self.open_round(timeout)
        self.name = name
        frame = self.advertise_frame(name)
        await self.send(frame)
        return frame

    async def closed(self, timeout: float = 30.0) -> tuple[int | None, str]:
        """Read until the connection closes; return (close code, close reason)."""
        assert self.ws is not None
        async with asyncio.timeout(timeout):
            with contextlib.suppress(ConnectionClosed):
                while True:
                    frame = await self.ws.recv()
                    if isinstance(frame, bytes):
                        with contextlib.suppress(WireError):
                            self.received.append(decode(frame))
        return self.ws.close_code, self.ws.close_reason or ""


def random_frame(size: int, seed: int = 1) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def empty_message(cls: type[Message]) -> Message:
    """An instance of a message whose fields are all lists, with every list empty."""
    fields: dict[str, list[Any]] = {
        f.name: [] for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**fields)
