"""HKDF-SHA256 key derivation with domain-separated, unambiguous ``info``."""

from __future__ import annotations

from functools import lru_cache

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from secagg.errors import CryptoError

PROTOCOL_ID = b"secagg/v1"


def _lp(data: bytes) -> bytes:
    """Length-prefix ``data`` (4-byte big-endian) so concatenations cannot collide."""
    return len(data).to_bytes(4, "big") + data


def encode_info(*, purpose: str, session: bytes, round: int, context: bytes = b"") -> bytes:
    """HKDF ``info``: lp(PROTOCOL_ID) || lp(purpose) || lp(session) || round(8, BE) || lp(context).

    Every variable-length field is length-prefixed (4-byte big-endian length).
    """
    return _info(purpose, bytes(session), round, bytes(context))


@lru_cache(maxsize=256)
def _info(purpose: str, session: bytes, round: int, context: bytes) -> bytes:
    # Cached: every mask of a round derives its key with the same info (a server
    # removing 50,000 pair masks would otherwise rebuild it 50,000 times).
    if not 0 <= round < 2**64:
        raise CryptoError(f"round must fit in 8 unsigned bytes, got {round}")
    return b"".join(
        (
            _lp(PROTOCOL_ID),
            _lp(purpose.encode("ascii")),
            _lp(session),
            round.to_bytes(8, "big"),
            _lp(context),
        )
    )


def derive_key(
    secret: bytes,
    *,
    purpose: str,
    session: bytes,
    round: int,
    length: int = 32,
    context: bytes = b"",
) -> bytes:
    """Derive ``length`` bytes from ``secret`` with HKDF-SHA256 (salt None)."""
    info = encode_info(purpose=purpose, session=session, round=round, context=context)
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(secret)
