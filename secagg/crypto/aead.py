"""ChaCha20-Poly1305 sealing bound to (session, round, purpose, sender, receiver)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from secagg.crypto.keys import RandomBytes
from secagg.errors import CryptoError, DecryptionError

KEY_LENGTH = 32
NONCE_LENGTH = 12
TAG_LENGTH = 16
_AD_TAG = b"secagg/v1/ad"

_FAILURE = (
    "ciphertext failed authentication: tampered, misdirected or replayed "
    "(session/round/sender/receiver mismatch)"
)


def _lp(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


@dataclass(frozen=True)
class AssociatedData:
    """What a ciphertext is bound to; a mismatch on open means misdirection or replay."""

    session: bytes
    round: int
    purpose: str
    sender: int
    receiver: int

    def encode(self) -> bytes:
        """lp(tag) || lp(session) || round(8) || lp(purpose) || sender(8) || receiver(8).

        Integers are 8-byte big-endian unsigned; lp = 4-byte big-endian length prefix.
        """
        for name, value in (
            ("round", self.round),
            ("sender", self.sender),
            ("receiver", self.receiver),
        ):
            if not 0 <= value < 2**64:
                raise CryptoError(f"associated data {name} must be in [0, 2^64), got {value}")
        return b"".join(
            (
                _lp(_AD_TAG),
                _lp(bytes(self.session)),
                self.round.to_bytes(8, "big"),
                _lp(self.purpose.encode("ascii")),
                self.sender.to_bytes(8, "big"),
                self.receiver.to_bytes(8, "big"),
            )
        )


def seal(
    key: bytes,
    plaintext: bytes,
    associated: AssociatedData,
    random_bytes: RandomBytes = os.urandom,
) -> bytes:
    """Encrypt and authenticate; returns nonce(12) || ciphertext || tag(16)."""
    # Random 96-bit nonces are fine: each channel key seals only a handful of messages.
    if len(key) != KEY_LENGTH:
        raise CryptoError(f"AEAD key must be {KEY_LENGTH} bytes, got {len(key)}")
    nonce = random_bytes(NONCE_LENGTH)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated.encode())


def open_sealed(key: bytes, sealed: bytes, associated: AssociatedData) -> bytes:
    """Decrypt ``seal`` output; raise DecryptionError on any failure."""
    if len(sealed) < NONCE_LENGTH + TAG_LENGTH:
        raise DecryptionError(f"{_FAILURE}; input too short ({len(sealed)} bytes)")
    try:
        return ChaCha20Poly1305(key).decrypt(
            sealed[:NONCE_LENGTH], sealed[NONCE_LENGTH:], associated.encode()
        )
    except (InvalidTag, ValueError, OverflowError) as exc:
        raise DecryptionError(_FAILURE) from exc
