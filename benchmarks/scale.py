"""Benchmark: 1,000 real peers over websockets on loopback, three rounds of one session.

What is measured
----------------
One :class:`server.coordinator.Coordinator` (in this process) and ``--peers``
:class:`peers.peer.Peer` objects spread over ``--workers`` worker processes
(started with the "spawn" method; each runs its share of the peers in one asyncio
loop), all on 127.0.0.1, each peer with its own websocket listener. The sparse
(SecAgg+) graph, threshold ``floor(n/2) + 1``, ``--dim`` float64 coordinates per
peer, uniform in [-1, 1] and drawn afresh every round. The coordinator runs with
its default deadlines unless ``--phase-timeout`` is given.

In every round a ``--crash-fraction`` of the peers (chosen with a seeded
``numpy.random.Generator``) crash: ``Peer.crash()`` aborts every socket at once,
as SIGKILL would, when the victim's round enters the state it was dealt,
round-robin over ``advertised`` (keys queued, not yet registered), ``sharing``
(shares sent, collecting the neighbours'),
``reported`` (share report sent, before the masked input), ``masking`` (its
masked input computed but never sent) and ``forwarded`` (partial sum sent up,
before unmasking); ``--crash-phases`` picks others. A victim crashes at the
first state at or past its planned one that it reaches (a leaf goes from
``reported`` to ``forwarded`` in one step), right after what it queued on
entering that state went out, except for ``masking``, where it dies before
anything queued leaves. A victim of ``advertised`` enters it as it queues its
keys, so it dies before registering: the coordinator counts its closed
connection as answered and closes registration once every other peer registered
(``registration_seconds`` shows it did not wait out the deadline).

Between rounds each crashed peer is replaced by a new ``Peer`` under the same
name (a restarted process: new keys, new listener, new links), and so is a live
peer whose round ended with its coordinator connection gone
(``peer_statuses["lost_server"]``), as a supervisor would restart
``secagg-peer`` after it exits with the lost-server status
(``peers_restarted_before`` counts them). The workers do this once the
coordinator's round is over (they wait for its word), so every round opens with
all ``n`` peers connected and registration closes as soon as they all
registered.

Workers get plain arguments (one JSON string) and talk JSON over a pipe; nothing
of the protocol crosses a process boundary. Every process raises its soft
RLIMIT_NOFILE to the hard limit; a worker holds ``ceil(n / workers)`` peers,
each needing a listener, a coordinator connection and up to two sockets per
neighbour (both ends of a pair may dial), so ``--workers`` is raised to the
fewest processes that fit if needed (``note`` says so).

One JSON line per round on stdout::

    {"bench": "scale", "params": {...}, "round": 0, "seconds": ...,
     "registration_seconds": ..., "after_registration_seconds": ...,
     "phase_seconds": {...}, "target_seconds": 15, "meets_target": true,
     "server_peak_rss_bytes": ..., "status": "ok", "exact": true, ...}

- ``seconds``: wall time of ``Coordinator.run_round()``, from opening
  registration to the decoded aggregate; ``registration_seconds`` until
  registration closed (the coordinator left ``collecting_keys``), and
  ``after_registration_seconds`` the rest: the figure the targets apply to.
- ``phase_seconds``: the coordinator's time in each of its states.
- ``server_peak_rss_bytes``: this process's peak resident set so far
  (``ru_maxrss``); it holds the coordinator and only bookkeeping besides (the
  exactness check regenerates one input vector at a time). ``server_rss_bytes``:
  the resident set after the round.
- ``exact``: the aggregate is within the quantization bound ``n / scale`` of the
  plain sum of the contributors' inputs (``max_abs_error``, ``error_bound``).
- ``crashed``: peers that did crash (``crash_phases`` by planned state,
  ``crash_states`` by the state they crashed in); ``dropped`` and
  ``dropped_by_reason``: the coordinator's view; ``peer_statuses``: how the
  peers' ``contribute()`` calls ended (a crashed peer's ends ``CancelledError``;
  ``lost_server``: the coordinator connection was gone, e.g. cut off by a missed
  keepalive pong; ``ok_not_included``: ok without its input in the sum);
  ``crashed_contributors``: victims counted in the sum (they crashed after their
  input went up). ``peer_max_bytes_sent``: the most bytes one peer wrote in the
  round. ``server_max_loop_lag_seconds`` and ``workers_max_loop_lag_seconds``:
  the longest the coordinator's event loop, and any worker's, went without
  running (busy, or starved of CPU) during the round: a pong waits that long.
  ``workers_gc_seconds``: the time the workers spent in Python's garbage
  collector during the round, summed over them, per generation (see
  :func:`tune_gc`); ``server_gc_seconds``: the same for this process.

- ``floor``: what this round cannot undercut on this machine
  (:mod:`benchmarks.floor`): the unit costs measured at the start of the run
  (``params.unit_costs``: CPU seconds per websocket link opened and closed, per
  frame sent and received, per X25519 agreement, per mask of ``d`` words), times
  the round's counts (``links``: peer links the peers dialled; ``frames``: frames
  the peers sent; ``agreements``: ``(u1 + contributors) * degree``; ``masks``:
  ``contributors * (degree + 1)``), over the cores. ``ratio_to_floor`` is
  ``after_registration_seconds`` over it; ``target_below_floor`` says when the
  target asks for less than that. ``cpu_seconds``: the CPU time this process
  (``server``) and the workers together (``workers``, from the start of their
  round to their report) spent on the round, to set against the floor's.

A final line ``{"bench": "scale", "summary": true, ...}`` gives the targets on a
2-core machine (round 1 at most 15 s after registration, later rounds at most
8 s) and whether each round met its target.

The script exits 0: benchmarks report, they do not fail. A round that ends
without an aggregate says so (``status``, ``reason``) and the session goes on; a
worker that fails is reported (``error``, ``errors``) and ends the session.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import math
import multiprocessing
import os
import resource
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):
    # Run as a script: make the sibling benchmarks importable as a package (appended,
    # as in benchmarks/sim_round.py).
    sys.path.append(str(Path(__file__).resolve().parent.parent))

from benchmarks.floor import measure_unit_costs, round_floor
from peers.cli import LOST_REASONS
from peers.peer import Peer
from secagg.cli_support import raise_open_file_limit
from secagg.encoding import Quantizer
from secagg.graph import GraphKind, default_threshold, make_graph
from secagg.protocol import PeerOutcome
from server.coordinator import Coordinator, RoundResult

HOST = "127.0.0.1"
GRAPH: GraphKind = "sparse"
CRASH_PHASES = ("advertised", "sharing", "reported", "masking", "forwarded")
"""The states victims crash in by default (``secagg.protocol.peer.phase.PeerState``)."""
PEER_STATES = ("advertised", "sharing", "reported", "masking", "forwarded", "unmasked")
TARGET_FIRST_ROUND_SECONDS = 15.0
TARGET_LATER_ROUNDS_SECONDS = 8.0
START_BATCH = 50  # peers of one worker connecting at once (the listen backlog is 100)
FD_SLACK = 256
READY_WAIT_SECONDS = 900.0
"""How long the coordinator waits for the workers' peers to connect."""
STOP_WAIT_SECONDS = 60.0
"""How long the workers may take to close their peers and exit once the session ended."""
LAG_TICK_SECONDS = 0.05
GC_YOUNG_THRESHOLD = 50_000
REPORT_WAIT_SECONDS = 1800.0
"""How long a worker's round report may take after the coordinator's round ended (and a
worker may wait for the word to go on): longer than a peer's own bound on a round,
8 phase deadlines of at most about two minutes each at n = 1,000."""

