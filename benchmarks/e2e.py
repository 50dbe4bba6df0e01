"""Benchmark: one secure-aggregation round over real websockets on loopback.

What is measured
----------------
A :class:`server.Coordinator` and ``n`` :class:`peers.Peer` objects, all on
127.0.0.1, each peer with its own websocket listener. Every peer contributes a
vector of ``d`` float64 values uniform in [-1, 1]; 10 % of the peers crash
(``Peer.crash()``: every socket aborted at once, as SIGKILL would) right after
the share exchange, when they report the ``reported`` state, so the round must
remove their pairwise masks. Configurations: n = 100, d = 100,000 on the complete
graph and n = 500, d = 10,000 on the sparse (SecAgg+) graph; ``--quick`` runs
n = 12, d = 1,000.

- ``seconds``: wall time of ``Coordinator.run_round()``, from opening
  registration to the decoded aggregate (the peers are already connected to the
  coordinator; their start-up is ``setup_seconds``).
- ``phase_seconds``: the coordinator's time in each of its states.
- ``peer_bytes_ratio``: the most bytes any peer wrote to its sockets during the
  round (``Peer.bytes_sent``), over one raw vector (4 * d bytes in the 32-bit
  ring). DESIGN.md section 8: one masked vector leaves each peer.
- ``server_bytes_ratio``: bytes the coordinator received during the round
  (``stats["bytes_in"]``) over 4 * d. The server receives one vector per round.
- ``params.mode``: ``--mode paillier`` or ``hybrid`` runs the homomorphic modes
  (DESIGN section 5); the byte ratios then include the ciphertext expansion.
- ``exact``: the aggregate equals the sum of the contributors' inputs within the
  quantization bound n / scale.

All peers run in this process (one event loop, one core) when the process may
open enough file descriptors. The soft RLIMIT_NOFILE is raised to the hard
limit first; if even that is too low (each peer needs a listener, a coordinator
connection and one socket per neighbour link, and both ends of a link live in
the process), the peers are spread over the fewest worker processes that fit
even if every pair ends up with two connections, and ``params.peer_processes``
and ``note`` say so. The timed window is the same. (With a hard limit of 20,000
descriptors, n = 500 on the sparse graph, degree 52, cannot run in one process.)

Output: one JSON line per configuration on stdout::

    {"bench": "e2e", "params": {...}, "seconds": ..., "phase_seconds": {...},
     "peer_bytes_ratio": ..., "server_bytes_ratio": ...,
     "targets": {"seconds": 10, "peer_bytes_ratio": 1.1, "server_bytes_ratio": 1.5},
     "status": "ok", "exact": true, ...}

The script exits 0: benchmarks report, they do not fail.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import multiprocessing
import resource
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from peers.peer import Peer
from secagg.graph import make_graph
from secagg.protocol.common import Encoder
from server.coordinator import Coordinator

HOST = "127.0.0.1"
TARGETS = {"seconds": 10, "peer_bytes_ratio": 1.1, "server_bytes_ratio": 1.5}
FULL = ({"n": 100, "d": 100_000, "graph": "complete"},
        {"n": 500, "d": 10_000, "graph": "sparse"})
QUICK = ({"n": 12, "d": 1_000, "graph": "complete"},)
DROPOUT = 0.1
CRASH_STATE = "reported"
FAN_IN = 8
START_BATCH = 50  # peers connecting at once (the listen backlog is 100)
FD_SLACK = 256

log = logging.getLogger("secagg.bench.e2e")


def peer_input(seed: int, index: int, d: int) -> np.ndarray:
    """Peer ``index``'s input; any process can regenerate it."""
    return np.random.default_rng([seed, index]).uniform(-1.0, 1.0, d)


def peer_name(index: int) -> str:
    return f"peer-{index:04d}"


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def fds_needed(peers: int, total: int, degree: int, processes: int,
               links_per_pair: int = 1) -> int:
    """Descriptors a process holding ``peers`` of ``total`` peers needs.

    Each peer: a listener, its coordinator connection, one socket per neighbour
    link plus one to a tree parent that is not a neighbour; with one process both
    ends of a link (and of the coordinator connections) are local. Under load a
    pair may end up with two connections (when the R1 link wait expires before
    the other side dialled, both sides dial): ``links_per_pair=2`` allows for it.
    """
    per_peer = 2 + links_per_pair * degree + 1
    coordinator_side = total if processes == 1 else 0
    return peers * per_peer + coordinator_side + FD_SLACK


