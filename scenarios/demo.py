"""The main demo: one round with peers dropping at several phases.

Prints the aggregate next to the exact plaintext sum of the contributors and
the reason each dropped peer was dropped.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from secagg.sim import run_round


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--peers", type=int, default=12)
    parser.add_argument("--dim", type=int, default=6)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    n, d = args.peers, args.dim
    if n < 5:
        parser.error("--peers must be at least 5 (four of them drop)")
    rng = np.random.default_rng(args.seed)
    inputs = rng.uniform(-1.0, 1.0, size=(n, d))
    threshold = n // 2 + 1
    dropouts = {1: "share_keys", 2: "masked_input", 3: "relay", 4: "unmasking"}
    print(f"simulated round: {n} peers, {d} coordinates, threshold {threshold}")
    print("scripted drops: " + ", ".join(f"peer {i} in {ph}" for i, ph in dropouts.items()))
    result = run_round(inputs, threshold=threshold, dropouts=dropouts, seed=args.seed)
    print(f"status: {result.status} {result.reason}")
    for peer, reason in result.dropped.items():
        print(f"  dropped peer {peer}: {reason}")
    if result.aggregate is None:
        return 1
    expected = inputs[result.contributors].sum(axis=0)
    print(f"contributors ({len(result.contributors)}): {result.contributors}")
    np.set_printoptions(precision=6, suppress=True, linewidth=120)
    print(f"secure aggregate : {result.aggregate}")
    print(f"plaintext sum    : {expected}")
    error = float(np.max(np.abs(result.aggregate - expected)))
    print(f"max abs difference {error:.2e} (quantization bound n/scale)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
