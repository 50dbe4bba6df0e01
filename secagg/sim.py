"""An in-memory network that runs whole rounds with scripted dropouts.

The same :class:`~secagg.protocol.PeerProtocol` and
:class:`~secagg.protocol.ServerProtocol` objects that run on the wire are driven
here by a discrete-event loop with a virtual clock: messages take one
millisecond, timers fire at their virtual deadline, and a peer scripted to drop
in a phase dies at the start of that phase (its connections close, so its
neighbours, its tree relatives and the server see it go). Every frame is encoded
and decoded with :mod:`secagg.wire` unless ``encode_frames=False``. Runs are
deterministic: all randomness comes from ``seed``.

Quantization error: with clipping range c and scale s (chosen automatically as
the largest power of two that keeps n contributions exact in Z_{2^k}), each
coordinate of the decoded sum differs from the sum of the clipped inputs by
less than n/s; in the integer domain the sum is exact.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from secagg.crypto.prg import MaskGenerator
from secagg.crypto.signing import SigningKey, generate_signing_key
from secagg.dp import DPConfig
from secagg.driver import dispatch
from secagg.graph import GraphKind, NeighbourGraph, make_graph
from secagg.paillier import DEFAULT_KEY_BITS, PaillierKeyPair
from secagg.protocol.common import Mode
from secagg.protocol.errors import DropReason
from secagg.protocol.events import (
    Action,
    Bind,
    CancelTimer,
    DeliveryFailed,
    Disconnect,
    Event,
    FrameReceived,
    MessageReceived,
    PeerGone,
    RoundFinished,
    Send,
    ServerOutcome,
    SetTimer,
    TimerExpired,
)
from secagg.protocol.peer import PeerProtocol
from secagg.protocol.server import ServerConfig, ServerProtocol
from secagg.wire import (
    SERVER,
    ConsistencyRequest,
    Envelope,
    MaskingStart,
    RootAggregate,
    Roster,
    UnmaskRequest,
    encode,
)

log = logging.getLogger("secagg.sim")

PHASES = ("advertise_keys", "share_keys", "masked_input", "relay", "consistency_check",
          "unmasking")
"""Where a scripted peer can die (see :func:`run_round`)."""

LATENCY = 0.001
# The server message on whose arrival a peer scripted for the phase dies.
_DEATH_TRIGGER = {
    "share_keys": Roster.TYPE,
    "masked_input": MaskingStart.TYPE,
    "consistency_check": ConsistencyRequest.TYPE,
    "unmasking": UnmaskRequest.TYPE,
}
_FORWARDING = frozenset({"encrypted_partial_sum", RootAggregate.TYPE, "root_abort",
                         "ancestors_unreachable"})


class DeterministicRandom:
    """A seeded byte source (AES-CTR keystream) standing in for ``os.urandom``."""

    def __init__(self, seed: int, label: str) -> None:
        key = hashlib.sha256(f"secagg-sim/{seed}/{label}".encode()).digest()
        self._stream = Cipher(algorithms.AES(key), modes.CTR(b"\0" * 16)).encryptor()

    def __call__(self, size: int) -> bytes:
        return self._stream.update(bytes(size))


@dataclass(frozen=True)
class ServerView:
    """Everything the server accepted during the round, for privacy checks."""

    messages: tuple[Envelope, ...]
    names: tuple[str, ...]
    shares: tuple[tuple[str, int, int], ...] = ()
    """Every unmasking share received: (kind, owner index, holder index)."""

    def revealed_secrets(self) -> dict[str, set[str]]:
        """Peer name -> which of its secrets ("self_mask", "secret_key") had shares sent."""
        revealed: dict[str, set[str]] = {}
        for kind, owner, _holder in self.shares:
            revealed.setdefault(self.names[owner], set()).add(kind)
        return revealed

    def vectors(self) -> list[tuple[str, ...]]:
        """The contributor sets of every aggregate (masked vector, or ciphertexts the
        server can decrypt) the server received."""
        return [tuple(self.names[u] for u in env.body.contributors)
                for env in self.messages
                if isinstance(env.body, RootAggregate)]


@dataclass
class SimResult:
    status: str
    aggregate: np.ndarray | None
    contributors: list[int]
    dropped: dict[int, str]
    server_view: ServerView
    reason: str = ""
    total_weight: float | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    outcome: ServerOutcome | None = None
    clipped: int | None = None
    """How many input coordinates the contributors clipped (summed securely)."""

    @property
    def mean(self) -> np.ndarray | None:
        """The weighted mean of a weighted round (else the aggregate)."""
        return self.outcome.mean if self.outcome is not None else self.aggregate


def peer_name(index: int) -> str:
    """The name the simulator gives peer ``index`` (sorting names sorts indices)."""
    return f"peer-{index:05d}"


@lru_cache(maxsize=8)
def _cached_graph(kind: str, n: int, threshold: int, seed: bytes) -> NeighbourGraph:
    return make_graph(kind, n, threshold, seed)  # type: ignore[arg-type]


class Network:
    """The discrete-event loop: a virtual clock, a queue, and who is alive."""

    def __init__(self, server: ServerProtocol, peers: Mapping[str, PeerProtocol],
                 dies_in: Mapping[str, str], *, encode_frames: bool) -> None:
        self.server = server
        self.peers = dict(peers)
        self.dies_in = dict(dies_in)
        self.encode_frames = encode_frames
        self.now = 0.0
        self.dead: set[str] = set()
        self._queue: list[tuple[float, int, str, Event | _Frame]] = []
        self._seq = 0
        self._timers: dict[tuple[str, str], int] = {}
        self.events = 0
        self.bytes_sent: dict[str, int] = {}
        self.server_bytes_in = 0
        self.rejections: list[str] = []
        self.server_seconds = 0.0
        """Wall time spent inside the server's ``start`` and ``handle``."""

    # ----------------------------------------------------------- plumbing

    def _push(self, delay: float, target: str, event: Event | _Frame) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (self.now + delay, self._seq, target, event))

    def run(self, max_events: int = 50_000_000) -> None:
        while self._queue:
            when, _, target, event = heapq.heappop(self._queue)
            if isinstance(event, TimerExpired):
                generation = self._timers.get((target, event.name))
                if generation is None or generation != _timer_generation(event):
                    continue  # cancelled or replaced
                del self._timers[(target, event.name)]
                event = TimerExpired(event.name)
            self.now = when
            self.events += 1
            if self.events > max_events:
                raise RuntimeError("simulation did not converge")
            self._deliver(target, event)

    def apply(self, party: str, actions: list[Action]) -> None:
        if party not in self.dead:
            dispatch(actions, _PartyTransport(self, party))

    def _send(self, sender: str, action: Send) -> None:
        env = action.envelope
        if sender != SERVER and env.type in _FORWARDING and \
                self.dies_in.get(sender) == "relay":
            # Scripted: this peer dies holding its (and its children's) sums.
            self.kill(sender)
            return
        payload: Envelope | bytes = env
        if self.encode_frames:
            frame = encode(env)
            self.bytes_sent[sender] = self.bytes_sent.get(sender, 0) + len(frame)
            if action.recipient == SERVER:
                self.server_bytes_in += len(frame)
            payload = frame
        self._push(LATENCY, action.recipient, _Frame(sender, payload, env))

    def _deliver(self, target: str, event: Event | _Frame) -> None:
        if target in self.dead:
            if isinstance(event, _Frame) and event.sender != SERVER and \
                    event.sender not in self.dead:
                # Connection refused: the sender learns its frame did not arrive.
                self._push(LATENCY, event.sender, DeliveryFailed(target, event.original))
            return
        if isinstance(event, _Frame):
            self._deliver_frame(target, event)
            return
        self._handle(target, event)

    def _deliver_frame(self, target: str, frame: _Frame) -> None:
        trigger = self.dies_in.get(target)
        if trigger in _DEATH_TRIGGER and frame.original.type == _DEATH_TRIGGER[trigger]:
            self.kill(target)
            return
        if isinstance(frame.payload, bytes):
            self._handle(target, FrameReceived(frame.sender, frame.payload))
        else:
            self._handle(target, MessageReceived(frame.payload))

    def _handle(self, target: str, event: Event) -> None:
        if target == SERVER:
            started = time.perf_counter()
            actions = self.server.handle(event)
            self.server_seconds += time.perf_counter() - started
        else:
            actions = self.peers[target].handle(event)
        self.apply(target, actions)

    def _disconnect(self, party: str, action: Disconnect) -> None:
        self.rejections.append(f"{party} cut off {action.name}: {action.reason.value}: "
                               f"{action.detail}")
        log.info("%s cut off %s: %s (%s)", party, action.name, action.reason.value,
                 action.detail)
        if party == SERVER:
            # The server cut a misbehaving peer off: the peer sees the server go.
            self._push(LATENCY, action.name, PeerGone(SERVER))
        elif action.name == SERVER:
            # A peer that cannot follow the server gives up, as the wire driver does.
            self.kill(party)

    def kill(self, name: str) -> None:
        """Peer ``name`` dies now: everyone connected to it sees the connection close."""
        if name in self.dead:
            return
        self.dead.add(name)
        self._push(LATENCY, SERVER, PeerGone(name))
        for other in sorted(self._connected_to(name)):
            if other not in self.dead:
                self._push(LATENCY, other, PeerGone(name))

    def _connected_to(self, name: str) -> set[str]:
        """Peers that would hold a connection to ``name``: neighbours and tree relatives."""
        server = self.server
        names = server.names
        u = server.index_of(name)
        if u is None:
            return set()
        connected: set[str] = set()
        graph = server.graph
        if graph is not None:
            connected.update(names[v] for v in graph.neighbours(u) if v != u)
        tree = server.tree
        if tree is not None and u in tree:
            parent = tree.parent(u)
            if parent is not None:
                connected.add(names[parent])
            connected.update(names[c] for c in tree.children(u))
        return connected


