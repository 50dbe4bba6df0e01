"""Helpers shared by the scenario scripts (``dropouts`` and ``run``).

One round, or several, with a scripted set of peers dropping at given phases, run
either in the in-memory simulator (:func:`run_sim_round`) or over real websockets
on 127.0.0.1 (:func:`run_network_rounds`): a :class:`server.Coordinator` and one
:class:`peers.Peer` per input row, all in one event loop, peers crashed (sockets
aborted, as SIGKILL would leave them) when they reach the scripted phase.

Both return :class:`RoundReport` objects in the same shape: status, contributors
and dropped peers (by index), whether the aggregate is exact, wall time, bytes.

Phases, and how a websocket peer is killed for each (the simulator's own
semantics are in :func:`secagg.sim.run_round`):

================== =================================================================
``advertise_keys`` crashed before the round opens: it never registers
``share_keys``     crashed when it enters state ``sharing`` (its shares are out or
                   on their way; its share report never arrives)
``masked_input``   crashed when it enters ``reported`` (before sending its masked input)
``relay``          crashed when it enters ``masking``, which only relays reach (they
                   wait there for their children's sums). A peer scripted as a relay
                   that turns out to be a leaf goes straight to ``forwarded``: it is
                   crashed then, after its sum left (recorded as such in ``killed``).
                   ``relay_kills=k`` instead kills the first k relays, whoever they are.
``unmasking``      crashed when the coordinator enters ``unmasking`` (input already in)
================== =================================================================

``consistency_check`` is accepted as a synonym of ``unmasking``: under the
honest-but-curious threat model used here there is no R3.

Modes (``mode=``, see :data:`MODES`): ``masking`` (the default) and ``hybrid``
(masked vectors, Paillier-encrypted) run every phase above. ``paillier`` (inputs
Paillier-encrypted under the server's key, complete graph only) has no share
exchange and no unmasking: a ``share_keys`` peer dies when the roster arrives, so
it never contributes (websockets: crashed on entering ``reported``, like
``masked_input``; the simulator kills it on the roster), and ``unmasking`` /
``consistency_check`` peers are never killed: they contribute normally (see
:func:`phase_applies`).

Exactness: the aggregate is exact when it differs from
``inputs[contributors].sum(axis=0)`` by at most ``n / scale`` per coordinate
(``scale`` as chosen by the encoder for ``n`` peers; see ``secagg.sim``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, cast
from unittest import mock

import numpy as np

from peers import Peer
from secagg import sim
from secagg.graph import GraphKind
from secagg.paillier import PaillierKeyPair
from secagg.protocol import PeerOutcome
from secagg.protocol.common import MODES, Encoder, Mode
from secagg.protocol.common import check_mode as protocol_check_mode
from secagg.sim import PHASES, peer_name, run_round
from secagg.wire import SERVER
from server import Coordinator

log = logging.getLogger("scenarios")

__all__ = [
    "MODES",
    "PHASES",
    "STUDY_PHASES",
    "Mode",
    "RoundReport",
    "check_exact",
    "check_mode",
    "default_threshold",
    "inapplicable_phases",
    "make_inputs",
    "normalize_phase",
    "phase_applies",
    "run_network_rounds",
    "run_sim_round",
    "tolerance",
]

STUDY_PHASES: tuple[str, ...] = ("share_keys", "masked_input", "relay", "unmasking")
"""The phases the dropout study sweeps over (plus "random")."""

# A scripted peer of these phases never gets its masked input into the sum.
_NO_INPUT_PHASES = frozenset({"advertise_keys", "share_keys", "masked_input"})
# Peer state (from the progress callback) on entering which a scripted peer is crashed.
_PEER_TRIGGER = {"share_keys": "sharing", "masked_input": "reported", "relay": "masking"}
# In paillier mode a share_keys peer dies on the roster, i.e. when it enters "reported".
_PAILLIER_TRIGGER = {**_PEER_TRIGGER, "share_keys": "reported"}
# Phases that have no protocol phase of their own in a mode: their peers are never killed.
_INAPPLICABLE: dict[str, frozenset[str]] = {
    "paillier": frozenset({"consistency_check", "unmasking"})}
# Stats copied from the server's outcome into a report, when present.
_STAT_KEYS = ("registered", "graph", "degree", "share_threshold", "u1", "u2", "u3", "u4",
              "tree_depth", "root", "new_root")


def normalize_phase(phase: str) -> str:
    """The phase as run: ``consistency_check`` is ``unmasking`` without R3."""
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; phases are {', '.join(PHASES)}")
    return "unmasking" if phase == "consistency_check" else phase


def check_mode(mode: str, graph: str = "complete") -> Mode:
    """``mode`` as a :data:`Mode`; ValueError (one line) for an unknown mode or a
    paillier round on a sparse graph."""
    protocol_check_mode(mode, graph)
    return cast(Mode, mode)


def phase_applies(phase: str, mode: str) -> bool:
    """Whether a peer scripted to drop at ``phase`` is killed at all in ``mode``.

    In paillier mode there is no unmasking (nor R3): ``unmasking`` and
    ``consistency_check`` peers contribute normally. A ``share_keys`` peer still
    dies (when the roster arrives), so that phase applies.
    """
    return phase not in _INAPPLICABLE.get(mode, frozenset())


def inapplicable_phases(mode: str) -> tuple[str, ...]:
    """The phases, in :data:`PHASES` order, whose peers ``mode`` never kills."""
    return tuple(phase for phase in PHASES if not phase_applies(phase, mode))


def default_threshold(n: int) -> int:
    """floor(n/2) + 1, the smallest threshold the protocol accepts."""
    return n // 2 + 1


def make_inputs(n: int, dim: int, seed: int) -> np.ndarray:
    """n vectors uniform in [-1, 1) (nothing is clipped)."""
    return np.random.default_rng(seed).uniform(-1.0, 1.0, size=(n, dim))


def tolerance(n: int, dim: int) -> float:
    """The quantization error bound n / scale of a round sized for ``n`` peers."""
    encoder = Encoder.create(n=n, dim=dim, clip=1.0, scale=None, modulus_bits=32,
                             weighted=False, max_weight=1.0)
    return n / encoder.quantizer.scale


def check_exact(inputs: np.ndarray, aggregate: np.ndarray | None, contributors: Sequence[int],
                tol: float) -> tuple[bool | None, float | None]:
    """(exact, max abs error) of ``aggregate`` against the contributors' plaintext sum.

    (None, None) when there is no aggregate (the round aborted).
    """
    if aggregate is None:
        return None, None
    if not contributors:
        return False, None
    expected = inputs[list(contributors)].sum(axis=0)
    error = float(np.max(np.abs(np.asarray(aggregate, dtype=np.float64) - expected)))
    # A few ulps of float64 summation on top of the quantization bound.
    return error <= tol * (1 + 1e-9) + 1e-12, error


@dataclass
class RoundReport:
    """One round's outcome, in peer indices (row numbers of ``inputs``)."""

    transport: str
    round: int
    mode: str
    n: int
    dim: int
    threshold: int
    status: str
    reason: str
    contributors: list[int]
    dropped: dict[int, str]
    scheduled: dict[int, str]
    """The drop script: peer -> phase (dynamic relay kills are not in it)."""
    killed: dict[int, str] | None
    """Websockets: who was actually crashed, and when. None in the simulator."""
    exact: bool | None
    max_error: float | None
    tolerance: float
    wall_seconds: float
    max_peer_bytes_sent: int
    server_bytes_in: int
    stats: dict[str, Any] = field(default_factory=dict)
    unexpected_contributors: list[int] = field(default_factory=list)
    """Scripted to die before sending their masked input, yet counted: a bug if non-empty."""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def drop_count(self) -> int:
        return len(self.killed) if self.killed is not None else len(self.scheduled)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["dropped"] = {str(k): v for k, v in self.dropped.items()}
        data["scheduled"] = {str(k): v for k, v in self.scheduled.items()}
        if self.killed is not None:
            data["killed"] = {str(k): v for k, v in self.killed.items()}
        return data


