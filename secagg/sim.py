"""An in-memory network that runs whole rounds with scripted dropouts and stalls.

The same :class:`~secagg.protocol.PeerProtocol` and
:class:`~secagg.protocol.ServerProtocol` objects that run on the wire are driven
here by a discrete-event loop with a virtual clock: messages take one
millisecond, timers fire at their virtual deadline, and a peer scripted to drop
in a phase dies at the start of that phase (its connections close, so its
neighbours, its tree relatives and the server see it go). A peer scripted to
stall in a phase stays connected from then on, receives everything and sends
nothing; as the coordinator's keepalive would, the server sees it go
``2 * keepalive_seconds(phase_timeout)`` of virtual time after the stall began, and
the peers only through what the server tells them (peer links carry no keepalive).
Every frame is encoded and decoded with :mod:`secagg.wire` unless
``encode_frames=False``. Runs are deterministic: all randomness comes from ``seed``.

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
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from secagg.crypto.prg import MaskGenerator
from secagg.crypto.signing import SigningKey, generate_signing_key
from secagg.dp import DPConfig
from secagg.driver import dispatch
from secagg.graph import GraphKind
from secagg.paillier import DEFAULT_KEY_BITS, PaillierKeyPair
from secagg.protocol.common import Mode, keepalive_seconds
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
    PeerOutcome,
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
"""Where a scripted peer can die or stall (see :func:`run_round`)."""

LATENCY = 0.001
# The server message on whose arrival a peer scripted for the phase dies (or stalls).
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
    stalled: dict[int, str] = field(default_factory=dict)
    """Peers whose scripted stall began -> its phase (a stall whose phase the round
    never reached for that peer is not listed: the peer took part normally)."""
    peer_outcomes: dict[int, PeerOutcome] = field(default_factory=dict)
    """Each peer's own view of how the round ended (peers that died have none)."""
    tree_parents: dict[int, int | None] = field(default_factory=dict)
    """The accumulation tree the server built: member -> its parent (the root: None)."""

    @property
    def mean(self) -> np.ndarray | None:
        """The weighted mean of a weighted round (else the aggregate)."""
        return self.outcome.mean if self.outcome is not None else self.aggregate


def peer_name(index: int) -> str:
    """The name the simulator gives peer ``index`` (sorting names sorts indices)."""
    return f"peer-{index:05d}"


