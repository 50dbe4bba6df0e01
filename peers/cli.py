"""``secagg-peer``: take part in secure-aggregation rounds with a vector from a file.

``--input`` is a .npy file: a 1-D array (the same input every round) or a 2-D
array (one row per round). Exits 0 after the last round, non-zero with a
one-line reason otherwise. Progress goes to stderr; no vector or secret is
ever printed.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import ssl
import sys
from pathlib import Path

import numpy as np

from peers.peer import Peer, PeerError
from secagg.cli_support import OneLineParser, configure_logging
from secagg.errors import SecAggError

log = logging.getLogger("secagg.peer.cli")


def _listen_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="secagg-peer", description=__doc__.splitlines()[0])
    parser.add_argument("--server", required=True, help="coordinator URL, ws://H:P or wss://H:P")
    parser.add_argument("--id", required=True, dest="peer_id", help="this peer's unique id")
    parser.add_argument("--input", required=True, type=Path, help=".npy file, 1-D or 2-D")
    parser.add_argument("--weight", type=float, default=1.0)
    parser.add_argument("--mode", choices=["any", "masking", "paillier", "hybrid"],
                        default="any",
                        help="take part only in rounds of this mode (default: any mode the "
                             "coordinator runs)")
    parser.add_argument("--listen", type=_listen_address, default=("127.0.0.1", 0),
                        help="HOST:PORT of this peer's listener (port 0 picks one)")
    parser.add_argument("--no-listen", action="store_true",
                        help="accept no connections (behind NAT): the coordinator forwards")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds to take part in (default: rows of a 2-D input, else 1)")
    parser.add_argument("--tls-cert", type=Path, help="serve the listener over wss://")
    parser.add_argument("--tls-key", type=Path)
    parser.add_argument("--tls-ca", type=Path, help="CA bundle to verify wss:// endpoints")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def load_inputs(path: Path, rounds: int | None) -> tuple[np.ndarray, int]:
    """Load the input file; return (array, number of rounds). Raises ValueError."""
    try:
        data = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ValueError(f"--input {path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"--input {path}: not a readable .npy array ({exc})") from None
    if not isinstance(data, np.ndarray) or data.ndim not in (1, 2) or data.size == 0:
        raise ValueError(f"--input {path}: expected a non-empty 1-D or 2-D array")
    if not np.issubdtype(data.dtype, np.number) or np.iscomplexobj(data):
        raise ValueError(f"--input {path}: expected real numbers, got dtype {data.dtype}")
    data = data.astype(np.float64)
    if not np.all(np.isfinite(data)):
        raise ValueError(f"--input {path}: contains NaN or infinity")
    available = data.shape[0] if data.ndim == 2 else None
    count = rounds if rounds is not None else (available or 1)
    if count < 1:
        raise ValueError(f"--rounds must be positive, got {count}")
    if available is not None and count > available:
        raise ValueError(f"--rounds {count} but --input has only {available} rows")
    return data, count


async def take_part(args: argparse.Namespace, data: np.ndarray, rounds: int) -> int:
    listener_ssl = client_ssl = None
    if args.tls_cert:
        listener_ssl = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        listener_ssl.load_cert_chain(args.tls_cert, args.tls_key)
    if args.tls_ca or args.server.startswith("wss://"):
        client_ssl = ssl.create_default_context(cafile=str(args.tls_ca) if args.tls_ca else None)

    def progress(phase: str, round_number: int) -> None:
        log.info("round %d: %s", round_number, phase)

    listen = None if args.no_listen else args.listen
    async with Peer(args.server, args.peer_id, listen=listen, listener_ssl=listener_ssl,
                    client_ssl=client_ssl, progress=progress,
                    mode=None if args.mode == "any" else args.mode) as peer:
        for index in range(rounds):
            vector = data[index] if data.ndim == 2 else data
            outcome = await peer.contribute(vector, weight=args.weight)
            print(f"secagg-peer {args.peer_id}: round {outcome.round}: {outcome.status}"
                  f"{' (' + outcome.reason + ')' if outcome.reason else ''}",
                  file=sys.stderr, flush=True)
            if outcome.status == "rejected":
                print(f"secagg-peer: error: rejected by the coordinator: {outcome.reason}",
                      file=sys.stderr)
                return 3
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    if not args.server.startswith(("ws://", "wss://")):
        parser.error(f"--server must be a ws:// or wss:// URL, got {args.server!r}")
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    try:
        data, rounds = load_inputs(args.input, args.rounds)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        return asyncio.run(take_part(args, data, rounds))
    except KeyboardInterrupt:
        print("secagg-peer: interrupted", file=sys.stderr)
        return 130
    except (PeerError, SecAggError, ValueError) as exc:
        print(f"secagg-peer: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"secagg-peer: error: {exc.strerror or exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
