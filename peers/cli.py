"""``secagg-peer``: take part in secure-aggregation rounds with a vector from a file.

``--input`` is a .npy file: a 1-D array (the same input every round) or a 2-D
array (one row per round). Progress goes to stderr; no vector or secret is ever
printed. One line per round says how it ended; the exit status (defined in
:mod:`secagg.cli_support`) is the most severe of the rounds' (ok, excluded,
aborted), or says why the peer had to stop (lost the coordinator, rejected). A
round whose registration had closed when the peer arrived is not one of its
rounds: the coordinator keeps the connection, and the peer takes the next one.

``secagg-peer keygen --out FILE`` writes an Ed25519 identity key (PKCS#8 PEM, mode
0600) and prints its public identity line, ``ID HEX-PUBLIC-KEY``; ``--identity FILE``
makes the peer sign its keys with it, ``--trust FILE`` (such lines, one per peer)
is the closed list of peers it accepts in a roster, and either makes it insist on
the active threat model unless ``--threat-model`` says otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import ssl
import sys
from pathlib import Path

import numpy as np
from websockets.exceptions import InvalidURI
from websockets.uri import parse_uri

from peers.identity import keygen_main, load_identities
from peers.peer import Peer, PeerError
from secagg.cli_support import (
    PEER_EXIT_NOTE,
    PEER_EXIT_STATUSES,
    VERBOSE_HELP,
    ExitStatus,
    OneLineParser,
    configure_logging,
    exit_status_epilog,
    os_error_text,
    raise_open_file_limit,
    worse,
)
from secagg.crypto.signing import SigningKey
from secagg.errors import SecAggError
from secagg.protocol import PeerOutcome

log = logging.getLogger("secagg.peer.cli")


def _listen_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


DESCRIPTION = """\
Take part in secure-aggregation rounds with a vector read from a .npy file: a 1-D
array (the same input every round) or a 2-D array (one row per round). Prints one
line per round to stderr; never prints a vector or a secret.

