"""An in-memory network for driving PeerProtocol and ServerProtocol without sockets.

A tiny synchronous network (:class:`Net`) routes the ``Send`` actions between
protocol objects, FIFO, passing every envelope through ``wire.encode`` and
``wire.decode`` with the recipient's limits. Timers are recorded but fire only
when a test fires them. Tests can hold back frames (``hold=``), kill a party, or
hand-craft a frame (for example a malicious server request) and deliver it.
Shared by ``test_protocol.py`` and the malicious-party harnesses in ``adversarial/``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from secagg import wire
from secagg.crypto.signing import SigningKey, generate_signing_key
from secagg.driver import dispatch
from secagg.paillier import DEFAULT_KEY_BITS, PaillierKeyPair
from secagg.protocol import (
    Action,
    Bind,
    CancelTimer,
    DeliveryFailed,
    Disconnect,
    Event,
    FrameReceived,
    MessageReceived,
    PeerGone,
    PeerProtocol,
    RoundFinished,
    Send,
    ServerConfig,
    ServerProtocol,
    SetTimer,
    TimerExpired,
)
from secagg.protocol.common import Encoder
from secagg.sim import DeterministicRandom, peer_name
from secagg.wire import SERVER, Envelope

SESSION = bytes(range(16))
OTHER_SESSION = bytes(range(1, 17))
ROUND = 3

Hold = Callable[[str, str, Envelope], bool]


@dataclass
class Net:
    """A FIFO in-memory network between one server and some peers.

    Actions are carried out by the shared :func:`secagg.driver.dispatch`; every
    frame goes through ``wire.encode`` and is decoded by its recipient
    (``FrameReceived``). ``errors`` records every connection a party cut off for
    what was sent on it: (party, culprit, detail).
    """

    server: ServerProtocol
    peers: dict[str, PeerProtocol]
    queue: deque[tuple[str, str, Envelope, bytes]] = field(default_factory=deque)
    held: list[tuple[str, str, Envelope, bytes]] = field(default_factory=list)
    timers: dict[str, dict[str, float]] = field(default_factory=dict)
    finished: dict[str, RoundFinished] = field(default_factory=dict)
    disconnects: list[Disconnect] = field(default_factory=list)
    errors: list[tuple[str, str, str]] = field(default_factory=list)
    dead: set[str] = field(default_factory=set)
    sent: list[tuple[str, str, Envelope]] = field(default_factory=list)

    def party(self, name: str) -> ServerProtocol | PeerProtocol:
        return self.server if name == SERVER else self.peers[name]

    def apply(self, party: str, actions: list[Action]) -> None:
        dispatch(actions, _NetTransport(self, party))

    def event(self, party: str, event: Event) -> None:
        self.apply(party, self.party(party).handle(event))

    def deliver(self, recipient: str, sender: str, env: Envelope, frame: bytes) -> None:
        if recipient in self.dead:
            if sender != SERVER and sender not in self.dead:
                self.event(sender, DeliveryFailed(recipient, env))
            return
        if sender in self.dead:
            return
        self.event(recipient, FrameReceived(sender, frame))

    def run(self, hold: Hold | None = None, max_steps: int = 100_000) -> None:
        steps = 0
        while self.queue:
            steps += 1
            assert steps < max_steps, "the in-memory round did not converge"
            recipient, sender, env, frame = self.queue.popleft()
            if hold is not None and hold(recipient, sender, env):
                self.held.append((recipient, sender, env, frame))
                continue
            self.deliver(recipient, sender, env, frame)

    def release(self, which: Hold | None = None) -> None:
        """Put held frames (all, or those ``which`` selects) back on the queue."""
        keep = []
        for item in self.held:
            if which is None or which(item[0], item[1], item[2]):
                self.queue.append(item)
            else:
                keep.append(item)
        self.held = keep

    def fire(self, party: str, timer: str) -> None:
        assert timer in self.timers.get(party, {}), f"{party} has no pending timer {timer!r}"
        del self.timers[party][timer]
        self.event(party, TimerExpired(timer))

    def kill(self, name: str) -> None:
        """``name`` dies: everyone sees its connection close."""
        self.dead.add(name)
        for other in [SERVER, *self.peers]:
            if other != name and other not in self.dead:
                self.event(other, PeerGone(name))

    def held_of(self, type_name: str, recipient: str | None = None) -> list[Envelope]:
        return [env for r, _, env, _ in self.held
                if env.type == type_name and (recipient is None or r == recipient)]


@dataclass
class _NetTransport:
    """Where one party's actions go in a :class:`Net`."""

    net: Net
    party: str

    def send(self, action: Send) -> None:
        frame = wire.encode(action.envelope)
        self.net.sent.append((self.party, action.recipient, action.envelope))
        self.net.queue.append((action.recipient, self.party, action.envelope, frame))

    def set_timer(self, action: SetTimer) -> None:
        self.net.timers.setdefault(self.party, {})[action.name] = action.delay

    def cancel_timer(self, action: CancelTimer) -> None:
        self.net.timers.get(self.party, {}).pop(action.name, None)

    def disconnect(self, action: Disconnect) -> None:
        net = self.net
        net.disconnects.append(action)
        net.errors.append((self.party, action.name, action.detail))
        if self.party == SERVER and action.name in net.peers and action.name not in net.dead:
            net.event(action.name, PeerGone(SERVER))

    def bind(self, action: Bind) -> None:
        pass  # every frame here names its true sender

    def finish(self, action: RoundFinished) -> None:
        self.net.finished[self.party] = action


