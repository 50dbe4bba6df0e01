"""Ed25519 signatures (used by the actively secure variant)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)

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


def signing_key_pem(key: SigningKey) -> bytes:
    """``key`` as an unencrypted PKCS#8 PEM file (what ``openssl genpkey -algorithm
    ed25519`` writes): whoever can read it can sign as this peer."""
    return Ed25519PrivateKey.from_private_bytes(key.private_bytes).private_bytes(
        Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())


def load_signing_key_pem(data: bytes) -> SigningKey:
    """The Ed25519 key in an unencrypted PKCS#8 PEM file; SignatureError if it is not
    one (the message never quotes the file)."""
    try:
        private = load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        # TypeError: the file is encrypted; ValueError: not a PEM key at all.
        reason = "it is encrypted" if isinstance(exc, TypeError) else \
            "not an unencrypted PEM private key"
        raise SignatureError(f"unusable Ed25519 key file: {reason}") from None
    except UnsupportedAlgorithm:
        raise SignatureError("unusable Ed25519 key file: unsupported key type") from None
    if not isinstance(private, Ed25519PrivateKey):
        raise SignatureError("unusable Ed25519 key file: a private key of another type")
    return SigningKey(private_bytes=private.private_bytes_raw(),
                      public_bytes=private.public_key().public_bytes(Encoding.Raw,
                                                                     PublicFormat.Raw))


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