log = logging.getLogger("secagg.bench.scale")


def peer_input(seed: int, round_number: int, index: int, d: int) -> np.ndarray:
    """Peer ``index``'s input in ``round_number``; any process can regenerate it."""
    return np.random.default_rng([seed, round_number, index]).uniform(-1.0, 1.0, d)


def peer_name(index: int) -> str:
    return f"peer-{index:04d}"


def crash_plan(n: int, rounds: int, fraction: float, seed: int,
               phases: Sequence[str] = CRASH_PHASES) -> list[dict[int, str]]:
    """Per round: ``round(fraction * n)`` victims -> the state each crashes in (dealt
    round-robin over ``phases``, starting one further every round, so that even one
    victim a round visits every state)."""
    plan = []
    for round_number in range(rounds):
        rng = np.random.default_rng([seed, round_number, 1])
        victims = rng.choice(n, size=round(fraction * n), replace=False)
        plan.append({int(v): phases[(i + round_number) % len(phases)]
                     for i, v in enumerate(sorted(int(v) for v in victims))})
    return plan


def fds_per_worker(peers: int, degree: int) -> int:
    """Descriptors for ``peers`` peers: listener, coordinator link, up to two sockets per
    neighbour (both ends of a pair may dial under load), one to a tree parent."""
    return peers * (2 + 2 * degree + 1) + FD_SLACK