Identity keys for the active threat model: secagg-peer keygen --out FILE (see
secagg-peer keygen --help)."""

# Peer.contribute's reasons when the connection to the coordinator is gone: its
# outcome's status is "aborted" (or "rejected" when no round was open), so only the
# reason tells a dead coordinator from an aborted round or a rejection.
LOST_REASONS = frozenset({"lost the connection to the server",
                          "lost the connection to the coordinator",
                          "the coordinator closed the connection"})

# How the coordinator's notice begins when this peer came after a round's registration
# closed: the coordinator keeps the connection and a later round admits the peer.
REGISTRATION_CLOSED = "registration for this round is closed"

# peers.Peer logs these at WARNING; the round line printed here says the same.
ALREADY_PRINTED = (
    ("secagg.peer", r"^\S+: rejected by the coordinator: "),
    ("secagg.peer", r"^\S+: declines round \d+: "),
    ("secagg.peer", r"^\S+ aborts: the round runs under the \S+ threat model, "),
)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="secagg-peer", description=DESCRIPTION,
                           epilog=exit_status_epilog(PEER_EXIT_STATUSES, {
                               ExitStatus.OK: "every round ended ok with this peer's input "
                                              "in the aggregate",
                           }, note=PEER_EXIT_NOTE))
    parser.add_argument("--server", required=True, metavar="URL",
                        help="the coordinator, ws://HOST:PORT or wss://HOST:PORT")
    parser.add_argument("--id", required=True, dest="peer_id", metavar="ID",
                        help="this peer's id, unique among the round's peers")
    parser.add_argument("--input", required=True, type=Path, metavar="FILE",
                        help=".npy file: 1-D (same vector every round) or 2-D (a row per "
                             "round)")
    parser.add_argument("--rounds", type=int, default=None, metavar="R",
                        help="rounds to take part in; give the server's --rounds "
                             "(default: 1 for a 1-D --input, its row count for a 2-D one)")
    parser.add_argument("--weight", type=float, default=1.0, metavar="W",
                        help="this peer's weight in a --weighted round (e.g. its sample "
                             "count, at most the server's --max-weight); unweighted rounds "
                             "ignore it")
    parser.add_argument("--mode", choices=["any", "masking", "paillier", "hybrid"],
                        default="any",
                        help="take part only in rounds of this mode; any: whatever mode the "
                             "coordinator runs")
    parser.add_argument("--min-noise-multiplier", type=float, default=None, metavar="Z",
                        help="take part only in rounds with distributed-DP noise of at "
                             "least this multiplier (default: no floor)")
    parser.add_argument("--identity", type=Path, metavar="FILE",
                        help="this peer's Ed25519 signing key (from secagg-peer keygen, "
                             "or openssl genpkey -algorithm ed25519; readable by its "
                             "owner only); needed under --threat-model active "
                             "(default: none)")
    parser.add_argument("--trust", type=Path, metavar="FILE",
                        help="the peers this peer accepts, one 'ID PUBLIC-KEY' per line "
                             "(hex or base64, # starts a comment): a roster naming any "
                             "other peer, or another key, ends the round; needs --identity "
                             "(default: accept any peer)")
    parser.add_argument("--threat-model", choices=["honest-but-curious", "active"],
                        default=None,
                        help="take part only in rounds of this threat model (default: "
                             "active with --identity or --trust, otherwise any)")
    parser.add_argument("--strict", action="store_true",
                        help="refuse (withdraw from) a round that would clip this peer's "
                             "input, instead of clipping it")
    parser.add_argument("--listen", type=_listen_address, default=("127.0.0.1", 0),
                        metavar="HOST:PORT",
                        help="this peer's listener for other peers; port 0 picks one "
                             "(default: 127.0.0.1:0)")
    parser.add_argument("--no-listen", action="store_true",
                        help="accept no connections (behind NAT): the coordinator forwards")
    parser.add_argument("--tls-cert", type=Path, metavar="FILE",
                        help="serve the listener over wss:// (default: plain ws://)")
    parser.add_argument("--tls-key", type=Path, metavar="FILE",
                        help="private key of --tls-cert (default: none)")
    parser.add_argument("--tls-ca", type=Path, metavar="FILE",
                        help="CA bundle to verify wss:// endpoints (default: the system's)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help=VERBOSE_HELP)
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


def came_too_late(outcome: PeerOutcome) -> bool:
    """Whether the round refused this peer only because its registration had closed."""
    return outcome.status == "rejected" and outcome.reason.startswith(REGISTRATION_CLOSED)


def round_status(outcome: PeerOutcome, opened: bool = True) -> tuple[ExitStatus, str]:
    """How one round ended for this peer: its exit status and the line to print.

    ``opened``: whether this peer entered the round at all (it reported a phase).
    """
    reason = f" ({outcome.reason})" if outcome.reason else ""
    if outcome.status == "ok":
        if outcome.included:
            return ExitStatus.OK, f"ok ({outcome.contributor_count} contributors)"
        return ExitStatus.EXCLUDED, (f"excluded: the round ended ok ({outcome.contributor_count} "
                                     f"contributors) without this peer's input{reason}")
    if outcome.status == "excluded":
        return ExitStatus.EXCLUDED, f"excluded{reason}"
    if outcome.status in ("aborted", "rejected") and outcome.reason in LOST_REASONS:
        return ExitStatus.LOST_SERVER, ("lost the connection to the coordinator" +
                                        ("" if opened else " before the round opened"))
    if outcome.status == "rejected":
        return ExitStatus.REJECTED, f"rejected by the coordinator: {outcome.reason}"
    return ExitStatus.ROUND_ABORTED, f"{outcome.status}{reason}"


async def take_part(args: argparse.Namespace, data: np.ndarray, rounds: int,
                    identity: SigningKey | None = None,
                    trusted: dict[str, bytes] | None = None) -> ExitStatus:
    listener_ssl = client_ssl = None
    if args.tls_cert:
        listener_ssl = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        listener_ssl.load_cert_chain(args.tls_cert, args.tls_key)
    if args.tls_ca or args.server.startswith("wss://"):
        client_ssl = ssl.create_default_context(cafile=str(args.tls_ca) if args.tls_ca else None)

    opened: set[int] = set()

    def progress(phase: str, round_number: int) -> None:
        opened.add(round_number)
        log.info("round %d: %s", round_number, phase)

    listen = None if args.no_listen else args.listen
    status = ExitStatus.OK
    async with Peer(args.server, args.peer_id, listen=listen, listener_ssl=listener_ssl,
                    client_ssl=client_ssl, progress=progress,
                    mode=None if args.mode == "any" else args.mode,
                    min_noise_multiplier=args.min_noise_multiplier, identity=identity,
                    trusted_identities=trusted or None,
                    threat_model=args.threat_model) as peer:
        index, late_round = 0, -1
        while index < rounds:
            vector = data[index] if data.ndim == 2 else data
            try:
                outcome = await peer.contribute(vector, weight=args.weight,
                                                strict=args.strict)
            except TimeoutError as exc:  # the coordinator stopped answering
                message = str(exc).split(" (pass timeout=")[0]
                print(f"secagg-peer: error: {message}", file=sys.stderr, flush=True)
                return ExitStatus.LOST_SERVER
            if came_too_late(outcome) and outcome.round > late_round:
                # Not one of its rounds: the same input goes to the next round (once per
                # round, so that a coordinator repeating itself cannot keep us looping).
                late_round = outcome.round
                print(f"secagg-peer {args.peer_id}: round {outcome.round}: not admitted "
                      f"({outcome.reason}); taking part in the next round",
                      file=sys.stderr, flush=True)
                continue
            opened_round = outcome.round in opened
            round_result, line = round_status(outcome, opened_round)
            if round_result is ExitStatus.LOST_SERVER and index > 0 and not opened_round:
                line += (f" (this peer's round {index + 1} of {rounds}; did the server run "
                         f"fewer --rounds?)")
            print(f"secagg-peer {args.peer_id}: round {outcome.round}: {line}",
                  file=sys.stderr, flush=True)
            status = worse(status, round_result)
            if round_result in (ExitStatus.LOST_SERVER, ExitStatus.REJECTED):
                break
            index += 1
    return status


async def until_signalled(args: argparse.Namespace, data: np.ndarray, rounds: int,
                          identity: SigningKey | None = None,
                          trusted: dict[str, bytes] | None = None) -> ExitStatus:
    """:func:`take_part`, ended cleanly (the peer closes its connections) by SIGINT or
    SIGTERM."""
    task = asyncio.ensure_future(take_part(args, data, rounds, identity, trusted))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        return await task
    except asyncio.CancelledError:
        if not task.cancelled():
            raise
        print("secagg-peer: interrupted", file=sys.stderr, flush=True)
        return ExitStatus.INTERRUPTED


def main(argv: list[str] | None = None) -> int:
    raise_open_file_limit()  # a descriptor per peer link: the default 1,024 is too few
    arguments = sys.argv[1:] if argv is None else list(argv)
    if arguments[:1] == ["keygen"]:
        return keygen_main(arguments[1:])
    parser = build_parser()
    args = parser.parse_args(arguments)
    configure_logging(args.verbose, ALREADY_PRINTED)
    if not args.server.startswith(("ws://", "wss://")):
        parser.error(f"--server must be a ws:// or wss:// URL, got {args.server!r}")
    try:
        parse_uri(args.server)
    except (InvalidURI, ValueError) as exc:
        parser.error(f"--server {args.server!r} is not a valid ws:// or wss:// URL ({exc})")
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    try:
        data, rounds = load_inputs(args.input, args.rounds)
        identity, trusted = load_identities(args)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        return int(asyncio.run(until_signalled(args, data, rounds, identity, trusted)))
    except KeyboardInterrupt:
        print("secagg-peer: interrupted", file=sys.stderr)
        return int(ExitStatus.INTERRUPTED)
    except PeerError as exc:  # the coordinator cannot be reached
        print(f"secagg-peer: error: {exc}", file=sys.stderr)
        return int(ExitStatus.LOST_SERVER)
    except (SecAggError, ValueError) as exc:
        print(f"secagg-peer: error: {exc}", file=sys.stderr)
        return int(ExitStatus.FAILED)
    except OSError as exc:
        print(f"secagg-peer: error: {os_error_text(exc)}", file=sys.stderr)
        return int(ExitStatus.FAILED)


if __name__ == "__main__":
    sys.exit(main())
