"""Benchmark: one simulated round (``secagg.sim.run_round``) as the number of peers grows.

Setup per size ``n``: the sparse (SecAgg+) graph, threshold ``floor(n/2) + 1`` (the
honest-but-curious default), ``d`` coordinates (10,000 by default), inputs uniform
in [-1, 1], and a ``--dropout`` fraction (10 %) of the peers dying, chosen with a
seeded ``numpy.random.Generator`` and dealt round-robin over the phases
``share_keys``, ``masked_input`` and ``unmasking``. Everything is deterministic.

Two modes, because ``tracemalloc`` slows Python down several times:

* timing (default; n in 100, 1000, 5000): no tracing. ``seconds`` is the wall
  time of the whole ``run_round`` call (peer construction included),
  ``loop_seconds`` the simulator's own figure (event loop only).
  ``process_max_rss_bytes`` is the process high-water mark so far (``ru_maxrss``;
  cumulative over the sizes run before, which go in increasing order).
* ``--memory`` (n in 100, 1000 by default): the same round under ``tracemalloc``
  (started after the inputs are built; ``inputs_bytes`` reports them). Figures:

  - ``peak_total_bytes``: traced peak of the whole simulation (all peers, the
    frames in flight, the server). It grows like n·d, as it must: every peer
    holds its own vectors.
  - Server-side memory, measured with a ``ServerProtocol`` subclass that the
    benchmark (only) substitutes for the one ``run_round`` builds:

    * ``server_retained_peak_bytes``: the largest *retained* size of the server
      object, i.e. the sum of ``sys.getsizeof`` over everything reachable from it
      (numpy arrays count their data buffers, views count their base), skipping
      types, modules and functions, and not counting ``server.view``, the
      simulator's record of every accepted message (``record_view=True``, kept
      for privacy checks, not needed by a server), which is reported apart as
      ``server_view_peak_bytes``. It is sampled at the entry of every
      ``_close_phase`` (when a phase has collected everything it will get: all
      share reports, all unmasking shares, before the shares are dropped) and
      after every event that changes the server's state (which catches the
      root's aggregate arriving).
    * ``server_vector_bytes``: the numpy part of that retained size (max over
      the samples): the vectors the server holds. Should be O(d), flat in n.
    * ``server_transient_peak_bytes``: the largest growth of traced memory during
      one ``ServerProtocol.handle`` call (traced peak during the call minus traced
      memory at entry). Everything allocated during that call is allocated by
      the server, so this is the server's working memory for one event
      (messages it builds, shares it parses, the mask buffers of unmasking).
      ``server_transient_by_state`` breaks it down by the server's state at the
      start of the call, e.g. ``masking`` holds the call that receives the
      aggregate and starts unmasking, ``unmasking`` the one that removes the
      masks.
    * ``server_peak_bytes_bound``: retained peak + transient peak, an upper
      bound on the server's peak (the two maxima may not coincide and the
      transient part can include what is then retained).

  The sampling itself (the traversal) is excluded from the transient figures:
  the traced peak is read before it and reset after it.

Other figures (both modes): ``status``, ``exact`` (max abs error of the decoded
sum against ``inputs[contributors].sum(0)`` below the quantization bound
``n/scale``), ``u1``..``u3``, ``degree``, ``events``, ``virtual_seconds``,
``max_peer_bytes_sent`` (the simulator's figure, which counts the server as a
sender; ``max_peer_bytes_sent_peers_only`` and ``server_bytes_out`` split it),
``server_bytes_in`` and ``server_bytes_in_vectors`` = ``server_bytes_in / (4 d)``:
the server's inbound traffic in units of one uint32 vector.

Output: one JSON line per n on stdout. ``--quick`` (n in 20, 60, d = 1000) is for
the smoke test. The script always exits 0.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import time
import tracemalloc
import types
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import secagg.sim as sim
from secagg.encoding import Quantizer
from secagg.graph import default_threshold
from secagg.protocol.events import Action, Event
from secagg.protocol.peer import PeerProtocol
from secagg.protocol.server import ServerConfig, ServerProtocol
from secagg.wire import SERVER

DROP_PHASES = ("share_keys", "masked_input", "unmasking")
FULL_SIZES = (100, 1000, 5000)
MEMORY_SIZES = (100, 1000)
QUICK_SIZES = (20, 60)
FULL_DIM = 10_000
QUICK_DIM = 1000

_SKIP_TYPES = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType,
               types.MethodType, types.CodeType, types.FrameType)


def make_dropouts(n: int, fraction: float, seed: int) -> dict[int, str]:
    """``round(fraction * n)`` distinct peers, dealt round-robin over DROP_PHASES."""
    rng = np.random.default_rng([seed, n, 1])
    chosen = rng.choice(n, size=round(fraction * n), replace=False)
    return {int(peer): DROP_PHASES[i % len(DROP_PHASES)] for i, peer in enumerate(chosen)}


def make_inputs(n: int, d: int, seed: int) -> np.ndarray:
    inputs: np.ndarray = np.random.default_rng([seed, n, 0]).uniform(-1.0, 1.0, size=(n, d))
    return inputs


def retained_size(root: object, exclude: Sequence[object] = ()) -> tuple[int, int]:
    """(bytes, numpy bytes) reachable from ``root``, each object counted once."""
    seen = {id(obj) for obj in exclude}
    stack: list[object] = [root]
    total = arrays = 0
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, _SKIP_TYPES):
            continue
        seen.add(id(obj))
        size = sys.getsizeof(obj)
        total += size
        if isinstance(obj, np.ndarray):
            arrays += size  # includes the data buffer when the array owns it
            if obj.base is not None:
                stack.append(obj.base)
            continue
        stack.extend(gc.get_referents(obj))
    return total, arrays


@dataclass
class ServerMeter:
    """What the metered server records; also tracks the global traced peak."""

    tracing: bool = False
    global_peak: int = 0
    retained_peak: int = 0
    view_peak: int = 0
    vector_bytes: int = 0
    transient_peak: int = 0
    transient_by_state: dict[str, int] = field(default_factory=dict)
    samples: int = 0
    _call_peak: int = 0

    def _read_peak(self) -> None:
        peak = tracemalloc.get_traced_memory()[1]
        self.global_peak = max(self.global_peak, peak)
        self._call_peak = max(self._call_peak, peak)

    def begin_call(self) -> int:
        self._read_peak()  # keep the global peak before resetting it
        tracemalloc.reset_peak()
        self._call_peak = 0
        return tracemalloc.get_traced_memory()[0]

    def end_call(self, state: str, before: int) -> None:
        self._read_peak()
        growth = max(0, self._call_peak - before)
        self.transient_peak = max(self.transient_peak, growth)
        self.transient_by_state[state] = max(self.transient_by_state.get(state, 0), growth)

    def sample(self, server: ServerProtocol) -> None:
        """Retained size of ``server``; the traversal's own allocations are not counted."""
        self._read_peak()
        core, arrays = retained_size(server, exclude=(server.view,))
        view, _ = retained_size(server.view)
        self.retained_peak = max(self.retained_peak, core)
        self.view_peak = max(self.view_peak, view)
        self.vector_bytes = max(self.vector_bytes, arrays)
        self.samples += 1
        tracemalloc.reset_peak()

    def finish(self) -> None:
        self._read_peak()