def workers_that_fit(n: int, degree: int, wanted: int, fd_limit: int) -> int:
    workers = max(1, min(wanted, n))
    while workers < n and fds_per_worker(math.ceil(n / workers), degree) > fd_limit:
        workers += 1
    return workers


def rss_bytes() -> int | None:
    """This process's resident set now (Linux), None elsewhere."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


class LoopLag:
    """The longest this process's event loop went without running a ready callback.

    A task asks to wake every ``LAG_TICK_SECONDS``; how late it wakes is how long the
    loop was busy (or the process starved of CPU). A keepalive's pong is handled no
    sooner than that, so this is what stall detection has to tolerate.
    """

    def __init__(self) -> None:
        self.max_seconds = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def take(self) -> float:
        """The largest lag since the last call."""
        lag, self.max_seconds = self.max_seconds, 0.0
        return round(lag, 4)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + LAG_TICK_SECONDS
            await asyncio.sleep(LAG_TICK_SECONDS)
            self.max_seconds = max(self.max_seconds, loop.time() - due)


class GcTime:
    """Seconds this process spent in the garbage collector's passes, by generation."""

    def __init__(self) -> None:
        self.seconds = [0.0, 0.0, 0.0]
        self._started = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds[info["generation"]] += time.perf_counter() - self._started

    def take(self) -> list[float]:
        """Per generation, since the last call."""
        seconds, self.seconds = self.seconds, [0.0, 0.0, 0.0]
        return [round(x, 3) for x in seconds]