def _stats_subset(stats: Mapping[str, Any]) -> dict[str, Any]:
    return {key: stats[key] for key in _STAT_KEYS if key in stats}


def _unexpected(contributors: Sequence[int], scheduled: Mapping[int, str]) -> list[int]:
    # share_keys peers never contribute in any mode (in paillier mode they die on the roster).
    return sorted(u for u in contributors if scheduled.get(u) in _NO_INPUT_PHASES)


# --------------------------------------------------------------------- simulator


class _RecordingNetwork(sim.Network):
    """secagg.sim's network, remembered so that per-peer byte counts can be read.

    ``secagg.sim.run_round`` computes ``max_peer_bytes_sent`` as the maximum of
    ``Network.bytes_sent`` over every sender, and the server is one of them: the
    figure is the server's output (O(n^2) for the rosters), not the busiest peer's.
    The study reads the per-sender counts directly instead.
    """

    last: ClassVar[sim.Network | None] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _RecordingNetwork.last = self

    @classmethod
    def take(cls) -> sim.Network | None:
        network, cls.last = cls.last, None
        return network



def run_sim_round(inputs: np.ndarray, threshold: int, drops: Mapping[int, str], *,
                  graph: GraphKind = "complete", seed: int = 0, fan_in: int = 8,
                  phase_timeout: float = 10.0, round_number: int = 0,
                  mode: Mode = "masking",
                  paillier_keys: PaillierKeyPair | None = None) -> RoundReport:
    """One round in :mod:`secagg.sim` with ``drops`` (peer index -> phase).

    ``paillier_keys`` (paillier and hybrid modes) saves generating a key pair.
    """
    n, dim = inputs.shape
    mode = check_mode(mode, graph)
    scheduled = {int(u): normalize_phase(phase) for u, phase in sorted(drops.items())}
    with mock.patch.object(sim, "Network", _RecordingNetwork):
        _RecordingNetwork.last = None
        result = run_round(inputs, threshold=threshold, dropouts=scheduled, graph=graph,
                           seed=seed, fan_in=fan_in, phase_timeout=phase_timeout, mode=mode,
                           paillier_keys=paillier_keys if mode != "masking" else None)
    network = _RecordingNetwork.take()
    # secagg.sim's own "max_peer_bytes_sent" is the maximum over every sender,
    # the server included, so it reports the server's output (see _RecordingNetwork).
    reported_max = int(result.stats["max_peer_bytes_sent"])
    peer_max, server_out = reported_max, None
    if network is not None:
        peer_max = max((sent for name, sent in network.bytes_sent.items() if name != SERVER),
                       default=0)
        server_out = network.bytes_sent.get(SERVER, 0)
    tol = tolerance(n, dim)
    exact, error = check_exact(inputs, result.aggregate if result.status == "ok" else None,
                               result.contributors, tol)
    stats = _stats_subset(result.stats)
    stats.update(virtual_seconds=result.stats.get("virtual_seconds"),
                 events=result.stats.get("events"), server_bytes_out=server_out,
                 sim_reported_max_peer_bytes_sent=reported_max)
    return RoundReport(
        transport="sim", round=round_number, mode=mode, n=n, dim=dim, threshold=threshold,
        status=result.status, reason=result.reason, contributors=list(result.contributors),
        dropped=dict(result.dropped), scheduled=scheduled, killed=None, exact=exact,
        max_error=error, tolerance=tol, wall_seconds=float(result.stats["wall_seconds"]),
        max_peer_bytes_sent=peer_max,
        server_bytes_in=int(result.stats["server_bytes_in"]), stats=stats,
        unexpected_contributors=_unexpected(result.contributors, scheduled))


