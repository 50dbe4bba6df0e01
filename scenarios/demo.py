"""The main demo: a coordinator and peers on 127.0.0.1, some of them dying mid-round.

Every peer is a real :class:`peers.Peer` with its own websocket listener; the
coordinator is a real :class:`server.Coordinator`. Four peers are killed at
different phases (their sockets aborted, as SIGKILL would): during the share
exchange, before sending the masked input, as a relay holding its children's
sums, and during unmasking. The demo prints the aggregate next to the exact
plaintext sum of the contributors, and why each dropped peer was dropped.
``--sim`` runs the same scenario in the in-memory simulator instead.

``--mode`` picks how inputs are protected: ``masking`` (the default), ``paillier``
(Paillier-encrypted under the coordinator's key, no share exchange and no
unmasking) or ``hybrid`` (masked, then Paillier-encrypted). In paillier mode the
kills scripted for the share exchange and for unmasking cannot happen: the demo
says so and those two peers contribute normally.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time

import numpy as np

from peers import Peer
from secagg.cli_support import HelpFormatter
from secagg.protocol import PeerOutcome
from secagg.protocol.common import MODES, Mode
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
# The simulator's dropout phase for each scripted kill, by peer index.
SIM_DROPOUTS = {1: "share_keys", 2: "masked_input", 3: "relay", UNMASKING_VICTIM: "unmasking"}
# Modes without a phase of their own for some kills: paillier has no share
# exchange (R1) and no unmasking (R4).
MISSING_PHASES: dict[str, frozenset[str]] = {"paillier": frozenset({"sharing", "unmasking"})}


def inapplicable_kills(mode: str) -> dict[int, str]:
    """Peer index -> scripted kill state that ``mode`` never reaches."""
    missing = MISSING_PHASES.get(mode, frozenset())
    scripted = {**KILLS, UNMASKING_VICTIM: "unmasking"}
    return {i: state for i, state in sorted(scripted.items()) if state in missing}


def _announce_inapplicable(mode: str, names: list[str]) -> dict[int, str]:
    skipped = inapplicable_kills(mode)
    if skipped:
        what = " and ".join(f"{names[i]} ({PHASE_NAMES[state]})"
                            for i, state in skipped.items())
        print(f"{mode} mode has no share exchange and no unmasking: the scripted kills of "
              f"{what} do not apply; {'both contribute' if len(skipped) > 1 else 'it contributes'}"
              " normally")
    return skipped


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


async def run_network(n: int, dim: int, seed: int, mode: Mode = "masking") -> int:
    rng = np.random.default_rng(seed)
    inputs = rng.uniform(-1.0, 1.0, size=(n, dim))
    names = [f"peer-{i:02d}" for i in range(n)]
    threshold = n // 2 + 1
    peers: list[Peer] = []
    skipped = inapplicable_kills(mode)
    kills = {i: state for i, state in KILLS.items() if i not in skipped}

    def on_phase(phase: str, round_number: int) -> None:
        if phase == "unmasking" and UNMASKING_VICTIM not in skipped:
            print(f"  killing {names[UNMASKING_VICTIM]} {PHASE_NAMES['unmasking']}")
            peers[UNMASKING_VICTIM].crash()

    async with Coordinator(max_peers=n, threshold=threshold, dim=dim, fan_in=2,
                           phase_timeout=10.0, progress=on_phase,
                           mode=mode) as coordinator:
        print(f"coordinator on {coordinator.url}: {n} peers, {dim} coordinates, "
              f"threshold {threshold}, accumulation tree fan-in 2, {mode} mode")
        _announce_inapplicable(mode, names)
        killed: set[int] = set()
        killed_relay: set[str] = set()
        loop = asyncio.get_running_loop()

        def make_progress(i: int):  # type: ignore[no-untyped-def]
            def progress(state: str, round_number: int) -> None:
                target = kills.get(i)
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


def run_simulated(n: int, dim: int, seed: int, mode: Mode = "masking") -> int:
    rng = np.random.default_rng(seed)
    inputs = rng.uniform(-1.0, 1.0, size=(n, dim))
    names = [f"peer-{i:05d}" for i in range(n)]
    print(f"simulated round: {n} peers, {dim} coordinates, threshold {n // 2 + 1}, "
          f"{mode} mode")
    # The simulator would still kill a "share_keys" peer in paillier mode (when the
    # roster arrives); the demo skips the same kills on both transports instead.
    skipped = _announce_inapplicable(mode, names)
    dropouts = {i: phase for i, phase in SIM_DROPOUTS.items() if i not in skipped}
    result = run_round(inputs, threshold=n // 2 + 1, dropouts=dropouts, seed=seed, fan_in=2,
                       mode=mode)
    return _print_result(inputs, names, result.aggregate,
                         [names[i] for i in result.contributors],
                         {names[i]: why for i, why in result.dropped.items()},
                         result.status, result.reason)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scenarios.demo",
                                     formatter_class=HelpFormatter,
                                     description="secagg demo: peers dropping mid-round")
    parser.add_argument("--peers", type=int, default=12, help="peers in the round, at least 9")
    parser.add_argument("--dim", type=int, default=6, help="coordinates per input")
    parser.add_argument("--seed", type=int, default=7, help="seed of the inputs")
    parser.add_argument("--sim", action="store_true", help="use the in-memory simulator")
    parser.add_argument("--mode", choices=MODES, default="masking",
                        help="how inputs are protected")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log every protocol step to stderr")
    args = parser.parse_args(argv)
    if args.peers < 9:
        parser.error("--peers must be at least 9 (four of them are killed)")
    if args.dim < 1:
        parser.error("--dim must be positive")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR,
                        format="%(name)s %(levelname)s %(message)s")
    # A line per websocket opened or closed would drown the protocol's own.
    logging.getLogger("websockets").setLevel(logging.WARNING)
    if args.sim:
        return run_simulated(args.peers, args.dim, args.seed, args.mode)
    return asyncio.run(run_network(args.peers, args.dim, args.seed, args.mode))


if __name__ == "__main__":
    sys.exit(main())