def make_round(
    n: int = 4,
    threshold: int = 3,
    dim: int = 5,
    *,
    seed: int = 0,
    threat_model: str = "honest-but-curious",
    fan_in: int = 8,
    graph: str = "complete",
    start_peers: bool = True,
    pin_identities: bool = False,
    mode: str = "masking",
    paillier_keys: PaillierKeyPair | None = None,
) -> tuple[Net, np.ndarray, dict[str, SigningKey]]:
    """A server and ``n`` peers with deterministic randomness, all registered.
    ``paillier_keys`` is required in the modes that encrypt."""
    config = ServerConfig(session=SESSION, round=ROUND, max_peers=n, threshold=threshold,
                          dim=dim, threat_model=threat_model,  # type: ignore[arg-type]
                          graph=graph,  # type: ignore[arg-type]
                          fan_in=fan_in, phase_timeout=10.0, mode=mode,  # type: ignore[arg-type]
                          paillier_key_bits=(paillier_keys.key_bits if paillier_keys
                                             else DEFAULT_KEY_BITS))
    server = ServerProtocol(config, random_bytes=DeterministicRandom(seed, "server"),
                            record_view=True, paillier_keys=paillier_keys)
    identities: dict[str, SigningKey] = {}
    names = [peer_name(i) for i in range(n)]
    if threat_model == "active":
        identities = {name: generate_signing_key(DeterministicRandom(seed, f"id/{name}"))
                      for name in names}
    pinned = ({name: key.public_bytes for name, key in identities.items()}
              if pin_identities else None)
    peers = {name: PeerProtocol(name, address=f"ws://127.0.0.1:{9000 + i}",
                                random_bytes=DeterministicRandom(seed, name),
                                identity=identities.get(name), trusted_identities=pinned)
             for i, name in enumerate(names)}
    net = Net(server, peers)
    inputs = np.random.default_rng(seed).uniform(-1.0, 1.0, size=(n, dim))
    net.apply(SERVER, server.start())
    if start_peers:
        for i, name in enumerate(names):
            net.apply(name, peers[name].start(SESSION, ROUND, inputs[i]))
    return net, inputs, identities


def error_bound(n: int, dim: int) -> float:
    quantizer = Encoder.create(n=n, dim=dim, clip=1.0, scale=None, modulus_bits=32,
                               weighted=False, max_weight=1.0).quantizer
    return quantizer.error_bound(n) + 1e-9


def assert_sum(net: Net, inputs: np.ndarray, contributors: list[int]) -> None:
    outcome = net.server.outcome
    assert outcome is not None and outcome.status == "ok", outcome
    assert outcome.contributors == tuple(peer_name(i) for i in contributors)
    assert outcome.aggregate is not None
    expected = inputs[contributors].sum(axis=0)
    n = inputs.shape[0]
    assert np.max(np.abs(outcome.aggregate - expected)) < error_bound(n, inputs.shape[1])


def server_env(body: wire.Message, *, session: bytes = SESSION, round: int = ROUND) -> Envelope:
    return Envelope(session=session, round=round, sender=SERVER, body=body)


def through_wire(env: Envelope, limits: wire.Limits | None = None) -> MessageReceived:
    return MessageReceived(wire.decode(wire.encode(env), limits))


def is_type(type_name: str) -> Hold:
    return lambda recipient, sender, env: env.type == type_name