# --------------------------------------------------------------------- websockets


@dataclass
class _KillPlan:
    """Who dies when, in the round being run; updated by the progress callbacks."""

    drops: dict[int, str]
    relay_kills: int
    killed: dict[int, str] = field(default_factory=dict)
    masking_seen: set[int] = field(default_factory=set)


def run_network_rounds(inputs: Sequence[np.ndarray], threshold: int,
                       drops: Sequence[Mapping[int, str]], *, graph: GraphKind = "complete",
                       fan_in: int = 3, phase_timeout: float = 5.0,
                       relay_kills: Sequence[int] | None = None,
                       round_timeout: float | None = None,
                       mode: Mode = "masking") -> list[RoundReport]:
    """Run ``len(inputs)`` rounds over websockets on 127.0.0.1 in a fresh event loop.

    ``inputs[r]`` is round r's (n, dim) array, ``drops[r]`` its drop script (peer
    index -> phase), ``relay_kills[r]`` how many further relays to kill in R2.
    One coordinator serves every round (in ``mode``; the peers follow it); a peer
    crashed in a round is replaced by a fresh one (same id, new keys) for the next.
    """
    return asyncio.run(run_network_rounds_async(
        inputs, threshold, drops, graph=graph, fan_in=fan_in, phase_timeout=phase_timeout,
        relay_kills=relay_kills, round_timeout=round_timeout, mode=mode))


