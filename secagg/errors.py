"""The exception hierarchy shared by every layer of secagg."""

from __future__ import annotations


class SecAggError(Exception):
    """Base class of every error raised by secagg."""


class CryptoError(SecAggError):
    """A cryptographic operation failed (bad key, failed authentication, ...)."""


class DecryptionError(CryptoError):
    """An AEAD ciphertext did not authenticate: tampered, misdirected or replayed."""


class SignatureError(CryptoError):
    """An Ed25519 signature did not verify."""


class ShamirError(CryptoError):
    """Secret sharing was misused: too few shares, duplicate indices, bad values."""


class EncodingError(SecAggError, ValueError):
    """Quantization parameters cannot represent the requested aggregate."""


class WireError(SecAggError):
    """A message could not be decoded or failed validation."""


class ProtocolError(SecAggError):
    """A message or event is not allowed in the current protocol state."""


class AbortError(SecAggError):
    """The round was aborted; the message says why."""