class _PartyTransport:
    """How one party's actions take effect in the simulated network."""

    def __init__(self, network: Network, party: str) -> None:
        self._network = network
        self._party = party

    def send(self, action: Send) -> None:
        if self._party not in self._network.dead:
            self._network._send(self._party, action)

    def set_timer(self, action: SetTimer) -> None:
        network = self._network
        network._seq += 1
        network._timers[(self._party, action.name)] = network._seq
        heapq.heappush(network._queue, (network.now + action.delay, network._seq,
                                        self._party,
                                        _GenerationTimer(action.name, network._seq)))

    def cancel_timer(self, action: CancelTimer) -> None:
        self._network._timers.pop((self._party, action.name), None)

    def disconnect(self, action: Disconnect) -> None:
        self._network._disconnect(self._party, action)

    def bind(self, action: Bind) -> None:
        pass  # connections are implicit here: every frame names its true sender

    def finish(self, action: RoundFinished) -> None:
        pass  # outcomes are read from the protocol objects after the run


@dataclass(frozen=True)
class _Frame:
    sender: str
    payload: Envelope | bytes
    original: Envelope


@dataclass(frozen=True)
class _GenerationTimer(TimerExpired):
    generation: int = 0


def _timer_generation(event: TimerExpired) -> int:
    return event.generation if isinstance(event, _GenerationTimer) else -1


