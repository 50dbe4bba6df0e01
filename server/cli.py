"""``secagg-server``: run secure-aggregation rounds and write their results.

For each round r it writes ``DIR/round-<r>.json`` ({"round", "status",
"contributors", "dropped", "threshold", ...}) and, when the round is ok,
``DIR/round-<r>.npy`` with the float64 aggregate sum. Progress goes to stderr;
nothing secret is logged. Exit statuses: :mod:`secagg.cli_support`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import ssl
import sys
from pathlib import Path

import numpy as np

from secagg.cli_support import (
    SERVER_EXIT_STATUSES,
    VERBOSE_HELP,
    ExitStatus,
    OneLineParser,
    configure_logging,
    exit_status_epilog,
    os_error_text,
    raise_open_file_limit,
)
from secagg.dp import DPConfig
from secagg.errors import SecAggError
from secagg.graph import check_threshold
from server.coordinator import Coordinator, RoundResult

log = logging.getLogger("secagg.server.cli")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


DESCRIPTION = """\
Run secure-aggregation rounds: wait for --max-peers peers, run a round, write
DIR/round-<r>.json (and DIR/round-<r>.npy, the float64 aggregate sum, when the
round is ok); repeat --rounds times. Progress goes to stderr; nothing secret is
logged."""

# Lines the coordinator and its protocol log that this tool prints itself (with the
# round's contributor and drop counts), so that each round's end shows once.
ALREADY_PRINTED = (
    ("secagg.server", r"^round \d+ aborted: "),
    ("secagg.server", r"^round \d+: \d+ coordinates were clipped"),
    ("secagg.coordinator", r"^round \d+: (ok|aborted)\b"),
    ("secagg.coordinator", r"^coordinator listening on "),
)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="secagg-server", description=DESCRIPTION,
                           epilog=exit_status_epilog(SERVER_EXIT_STATUSES, {
                               ExitStatus.OK: "every round ended ok",
                               ExitStatus.FAILED: "an error that is none of the below "
                                                  "(e.g. the port is taken)",
                               ExitStatus.ROUND_ABORTED: "a round aborted (see its "
                                                         "round-<r>.json); the later rounds "
                                                         "still ran",
                           }))
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    parser.add_argument("--port", type=int, default=8765, help="port; 0 picks a free one")
    parser.add_argument("--max-peers", "--min-peers", type=_positive_int, required=True,
                        metavar="N", dest="max_peers",
                        help="the most peers a round admits: registration closes as soon as "
                             "N registered (later ones are turned away), or after "
                             "--phase-timeout with at least --threshold (--min-peers is the "
                             "old name)")
    parser.add_argument("--threshold", type=_positive_int, required=True, metavar="T",
                        help="fewest contributors whose sum may be revealed; N/2 < T <= N")
    parser.add_argument("--dim", type=_positive_int, required=True, metavar="D",
                        help="coordinates of every peer's vector")
    parser.add_argument("--rounds", type=_positive_int, default=1, metavar="R",
                        help="rounds to run, one after the other; run every peer with as "
                             "many: secagg-peer --rounds R")
    parser.add_argument("--mode", choices=["masking", "paillier", "hybrid"], default="masking",
                        help="masking (pairwise masks), paillier (inputs encrypted under "
                             "the server's key; no masks) or hybrid (masked and encrypted)")
    parser.add_argument("--paillier-key-bits", type=int, choices=[2048, 3072], default=2048,
                        help="Paillier modulus size for --mode paillier/hybrid")
    parser.add_argument("--graph", choices=["complete", "sparse"], default="complete",
                        help="who shares masks with whom: every pair, or a sparse random "
                             "graph of O(log n) neighbours (SecAgg+) for large n")
    parser.add_argument("--threat-model", choices=["honest-but-curious", "active"],
                        default="honest-but-curious",
                        help="active adds signed keys and a consistency check (R3) against "
                             "a server that lies about who dropped")
    parser.add_argument("--phase-timeout", type=_positive_float, default=None, metavar="S",
                        help="seconds each phase (registration too) may take (default: "
                             "derived from --max-peers, the graph's degree and --dim; 30 s "
                             "for a dozen peers, about 115 s for 1,000 sparse peers at "
                             "d = 10,000)")
    parser.add_argument("--clip", type=_positive_float, default=1.0,
                        help="inputs are clipped to [-clip, clip]")
    parser.add_argument("--modulus-bits", type=int, choices=[32, 64], default=32,
                        help="ring size for the quantized inputs; 64 allows finer "
                             "quantization or more peers")
    parser.add_argument("--fan-in", type=_positive_int, default=8,
                        help="children per relay in the accumulation tree")
    parser.add_argument("--weighted", action="store_true",
                        help="peers send (w*x, w); the .npy holds the weighted sum")
    parser.add_argument("--max-weight", type=_positive_float, default=1.0,
                        help="largest weight a peer may send with --weighted (public bound "
                             "used to size the encoding)")
    # Distributed DP: each peer adds a share of discrete noise before masking, sized
    # so that any sum of at least --threshold contributors carries all of it.
    parser.add_argument("--dp-noise-multiplier", type=_positive_float, metavar="Z",
                        help="distributed differential privacy: each peer adds its share of "
                             "noise of this stddev over the L2 sensitivity (default: no DP)")
    parser.add_argument("--dp-clip", type=_positive_float, metavar="C",
                        help="with DP: the L2 norm every input is clipped to (default: --clip)")
    parser.add_argument("--dp-mechanism", choices=["skellam", "gaussian"], default="skellam",
                        help="with DP: the discrete noise, Skellam or discrete Gaussian")
    parser.add_argument("--dp-delta", type=_positive_float, default=1e-5,
                        help="with DP: the delta at which each round reports epsilon")
    parser.add_argument("--tls-cert", type=Path, metavar="FILE",
                        help="serve wss:// with this certificate (default: plain ws://)")
    parser.add_argument("--tls-key", type=Path, metavar="FILE",
                        help="private key of --tls-cert (default: none)")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help="directory for round results")
    parser.add_argument("-v", "--verbose", action="count", default=0, help=VERBOSE_HELP)
    return parser


def round_notes(result: RoundResult) -> str:
    """What else a person should know about a finished round: clipping, privacy."""
    notes = ""
    clipped = result.outcome.clipped
    if clipped:
        notes += (f"; {clipped} input coordinates were clipped this round (raise --clip "
                  "if that is not intended)")
    dp = result.stats.get("dp")
    if isinstance(dp, dict) and dp.get("epsilon") is not None:
        notes += (f"; privacy spent so far: epsilon {dp['epsilon']:.3g} at delta "
                  f"{dp['delta']:g} (noise multiplier achieved "
                  f"{dp['achieved_noise_multiplier']:.3g})")
    return notes


def write_round(out: Path, result: RoundResult) -> None:
    """Write round-<r>.json (and round-<r>.npy when ok) atomically."""
    outcome = result.outcome
    record = {
        "round": outcome.round,
        "status": outcome.status,
        "contributors": list(outcome.contributors),
        "dropped": dict(outcome.dropped),
        "threshold": outcome.threshold,
        "reason": outcome.reason,
        "clipped": outcome.clipped,
        "stats": {key: value for key, value in result.stats.items()
                  if key not in ("dropped",)},
    }
    dp = result.stats.get("dp")
    if isinstance(dp, dict):
        record["dp"] = {key: dp.get(key) for key in (
            "epsilon", "delta", "noise_multiplier", "achieved_noise_multiplier", "bits",
            "mechanism", "rounds")}
    if outcome.aggregate is not None:
        aggregate = outcome.aggregate
        if outcome.total_weight is not None:
            # Weighted rounds publish the weighted sum; the mean is sum / total_weight.
            record["total_weight"] = outcome.total_weight
        tmp = out / f".round-{outcome.round}.npy"
        with open(tmp, "wb") as handle:
            np.save(handle, np.asarray(aggregate, dtype=np.float64), allow_pickle=False)
        tmp.replace(out / f"round-{outcome.round}.npy")
    tmp_json = out / f".round-{outcome.round}.json"
    tmp_json.write_text(json.dumps(record, indent=2, default=str) + "\n")
    tmp_json.replace(out / f"round-{outcome.round}.json")


def dp_config(args: argparse.Namespace) -> DPConfig | None:
    """The DP settings the options ask for (None without --dp-noise-multiplier)."""
    if args.dp_noise_multiplier is None:
        return None
    return DPConfig(noise_multiplier=args.dp_noise_multiplier,
                    clip=args.dp_clip if args.dp_clip is not None else args.clip,
                    mechanism=args.dp_mechanism, delta=args.dp_delta,
                    modulus_bits=args.modulus_bits)


async def serve_rounds(args: argparse.Namespace) -> ExitStatus:
    ssl_context = None
    if args.tls_cert or args.tls_key:
        ssl_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ssl_context.load_cert_chain(args.tls_cert, args.tls_key)
    coordinator = Coordinator(
        args.host, args.port, max_peers=args.max_peers, threshold=args.threshold,
        dim=args.dim, graph=args.graph, threat_model=args.threat_model,
        phase_timeout=args.phase_timeout, clip=args.clip, modulus_bits=args.modulus_bits,
        fan_in=args.fan_in, weighted=args.weighted, max_weight=args.max_weight,
        ssl_context=ssl_context, mode=args.mode, paillier_key_bits=args.paillier_key_bits,
        dp=dp_config(args))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    status = ExitStatus.OK
    async with coordinator:
        print(f"secagg-server listening on {coordinator.url} (phase deadline "
              f"{coordinator.phase_timeout:g} s)", file=sys.stderr, flush=True)
        for _ in range(args.rounds):
            round_task = asyncio.create_task(coordinator.run_round())
            stop_task = asyncio.create_task(stop.wait())
            done, _pending = await asyncio.wait({round_task, stop_task},
                                                return_when=asyncio.FIRST_COMPLETED)
            stop_task.cancel()
            if round_task not in done:
                round_task.cancel()
                print("secagg-server: interrupted", file=sys.stderr)
                return ExitStatus.INTERRUPTED
            result = round_task.result()
            write_round(args.out, result)
            outcome = result.outcome
            print(f"round {outcome.round}: {outcome.status}"
                  f"{' (' + outcome.reason + ')' if outcome.reason else ''}; "
                  f"{len(outcome.contributors)} contributors, {len(outcome.dropped)} dropped"
                  f"{round_notes(result)}", file=sys.stderr, flush=True)
            if outcome.status != "ok":
                status = ExitStatus.ROUND_ABORTED
    return status


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose, ALREADY_PRINTED)
    if args.mode == "paillier" and args.graph != "complete":
        parser.error("--mode paillier has no masks and so no neighbour graph: drop --graph "
                     "sparse (it applies to masking and hybrid)")
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    try:
        check_threshold(args.max_peers, args.threshold, args.threat_model)
    except ValueError as exc:
        parser.error(f"--threshold {args.threshold} with --max-peers {args.max_peers}: {exc}")
    if not 0 <= args.port < 65536:
        parser.error(f"--port must be in 0..65535, got {args.port}")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        parser.error(f"cannot create --out {args.out}: {exc.strerror}")
    # One descriptor per peer: the usual soft limit (1,024) is far below the usual hard
    # one. Beyond what the limit allows, the coordinator turns connections away.
    raise_open_file_limit()
    try:
        return int(asyncio.run(serve_rounds(args)))
    except KeyboardInterrupt:
        print("secagg-server: interrupted", file=sys.stderr)
        return int(ExitStatus.INTERRUPTED)
    except (SecAggError, ValueError) as exc:
        # The coordinator refuses a configuration that cannot work (e.g. the ring
        # cannot hold the sum): it says which parameter to change.
        print(f"secagg-server: error: {exc}", file=sys.stderr)
        return int(ExitStatus.BAD_ARGUMENTS)
    except OSError as exc:
        print(f"secagg-server: error: {os_error_text(exc)}", file=sys.stderr)
        return int(ExitStatus.FAILED)


if __name__ == "__main__":
    sys.exit(main())