def tune_gc() -> None:
    """What an operator running many peers in one process would do about the collector.

    Python collects its youngest generation every 700 allocations and, every so
    often, walks every object of the process. A worker holds 125 peers: their
    connections, keys and round state, seven thousand websockets. The full
    passes over all of that took the workers some 110 s per round (summed over
    the 8 of them, ``workers_gc_seconds``), a cost that grows with the peers a
    process holds, which real peers, one to a process, never pay. So the objects
    of the setup are frozen out of collection (``gc.freeze``, after a full collection
    so that nothing collectable is frozen) and the young generation is collected
    every 50,000 allocations. Reference counting frees everything else as before."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 20)


# ------------------------------------------------------------------ workers


class PeerPool:
    """One worker's peers: started in batches, crashing on plan, replaced after a crash."""

    def __init__(self, url: str, indices: Sequence[int], plan: list[dict[int, str]]) -> None:
        self.url = url
        self.indices = list(indices)
        self.plan = plan
        self.peers: dict[int, Peer] = {}
        self.crashed: dict[int, tuple[str, str]] = {}
        """This round's victims that crashed -> (planned state, state they crashed in)."""
        self.lost_server: set[int] = set()
        """Live peers whose round ended with their coordinator connection gone."""

    def _progress_of(self, index: int) -> Callable[[str, int], None]:
        def progress(state: str, round_number: int) -> None:
            if round_number >= len(self.plan) or index in self.crashed:
                return
            planned = self.plan[round_number].get(index)
            if planned is None or state not in PEER_STATES or \
                    PEER_STATES.index(state) < PEER_STATES.index(planned):
                return
            # At or past the planned state: a leaf goes from reported to forwarded in
            # one step, never reporting masking.
            self.crashed[index] = (planned, state)
            if planned == "masking":
                # Now, inside the callback: what it queued on the way (its masked
                # input) never leaves.
                self.peers[index].crash()
            else:
                # Once the callback returned: what entering the state queued goes out
                # (the outboxes' tasks run first), then the peer dies.
                asyncio.get_running_loop().call_soon(self.peers[index].crash)
        return progress

    async def start(self, indices: Sequence[int]) -> None:
        for start in range(0, len(indices), START_BATCH):
            batch = indices[start:start + START_BATCH]
            for index in batch:
                self.peers[index] = Peer(self.url, peer_name(index), listen=(HOST, 0),
                                         progress=self._progress_of(index))
            await asyncio.gather(*(self.peers[i].start() for i in batch))

    async def run_round(self, round_number: int, d: int, seed: int) -> dict[str, Any]:
        self.crashed = {}
        self.lost_server = set()
        sent_before = {i: peer.bytes_sent for i, peer in self.peers.items()}
        frames_before = sum(peer.frames_sent for peer in self.peers.values())
        dials_before = sum(peer.links_dialled for peer in self.peers.values())
        tasks = [asyncio.create_task(self.peers[i].contribute(
            peer_input(seed, round_number, i, d))) for i in self.indices]
        done = await asyncio.gather(*tasks, return_exceptions=True)
        statuses: Counter[str] = Counter()
        errors: list[str] = []
        for index, result in zip(self.indices, done, strict=True):
            if isinstance(result, PeerOutcome):
                if result.reason in LOST_REASONS and index not in self.crashed:
                    self.lost_server.add(index)
                    statuses["lost_server"] += 1
                elif result.status == "ok" and not result.included:
                    statuses["ok_not_included"] += 1
                else:
                    statuses[result.status] += 1
                continue
            statuses[type(result).__name__] += 1
            if index not in self.crashed and len(errors) < 5:
                errors.append(f"{peer_name(index)}: {type(result).__name__}: {result}")
        return {"round": round_number, "statuses": dict(statuses), "errors": errors,
                "crashed": {peer_name(i): states for i, states in sorted(self.crashed.items())},
                "lost_server": len(self.lost_server),
                "max_bytes_sent": max(peer.bytes_sent - sent_before[i]
                                      for i, peer in self.peers.items()),
                "frames_sent": sum(p.frames_sent for p in self.peers.values()) - frames_before,
                "links_dialled": sum(p.links_dialled for p in self.peers.values())
                - dials_before}

    async def replace_gone(self) -> int:
        """Restart the crashed peers, and those that lost the coordinator, under their
        names, as a supervisor restarts a process that died or exited with LOST_SERVER."""
        victims = sorted({*self.crashed, *self.lost_server})
        await asyncio.gather(*(self.peers[i].close() for i in victims),
                             return_exceptions=True)
        await self.start(victims)
        return len(victims)

    async def close(self) -> None:
        await asyncio.gather(*(peer.close() for peer in self.peers.values()),
                             return_exceptions=True)


def configure_logging(verbosity: int) -> None:
    """-v: warnings; -vv: info too; -vvv: secagg's debug lines (connection attempts...)."""
    level = {0: logging.ERROR, 1: logging.WARNING}.get(verbosity, logging.INFO)
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")
    if verbosity >= 3:
        logging.getLogger("secagg").setLevel(logging.DEBUG)


def send_json(conn: Connection, message: dict[str, Any]) -> None:
    conn.send_bytes(json.dumps(message).encode())