@dataclass
class Capture:
    """Objects run_round builds internally, captured for reporting."""

    network: sim.Network | None = None
    server: ServerProtocol | None = None


@contextmanager
def instrumented(meter: ServerMeter) -> Iterator[Capture]:
    """Substitute recording subclasses of Network and ServerProtocol inside secagg.sim."""
    capture = Capture()

    class RecordingNetwork(sim.Network):
        def __init__(self, server: ServerProtocol, peers: Mapping[str, PeerProtocol],
                     dies_in: Mapping[str, str], *, encode_frames: bool) -> None:
            super().__init__(server, peers, dies_in, encode_frames=encode_frames)
            capture.network = self

    class MeteredServer(ServerProtocol):
        def __init__(self, config: ServerConfig, **kwargs: Any) -> None:
            super().__init__(config, **kwargs)
            capture.server = self

        def handle(self, event: Event) -> list[Action]:
            if not meter.tracing:
                return super().handle(event)
            state = self.state
            before = meter.begin_call()
            actions = super().handle(event)
            if self.state is not state:
                meter.sample(self)
            meter.end_call(str(state), before)
            return actions

        def _close_phase(self) -> list[Action]:
            if meter.tracing:
                meter.sample(self)
            return super()._close_phase()

    namespace = vars(sim)  # run_round looks both names up in its module at call time
    saved = {name: namespace[name] for name in ("Network", "ServerProtocol")}
    namespace.update(Network=RecordingNetwork, ServerProtocol=MeteredServer)
    try:
        yield capture
    finally:
        namespace.update(saved)


