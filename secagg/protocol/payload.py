"""What travels up the accumulation tree, one codec per kind of payload.

In the ``masking`` mode a partial sum is a vector of ring elements, added
coordinate-wise; in the ``paillier`` and ``hybrid`` modes it is a list of packed
Paillier ciphertexts under the server's key, added by multiplying them modulo
n^2. The tree logic (who waits for whom, re-routing, the new root) is the same
for both, so it talks to a :class:`RingPayloads` or a
:class:`CiphertextPayloads` object and never looks inside a payload. On the
wire a payload is always one byte string of a length fixed by the round
(:attr:`PayloadCodec.byte_length`), carried by ``wire.PartialSum`` (sealed
between tree relatives) and ``wire.RootAggregate`` (root to server).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from phe import PaillierPrivateKey, PaillierPublicKey

from secagg.crypto.keys import RandomBytes
from secagg.errors import CryptoError, WireError
from secagg.paillier import (
    FastEncryptor,
    SlotLayout,
    add_ciphertexts,
    ciphertexts_from_bytes,
    ciphertexts_to_bytes,
    decrypt_vector,
)
from secagg.protocol.errors import DropReason, RemoteProtocolError
from secagg.wire import Limits, PartialSum, decode_record, encode_record

Payload = Any
"""A ring vector (``np.ndarray``) or a list of ciphertexts (``list[int]``)."""

RING_DTYPES: dict[int, np.dtype[Any]] = {32: np.dtype("<u4"), 64: np.dtype("<u8")}


@dataclass(frozen=True)
class Partial:
    """A partial sum held by a peer: its payload and whose inputs it contains."""

    payload: Payload
    contributors: tuple[int, ...]


class PayloadCodec(Protocol):
    """The operations the tree and the server need on payloads of one kind."""

    @property
    def byte_length(self) -> int:
        """The exact length of one payload on the wire."""

    def seal_ring(self, ring: np.ndarray, random_bytes: RandomBytes) -> Payload:
        """A peer's own payload from its ring vector (identity, or encryption)."""

    def add(self, total: Payload, other: Payload) -> Payload:
        """``total + other``; may update ``total`` in place and return it."""

    def copy(self, total: Payload) -> Payload: ...

    def to_bytes(self, payload: Payload) -> bytes: ...

    def from_bytes(self, data: bytes) -> Payload:
        """Parse a payload of :attr:`byte_length` bytes; RemoteProtocolError if malformed."""

    def to_ring(self, payload: Payload, private_key: PaillierPrivateKey | None) -> np.ndarray:
        """The server's view of the root's payload: the ring sum (decrypted if need be)."""


@dataclass(frozen=True)
class RingPayloads:
    """Masking mode: vectors in Z_{2^k} (``dtype`` uint32 or uint64), as raw
    little-endian bytes on the wire."""

    dtype: np.dtype[Any]
    dim: int

    @property
    def byte_length(self) -> int:
        return self.dim * self.dtype.itemsize

    def seal_ring(self, ring: np.ndarray, random_bytes: RandomBytes) -> Payload:
        return ring

    def add(self, total: Payload, other: Payload) -> Payload:
        np.add(total, other, out=total)
        return total

    def copy(self, total: Payload) -> Payload:
        return np.array(total, copy=True)

    def to_bytes(self, payload: Payload) -> bytes:
        vector = np.asarray(payload)
        if vector.ndim != 1 or vector.dtype.kind != "u" or \
                vector.dtype.itemsize != self.dtype.itemsize or vector.shape[0] != self.dim:
            raise ValueError(f"a ring payload is a 1-D {self.dtype} vector of {self.dim} "
                             f"coordinates, not {vector.dtype}{vector.shape}")
        return np.ascontiguousarray(vector, dtype=self.dtype.newbyteorder("<")).tobytes()

    def from_bytes(self, data: bytes) -> Payload:
        if len(data) != self.byte_length:
            raise RemoteProtocolError(
                f"payload of {len(data)} bytes, the round's vector has {self.byte_length}",
                DropReason.MALFORMED_MESSAGE)
        # Zero-copy and read-only: a received vector is only ever added into a sum we own.
        vector: np.ndarray = np.frombuffer(data, dtype=self.dtype.newbyteorder("<"))
        return vector.astype(self.dtype.newbyteorder("="), copy=False)

    def to_ring(self, payload: Payload, private_key: PaillierPrivateKey | None) -> np.ndarray:
        """The server's view: the aggregate payload is the ring vector itself."""
        return np.array(payload, copy=True)


@dataclass(frozen=True)
class CiphertextPayloads:
    """Paillier and hybrid modes: packed ciphertexts under the server's public key."""

    public_key: PaillierPublicKey
    layout: SlotLayout
    dim: int
    """Ring coordinates per vector (the weight coordinate included)."""
    dtype: np.dtype[Any]
    """The ring the plaintext slots hold."""

    @property
    def count(self) -> int:
        """Ciphertexts per vector."""
        return self.layout.ciphertext_count(self.dim)

    @property
    def byte_length(self) -> int:
        return self.count * self.layout.ciphertext_bytes

    def seal_ring(self, ring: np.ndarray, random_bytes: RandomBytes) -> Payload:
        encryptor = FastEncryptor(self.public_key, random_bytes=random_bytes)
        return encryptor.encrypt_vector(ring, self.layout)

    def add(self, total: Payload, other: Payload) -> Payload:
        # A product of ciphertexts encrypts the sum; no re-randomisation is needed
        # because every leaf ciphertext is already randomised.
        add_ciphertexts(total, other, self.public_key)
        return total

    def copy(self, total: Payload) -> Payload:
        return list(total)

    def to_bytes(self, payload: Payload) -> bytes:
        return ciphertexts_to_bytes(payload, self.public_key)

    def from_bytes(self, data: bytes) -> Payload:
        try:
            return ciphertexts_from_bytes(data, self.public_key, self.count)
        except (CryptoError, WireError) as exc:
            raise RemoteProtocolError(f"malformed ciphertexts: {exc}",
                                      DropReason.MALFORMED_MESSAGE) from None

    def to_ring(self, payload: Payload, private_key: PaillierPrivateKey | None) -> np.ndarray:
        """The server's view: decrypt the aggregate into the ring."""
        if private_key is None:
            raise ValueError("decrypting the aggregate needs the round's Paillier private key")
        return decrypt_vector(private_key, payload, self.layout, self.dim, self.dtype)


def encode_partial(codec: PayloadCodec, partial: Partial) -> bytes:
    """The AEAD plaintext carrying ``partial`` to a tree ancestor."""
    return encode_record(PartialSum(payload=codec.to_bytes(partial.payload),
                                    contributors=list(partial.contributors)))


def decode_partial(codec: PayloadCodec, plaintext: bytes, limits: Limits) -> Partial:
    """Parse and check an AEAD plaintext (RemoteProtocolError or WireError if bad)."""
    record = decode_record(PartialSum, plaintext, limits)
    assert isinstance(record, PartialSum)
    members = record.contributors
    if not members or len(set(members)) != len(members):
        raise RemoteProtocolError("partial sum has an empty or repeated contributor set",
                                  DropReason.INVALID_AGGREGATE)
    return Partial(codec.from_bytes(record.payload), tuple(members))