async def receive_json(pipe: Connection, timeout: float) -> dict[str, Any]:
    """The next message on ``pipe``, read when the event loop sees it readable; an
    ``error`` message if none comes within ``timeout`` or the other end is gone."""
    loop = asyncio.get_running_loop()
    readable: asyncio.Future[None] = loop.create_future()

    def on_readable() -> None:
        if not readable.done():
            readable.set_result(None)

    loop.add_reader(pipe.fileno(), on_readable)
    try:
        await asyncio.wait_for(readable, timeout)
        message: dict[str, Any] = json.loads(pipe.recv_bytes())
        return message
    except TimeoutError:
        return {"error": f"no message within {timeout:.0f} s"}
    except EOFError:
        return {"error": "the other process closed the pipe"}
    finally:
        loop.remove_reader(pipe.fileno())


def worker_main(spec_json: str, conn: Connection) -> None:
    """A peer process: connect its peers, then take part in every round and report each."""
    spec = json.loads(spec_json)
    raise_open_file_limit()
    configure_logging(spec["verbose"])
    plan = [{int(k): v for k, v in round_plan.items()} for round_plan in spec["plan"]]

    async def main() -> None:
        pool = PeerPool(spec["url"], spec["indices"], plan)
        lag = LoopLag()
        lag.start()
        gc_time = GcTime()
        try:
            await pool.start(pool.indices)
            tune_gc()
            send_json(conn, {"ready": len(pool.peers)})
            for round_number in range(spec["rounds"]):
                lag.take()
                gc_time.take()
                cpu_started = time.process_time()
                report = await pool.run_round(round_number, spec["d"], spec["seed"])
                report["cpu_seconds"] = time.process_time() - cpu_started
                report["max_loop_lag_seconds"] = lag.take()
                report["gc_seconds"] = gc_time.take()
                send_json(conn, report)
                if round_number + 1 == spec["rounds"]:
                    break
                # Restart the gone peers only once the coordinator's round is over:
                # started earlier, they would be told of the round still running,
                # be turned away from it, and miss the next one too.
                go = await receive_json(conn, REPORT_WAIT_SECONDS)
                if go.get("next") != round_number + 1:
                    return  # the session ended early
                restarted = await pool.replace_gone()
                send_json(conn, {"ready": len(pool.peers), "restarted": restarted})
        finally:
            await lag.stop()
            await pool.close()

    try:
        asyncio.run(main())
    except BaseException as exc:  # the coordinator's process reports it
        with contextlib.suppress(OSError):  # unless it is gone already
            send_json(conn, {"error": f"{type(exc).__name__}: {exc}"})
    finally:
        conn.close()


# --------------------------------------------------------------- coordinator


class Workers:
    """The worker processes and their pipes, as seen from the coordinator's process."""

    def __init__(self, specs: list[dict[str, Any]]) -> None:
        context = multiprocessing.get_context("spawn")
        self.pipes: list[Connection] = []
        self.processes: list[multiprocessing.process.BaseProcess] = []
        for spec in specs:
            parent, child = context.Pipe()
            process = context.Process(target=worker_main, args=(json.dumps(spec), child),
                                      daemon=True)
            process.start()
            child.close()
            self.pipes.append(parent)
            self.processes.append(process)

    async def receive_all(self, timeout: float) -> list[dict[str, Any]]:
        """One message from every worker; a worker that says nothing in time, or died,
        yields an ``error`` message."""
        return list(await asyncio.gather(*(receive_json(pipe, timeout)
                                           for pipe in self.pipes)))

    def send_all(self, message: dict[str, Any]) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):  # a dead worker: receive_all says so
                send_json(pipe, message)

    def stop(self) -> None:
        deadline = time.monotonic() + STOP_WAIT_SECONDS
        for process in self.processes:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
        for process in self.processes:
            if process.is_alive():
                log.warning("worker %s did not exit; killing it", process.pid)
                process.kill()
                process.join(timeout=5)
        for pipe in self.pipes:
            pipe.close()


