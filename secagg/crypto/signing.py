"""Ed25519 signatures (used by the actively secure variant)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from secagg.crypto.keys import RandomBytes
from secagg.errors import SignatureError

PUBLIC_KEY_LENGTH = 32
SIGNATURE_LENGTH = 64


@dataclass(frozen=True)
class SigningKey:
    """An Ed25519 key pair as raw bytes (32-byte seed, 32-byte public key)."""

    private_bytes: bytes = field(repr=False)  # never leak the secret through logs
    public_bytes: bytes


def generate_signing_key(random_bytes: RandomBytes = os.urandom) -> SigningKey:
    """Generate an Ed25519 key from a 32-byte seed drawn from ``random_bytes``."""
    private = Ed25519PrivateKey.from_private_bytes(random_bytes(32))
    public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return SigningKey(private_bytes=private.private_bytes_raw(), public_bytes=public)


def sign(key: SigningKey, message: bytes) -> bytes:
    """Return the 64-byte Ed25519 signature of ``message``."""
    return Ed25519PrivateKey.from_private_bytes(key.private_bytes).sign(message)


def verify(public: bytes, message: bytes, signature: bytes) -> None:
    """Raise SignatureError unless ``signature`` is valid for ``message`` under ``public``."""
    if len(public) != PUBLIC_KEY_LENGTH:
        raise SignatureError(
            f"malformed Ed25519 public key: expected {PUBLIC_KEY_LENGTH} bytes, got {len(public)}"
        )
    if len(signature) != SIGNATURE_LENGTH:
        raise SignatureError(
            f"malformed Ed25519 signature: expected {SIGNATURE_LENGTH} bytes, got {len(signature)}"
        )
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except (InvalidSignature, ValueError) as exc:
        raise SignatureError(
            "Ed25519 signature verification failed: wrong key, altered message or forged signature"
        ) from exc