def bench_size(n: int, d: int, *, dropout: float, seed: int, memory: bool) -> dict[str, Any]:
    inputs = make_inputs(n, d, seed)
    dropouts = make_dropouts(n, dropout, seed)
    threshold = default_threshold(n, "honest-but-curious")
    meter = ServerMeter(tracing=memory)
    gc.collect()
    if memory:
        tracemalloc.start(1)
        tracemalloc.reset_peak()
    try:
        with instrumented(meter) as capture:
            started = time.perf_counter()
            result = sim.run_round(inputs, threshold, dropouts, graph="sparse", seed=seed)
            seconds = time.perf_counter() - started
        if memory:
            meter.finish()
    finally:
        if memory:
            tracemalloc.stop()
    stats = result.stats
    scale = Quantizer.for_peers(n, clip=1.0, modulus_bits=32).scale
    bound = n / scale
    error = float("nan")
    if result.aggregate is not None:
        error = float(np.abs(result.aggregate - inputs[result.contributors].sum(axis=0)).max())
    bytes_sent = capture.network.bytes_sent if capture.network is not None else {}
    phase_counts = {phase: sum(1 for p in dropouts.values() if p == phase)
                    for phase in DROP_PHASES}
    server_in = int(stats.get("server_bytes_in", 0))
    record: dict[str, Any] = {
        "bench": "sim_scale",
        "params": {"n": n, "d": d, "graph": "sparse", "threshold": threshold,
                   "dropout": dropout, "dropouts": phase_counts, "seed": seed,
                   "mode": "memory" if memory else "timing"},
        "seconds": seconds,
        "loop_seconds": stats.get("wall_seconds"),
        "status": result.status,
        "reason": result.reason,
        "exact": bool(error < bound),
        "max_abs_error": error,
        "error_bound": bound,
        "u1": stats.get("u1"),
        "u2": stats.get("u2"),
        "u3": stats.get("u3"),
        "degree": stats.get("degree"),
        "share_threshold": stats.get("share_threshold"),
        "tree_depth": stats.get("tree_depth"),
        "events": stats.get("events"),
        "virtual_seconds": stats.get("virtual_seconds"),
        "max_peer_bytes_sent": stats.get("max_peer_bytes_sent"),
        "max_peer_bytes_sent_peers_only": max(
            (b for name, b in bytes_sent.items() if name != SERVER), default=0),
        "server_bytes_out": bytes_sent.get(SERVER, 0),
        "server_bytes_in": server_in,
        "server_bytes_in_vectors": server_in / (4 * d),
        "rejections": len(stats.get("rejections", [])),
    }
    if memory:
        record.update(
            peak_total_bytes=meter.global_peak,
            inputs_bytes=int(inputs.nbytes),
            vector_bytes=4 * d,
            server_retained_peak_bytes=meter.retained_peak,
            server_view_peak_bytes=meter.view_peak,
            server_vector_bytes=meter.vector_bytes,
            server_transient_peak_bytes=meter.transient_peak,
            server_transient_by_state=meter.transient_by_state,
            server_peak_bytes_bound=meter.retained_peak + meter.transient_peak,
            server_samples=meter.samples,
        )
    else:
        record["process_max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return record


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true",
                        help=f"n in {QUICK_SIZES}, d = {QUICK_DIM} (smoke test)")
    parser.add_argument("--memory", action="store_true",
                        help="trace memory (tracemalloc) instead of timing; default n "
                             f"{MEMORY_SIZES}")
    parser.add_argument("--n", type=int, nargs="+", default=None, help="numbers of peers")
    parser.add_argument("--d", type=int, default=None, help=f"vector length (default {FULL_DIM})")
    parser.add_argument("--dropout", type=float, default=0.1,
                        help="fraction of peers that drop (default 0.1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 0.0 <= args.dropout < 1.0:
        parser.error("--dropout must be in [0, 1)")
    if args.n is not None:
        sizes: Sequence[int] = sorted(args.n)
    elif args.quick:
        sizes = QUICK_SIZES
    else:
        sizes = MEMORY_SIZES if args.memory else FULL_SIZES
    d = args.d or (QUICK_DIM if args.quick else FULL_DIM)
    for n in sizes:
        record = bench_size(n, d, dropout=args.dropout, seed=args.seed, memory=args.memory)
        print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