async def run_network_rounds_async(
    inputs: Sequence[np.ndarray], threshold: int, drops: Sequence[Mapping[int, str]], *,
    graph: GraphKind = "complete", fan_in: int = 3, phase_timeout: float = 5.0,
    relay_kills: Sequence[int] | None = None, round_timeout: float | None = None,
    mode: Mode = "masking",
) -> list[RoundReport]:
    """The coroutine behind :func:`run_network_rounds`."""
    mode = check_mode(mode, graph)
    triggers = _PAILLIER_TRIGGER if mode == "paillier" else _PEER_TRIGGER
    if not inputs:
        return []
    if len(drops) != len(inputs):
        raise ValueError("need one drop script per round")
    relay_counts = list(relay_kills) if relay_kills is not None else [0] * len(inputs)
    n, dim = inputs[0].shape
    names = [peer_name(i) for i in range(n)]
    loop = asyncio.get_running_loop()
    peers: list[Peer | None] = [None] * n
    plan = _KillPlan(drops={}, relay_kills=0)
    pending: set[asyncio.Task[None]] = set()  # delayed crashes (see crash_after_send)
    # Time enough for every phase deadline plus re-routing, then some.
    limit = round_timeout if round_timeout is not None else 8 * phase_timeout + 30.0

    def crash(i: int, why: str) -> None:
        if i in plan.killed:
            return
        plan.killed[i] = why
        peer = peers[i]
        if peer is not None:
            loop.call_soon(peer.crash)

    def crash_after_send(i: int, why: str) -> None:
        """Crash peer i once its queued frame has left (bytes_sent grows).

        A leaf's partial sum may need a new connection to its parent first (always in
        paillier mode, where no R1 exchange opened one): crashing at once would kill it
        with the sum still queued.
        """
        peer = peers[i]
        if i in plan.killed or peer is None:
            return
        plan.killed[i] = why
        before = peer.bytes_sent

        async def wait_then_crash() -> None:
            deadline = loop.time() + phase_timeout
            while peer.bytes_sent == before and loop.time() < deadline:
                await asyncio.sleep(0.002)
            peer.crash()

        task = loop.create_task(wait_then_crash())
        pending.add(task)
        task.add_done_callback(pending.discard)

    def on_coordinator_phase(phase: str, round_number: int) -> None:
        if phase == "unmasking":
            for i, scripted in sorted(plan.drops.items()):
                if scripted == "unmasking":
                    crash(i, "unmasking")

    def make_progress(i: int) -> Any:
        def progress(state: str, round_number: int) -> None:
            if i in plan.killed:
                return
            scripted = plan.drops.get(i)
            if state == "masking":
                plan.masking_seen.add(i)
            if scripted is not None and triggers.get(scripted) == state:
                crash(i, scripted)
            elif scripted == "relay" and state == "forwarded" and i not in plan.masking_seen:
                crash_after_send(i, "relay: was a leaf, crashed after its sum left")
            elif scripted is None and state == "masking" and plan.relay_kills > 0:
                plan.relay_kills -= 1
                crash(i, "relay")
        return progress

    reports: list[RoundReport] = []
    replace: set[int] = set()  # peers that cannot take part again (no server link)
    tol = tolerance(n, dim)
    async with Coordinator(max_peers=n, threshold=threshold, dim=dim, graph=graph,
                           fan_in=fan_in, phase_timeout=phase_timeout, mode=mode,
                           progress=on_coordinator_phase) as coordinator:
        try:
            for r, (x, script) in enumerate(zip(inputs, drops, strict=True)):
                if x.shape != (n, dim):
                    raise ValueError(f"round {r}: inputs have shape {x.shape}, "
                                     f"expected {(n, dim)}")
                scheduled = {int(u): normalize_phase(p) for u, p in sorted(script.items())}
                # Replace the peers that died in the previous round.
                stale = [i for i in range(n)
                         if peers[i] is None or i in plan.killed or i in replace]
                replace = set()
                for i in stale:
                    old = peers[i]
                    if old is not None:
                        await old.close()
                if stale and r > 0:
                    await asyncio.sleep(0.05)  # let the coordinator see the old sockets close
                fresh = {i: Peer(coordinator.url, names[i], progress=make_progress(i))
                         for i in stale}
                await asyncio.gather(*(peer.start() for peer in fresh.values()))
                for i, peer in fresh.items():
                    peers[i] = peer
                plan = _KillPlan(drops=scheduled, relay_kills=relay_counts[r])
                sent_before = [peer.bytes_sent if peer is not None else 0 for peer in peers]
                for i, phase in scheduled.items():
                    if phase == "advertise_keys":
                        crash(i, "advertise_keys")
                await asyncio.sleep(0)  # the advertise_keys victims die now

                started = time.perf_counter()
                round_task = asyncio.create_task(coordinator.run_round())

                async def contribute(i: int, row: np.ndarray) -> PeerOutcome | None:
                    peer = peers[i]
                    assert peer is not None
                    try:
                        return await peer.contribute(row)
                    except asyncio.CancelledError:
                        return None  # crashed

                live = [i for i in range(n) if scheduled.get(i) != "advertise_keys"]
                tasks = {i: asyncio.create_task(contribute(i, x[i])) for i in live}
                try:
                    result = await asyncio.wait_for(round_task, limit)
                except TimeoutError:
                    for task in tasks.values():
                        task.cancel()
                    await asyncio.gather(*tasks.values(), return_exceptions=True)
                    raise RuntimeError(f"round {r} did not finish within {limit:.0f} s") from None
                wall = time.perf_counter() - started
                # Live peers hear the outcome at once; one that does not is stuck.
                await asyncio.wait(tasks.values(), timeout=phase_timeout + 2)
                for i, task in tasks.items():
                    if not task.done():
                        task.cancel()
                        replace.add(i)
                        continue
                    outcome = None if task.cancelled() or task.exception() is not None \
                        else task.result()
                    if outcome is None or outcome.status == "rejected":
                        replace.add(i)
                sent = [(peer.bytes_sent if peer is not None else 0) - before
                        for peer, before in zip(peers, sent_before, strict=True)]
                index = {name: i for i, name in enumerate(names)}
                contributors = sorted(index[name] for name in result.contributors)
                dropped = {index[name]: str(why)
                           for name, why in sorted(result.outcome.dropped.items())}
                for i, phase in scheduled.items():
                    if phase == "advertise_keys":
                        dropped.setdefault(i, "not_registered")
                dropped = dict(sorted(dropped.items()))
                ok = result.outcome.status == "ok"
                exact, error = check_exact(x, result.aggregate if ok else None, contributors,
                                           tol)
                stats = _stats_subset(result.stats)
                stats.update(phase_seconds=result.stats.get("phase_seconds", {}),
                             server_bytes_out=result.stats.get("bytes_out", 0))
                reports.append(RoundReport(
                    transport="websockets", round=r, mode=mode, n=n, dim=dim,
                    threshold=threshold,
                    status=result.outcome.status, reason=result.outcome.reason,
                    contributors=contributors, dropped=dropped, scheduled=scheduled,
                    killed=dict(sorted(plan.killed.items())), exact=exact, max_error=error,
                    tolerance=tol, wall_seconds=wall, max_peer_bytes_sent=max(sent, default=0),
                    server_bytes_in=int(result.stats.get("bytes_in", 0)), stats=stats,
                    unexpected_contributors=_unexpected(contributors, scheduled)))
        finally:
            for task in list(pending):
                task.cancel()
            for leftover in peers:
                if leftover is not None:
                    with contextlib.suppress(Exception):
                        await leftover.close()
    return reports