def run_round(
    inputs: np.ndarray,
    threshold: int,
    dropouts: Mapping[int, str] | None = None,
    graph: GraphKind = "complete",
    seed: int = 0,
    weights: np.ndarray | None = None,
    *,
    clip: float = 1.0,
    scale: float | None = None,
    modulus_bits: int | None = None,
    threat_model: str = "honest-but-curious",
    fan_in: int = 8,
    phase_timeout: float = 10.0,
    encode_frames: bool = True,
    max_weight: float | None = None,
    mode: Mode = "masking",
    paillier_keys: PaillierKeyPair | None = None,
    paillier_key_bits: int = DEFAULT_KEY_BITS,
    dp: DPConfig | None = None,
) -> SimResult:
    """Run one full round in memory and return what the server computed.

    ``dropouts`` maps a peer index to the phase it dies in: ``"advertise_keys"``
    (never registers), ``"share_keys"``, ``"masked_input"`` (dies before sending
    its masked input), ``"relay"`` (dies holding its children's sums, sending
    nothing), ``"consistency_check"`` (like ``"unmasking"`` without R3) or
    ``"unmasking"``. With ``weights``, the aggregate is the weighted sum Σ w·x and
    ``mean`` the weighted mean (``total_weight`` is Σ w).

    ``mode`` is ``"masking"`` (the default), ``"paillier"`` or ``"hybrid"``; the
    latter two use ``paillier_keys`` as the server's key pair if given (generating
    one costs tens of milliseconds), else a fresh one of ``paillier_key_bits``.

    The result's ``clipped`` counts the input coordinates the contributors clipped
    to [-clip, clip] (summed securely, like the inputs).

    ``dp`` adds distributed differential privacy: every peer adds its share of the
    noise (see :mod:`secagg.dp`); the result's ``stats["dp"]`` reports the noise
    present. ``clip`` is then the L2 clip of ``dp`` and ``modulus_bits`` its ring.
    """
    inputs = np.asarray(inputs, dtype=np.float64)
    if inputs.ndim != 2 or inputs.shape[0] < 2 or inputs.shape[1] < 1:
        raise ValueError(f"inputs must have shape (n >= 2, d >= 1), got {inputs.shape}")
    n, d = inputs.shape
    dropouts = dict(dropouts or {})
    for peer, phase in dropouts.items():
        if not 0 <= peer < n:
            raise ValueError(f"dropout for peer {peer}, but peers are 0..{n - 1}")
        if phase not in PHASES:
            raise ValueError(f"unknown dropout phase {phase!r}; phases are {PHASES}")
    if threat_model == "honest-but-curious":
        dropouts = {p: "unmasking" if ph == "consistency_check" else ph
                    for p, ph in dropouts.items()}
    weighted = weights is not None
    weight_values = np.ones(n)
    if weights is not None:
        weight_values = np.asarray(weights, dtype=np.float64)
        if weight_values.shape != (n,) or not np.all(np.isfinite(weight_values)) or \
                np.any(weight_values < 0):
            raise ValueError("weights must be n finite non-negative numbers")
        if max_weight is None:
            max_weight = float(weight_values.max()) or 1.0
    bits = modulus_bits if modulus_bits is not None else (64 if weighted else 32)
    if dp is not None:
        bits, clip = dp.modulus_bits, dp.clip

    session = hashlib.sha256(f"secagg-sim-session/{seed}".encode()).digest()[:16]
    config = ServerConfig(session=session, round=0, max_peers=n, threshold=threshold, dim=d,
                          threat_model=threat_model,  # type: ignore[arg-type]
                          graph=graph, fan_in=fan_in, clip=clip, scale=scale,
                          modulus_bits=bits, weighted=weighted,
                          max_weight=max_weight if max_weight is not None else 1.0,
                          phase_timeout=phase_timeout, mode=mode, dp=dp,
                          paillier_key_bits=(paillier_keys.key_bits if paillier_keys is not None
                                             else paillier_key_bits))
    server = ServerProtocol(config, random_bytes=DeterministicRandom(seed, "server"),
                            record_view=True, paillier_keys=paillier_keys)
    names = [peer_name(i) for i in range(n)]
    generator = MaskGenerator(config.wire_dim, np.uint32 if bits == 32 else np.uint64)
    identities: dict[str, SigningKey] = {}
    if threat_model == "active":
        identities = {name: generate_signing_key(DeterministicRandom(seed, f"id/{name}"))
                      for name in names}
    graph_factory: Callable[[str, int, int, bytes], NeighbourGraph] = _cached_graph
    peers = {name: PeerProtocol(name, random_bytes=DeterministicRandom(seed, name),
                                identity=identities.get(name), graph_factory=graph_factory,
                                mask_generator=generator)
             for name in names}
    dies_in = {names[i]: phase for i, phase in dropouts.items()}
    network = Network(server, peers, dies_in, encode_frames=encode_frames)

    started = time.perf_counter()
    network.apply(SERVER, server.start())
    network.server_seconds = time.perf_counter() - started
    for i, name in enumerate(names):
        if dies_in.get(name) == "advertise_keys":
            network.dead.add(name)
            continue
        network.apply(name, peers[name].start(session, 0, inputs[i], float(weight_values[i])))
    network.run()
    wall = time.perf_counter() - started

    outcome = server.outcome
    if outcome is None:  # pragma: no cover - the phase timer always ends a round
        raise RuntimeError("the simulated round did not finish")
    index = {name: i for i, name in enumerate(names)}
    dropped = {index[name]: reason for name, reason in outcome.dropped.items()}
    for i, phase in dropouts.items():
        if phase == "advertise_keys":
            dropped[i] = DropReason.NOT_REGISTERED.value
    stats = dict(outcome.stats)
    stats.update(wall_seconds=wall, server_seconds=network.server_seconds,
                 virtual_seconds=network.now, events=network.events,
                 max_peer_bytes_sent=max((sent for name, sent in network.bytes_sent.items()
                                          if name != SERVER), default=0),
                 server_bytes_out=network.bytes_sent.get(SERVER, 0),
                 server_bytes_in=network.server_bytes_in,
                 rejections=list(network.rejections))
    return SimResult(
        status=outcome.status, aggregate=outcome.aggregate,
        contributors=sorted(index[name] for name in outcome.contributors),
        dropped=dict(sorted(dropped.items())),
        server_view=ServerView(messages=tuple(server.view), names=tuple(server.names),
                               shares=tuple(server.shares_received)),
        reason=outcome.reason, total_weight=outcome.total_weight, stats=stats,
        outcome=outcome, clipped=outcome.clipped)