def exactness(result: RoundResult, n: int, d: int, seed: int, round_number: int
              ) -> tuple[bool, float | None, float]:
    """(exact, max abs error, bound) of the aggregate against the contributors' inputs."""
    bound = n / Quantizer.for_peers(n, clip=1.0, modulus_bits=32).scale
    if result.aggregate is None or not result.contributors:
        return False, None, bound
    index_of = {peer_name(i): i for i in range(n)}
    expected = np.zeros(d)
    for name in result.contributors:
        expected += peer_input(seed, round_number, index_of[name], d)
    error = float(np.max(np.abs(result.aggregate - expected)))
    return error <= bound, error, bound


def round_record(params: dict[str, Any], round_number: int, result: RoundResult,
                 seconds: float, registration_seconds: float | None,
                 reports: list[dict[str, Any]], seed: int,
                 server_loop_lag: float) -> dict[str, Any]:
    n, d = params["n"], params["d"]
    stats = result.stats
    exact, error, bound = exactness(result, n, d, seed, round_number)
    statuses: Counter[str] = Counter()
    crashed: dict[str, tuple[str, str]] = {}
    errors: list[str] = []
    for report in reports:
        statuses.update(report.get("statuses", {}))
        crashed.update({name: tuple(states) for name, states
                        in report.get("crashed", {}).items()})
        errors += report.get("errors", [])
        if "error" in report:
            errors.append(report["error"])
    target = TARGET_FIRST_ROUND_SECONDS if round_number == 0 else TARGET_LATER_ROUNDS_SECONDS
    after = None if registration_seconds is None else seconds - registration_seconds
    record: dict[str, Any] = {
        "bench": "scale",
        "params": params,
        "round": round_number,
        "seconds": round(seconds, 4),
        "registration_seconds": None if registration_seconds is None
        else round(registration_seconds, 4),
        "after_registration_seconds": None if after is None else round(after, 4),
        "phase_seconds": {k: round(v, 4) for k, v in stats.get("phase_seconds", {}).items()},
        "target_seconds": target,
        "meets_target": after is not None and after <= target and result.status == "ok",
        "server_peak_rss_bytes": peak_rss_bytes(),
        "server_rss_bytes": rss_bytes(),
        "status": result.status,
        "reason": result.outcome.reason,
        "exact": exact,
        "max_abs_error": error,
        "error_bound": bound,
        "contributors": len(result.contributors),
        "u1": stats.get("u1"), "u2": stats.get("u2"), "u3": stats.get("u3"),
        "tree_depth": stats.get("tree_depth"),
        "crashed": len(crashed),
        "crash_phases": dict(Counter(planned for planned, _ in crashed.values())),
        "crash_states": dict(Counter(state for _, state in crashed.values())),
        "crashed_contributors": len(set(crashed) & set(result.contributors)),
        "dropped": len(result.outcome.dropped),
        "dropped_by_reason": dict(Counter(str(r) for r in result.outcome.dropped.values())),
        "peer_statuses": dict(statuses),
        "peers_lost_server": sum(r.get("lost_server", 0) for r in reports),
        "peer_max_bytes_sent": max((r.get("max_bytes_sent", 0) for r in reports), default=0),
        "server_bytes_in": stats.get("bytes_in"),
        "server_bytes_out": stats.get("bytes_out"),
        "server_max_loop_lag_seconds": server_loop_lag,
        "workers_max_loop_lag_seconds": max(
            (r.get("max_loop_lag_seconds", 0.0) for r in reports), default=None),
        "workers_gc_seconds": [round(sum(r.get("gc_seconds", [0, 0, 0])[g] for r in reports), 3)
                               for g in range(3)],
    }
    costs = params.get("unit_costs")
    if costs:
        degree = params["degree"]
        u1, u3 = stats.get("u1") or 0, len(result.contributors)
        # Channel keys of every rostered peer with each neighbour, mask seeds of every
        # contributor with each; one pair mask per neighbour and one self mask each.
        counts = {"link": sum(r.get("links_dialled", 0) for r in reports),
                  "frame": sum(r.get("frames_sent", 0) for r in reports),
                  "agreement": (u1 + u3) * degree, "mask": u3 * (degree + 1)}
        floor = round_floor(counts, costs, params["cpus"] or 1)
        record["floor"] = floor
        record["ratio_to_floor"] = None if after is None or not floor["seconds"] else \
            round(after / floor["seconds"], 2)
        record["target_below_floor"] = floor["seconds"] > target
    if errors:
        record["errors"] = errors[:10]
    return record


