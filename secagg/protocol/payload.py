"""What travels up the accumulation tree, one class per kind of payload.

In the ``masking`` mode a partial sum is a vector of ring elements, added
coordinate-wise; in the ``paillier`` and ``hybrid`` modes it is a list of packed
Paillier ciphertexts under the server's key, added by multiplying them modulo
n^2. The peer's tree logic (who waits for whom, re-routing, the new root) is the
same for both, so it talks to a :class:`RingPayloads` or a
:class:`CiphertextPayloads` object and never looks inside a payload.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from phe import PaillierPublicKey

from secagg.errors import ProtocolError
from secagg.paillier import (
    SlotLayout,
    add_ciphertexts,
    ciphertexts_from_bytes,
    ciphertexts_to_bytes,
)
from secagg.wire import (
    Limits,
    Message,
    PaillierPartialSum,
    PaillierRootAggregate,
    PartialSum,
    RootAggregate,
    decode_record,
    encode_record,
)

Payload = Any
"""A ring vector (``np.ndarray``) or a list of ciphertexts (``list[int]``)."""


@dataclass(frozen=True)
class Partial:
    """A partial sum held by a peer: its payload and whose inputs it contains."""

    payload: Payload
    contributors: tuple[int, ...]


class Payloads(Protocol):
    """The operations the tree needs on partial sums of one kind."""

    def add(self, total: Payload, other: Payload) -> Payload:
        """``total + other``; may update ``total`` in place and return it."""

    def copy(self, total: Payload) -> Payload: ...

    def encode_partial(self, partial: Partial) -> bytes:
        """The AEAD plaintext carrying ``partial`` to a tree ancestor."""

    def decode_partial(self, plaintext: bytes, limits: Limits) -> Partial:
        """Parse and check an AEAD plaintext; ProtocolError or WireError if it is bad."""

    def root_message(self, partial: Partial) -> Message:
        """What the root sends the server."""


@dataclass(frozen=True)
class RingPayloads:
    """Masking mode: vectors in Z_{2^k}, with k given by ``dtype``."""

    dtype: np.dtype[Any]

    def add(self, total: Payload, other: Payload) -> Payload:
        np.add(total, other, out=total)
        return total

    def copy(self, total: Payload) -> Payload:
        return np.array(total, copy=True)

    def encode_partial(self, partial: Partial) -> bytes:
        return encode_record(PartialSum(vector=partial.payload,
                                        contributors=list(partial.contributors)))

    def decode_partial(self, plaintext: bytes, limits: Limits) -> Partial:
        record = decode_record(PartialSum, plaintext, limits)
        assert isinstance(record, PartialSum)
        if record.vector.dtype != self.dtype:
            raise ProtocolError(f"partial sum has dtype {record.vector.dtype}, the ring is "
                                f"{self.dtype}")
        # A read-only view of the frame: it is only ever added into a sum we own.
        return Partial(record.vector, tuple(record.contributors))

    def root_message(self, partial: Partial) -> Message:
        return RootAggregate(vector=partial.payload, contributors=list(partial.contributors))


@dataclass(frozen=True)
class CiphertextPayloads:
    """Paillier and hybrid modes: packed ciphertexts under the server's public key."""

    public_key: PaillierPublicKey
    layout: SlotLayout
    count: int
    """Ciphertexts per vector (``layout.ciphertext_count(dim)``)."""

    def add(self, total: Payload, other: Payload) -> Payload:
        # A product of ciphertexts encrypts the sum; no re-randomisation is needed
        # because every leaf ciphertext is already randomised.
        add_ciphertexts(total, other, self.public_key)
        return total

    def copy(self, total: Payload) -> Payload:
        return list(total)

    def encode_partial(self, partial: Partial) -> bytes:
        return encode_record(PaillierPartialSum(
            ciphertexts=ciphertexts_to_bytes(partial.payload, self.public_key),
            contributors=list(partial.contributors)))

    def decode_partial(self, plaintext: bytes, limits: Limits) -> Partial:
        record = decode_record(PaillierPartialSum, plaintext, limits)
        assert isinstance(record, PaillierPartialSum)
        return Partial(self.parse(record.ciphertexts), tuple(record.contributors))

    def parse(self, data: bytes) -> list[int]:
        """Ciphertexts from their fixed-width encoding (CryptoError if malformed)."""
        return ciphertexts_from_bytes(data, self.public_key, self.count)

    def root_message(self, partial: Partial) -> Message:
        return PaillierRootAggregate(
            ciphertexts=ciphertexts_to_bytes(partial.payload, self.public_key),
            contributors=list(partial.contributors))
