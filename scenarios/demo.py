"""The main demo: a coordinator and peers on 127.0.0.1, some of them dying mid-round.

Every peer is a real :class:`peers.Peer` with its own websocket listener; the
coordinator is a real :class:`server.Coordinator`. Four peers are killed at
different phases (their sockets aborted, as SIGKILL would): during the share
exchange, before sending the masked input, as a relay holding its children's
sums, and during unmasking. The demo prints the aggregate next to the exact
plaintext sum of the contributors, and why each dropped peer was dropped.
``--sim`` runs the same scenario in the in-memory simulator instead.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time

import numpy as np

from peers import Peer
from secagg.protocol import PeerOutcome
from secagg.sim import run_round
from server import Coordinator

# peer index -> the state in which it dies (see peers.Peer's progress callback);
# "masking" is only ever reached by relays, so the first relay to reach it dies.
# The unmasking victim dies when the coordinator enters R4, after its input is in.
KILLS = {1: "sharing", 2: "reported"}
UNMASKING_VICTIM = 4
PHASE_NAMES = {"sharing": "during the share exchange",
               "reported": "before sending its masked input",
               "masking": "as a relay holding its children's sums",
               "unmasking": "during unmasking"}


def _print_result(inputs: np.ndarray, names: list[str], aggregate: np.ndarray | None,
                  contributors: list[str], dropped: dict[str, str], status: str,
                  reason: str) -> int:
    print(f"\nround status: {status}" + (f" ({reason})" if reason else ""))
    for name, why in sorted(dropped.items()):
        print(f"  dropped {name}: {why}")
    if aggregate is None:
        return 1
    index = [names.index(name) for name in contributors]
    expected = inputs[index].sum(axis=0)
    np.set_printoptions(precision=6, suppress=True, linewidth=110)
    print(f"contributors ({len(contributors)}): {', '.join(contributors)}")
    print(f"secure aggregate : {aggregate}")
    print(f"plaintext sum    : {expected}")
    error = float(np.max(np.abs(aggregate - expected)))
    print(f"max |difference| = {error:.2e} (quantization only)")
    return 0 if error < 1e-4 else 1


async def run_network(n: int, dim: int, seed: int) -> int:
    rng = np.random.default_rng(seed)
    inputs = rng.uniform(-1.0, 1.0, size=(n, dim))
    names = [f"peer-{i:02d}" for i in range(n)]
    threshold = n // 2 + 1
    peers: list[Peer] = []

    def on_phase(phase: str, round_number: int) -> None:
        if phase == "unmasking":
            print(f"  killing {names[UNMASKING_VICTIM]} {PHASE_NAMES['unmasking']}")
            peers[UNMASKING_VICTIM].crash()

    async with Coordinator(min_peers=n, threshold=threshold, dim=dim, fan_in=2,
                           phase_timeout=10.0, progress=on_phase) as coordinator:
        print(f"coordinator on {coordinator.url}: {n} peers, {dim} coordinates, "
              f"threshold {threshold}, accumulation tree fan-in 2")
        killed: set[int] = set()
        killed_relay: set[str] = set()
        loop = asyncio.get_running_loop()

        def make_progress(i: int):  # type: ignore[no-untyped-def]
            def progress(state: str, round_number: int) -> None:
                target = KILLS.get(i)
                hit = state == target
                if state == "masking" and i not in KILLS and i != UNMASKING_VICTIM and \
                        "relay" not in killed_relay:
                    killed_relay.add("relay")
                    target, hit = "masking", True
                if hit and target is not None and i not in killed:
                    killed.add(i)
                    print(f"  killing {names[i]} {PHASE_NAMES[target]}")
                    loop.call_soon(peers[i].crash)
            return progress

        for i, name in enumerate(names):
            peer = Peer(coordinator.url, name, progress=make_progress(i))
            await peer.start()
            peers.append(peer)
        started = time.perf_counter()
        round_task = asyncio.create_task(coordinator.run_round())

        async def contribute(i: int) -> PeerOutcome | None:
            try:
                return await peers[i].contribute(inputs[i])
            except asyncio.CancelledError:
                return None  # this peer was killed

        await asyncio.gather(*(contribute(i) for i in range(n)))
        result = await round_task
        print(f"round finished in {time.perf_counter() - started:.2f} s")
        for peer in peers:
            await peer.close()
    outcome = result.outcome
    return _print_result(inputs, names, outcome.aggregate, list(outcome.contributors),
                         dict(outcome.dropped), outcome.status, outcome.reason)


def run_simulated(n: int, dim: int, seed: int) -> int:
    rng = np.random.default_rng(seed)
    inputs = rng.uniform(-1.0, 1.0, size=(n, dim))
    names = [f"peer-{i:05d}" for i in range(n)]
    dropouts = {1: "share_keys", 2: "masked_input", 3: "relay", 4: "unmasking"}
    print(f"simulated round: {n} peers, {dim} coordinates, threshold {n // 2 + 1}")
    result = run_round(inputs, threshold=n // 2 + 1, dropouts=dropouts, seed=seed, fan_in=2)
    return _print_result(inputs, names, result.aggregate,
                         [names[i] for i in result.contributors],
                         {names[i]: why for i, why in result.dropped.items()},
                         result.status, result.reason)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="secagg demo: peers dropping mid-round")
    parser.add_argument("--peers", type=int, default=12)
    parser.add_argument("--dim", type=int, default=6)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--sim", action="store_true", help="use the in-memory simulator")
    args = parser.parse_args(argv)
    if args.peers < 9:
        parser.error("--peers must be at least 9 (four of them are killed)")
    if args.dim < 1:
        parser.error("--dim must be positive")
    logging.basicConfig(level=logging.ERROR)
    if args.sim:
        return run_simulated(args.peers, args.dim, args.seed)
    return asyncio.run(run_network(args.peers, args.dim, args.seed))


if __name__ == "__main__":
    sys.exit(main())
