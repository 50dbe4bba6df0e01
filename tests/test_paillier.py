"""Tests for secagg.paillier: slot packing, fast short-exponent encryption over phe, wire format."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import phe
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secagg import paillier
from secagg.errors import CryptoError, EncodingError
from secagg.paillier import (
    DEFAULT_KEY_BITS,
    EXPONENT_BITS,
    HAVE_GMPY2,
    KEY_BITS,
    FastEncryptor,
    PaillierKeyPair,
    SlotLayout,
    add_ciphertexts,
    ciphertexts_from_bytes,
    ciphertexts_to_bytes,
    decrypt_vector,
    generate_keypair,
    load_public_key,
    pack,
    pack_signed,
    public_key_bytes,
    unpack,
    unpack_ring,
    unpack_signed,
)

VALUE_BITS = (8, 16, 32, 64)
needs_gmpy2 = pytest.mark.skipif(not HAVE_GMPY2, reason="gmpy2 not installed")


@pytest.fixture(scope="module")
def keypair() -> PaillierKeyPair:
    return generate_keypair()


@pytest.fixture(scope="module")
def encryptor(keypair: PaillierKeyPair) -> FastEncryptor:
    return FastEncryptor(keypair.public)


def seeded_bytes(seed: int) -> Callable[[int], bytes]:
    """A deterministic byte stream (numpy Generator, not the legacy RNG)."""
    return np.random.default_rng(seed).bytes


def unsigned_dtype(bits: int) -> np.dtype[np.unsignedinteger]:
    return np.dtype(f"uint{bits}")


def extremes_unsigned(bits: int) -> list[int]:
    return [0, 1, (1 << bits) - 1, (1 << bits) - 2, 1 << (bits - 1)]


def extremes_signed(bits: int) -> list[int]:
    half = 1 << (bits - 1)
    return [-half, half - 1, 0, -1, 1, -half + 1]


@st.composite
def layouts(draw: st.DrawFn, max_summands: int = 10**6) -> SlotLayout:
    return SlotLayout(
        value_bits=draw(st.sampled_from(VALUE_BITS)),
        max_summands=draw(st.integers(1, max_summands)),
        key_bits=draw(st.sampled_from(KEY_BITS)),
        min_guard_bits=draw(st.integers(0, 12)),
    )


# ----------------------------------------------------------------------------- layout


def test_layout_derived_fields() -> None:
    layout = SlotLayout(value_bits=32, max_summands=100, key_bits=2048)
    assert (layout.carry_bits, layout.slot_bits, layout.guard_bits) == (7, 40, 1)
    assert layout.slots == 2047 // 40 == 51
    assert layout.ciphertext_bytes == 512
    assert layout.ciphertext_count(0) == 0
    assert layout.ciphertext_count(51) == 1
    assert layout.ciphertext_count(52) == 2
    # 129 summands need 8 carry bits: 32 + 8 + 1 = 41, rounded up to 48 (7 guard bits).
    wide = SlotLayout(value_bits=32, max_summands=129, key_bits=3072)
    assert (wide.carry_bits, wide.slot_bits, wide.guard_bits, wide.slots) == (8, 48, 8, 63)
    assert wide.ciphertext_bytes == 768
    assert SlotLayout(value_bits=8, max_summands=1, key_bits=2048, min_guard_bits=0).slot_bits == 8


@given(layouts())
@settings(max_examples=200)
def test_layout_invariants(layout: SlotLayout) -> None:
    assert layout.slot_bits % 8 == 0
    assert layout.guard_bits >= layout.min_guard_bits
    assert layout.slot_bits == layout.value_bits + layout.carry_bits + layout.guard_bits
    assert 2 ** layout.carry_bits >= layout.max_summands
    # The largest permitted sum fits its slot, and all slots fit below 2^(key_bits-1) < n.
    assert layout.max_summands * (2**layout.value_bits - 1) < 2 ** layout.slot_bits
    assert layout.slots * layout.slot_bits <= layout.key_bits - 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"value_bits": 12, "max_summands": 4, "key_bits": 2048},
        {"value_bits": 0, "max_summands": 4, "key_bits": 2048},
        {"value_bits": 72, "max_summands": 4, "key_bits": 2048},
        {"value_bits": 32, "max_summands": 0, "key_bits": 2048},
        {"value_bits": 32, "max_summands": 4, "key_bits": 2048, "min_guard_bits": -1},
        {"value_bits": 32, "max_summands": 4, "key_bits": 2047},
        {"value_bits": 32.0, "max_summands": 4, "key_bits": 2048},
        # Slot (64 + 10 + 1 -> 80 bits) wider than the 63 usable bits of a 64-bit plaintext.
        {"value_bits": 64, "max_summands": 1000, "key_bits": 64},
        # A sum of 2^2000 summands cannot fit any slot of a 2048-bit plaintext.
        {"value_bits": 64, "max_summands": 2**2000, "key_bits": 2048},
    ],
)
def test_layout_rejects_invalid_parameters(kwargs: dict[str, object]) -> None:
    with pytest.raises(EncodingError):
        SlotLayout(**kwargs)  # type: ignore[arg-type]


def test_check_summands_refuses_more_than_declared() -> None:
    layout = SlotLayout(value_bits=32, max_summands=100, key_bits=2048)
    layout.check_summands(0)
    layout.check_summands(100)
    with pytest.raises(EncodingError, match="max_summands=100"):
        layout.check_summands(101)
    with pytest.raises(EncodingError):
        layout.check_summands(-1)
    plaintexts = pack_signed(np.zeros(3, dtype=np.int64), layout)
    with pytest.raises(EncodingError, match="max_summands=100"):
        unpack_signed(plaintexts, layout, 3, summands=101)


# ----------------------------------------------------------------------- pack/unpack


@given(layouts(), st.data())
@settings(max_examples=150)
def test_pack_unpack_round_trip(layout: SlotLayout, data: st.DataObject) -> None:
    bits = layout.value_bits
    drawn = data.draw(st.lists(st.integers(0, 2**bits - 1), max_size=400))
    values = np.array(extremes_unsigned(bits) + drawn, dtype=np.uint64)
    plaintexts = pack(values, layout)
    assert len(plaintexts) == layout.ciphertext_count(len(values))
    assert all(0 <= p < 2 ** (layout.key_bits - 1) for p in plaintexts)
    exact = unpack(plaintexts, layout, len(values))
    assert [int(x) for x in exact] == [int(x) for x in values]
    assert exact.dtype == (np.uint64 if layout.slot_bits <= 64 else object)
    ring = unpack_ring(plaintexts, layout, len(values), unsigned_dtype(bits))
    assert ring.dtype == unsigned_dtype(bits)
    np.testing.assert_array_equal(ring, values.astype(unsigned_dtype(bits)))


@given(layouts(), st.data())
@settings(max_examples=150)
def test_pack_signed_round_trip(layout: SlotLayout, data: st.DataObject) -> None:
    bits = layout.value_bits
    half = 1 << (bits - 1)
    drawn = data.draw(st.lists(st.integers(-half, half - 1), max_size=400))
    values = np.array(extremes_signed(bits) + drawn, dtype=np.int64)
    plaintexts = pack_signed(values, layout)
    assert all(0 <= p < 2 ** (layout.key_bits - 1) for p in plaintexts)
    decoded = unpack_signed(plaintexts, layout, len(values), summands=1)
    assert decoded.dtype == np.int64
    np.testing.assert_array_equal(decoded, values)


@pytest.mark.parametrize("bits", VALUE_BITS)
def test_pack_large_dimension(bits: int) -> None:
    layout = SlotLayout(value_bits=bits, max_summands=100, key_bits=2048)
    rng = np.random.default_rng(bits)
    values = rng.integers(0, 2**bits, size=50_000, dtype=np.uint64)
    plaintexts = pack(values, layout)
    np.testing.assert_array_equal(unpack(plaintexts, layout, 50_000), values)
    signed = rng.integers(-(2 ** (bits - 1)), 2 ** (bits - 1), size=50_000, dtype=np.int64)
    np.testing.assert_array_equal(
        unpack_signed(pack_signed(signed, layout), layout, 50_000, summands=1), signed
    )


@given(layouts(max_summands=40), st.data())
@settings(max_examples=150)
def test_packed_plaintext_sums_are_exact(layout: SlotLayout, data: st.DataObject) -> None:
    """Adding packed plaintexts (what decryption of a ciphertext product yields) adds slot-wise."""
    bits = layout.value_bits
    half = 1 << (bits - 1)
    m = data.draw(st.integers(1, layout.max_summands))
    dim = data.draw(st.integers(0, 150))
    rows = data.draw(st.lists(st.lists(st.integers(-half, half - 1), min_size=dim,
                                       max_size=dim), min_size=m, max_size=m))
    signed = [np.array(row, dtype=np.int64) for row in rows]
    packed = [pack_signed(v, layout) for v in signed]
    sums = [sum(column) for column in zip(*packed, strict=True)]
    expected = [sum(int(v[i]) for v in signed) for i in range(dim)]
    assert [int(x) for x in unpack_signed(sums, layout, dim, summands=m)] == expected
    unsigned = [v.astype(np.uint64) & np.uint64(2**bits - 1) for v in signed]
    packed_u = [pack(v, layout) for v in unsigned]
    sums_u = [sum(column) for column in zip(*packed_u, strict=True)]
    exact = [sum(int(v[i]) for v in unsigned) for i in range(dim)]
    assert [int(x) for x in unpack(sums_u, layout, dim)] == exact
    ring = unpack_ring(sums_u, layout, dim, unsigned_dtype(bits))
    assert [int(x) for x in ring] == [x % 2**bits for x in exact]


@pytest.mark.parametrize("bits", VALUE_BITS)
@pytest.mark.parametrize("max_summands", [1, 2, 3, 100, 128, 129, 1000])
def test_max_summands_of_maximal_values_never_carry(bits: int, max_summands: int) -> None:
    layout = SlotLayout(value_bits=bits, max_summands=max_summands, key_bits=2048,
                        min_guard_bits=0)
    top = 2**bits - 1
    dim = 2 * layout.slots + 3  # several plaintexts, and a partial last one
    packed = pack(np.full(dim, top, dtype=np.uint64), layout)
    sums = [p * max_summands for p in packed]
    assert all(s < 2 ** (layout.key_bits - 1) for s in sums)
    assert [int(x) for x in unpack(sums, layout, dim)] == [max_summands * top] * dim
    signed_top = np.full(dim, 2 ** (bits - 1) - 1, dtype=np.int64)
    signed_bottom = np.full(dim, -(2 ** (bits - 1)), dtype=np.int64)
    for vector in (signed_top, signed_bottom):
        total = [p * max_summands for p in pack_signed(vector, layout)]
        assert [int(x) for x in unpack_signed(total, layout, dim, max_summands)] == (
            [max_summands * int(vector[0])] * dim
        )


def test_pack_rejects_bad_input() -> None:
    layout = SlotLayout(value_bits=16, max_summands=4, key_bits=2048)
    with pytest.raises(EncodingError):
        pack(np.array([0, 2**16]), layout)
    with pytest.raises(EncodingError):
        pack(np.array([-1, 0]), layout)
    with pytest.raises(EncodingError, match="integer"):
        pack(np.array([1.0, 2.0]), layout)
    with pytest.raises(EncodingError, match="integer"):
        pack(np.array([True, False]), layout)
    with pytest.raises(EncodingError, match="one-dimensional"):
        pack(np.zeros((2, 2), dtype=np.uint16), layout)
    with pytest.raises(EncodingError):
        pack_signed(np.array([2**15]), layout)
    with pytest.raises(EncodingError):
        pack_signed(np.array([-(2**15) - 1]), layout)
    assert pack(np.array([], dtype=np.uint16), layout) == []
    assert pack(np.array([2**16 - 1], dtype=np.int64), layout) == [2**16 - 1]


def test_unpack_rejects_bad_input() -> None:
    layout = SlotLayout(value_bits=32, max_summands=4, key_bits=2048)
    plaintexts = pack(np.arange(60, dtype=np.uint32), layout)
    with pytest.raises(EncodingError, match="plaintexts"):
        unpack(plaintexts[:1], layout, 60)
    with pytest.raises(EncodingError):
        unpack([2 ** (layout.slots * layout.slot_bits)], layout, 1)
    with pytest.raises(EncodingError):
        unpack([-1], layout, 1)
    with pytest.raises(EncodingError, match="ring dtype"):
        unpack_ring(plaintexts, layout, 60, np.uint64)
    with pytest.raises(EncodingError, match="ring dtype"):
        unpack_ring(plaintexts, layout, 60, np.int32)
    # A slot sum larger than `summands` vectors can produce: wrong summand count.
    top = pack_signed(np.full(60, 2**31 - 1, dtype=np.int64), layout)
    assert [int(x) for x in unpack_signed([p * 3 for p in top], layout, 60, summands=3)] == (
        [3 * (2**31 - 1)] * 60)
    with pytest.raises(EncodingError, match="summands"):
        unpack_signed([p * 3 for p in top], layout, 60, summands=2)


# -------------------------------------------------------------------------- encryption


def decrypt_all(private: phe.PaillierPrivateKey, ciphertexts: Sequence[int]) -> list[int]:
    return [private.raw_decrypt(int(c)) for c in ciphertexts]


@given(st.data())
@settings(max_examples=12)
def test_homomorphic_sum_is_exact(keypair: PaillierKeyPair, encryptor: FastEncryptor,
                                  data: st.DataObject) -> None:
    bits = data.draw(st.sampled_from([32, 64]))
    max_summands = data.draw(st.integers(1, 6))
    layout = SlotLayout(value_bits=bits, max_summands=max_summands, key_bits=2048)
    m = data.draw(st.integers(1, max_summands))
    dim = data.draw(st.integers(1, 70))
    seed = data.draw(st.integers(0, 2**32))
    rng = np.random.default_rng(seed)
    half = 2 ** (bits - 1)
    signed = rng.integers(-half, half, size=(m, dim), dtype=np.int64)
    signed[0, 0], signed[-1, -1] = -half, half - 1
    ring_dtype = unsigned_dtype(bits)
    ring = signed.astype(ring_dtype)  # two's complement: the ring encoding of the values

    # Ring path (what the protocol uses): encrypt_vector + add + decrypt_vector.
    total = encryptor.encrypt_vector(ring[0], layout)
    for row in ring[1:]:
        add_ciphertexts(total, encryptor.encrypt_vector(row, layout), keypair.public)
    decrypted = decrypt_vector(keypair.private, total, layout, dim, ring_dtype)
    np.testing.assert_array_equal(decrypted, ring.sum(axis=0, dtype=ring_dtype))

    # Signed path: offset encoding, exact integer sums.
    total = [encryptor.encrypt(p) for p in pack_signed(signed[0], layout)]
    for row in signed[1:]:
        add_ciphertexts(total, [encryptor.encrypt(p) for p in pack_signed(row, layout)],
                        keypair.public)
    sums = unpack_signed(decrypt_all(keypair.private, total), layout, dim, summands=m)
    assert [int(x) for x in sums] == [int(x) for x in signed.astype(object).sum(axis=0)]


def test_encrypted_sum_at_the_boundary(keypair: PaillierKeyPair,
                                       encryptor: FastEncryptor) -> None:
    layout = SlotLayout(value_bits=32, max_summands=8, key_bits=2048, min_guard_bits=0)
    dim = layout.slots + 5
    top = np.full(dim, 2**32 - 1, dtype=np.uint32)
    total = encryptor.encrypt_vector(top, layout)
    for _ in range(layout.max_summands - 1):
        add_ciphertexts(total, encryptor.encrypt_vector(top, layout), keypair.public)
    exact = unpack(decrypt_all(keypair.private, total), layout, dim)
    assert exact.dtype == np.uint64
    np.testing.assert_array_equal(exact, np.full(dim, 8 * (2**32 - 1), dtype=np.uint64))


@pytest.mark.parametrize("use_gmpy2", [False, pytest.param(True, marks=needs_gmpy2)])
def test_fast_encryption_decrypts_with_phe(keypair: PaillierKeyPair, use_gmpy2: bool) -> None:
    enc = FastEncryptor(keypair.public, random_bytes=seeded_bytes(1), use_gmpy2=use_gmpy2)
    n = keypair.public.n
    for m in (0, 1, 12345, n // 2, n - 1):
        c = enc.encrypt(m)
        assert type(c) is int
        assert 0 < c < keypair.public.nsquare
        assert keypair.private.raw_decrypt(c) == m
    # phe's own EncryptedNumber arithmetic accepts our ciphertexts.
    a = phe.EncryptedNumber(keypair.public, enc.encrypt(20))
    b = phe.EncryptedNumber(keypair.public, enc.encrypt(22))
    assert keypair.private.decrypt(a + b) == 42


@needs_gmpy2
def test_gmpy2_and_pure_python_give_identical_ciphertexts(keypair: PaillierKeyPair) -> None:
    fast = FastEncryptor(keypair.public, random_bytes=seeded_bytes(7), use_gmpy2=True)
    slow = FastEncryptor(keypair.public, random_bytes=seeded_bytes(7), use_gmpy2=False)
    layout = SlotLayout(value_bits=32, max_summands=10, key_bits=2048)
    values = np.arange(120, dtype=np.uint32) * np.uint32(2**25 + 3)
    assert fast.encrypt(99) == slow.encrypt(99)
    assert fast.encrypt_vector(values, layout) == slow.encrypt_vector(values, layout)


def test_encryption_is_deterministic_given_random_bytes(keypair: PaillierKeyPair) -> None:
    layout = SlotLayout(value_bits=32, max_summands=10, key_bits=2048)
    values = np.arange(200, dtype=np.uint32)
    first = FastEncryptor(keypair.public, random_bytes=seeded_bytes(3))
    second = FastEncryptor(keypair.public, random_bytes=seeded_bytes(3))
    assert first.encrypt_vector(values, layout) == second.encrypt_vector(values, layout)
    # encrypt_vector draws one batch; from a byte stream that equals one draw per ciphertext.
    third = FastEncryptor(keypair.public, random_bytes=seeded_bytes(3))
    fourth = FastEncryptor(keypair.public, random_bytes=seeded_bytes(3))
    assert third.encrypt_vector(values, layout) == [fourth.encrypt(p)
                                                    for p in pack(values, layout)]


def test_encryptions_are_randomised(keypair: PaillierKeyPair, encryptor: FastEncryptor) -> None:
    ciphertexts = {encryptor.encrypt(7) for _ in range(5)}
    assert len(ciphertexts) == 5
    assert {keypair.private.raw_decrypt(c) for c in ciphertexts} == {7}
    layout = SlotLayout(value_bits=32, max_summands=2, key_bits=2048)
    zeros = np.zeros(10, dtype=np.uint32)
    assert encryptor.encrypt_vector(zeros, layout) != encryptor.encrypt_vector(zeros, layout)


def test_shared_table_encryptor(keypair: PaillierKeyPair) -> None:
    base = FastEncryptor(keypair.public, random_bytes=seeded_bytes(5))
    clone = base.with_random_bytes(seeded_bytes(6))
    reference = FastEncryptor(keypair.public, random_bytes=seeded_bytes(5)).with_random_bytes(
        seeded_bytes(6))
    assert clone.encrypt(11) == reference.encrypt(11)
    assert keypair.private.raw_decrypt(clone.encrypt(11)) == 11
    assert base.encrypt(11) != clone.encrypt(11)


@pytest.mark.parametrize("exponent_bits", [129, 1024])
def test_other_exponent_lengths(keypair: PaillierKeyPair, exponent_bits: int) -> None:
    # 1024 = key_bits // 2 is DJN's own parameter; 129 exercises a partial top window.
    enc = FastEncryptor(keypair.public, exponent_bits=exponent_bits)
    assert enc.exponent_bits == exponent_bits
    assert keypair.private.raw_decrypt(enc.encrypt(31337)) == 31337


def test_encryptor_rejects_bad_parameters(keypair: PaillierKeyPair,
                                          encryptor: FastEncryptor) -> None:
    assert EXPONENT_BITS == 256
    with pytest.raises(CryptoError):
        FastEncryptor(keypair.public, exponent_bits=64)
    with pytest.raises(CryptoError):
        encryptor.encrypt(keypair.public.n)
    with pytest.raises(CryptoError):
        encryptor.encrypt(-1)
    with pytest.raises(CryptoError, match="random_bytes"):
        FastEncryptor(keypair.public, random_bytes=lambda k: bytes(k))  # never a unit
    with pytest.raises(CryptoError, match="random_bytes"):
        FastEncryptor(keypair.public, random_bytes=lambda k: b"\x01" * (k - 1))
    short = FastEncryptor(keypair.public).with_random_bytes(lambda k: b"\x01" * (k - 1))
    with pytest.raises(CryptoError, match="random_bytes"):
        short.encrypt(1)
    with pytest.raises(EncodingError, match="3072"):
        encryptor.encrypt_vector(np.zeros(3, dtype=np.uint32),
                                 SlotLayout(value_bits=32, max_summands=2, key_bits=3072))
    with pytest.raises(CryptoError):
        add_ciphertexts([1, 2], [3], keypair.public)


def test_add_ciphertexts_in_place(keypair: PaillierKeyPair, encryptor: FastEncryptor) -> None:
    total = [encryptor.encrypt(m) for m in (1, 2, 3)]
    other = [encryptor.encrypt(m) for m in (10, 20, 30)]
    before = list(other)
    assert add_ciphertexts(total, other, keypair.public) is None  # type: ignore[func-returns-value]
    assert other == before
    assert all(type(c) is int for c in total)
    assert decrypt_all(keypair.private, total) == [11, 22, 33]


# ------------------------------------------------------------------------------- wire


def test_ciphertext_bytes_round_trip(keypair: PaillierKeyPair, encryptor: FastEncryptor) -> None:
    public = keypair.public
    ciphertexts = [encryptor.encrypt(m) for m in range(4)] + [1, public.nsquare - 1]
    data = ciphertexts_to_bytes(ciphertexts, public)
    assert len(data) == len(ciphertexts) * 2 * 2048 // 8
    assert ciphertexts_from_bytes(data, public, len(ciphertexts)) == ciphertexts
    assert ciphertexts_from_bytes(b"", public, 0) == []
    width = 512
    with pytest.raises(CryptoError):
        ciphertexts_from_bytes(data[:-1], public, len(ciphertexts))
    with pytest.raises(CryptoError):
        ciphertexts_from_bytes(data, public, len(ciphertexts) - 1)
    with pytest.raises(CryptoError):
        ciphertexts_from_bytes(data + bytes(width), public, len(ciphertexts))
    with pytest.raises(CryptoError):
        ciphertexts_from_bytes(bytes(width), public, 1)  # zero
    with pytest.raises(CryptoError):
        ciphertexts_from_bytes(public.nsquare.to_bytes(width, "big"), public, 1)
    with pytest.raises(CryptoError):
        ciphertexts_from_bytes(b"\xff" * width, public, 1)
    with pytest.raises(CryptoError):
        ciphertexts_to_bytes([0], public)
    with pytest.raises(CryptoError):
        ciphertexts_to_bytes([public.nsquare], public)


def test_public_key_bytes_round_trip(keypair: PaillierKeyPair) -> None:
    data = public_key_bytes(keypair.public)
    assert len(data) == 2048 // 8
    loaded = load_public_key(data)
    assert loaded == keypair.public and loaded.g == loaded.n + 1
    assert public_key_bytes(loaded) == data


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff" * 128,  # 1024-bit: not an accepted size
        b"\xff" * 255,
        b"\xff" * 257,
        b"\x7f" + b"\xff" * 255,  # top bit clear
        b"\xff" * 255 + b"\xfe",  # even
        bytes(256),
    ],
)
def test_load_public_key_rejects_junk(data: bytes) -> None:
    with pytest.raises(CryptoError):
        load_public_key(data)


def test_generate_keypair_sizes() -> None:
    assert DEFAULT_KEY_BITS == 2048 and KEY_BITS == (2048, 3072)
    with pytest.raises(ValueError):
        generate_keypair(1024)
    big = generate_keypair(3072)
    assert big.key_bits == 3072 and big.public.n.bit_length() == 3072
    assert len(public_key_bytes(big.public)) == 384
    layout = SlotLayout(value_bits=32, max_summands=50, key_bits=3072)
    enc = FastEncryptor(big.public, random_bytes=seeded_bytes(9))
    values = np.arange(layout.slots + 1, dtype=np.uint32)
    ciphertexts = enc.encrypt_vector(values, layout)
    data = ciphertexts_to_bytes(ciphertexts, big.public)
    assert len(data) == 2 * layout.ciphertext_bytes
    back = ciphertexts_from_bytes(data, big.public, 2)
    np.testing.assert_array_equal(
        decrypt_vector(big.private, back, layout, len(values), np.uint32), values)


def test_reprs_hide_secrets(keypair: PaillierKeyPair, encryptor: FastEncryptor) -> None:
    private = keypair.private
    for text in (repr(keypair), str(keypair), repr(encryptor)):
        for secret in (private.p, private.q):
            assert str(secret) not in text
            assert hex(secret)[2:] not in text
        assert "hidden" in text or "FastEncryptor" in text
    assert paillier.HAVE_GMPY2 is HAVE_GMPY2
