"""X25519 key pairs and raw Diffie-Hellman agreement."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from secagg.errors import CryptoError

RandomBytes = Callable[[int], bytes]
"""Source of randomness: ``random_bytes(n)`` returns ``n`` bytes (injected so tests are
deterministic)."""

KEY_LENGTH = 32


@dataclass(frozen=True)
class KeyPair:
    """An X25519 key pair as raw 32-byte strings."""

    private_bytes: bytes = field(repr=False)  # never leak the secret through logs
    public_bytes: bytes


def generate_keypair(random_bytes: RandomBytes = os.urandom) -> KeyPair:
    """Generate an X25519 key pair from 32 bytes of ``random_bytes``."""
    private = X25519PrivateKey.from_private_bytes(random_bytes(KEY_LENGTH))
    public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return KeyPair(private_bytes=private.private_bytes_raw(), public_bytes=public)


def validate_public_key(public: bytes) -> None:
    """Raise CryptoError unless ``public`` is a 32-byte X25519 public key."""
    if not isinstance(public, bytes | bytearray) or len(public) != KEY_LENGTH:
        size = len(public) if isinstance(public, bytes | bytearray) else type(public).__name__
        raise CryptoError(f"malformed X25519 public key: expected {KEY_LENGTH} bytes, got {size}")


def agree(private_bytes: bytes | X25519PrivateKey, peer_public: bytes) -> bytes:
    """Return the raw 32-byte X25519 shared secret (feed it to ``derive_key``, never use raw).

    Pass a loaded ``X25519PrivateKey`` when agreeing with many peers: loading the
    key from bytes costs as much as the agreement itself.
    """
    validate_public_key(peer_public)
    if isinstance(private_bytes, X25519PrivateKey):
        private = private_bytes
    elif len(private_bytes) != KEY_LENGTH:
        raise CryptoError(
            f"malformed X25519 private key: expected {KEY_LENGTH} bytes, got {len(private_bytes)}"
        )
    else:
        private = X25519PrivateKey.from_private_bytes(private_bytes)
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:
        # cryptography rejects low-order points (all-zero shared secret): a peer
        # sending one would force a predictable key, so it is an error, not a key.
        raise CryptoError(f"X25519 agreement rejected the peer public key: {exc}") from exc


def load_private(private_bytes: bytes) -> X25519PrivateKey:
    """Load a private key once, for repeated :func:`agree` calls."""
    if len(private_bytes) != KEY_LENGTH:
        raise CryptoError(f"malformed X25519 private key: expected {KEY_LENGTH} bytes")
    return X25519PrivateKey.from_private_bytes(private_bytes)


def public_from_private(private_bytes: bytes) -> bytes:
    """The X25519 public key of ``private_bytes`` (checks a reconstructed secret key)."""
    if len(private_bytes) != KEY_LENGTH:
        raise CryptoError(f"malformed X25519 private key: expected {KEY_LENGTH} bytes")
    private = X25519PrivateKey.from_private_bytes(private_bytes)
    return private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