def peer_processes(n: int, degree: int, fd_limit: int) -> int:
    """1 if all peers fit in this process, else the fewest workers that surely fit."""
    if fds_needed(n, n, degree, 1) <= fd_limit:
        return 1
    processes = 2
    while fds_needed(math.ceil(n / processes), n, degree, processes, links_per_pair=2) \
            > fd_limit and processes < 32:
        processes += 1
    return processes


# ------------------------------------------------------------------ peers


async def run_peers(url: str, indices: Sequence[int], d: int, seed: int,
                    victims: frozenset[int], ready: asyncio.Event | None = None,
                    ) -> dict[str, Any]:
    """Start the peers, contribute, and return what they sent and how they ended."""
    loop = asyncio.get_running_loop()
    peers: dict[int, Peer] = {}
    crashed: set[int] = set()

    def progress_of(index: int) -> Any:
        def progress(state: str, round_number: int) -> None:
            if state == CRASH_STATE and index in victims and index not in crashed:
                crashed.add(index)
                loop.call_soon(peers[index].crash)
        return progress

    try:
        for index in indices:
            peers[index] = Peer(url, peer_name(index), listen=(HOST, 0),
                                progress=progress_of(index))
        for start in range(0, len(indices), START_BATCH):
            batch = indices[start:start + START_BATCH]
            await asyncio.gather(*(peers[i].start() for i in batch))
        if ready is not None:
            ready.set()
        tasks = [asyncio.create_task(peers[i].contribute(peer_input(seed, i, d)))
                 for i in indices]
        done = await asyncio.gather(*tasks, return_exceptions=True)
        statuses = {peer_name(i): (o.status if hasattr(o, "status") else type(o).__name__)
                    for i, o in zip(indices, done, strict=True)}
        return {"bytes_sent": {peer_name(i): peers[i].bytes_sent for i in indices},
                "statuses": statuses, "crashed": sorted(peer_name(i) for i in crashed)}
    finally:
        await asyncio.gather(*(peer.close() for peer in peers.values()),
                             return_exceptions=True)


