"""Identity keys for the active threat model: ``secagg-peer keygen``, and the
``--identity`` and ``--trust`` files of ``secagg-peer``.

``secagg-peer keygen --out FILE`` writes an Ed25519 identity key (PKCS#8 PEM, mode
0600) and prints its public identity line, ``ID HEX-PUBLIC-KEY``; ``--identity FILE``
makes the peer sign its keys with it, ``--trust FILE`` (such lines, one per peer) is
the closed list of peers it accepts in a roster.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import os
import stat
import string
from pathlib import Path

from secagg.cli_support import ExitStatus, OneLineParser, os_error_text
from secagg.crypto.signing import (
    PUBLIC_KEY_LENGTH,
    SigningKey,
    generate_signing_key,
    load_signing_key_pem,
    signing_key_pem,
)
from secagg.errors import SecAggError, WireError
from secagg.wire import validate_names

KEYGEN_DESCRIPTION = """\
Write a new Ed25519 identity key for --identity to FILE (unencrypted PKCS#8 PEM,
mode 0600; an existing file is never overwritten) and print this peer's public
identity line, 'ID PUBLIC-KEY-HEX', to stdout. Collect every peer's line in one
file for --trust."""

MAX_TRUST_FILE_BYTES = 16 << 20
"""A --trust file is read whole; this bounds it (about 100,000 peers)."""


def build_keygen_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="secagg-peer keygen", description=KEYGEN_DESCRIPTION)
    parser.add_argument("--out", required=True, type=Path, metavar="FILE",
                        help="where to write the private key")
    parser.add_argument("--public-out", type=Path, metavar="FILE",
                        help="also write the public identity line to this file "
                             "(default: stdout only)")
    parser.add_argument("--id", dest="peer_id", metavar="ID",
                        help="the peer id the identity line names (default: the name of "
                             "--out without its suffix)")
    return parser


def os_reason(exc: OSError) -> str:
    """What went wrong with a file the message names already."""
    return exc.strerror or os_error_text(exc)


def identity_line(peer_id: str, public_key: bytes) -> str:
    """A peer's public identity as a --trust file lists it."""
    return f"{peer_id} {public_key.hex()}"


def parse_public_key(text: str) -> bytes:
    """A 32-byte Ed25519 public key written in hex or base64; ValueError otherwise."""
    if all(c in string.hexdigits for c in text):  # base64 of 32 bytes ends in "="
        if len(text) != 2 * PUBLIC_KEY_LENGTH:
            raise ValueError(f"the public key has {len(text)} hex digits, an Ed25519 key "
                             f"has {2 * PUBLIC_KEY_LENGTH}")
        return bytes.fromhex(text)
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the public key is neither hex nor base64") from None
    if len(key) != PUBLIC_KEY_LENGTH:
        raise ValueError(f"the public key has {len(key)} bytes, an Ed25519 key has "
                         f"{PUBLIC_KEY_LENGTH}")
    return key