async def run_session(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run the session; print and return one record per round."""
    n, d = args.peers, args.dim
    fd_limit = raise_open_file_limit()
    threshold = default_threshold(n, "honest-but-curious")
    degree = make_graph(GRAPH, n, threshold, bytes(32)).degree
    workers = workers_that_fit(n, degree, args.workers, fd_limit)
    plan = crash_plan(n, args.rounds, args.crash_fraction, args.seed, args.crash_phases)
    params: dict[str, Any] = {
        "n": n, "d": d, "graph": GRAPH, "threshold": threshold, "degree": degree,
        "rounds": args.rounds, "crash_fraction": args.crash_fraction,
        "crashes_per_round": len(plan[0]) if plan else 0, "crash_phases": list(args.crash_phases),
        "workers": workers, "seed": args.seed, "phase_timeout": args.phase_timeout,
        "cpus": os.cpu_count()}
    note = None
    if workers != args.workers:
        note = (f"{args.workers} workers cannot hold {n} peers under the open-file limit "
                f"of {fd_limit}; ran {workers}")
    # Measured before anything else runs, on this process's idle loop.
    params["unit_costs"] = await measure_unit_costs(d)
    registration_closed: dict[int, float] = {}

    def on_phase(phase: str, round_number: int) -> None:
        if phase not in ("idle", "collecting_keys"):
            registration_closed.setdefault(round_number, time.perf_counter())

    options: dict[str, Any] = {}
    if args.phase_timeout is not None:
        options["phase_timeout"] = args.phase_timeout
    records: list[dict[str, Any]] = []
    pool: Workers | None = None
    lag = LoopLag()
    lag.start()
    gc_time = GcTime()
    try:
        async with Coordinator(HOST, 0, max_peers=n, threshold=threshold, dim=d, graph=GRAPH,
                               progress=on_phase, **options) as coordinator:
            specs = [{"url": coordinator.url, "indices": list(range(w, n, workers)), "d": d,
                      "seed": args.seed, "rounds": args.rounds, "verbose": args.verbose,
                      "plan": [{str(i): phase for i, phase in round_plan.items()
                                if i % workers == w} for round_plan in plan]}
                     for w in range(workers)]
            # The deadline in effect (derived from n, degree and d when none is given).
            params["phase_timeout_used"] = getattr(coordinator, "phase_timeout", None)
            setup_started = time.perf_counter()
            pool = Workers(specs)
            ready = await pool.receive_all(READY_WAIT_SECONDS)
            failed = [m["error"] for m in ready if "error" in m]
            if failed:
                record = {"bench": "scale", "params": params, "error": failed[:10],
                          "setup_seconds": round(time.perf_counter() - setup_started, 4)}
                print(json.dumps(record), flush=True)
                return records
            setup_seconds = time.perf_counter() - setup_started
            restarted: dict[int, int] = {}
            for round_number in range(args.rounds):
                lag.take()
                gc_time.take()
                started, cpu_started = time.perf_counter(), time.process_time()
                result = await coordinator.run_round()
                seconds = time.perf_counter() - started
                server_cpu_seconds = time.process_time() - cpu_started
                server_gc_seconds = gc_time.take()
                closed_at = registration_closed.get(round_number)
                server_loop_lag = lag.take()
                reports = await pool.receive_all(REPORT_WAIT_SECONDS)
                record = round_record(params, round_number, result, seconds,
                                      None if closed_at is None else closed_at - started,
                                      reports, args.seed, server_loop_lag)
                record["peers_restarted_before"] = restarted.get(round_number, 0)
                record["server_gc_seconds"] = server_gc_seconds
                record["cpu_seconds"] = {
                    "server": round(server_cpu_seconds, 3),
                    "workers": round(sum(r.get("cpu_seconds", 0.0) for r in reports), 3)}
                if round_number == 0:
                    record["setup_seconds"] = round(setup_seconds, 4)
                if note:
                    record["note"] = note
                print(json.dumps(record), flush=True)
                records.append(record)
                if any("error" in r for r in reports):
                    break  # a worker is gone: its peers no longer follow the plan
                if round_number + 1 < args.rounds:
                    pool.send_all({"next": round_number + 1})
                    ready = await pool.receive_all(READY_WAIT_SECONDS)
                    failed = [m["error"] for m in ready if "error" in m]
                    if failed:
                        print(json.dumps({"bench": "scale", "params": params,
                                          "round": round_number + 1, "error": failed[:10]}),
                              flush=True)
                        break
                    restarted[round_number + 1] = sum(m.get("restarted", 0) for m in ready)
    finally:
        await lag.stop()
        # With the coordinator closed, peers still waiting for a round give up at once.
        if pool is not None:
            await asyncio.get_running_loop().run_in_executor(None, pool.stop)
    return records


def summary(records: list[dict[str, Any]], rounds: int) -> dict[str, Any]:
    per_round = [{"round": r["round"], "after_registration_seconds":
                  r["after_registration_seconds"], "target_seconds": r["target_seconds"],
                  "meets_target": r["meets_target"], "status": r["status"],
                  "exact": r["exact"], "floor_seconds": r.get("floor", {}).get("seconds"),
                  "ratio_to_floor": r.get("ratio_to_floor")} for r in records]
    return {
        "bench": "scale",
        "summary": True,
        "targets": {"round_1_after_registration_seconds": TARGET_FIRST_ROUND_SECONDS,
                    "later_rounds_after_registration_seconds": TARGET_LATER_ROUNDS_SECONDS},
        "rounds": per_round,
        "rounds_completed": len(records),
        "all_exact": len(records) == rounds and all(r["exact"] for r in records),
        "meets_targets": len(records) == rounds and all(r["meets_target"] for r in records),
        "server_peak_rss_bytes": max((r["server_peak_rss_bytes"] for r in records),
                                     default=peak_rss_bytes()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--peers", type=int, default=1000, help="number of peers (1000)")
    parser.add_argument("--dim", type=int, default=10_000, help="vector length (10,000)")
    parser.add_argument("--workers", type=int, default=max(8, os.cpu_count() or 1),
                        help="peer worker processes (8, or the CPU count if larger)")
    parser.add_argument("--rounds", type=int, default=3, help="consecutive rounds (3)")
    parser.add_argument("--crash-fraction", type=float, default=0.1,
                        help="fraction of the peers crashing in every round (0.1)")
    parser.add_argument("--crash-phases", nargs="+", choices=PEER_STATES,
                        default=list(CRASH_PHASES), metavar="STATE",
                        help="peer states the victims crash in, dealt round-robin "
                             f"(default: {' '.join(CRASH_PHASES)})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--phase-timeout", type=float, default=None,
                        help="the coordinator's phase timeout (default: its own defaults)")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log warnings to stderr (every process); -vv: info too; -vvv: "
                             "secagg's debug lines")
    args = parser.parse_args(argv)
    if args.peers < 2 or args.dim < 1 or args.workers < 1 or args.rounds < 1:
        parser.error("--peers must be >= 2, --dim, --workers and --rounds >= 1")
    if not 0.0 <= args.crash_fraction < 0.5:
        parser.error("--crash-fraction must be in [0, 0.5): the threshold is n/2 + 1")
    configure_logging(args.verbose)
    records = asyncio.run(run_session(args))
    print(json.dumps(summary(records, args.rounds)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