def worker_main(url: str, indices: list[int], d: int, seed: int, victims: list[int],
                conn: Any) -> None:
    """A peer process: connect every peer, say so, take part, report."""
    raise_fd_limit()
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)

    async def main() -> dict[str, Any]:
        ready = asyncio.Event()
        run = asyncio.create_task(run_peers(url, indices, d, seed, frozenset(victims), ready))
        await asyncio.wait([asyncio.create_task(ready.wait()), run],
                           return_when=asyncio.FIRST_COMPLETED)
        conn.send("ready")
        return await run

    try:
        conn.send(asyncio.run(main()))
    except BaseException as exc:  # the parent reports it
        conn.send({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        conn.close()


# -------------------------------------------------------------------- round


async def bench_one(n: int, d: int, graph: str, seed: int, phase_timeout: float,
                    fd_limit: int, mode: str = "masking") -> dict[str, Any]:
    threshold = n // 2 + 1
    degree = make_graph(graph, n, threshold, bytes(32)).degree  # type: ignore[arg-type]
    crash_count = max(1, round(DROPOUT * n))
    # Spread the victims evenly over the roster.
    victims = frozenset(int(i * n / crash_count) for i in range(crash_count))
    processes = peer_processes(n, degree, fd_limit)
    params: dict[str, Any] = {"n": n, "d": d, "graph": graph, "threshold": threshold,
                              "degree": degree, "fan_in": FAN_IN, "dropout": DROPOUT,
                              "crash_state": CRASH_STATE, "crashed": len(victims),
                              "modulus_bits": 32, "peer_processes": processes, "mode": mode}
    record: dict[str, Any] = {"bench": "e2e", "params": params}
    setup_started = time.perf_counter()
    async with Coordinator(HOST, 0, max_peers=n, threshold=threshold, dim=d,
                           graph=graph, fan_in=FAN_IN,  # type: ignore[arg-type]
                           phase_timeout=phase_timeout,
                           mode=mode) as coordinator:  # type: ignore[arg-type]
        if processes == 1:
            ready = asyncio.Event()
            peers_task = asyncio.create_task(run_peers(
                coordinator.url, list(range(n)), d, seed, victims, ready))
            await asyncio.wait([asyncio.create_task(ready.wait()), peers_task],
                               return_when=asyncio.FIRST_COMPLETED)
            if peers_task.done():
                peers_task.result()  # raises what went wrong
            setup_seconds = time.perf_counter() - setup_started
            started = time.perf_counter()
            result = await coordinator.run_round()
            seconds = time.perf_counter() - started
            peer_reports = [await peers_task]
        else:
            record["note"] = (f"{n} peers need more file descriptors than one process may "
                              f"open (limit {fd_limit}); peers ran in {processes} worker "
                              "processes")
            context = multiprocessing.get_context("spawn")
            pipes, workers = [], []
            for w in range(processes):
                indices = list(range(w, n, processes))
                parent, child = context.Pipe(duplex=False)
                worker = context.Process(target=worker_main, args=(
                    coordinator.url, indices, d, seed, sorted(victims & set(indices)), child),
                    daemon=True)
                worker.start()
                child.close()
                pipes.append(parent)
                workers.append(worker)
            loop = asyncio.get_running_loop()
            try:
                for pipe in pipes:
                    message = await loop.run_in_executor(None, pipe.recv)
                    if message != "ready":
                        raise RuntimeError(f"peer worker failed: {message}")
                setup_seconds = time.perf_counter() - setup_started
                started = time.perf_counter()
                result = await coordinator.run_round()
                seconds = time.perf_counter() - started
                peer_reports = [await loop.run_in_executor(None, pipe.recv) for pipe in pipes]
            finally:
                for worker in workers:
                    worker.join(timeout=30)
                    if worker.is_alive():
                        worker.kill()
            for report in peer_reports:
                if "error" in report:
                    raise RuntimeError(f"peer worker failed: {report['error']}")

    bytes_sent: dict[str, int] = {}
    statuses: dict[str, str] = {}
    crashed: list[str] = []
    for report in peer_reports:
        bytes_sent.update(report["bytes_sent"])
        statuses.update(report["statuses"])
        crashed += report["crashed"]
    vector_bytes = 4 * d
    stats = result.stats
    contributors = list(result.contributors)
    scale = Encoder.create(n=n, dim=d, clip=1.0, scale=None, modulus_bits=32, weighted=False,
                           max_weight=1.0).quantizer.scale
    error_bound = n / scale + 1e-9
    exact = False
    max_abs_error = None
    if result.aggregate is not None and contributors:
        index_of = {peer_name(i): i for i in range(n)}
        expected = np.zeros(d)
        for name in contributors:
            expected += peer_input(seed, index_of[name], d)
        max_abs_error = float(np.max(np.abs(result.aggregate - expected)))
        exact = max_abs_error <= error_bound and not set(contributors) & set(crashed)
    record.update(
        seconds=round(seconds, 4),
        setup_seconds=round(setup_seconds, 4),
        phase_seconds={k: round(v, 4) for k, v in stats.get("phase_seconds", {}).items()},
        peer_bytes_ratio=round(max(bytes_sent.values()) / vector_bytes, 4),
        server_bytes_ratio=round(stats["bytes_in"] / vector_bytes, 4),
        targets=TARGETS,
        status=result.status,
        exact=exact,
        max_abs_error=max_abs_error,
        error_bound=error_bound,
        contributors=len(contributors),
        crashed=len(crashed),
        dropped=len(result.outcome.dropped),
        u1=stats.get("u1"), u2=stats.get("u2"), u3=stats.get("u3"),
        server_bytes_out_ratio=round(stats["bytes_out"] / vector_bytes, 4),
        peers_ok=sum(1 for s in statuses.values() if s == "ok"),
    )
    if result.outcome.reason:
        record["reason"] = result.outcome.reason
    record["meets_targets"] = (record["seconds"] <= TARGETS["seconds"]
                               and record["peer_bytes_ratio"] <= TARGETS["peer_bytes_ratio"]
                               and record["server_bytes_ratio"]
                               <= TARGETS["server_bytes_ratio"])
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n=12, d=1000 only (smoke test)")
    parser.add_argument("--n", type=int, help="run one configuration with this many peers")
    parser.add_argument("--d", type=int, help="... with this many coordinates")
    parser.add_argument("--graph", choices=["complete", "sparse"], default="complete")
    parser.add_argument("--mode", choices=["masking", "paillier", "hybrid"], default="masking")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--phase-timeout", type=float, default=30.0,
                        help="the coordinator's phase timeout (its default, 30 s)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    if args.n is not None or args.d is not None:
        configs: Sequence[dict[str, Any]] = ({"n": args.n or 100, "d": args.d or 100_000,
                                              "graph": args.graph},)
    else:
        configs = QUICK if args.quick else FULL
    fd_limit = raise_fd_limit()
    for config in configs:
        record = asyncio.run(bench_one(config["n"], config["d"], config["graph"], args.seed,
                                       args.phase_timeout, fd_limit, args.mode))
        print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