def load_trusted_identities(path: Path) -> dict[str, bytes]:
    """The --trust file: peer id -> public key. ValueError (one line, naming the file
    and the line) if it is unreadable or malformed."""
    try:
        with path.open("rb") as file:
            data = file.read(MAX_TRUST_FILE_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"--trust {path}: {os_reason(exc)}") from None
    if len(data) > MAX_TRUST_FILE_BYTES:
        raise ValueError(f"--trust {path}: larger than {MAX_TRUST_FILE_BYTES >> 20} MiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"--trust {path}: not a UTF-8 text file") from None
    trusted: dict[str, bytes] = {}
    first_line: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        where = f"--trust {path} line {number}"
        if len(fields) != 2:
            raise ValueError(f"{where}: expected 'ID PUBLIC-KEY', got {len(fields)} "
                             f"field{'s' if len(fields) != 1 else ''}")
        peer_id, key_text = fields
        try:
            validate_names([peer_id])
        except WireError as exc:
            raise ValueError(f"{where}: {exc}") from None
        if peer_id in trusted:
            raise ValueError(f"{where}: {peer_id!r} is listed twice (first on line "
                             f"{first_line[peer_id]})")
        try:
            trusted[peer_id] = parse_public_key(key_text)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        first_line[peer_id] = number
    if not trusted:
        raise ValueError(f"--trust {path}: lists no identities")
    return trusted


def load_identity(path: Path) -> SigningKey:
    """The --identity key file; ValueError (one line) if it is unusable or others may
    read it (as ssh does: a key the whole machine can read is no identity)."""
    try:
        with path.open("rb") as file:
            mode = os.fstat(file.fileno()).st_mode
            data = file.read(64 << 10)  # a PEM Ed25519 key is 119 bytes
    except OSError as exc:
        raise ValueError(f"--identity {path}: {os_reason(exc)}") from None
    if stat.S_IMODE(mode) & 0o077:
        raise ValueError(f"--identity {path}: other users may read this private key (mode "
                         f"{stat.S_IMODE(mode):04o}); run chmod 600 {path}")
    try:
        return load_signing_key_pem(data)
    except SecAggError as exc:
        raise ValueError(f"--identity {path}: {exc}") from None


def write_private_key(path: Path, key: SigningKey) -> None:
    """Create ``path`` with mode 0600 (whatever the umask) and write ``key`` to it; an
    existing file (or symlink) is an OSError, never overwritten."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(descriptor, 0o600)
        os.write(descriptor, signing_key_pem(key))
    except BaseException:
        os.close(descriptor)
        path.unlink(missing_ok=True)
        raise
    os.close(descriptor)


def keygen_main(argv: list[str]) -> int:
    """``secagg-peer keygen``: write a new identity key, print its public line."""
    parser = build_keygen_parser()
    args = parser.parse_args(argv)
    peer_id = args.peer_id if args.peer_id is not None else args.out.stem
    try:
        validate_names([peer_id])
    except WireError as exc:
        parser.error(f"--id: {exc}" if args.peer_id is not None else
                     f"--out {args.out}: {exc}; name the peer with --id")
    if args.public_out is not None and args.public_out.resolve() == args.out.resolve():
        parser.error("--public-out must differ from --out")
    key = generate_signing_key()
    line = identity_line(peer_id, key.public_bytes)
    try:
        write_private_key(args.out, key)
    except FileExistsError:
        parser.error(f"--out {args.out} exists; remove it or choose another file (a key "
                     "is never overwritten)")
    except OSError as exc:
        parser.error(f"--out {args.out}: {os_reason(exc)}")
    if args.public_out is not None:
        try:
            with args.public_out.open("x", encoding="utf-8") as public_file:
                public_file.write(line + "\n")
        except FileExistsError:
            parser.error(f"--public-out {args.public_out} exists; remove it or choose "
                         f"another file (the private key is in {args.out})")
        except OSError as exc:
            parser.error(f"--public-out {args.public_out}: {os_reason(exc)} (the "
                         f"private key is in {args.out})")
    print(line, flush=True)
    return int(ExitStatus.OK)


def load_identities(args: argparse.Namespace) -> tuple[SigningKey | None, dict[str, bytes]]:
    """--identity and --trust, checked against each other and --threat-model;
    ValueError (one line) if they do not fit."""
    identity = load_identity(args.identity) if args.identity is not None else None
    trusted = load_trusted_identities(args.trust) if args.trust is not None else {}
    if trusted and identity is None:
        raise ValueError("--trust needs --identity: this peer's own roster entry must be "
                         "signed like the others'")
    if identity is not None:
        pinned = trusted.get(args.peer_id)
        if pinned is not None and pinned != identity.public_bytes:
            raise ValueError(f"--trust {args.trust} lists {args.peer_id!r}, this peer, "
                             f"under another key than --identity {args.identity}")
    if args.threat_model == "active" and identity is None:
        raise ValueError("--threat-model active needs --identity (this peer signs its "
                         "keys and its view of the round)")
    return identity, trusted