class Network:
    """The discrete-event loop: a virtual clock, a queue, and who is alive or stalled."""

    def __init__(self, server: ServerProtocol, peers: Mapping[str, PeerProtocol],
                 dies_in: Mapping[str, str], *, encode_frames: bool) -> None:
        self.server = server
        self.peers = dict(peers)
        self.dies_in = dict(dies_in)
        self.encode_frames = encode_frames
        self.now = 0.0
        self.dead: set[str] = set()
        self.stalls_in: dict[str, str] = {}
        self.stall_detection = 0.0
        self.stalled: dict[str, float] = {}
        """Peer -> the virtual time its stall began: from then on it sends nothing."""
        self.stall_detected: dict[str, float] = {}
        """Stalled peer -> the virtual time its keepalive failed (it was cut off)."""
        self.finished_at: float | None = None
        """The virtual time the server's outcome was fixed."""
        self._queue: list[tuple[float, int, str, Event | _Frame | _StallDetected]] = []
        self._seq = 0
        self._timers: dict[tuple[str, str], int] = {}
        self.events = 0
        self.bytes_sent: dict[str, int] = {}
        self.server_bytes_in = 0
        self.rejections: list[str] = []
        self.server_seconds = 0.0
        """Wall time spent inside the server's ``start`` and ``handle``."""

    def script_stalls(self, stalls_in: Mapping[str, str], detection: float) -> None:
        """Peer name -> the phase it stalls in (the trigger is that of a dropout in the
        same phase); a stall is noticed ``detection`` seconds after it began."""
        self.stalls_in = dict(stalls_in)
        self.stall_detection = detection

    # ----------------------------------------------------------- plumbing

    def _push(self, delay: float, target: str, event: Event | _Frame | _StallDetected) -> None:
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
            if isinstance(event, _StallDetected):
                self._stall_detected(target)
            else:
                self._deliver(target, event)

    def apply(self, party: str, actions: list[Action]) -> None:
        if party not in self.dead:
            dispatch(actions, _PartyTransport(self, party))

    def _send(self, sender: str, action: Send) -> None:
        env = action.envelope
        if sender in self.stalled:
            return  # a stalled peer's frames never leave it
        if sender != SERVER and env.type in _FORWARDING:
            # Scripted: this peer dies, or stalls, holding its (and its children's) sums.
            if self.dies_in.get(sender) == "relay":
                self.kill(sender)
                return
            if self.stalls_in.get(sender) == "relay":
                self.stall(sender)
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
        stall = self.stalls_in.get(target)
        if stall in _DEATH_TRIGGER and frame.original.type == _DEATH_TRIGGER[stall]:
            self.stall(target)  # it still reads this frame, and every later one
        if isinstance(frame.payload, bytes):
            self._handle(target, FrameReceived(frame.sender, frame.payload))
        else:
            self._handle(target, MessageReceived(frame.payload))

    def _handle(self, target: str, event: Event) -> None:
        if target == SERVER:
            started = time.perf_counter()
            actions = self.server.handle(event)
            self.server_seconds += time.perf_counter() - started
            if self.finished_at is None and self.server.outcome is not None:
                self.finished_at = self.now
        else:
            actions = self.peers[target].handle(event)
        self.apply(target, actions)

    def _disconnect(self, party: str, action: Disconnect) -> None:
        if party in self.stalled:
            return  # a stalled peer closes nothing either
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

    def stall(self, name: str) -> None:
        """Peer ``name`` stalls now: it stays connected and reads, but sends nothing.

        The coordinator pings every ``keepalive_seconds(phase_timeout)`` and waits as
        long for the answer, so the stall is noticed at most about twice that later:
        then the server cuts the peer off. Its links to other peers stay open (only
        the coordinator pings), so they learn it went from the server alone.
        """
        if name in self.stalled or name in self.dead:
            return
        self.stalled[name] = self.now
        self._push(self.stall_detection, name, _StallDetected())

    def _stall_detected(self, name: str) -> None:
        if name in self.dead:
            return
        self.stall_detected[name] = self.now
        # The server closed the stalled peer's connection: should the peer ever run
        # again, that is the first thing it reads, so it cannot finish as if it took part.
        self._handle(name, PeerGone(SERVER))
        self.dead.add(name)
        self._push(LATENCY, SERVER, PeerGone(name))

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
class _StallDetected:
    """The keepalive of the drivers gave up on a stalled peer."""


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
    stalls: Mapping[int, str] | None = None,
) -> SimResult:
    """Run one full round in memory and return what the server computed.

    ``dropouts`` maps a peer index to the phase it dies in: ``"advertise_keys"``
    (never registers), ``"share_keys"``, ``"masked_input"`` (dies before sending
    its masked input), ``"relay"`` (dies holding its children's sums, sending
    nothing), ``"consistency_check"`` (like ``"unmasking"`` without R3) or
    ``"unmasking"``. With ``weights``, the aggregate is the weighted sum Σ w·x and
    ``mean`` the weighted mean (``total_weight`` is Σ w).

    ``stalls`` maps a peer index to the phase it stalls in, with the same phases and
    the same moments as ``dropouts`` (``"advertise_keys"``: from the start). A
    stalled peer stays connected, receives and handles everything and sends nothing
    (its late frames never leave it). ``2 * keepalive_seconds(phase_timeout)`` of
    virtual time after the stall began (the drivers' keepalive: a ping, then as long
    for the pong) the server and the peers connected to it see it go, as for a
    dropout, and the stalled peer sees the server go. The result's ``stalled`` lists
    the stalls that began, ``peer_outcomes`` what each peer was told, and
    ``stats["stalls"]`` when each stall began and was noticed. A peer may be
    scripted to drop or to stall, not both.

    ``stats["virtual_seconds"]`` is the virtual time at which the server's outcome
    was fixed.

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
    dropouts = _checked_schedule("dropout", dropouts, n, threat_model)
    stalls = _checked_schedule("stall", stalls, n, threat_model)
    both = sorted(set(dropouts) & set(stalls))
    if both:
        raise ValueError(f"peers {both} are scripted both to drop and to stall; "
                         "a peer does one or the other")
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
    peers = {name: PeerProtocol(name, random_bytes=DeterministicRandom(seed, name),
                                identity=identities.get(name),
                                mask_generator=generator)
             for name in names}
    dies_in = {names[i]: phase for i, phase in dropouts.items()}
    stalls_in = {names[i]: phase for i, phase in stalls.items()}
    network = Network(server, peers, dies_in, encode_frames=encode_frames)
    # Twice the keepalive interval: the last answered ping can be almost one interval
    # old when the stall begins, and the unanswered one times out after another.
    detection = 2 * keepalive_seconds(phase_timeout)
    network.script_stalls(stalls_in, detection)

    started = time.perf_counter()
    network.apply(SERVER, server.start())
    network.server_seconds = time.perf_counter() - started
    for i, name in enumerate(names):
        if dies_in.get(name) == "advertise_keys":
            network.dead.add(name)
            continue
        if stalls_in.get(name) == "advertise_keys":
            network.stall(name)  # connected, but its registration never leaves it
        network.apply(name, peers[name].start(session, 0, inputs[i], float(weight_values[i])))
    network.run()
    wall = time.perf_counter() - started

    outcome = server.outcome
    if outcome is None:  # pragma: no cover - the phase timer always ends a round
        raise RuntimeError("the simulated round did not finish")
    index = {name: i for i, name in enumerate(names)}
    dropped = {index[name]: reason for name, reason in outcome.dropped.items()}
    for i, phase in (*dropouts.items(), *stalls.items()):
        if phase == "advertise_keys":
            dropped[i] = DropReason.NOT_REGISTERED.value
    stalled = {index[name]: stalls_in[name] for name in network.stalled}
    stats = dict(outcome.stats)
    finished_at = network.finished_at if network.finished_at is not None else network.now
    stats.update(wall_seconds=wall, server_seconds=network.server_seconds,
                 virtual_seconds=finished_at, events=network.events,
                 max_peer_bytes_sent=max((sent for name, sent in network.bytes_sent.items()
                                          if name != SERVER), default=0),
                 server_bytes_out=network.bytes_sent.get(SERVER, 0),
                 server_bytes_in=network.server_bytes_in,
                 rejections=list(network.rejections))
    if stalls:
        stats["stall_detection_seconds"] = detection
        stats["stalls"] = [{"peer": index[name], "phase": stalls_in[name], "since": since,
                            "detected": network.stall_detected.get(name)}
                           for name, since in sorted(network.stalled.items())]
    peer_outcomes = {i: told for i, name in enumerate(names)
                     if (told := peers[name].outcome) is not None}
    return SimResult(
        status=outcome.status, aggregate=outcome.aggregate,
        contributors=sorted(index[name] for name in outcome.contributors),
        dropped=dict(sorted(dropped.items())),
        server_view=ServerView(messages=tuple(server.view), names=tuple(server.names),
                               shares=tuple(server.shares_received)),
        reason=outcome.reason, total_weight=outcome.total_weight, stats=stats,
        outcome=outcome, clipped=outcome.clipped, stalled=dict(sorted(stalled.items())),
        peer_outcomes=peer_outcomes, tree_parents=_tree_parents(server, index))


def _checked_schedule(what: str, schedule: Mapping[int, str] | None, n: int,
                      threat_model: str) -> dict[int, str]:
    """A dropout or stall schedule, checked; without R3 (honest-but-curious) a fault
    scripted for "consistency_check" happens at the next request, the unmasking one."""
    checked: dict[int, str] = {}
    for peer, phase in (schedule or {}).items():
        if isinstance(peer, bool) or not isinstance(peer, int | np.integer) or \
                not 0 <= peer < n:
            raise ValueError(f"{what} for peer {peer!r}, but peers are 0..{n - 1}")
        if phase not in PHASES:
            raise ValueError(f"unknown {what} phase {phase!r}; phases are {PHASES}")
        if threat_model == "honest-but-curious" and phase == "consistency_check":
            phase = "unmasking"
        checked[int(peer)] = phase
    return checked


def _tree_parents(server: ServerProtocol, index: Mapping[str, int]) -> dict[int, int | None]:
    tree = server.tree
    if tree is None:
        return {}
    names = server.names
    parents: dict[int, int | None] = {}
    for u in tree.order:
        parent = tree.parent(u)
        parents[index[names[u]]] = index[names[parent]] if parent is not None else None
    return parents
