"""The payload codecs: what a partial sum is on the wire in each mode.

A ring vector travels as its raw little-endian bytes (the tests that used to
check the wire's vector fields live here now: dtype, byte order, length, and
that a decoded vector is never written in place).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from secagg import wire
from secagg.protocol.errors import DropReason, RemoteProtocolError
from secagg.protocol.modes import ROUND_MODES, round_mode
from secagg.protocol.payload import Partial, RingPayloads, decode_partial, encode_partial

U32 = np.array([0, 1, 2**31, 2**32 - 1, 12345, 7, 99], dtype=np.uint32)


@pytest.mark.parametrize(("dtype", "values"), [
    (np.uint32, [0, 1, 2**32 - 1, 2**31]),
    (np.uint64, [0, 1, 2**64 - 1, 2**63]),
    (np.dtype(">u4"), [1, 2, 3, 2**32 - 2]),  # big-endian input is converted, not reinterpreted
    (np.dtype(">u8"), [1, 2, 3, 2**64 - 2]),
])
def test_ring_payloads_keep_dtype_and_values(dtype: Any, values: list[int]) -> None:
    vector = np.array(values, dtype=dtype)
    codec = RingPayloads(np.dtype(dtype).newbyteorder("<"), len(values))
    decoded = codec.from_bytes(codec.to_bytes(vector))
    assert decoded.dtype == np.dtype(dtype).newbyteorder("=")
    assert decoded.dtype.itemsize == np.dtype(dtype).itemsize
    assert decoded.tolist() == values


def test_ring_payload_is_raw_little_endian_bytes() -> None:
    codec = RingPayloads(np.dtype("<u4"), 2)
    assert codec.to_bytes(np.array([1, 256], dtype=np.uint32)) == \
        b"\x01\x00\x00\x00\x00\x01\x00\x00"
    assert codec.byte_length == 8


@pytest.mark.parametrize("vector", [
    np.zeros(3, dtype=np.float64), np.zeros(3, dtype=np.int32), np.zeros(3, dtype=np.uint16),
    np.zeros((3, 1), dtype=np.uint32), np.zeros(3, dtype=bool), np.zeros(4, dtype=np.uint32),
    np.zeros(3, dtype=np.uint64),
])
def test_ring_codec_refuses_non_ring_vectors(vector: np.ndarray) -> None:
    with pytest.raises(ValueError, match="ring payload"):
        RingPayloads(np.dtype("<u4"), 3).to_bytes(vector)


@pytest.mark.parametrize("length", [0, 27, 29, 56])
def test_ring_payload_length_must_match_the_round(length: int) -> None:
    codec = RingPayloads(np.dtype("<u4"), 7)
    with pytest.raises(RemoteProtocolError, match="payload") as info:
        codec.from_bytes(bytes(length))
    assert info.value.reason is DropReason.MALFORMED_MESSAGE


def test_decoded_ring_vectors_are_native_and_not_shared_with_the_frame() -> None:
    codec = RingPayloads(np.dtype("<u4"), len(U32))
    decoded = codec.from_bytes(codec.to_bytes(U32))
    assert decoded.dtype.isnative
    # Accumulating into a copy works; the decoded vector itself is never written.
    with pytest.raises(ValueError):
        decoded += 1
    total = codec.copy(decoded)
    total = codec.add(total, decoded)
    assert total.tolist() == [(2 * int(v)) % 2**32 for v in U32]


def test_partial_sums_round_trip_and_refuse_bad_contributor_sets() -> None:
    codec = RingPayloads(np.dtype("<u4"), len(U32))
    limits = wire.Limits(max_peers=10, payload_bytes=codec.byte_length)
    partial = decode_partial(codec, encode_partial(codec, Partial(U32, (1, 4))), limits)
    assert partial.contributors == (1, 4) and partial.payload.tolist() == U32.tolist()
    for members in ((), (2, 2)):
        plaintext = wire.encode_record(wire.PartialSum(payload=codec.to_bytes(U32),
                                                       contributors=list(members)))
        with pytest.raises(RemoteProtocolError, match="contributor set"):
            decode_partial(codec, plaintext, limits)


def test_every_mode_is_a_strategy_with_a_codec() -> None:
    assert set(ROUND_MODES) == {"masking", "paillier", "hybrid"}
    masking, paillier, hybrid = (round_mode(m) for m in ("masking", "paillier", "hybrid"))
    assert masking.masks and masking.shares_keys and not masking.encrypts
    assert not paillier.masks and not paillier.unmasks and paillier.encrypts
    assert hybrid.masks and hybrid.encrypts
    assert masking.checks_consistency("active") and not paillier.checks_consistency("active")
    assert not hybrid.checks_consistency("honest-but-curious")
    assert paillier.neighbourhood((0, 1, 2), 1) == (1,)
    assert isinstance(masking.codec(modulus_bits=32, dim=3, peers=4), RingPayloads)
    with pytest.raises(ValueError, match="no Paillier key"):
        masking.codec(modulus_bits=32, dim=3, peers=4, paillier_key=b"\x01")
    with pytest.raises(ValueError, match="unknown mode 'fourth'"):
        round_mode("fourth")
    with pytest.raises(ValueError, match="complete graph"):
        paillier.check_graph("sparse")
