"""Tests of secagg.crypto: known answers that pin the encodings, round trips, misuse."""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable
from typing import Any, TypedDict

import numpy as np
import numpy.typing as npt
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st

import secagg.crypto.shamir as shamir_module
from secagg.crypto.aead import AssociatedData, open_sealed, seal
from secagg.crypto.kdf import PROTOCOL_ID, derive_key
from secagg.crypto.keys import KeyPair, agree, generate_keypair, validate_public_key
from secagg.crypto.prg import MaskGenerator
from secagg.crypto.shamir import (
    PRIME,
    SHARE_LENGTH,
    ReconstructionError,
    Share,
    reconstruct,
    reconstruct_checked,
    reconstruct_many,
    reconstruct_many_checked,
    split,
)
from secagg.crypto.signing import SigningKey, generate_signing_key, sign, verify
from secagg.errors import CryptoError, DecryptionError, ShamirError, SignatureError

RandomBytes = Callable[[int], bytes]


def det_rng(seed: bytes) -> RandomBytes:
    """A deterministic ``random_bytes`` (SHAKE-256 of seed || counter)."""
    counter = 0

    def random_bytes(n: int) -> bytes:
        nonlocal counter
        counter += 1
        return hashlib.shake_256(seed + counter.to_bytes(8, "big")).digest(n)

    return random_bytes


def lp(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


# ---------------------------------------------------------------- X25519


def test_x25519_rfc7748_vector() -> None:
    # RFC 7748 section 6.1.
    alice = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    bob_pub = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
    shared = "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"
    assert agree(alice, bob_pub).hex() == shared
    kp = generate_keypair(lambda n: alice[:n])
    assert kp.public_bytes.hex() == (
        "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    )


def test_x25519_agreement_symmetric() -> None:
    rng = det_rng(b"x25519")
    a, b = generate_keypair(rng), generate_keypair(rng)
    assert len(a.private_bytes) == len(a.public_bytes) == 32
    assert agree(a.private_bytes, b.public_bytes) == agree(b.private_bytes, a.public_bytes)
    c = generate_keypair(rng)
    assert agree(a.private_bytes, b.public_bytes) != agree(a.private_bytes, c.public_bytes)


def test_keypair_repr_hides_private() -> None:
    kp = KeyPair(private_bytes=b"\xaa" * 32, public_bytes=b"\xbb" * 32)
    assert "private" not in repr(kp) and repr(b"\xaa" * 32) not in repr(kp)


@pytest.mark.parametrize("bad", [b"", b"\x01" * 31, b"\x01" * 33])
def test_x25519_rejects_wrong_length(bad: bytes) -> None:
    with pytest.raises(CryptoError, match="32 bytes"):
        validate_public_key(bad)
    with pytest.raises(CryptoError, match="32 bytes"):
        agree(generate_keypair().private_bytes, bad)


def test_x25519_rejects_low_order_point() -> None:
    with pytest.raises(CryptoError, match="rejected"):
        agree(generate_keypair().private_bytes, bytes(32))


# ---------------------------------------------------------------- HKDF


def test_derive_key_known_answer() -> None:
    out = derive_key(
        b"\x01" * 32, purpose="channel", session=b"session-0001", round=7, context=b"ctx"
    )
    assert out.hex() == "4b398ab3cb94716e4be8adc604993c5ed11aad57971e3d16793f7a2c2c5aae72"
    plain = derive_key(b"\x01" * 32, purpose="channel", session=b"session-0001", round=7)
    assert plain.hex() == "97d298ee4ac9a414a36cdabcbe8af0f3b8d79a4753819e65885850c49cddc12d"


def test_derive_key_matches_documented_hkdf_layout() -> None:
    # info = lp(PROTOCOL_ID) || lp(purpose) || lp(session) || round (8, BE) || lp(context)
    info = lp(b"secagg/v1") + lp(b"channel") + lp(b"session-0001") + (7).to_bytes(8, "big")
    info += lp(b"ctx")
    expected = HKDF(algorithm=hashes.SHA256(), length=48, salt=None, info=info).derive(b"s" * 32)
    got = derive_key(
        b"s" * 32, purpose="channel", session=b"session-0001", round=7, length=48, context=b"ctx"
    )
    assert PROTOCOL_ID == b"secagg/v1"
    assert got == expected


def test_derive_key_domain_separation() -> None:
    base: dict[str, Any] = {"purpose": "pair-mask", "session": b"ab", "round": 1, "context": b"c"}
    ref = derive_key(b"k" * 32, **base)
    variants: list[dict[str, Any]] = [
        {"purpose": "self-mask"},
        {"session": b"abc"},
        {"round": 2},
        {"context": b""},
        # Shifting bytes between adjacent fields must not collide (length prefixes).
        {"session": b"a", "context": b"bc"},
    ]
    for change in variants:
        assert derive_key(b"k" * 32, **{**base, **change}) != ref
    assert derive_key(b"j" * 32, **base) != ref


# ---------------------------------------------------------------- AEAD

AD = AssociatedData(session=b"sess", round=2, purpose="share", sender=3, receiver=258)
KEY = b"\x02" * 32


def test_associated_data_known_answer() -> None:
    expected = (
        lp(b"secagg/v1/ad")
        + lp(b"sess")
        + (2).to_bytes(8, "big")
        + lp(b"share")
        + (3).to_bytes(8, "big")
        + (258).to_bytes(8, "big")
    )
    assert AD.encode() == expected
    assert AD.encode().hex() == (
        "0000000c7365636167672f76312f61640000000473657373000000000000000200000005"
        "736861726500000000000000030000000000000102"
    )


def test_seal_known_answer_and_layout() -> None:
    sealed = seal(KEY, b"hello", AD, random_bytes=lambda n: bytes(n))
    assert sealed.hex() == "00000000000000000000000022af5f1d22b02d10224f260c58186c4b7b4ac1c113"
    assert len(sealed) == 12 + 5 + 16
    assert open_sealed(KEY, sealed, AD) == b"hello"


@given(plaintext=st.binary(max_size=200))
def test_aead_round_trip(plaintext: bytes) -> None:
    assert open_sealed(KEY, seal(KEY, plaintext, AD), AD) == plaintext


def test_aead_every_bit_flip_rejected() -> None:
    sealed = seal(KEY, b"share bytes", AD, random_bytes=det_rng(b"nonce"))
    for bit in range(len(sealed) * 8):
        tampered = bytearray(sealed)
        tampered[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(DecryptionError, match="failed authentication"):
            open_sealed(KEY, bytes(tampered), AD)


@pytest.mark.parametrize(
    "change",
    [
        {"receiver": 259},
        {"sender": 4},
        {"round": 3},
        {"session": b"sesS"},
        {"purpose": "shares"},
        {"sender": 258, "receiver": 3},  # reflected back to the sender
    ],
)
def test_aead_misdirection_rejected(change: dict[str, Any]) -> None:
    sealed = seal(KEY, b"secret", AD)
    with pytest.raises(DecryptionError, match="misdirected"):
        open_sealed(KEY, sealed, dataclasses.replace(AD, **change))


def test_aead_wrong_key_and_truncation_rejected() -> None:
    sealed = seal(KEY, b"secret", AD)
    with pytest.raises(DecryptionError):
        open_sealed(b"\x03" * 32, sealed, AD)
    for n in range(len(sealed)):
        with pytest.raises(DecryptionError):
            open_sealed(KEY, sealed[:n], AD)
    with pytest.raises(DecryptionError):
        open_sealed(b"short", sealed, AD)


def test_aead_bad_inputs_raise_crypto_error() -> None:
    with pytest.raises(CryptoError):
        seal(b"short", b"x", AD)
    with pytest.raises(CryptoError):
        dataclasses.replace(AD, sender=-1).encode()


# ---------------------------------------------------------------- PRG

SEED = bytes(range(32))


class Labels(TypedDict):
    session: bytes
    round: int
    purpose: str


LABELS: Labels = {"session": b"session-0001", "round": 3, "purpose": "self-mask"}

KAT_U32 = [
    0x1568ECAE, 0x65D5BF0E, 0x88939597, 0x896A16DB, 0x2164716D, 0x1C5ED2A7, 0xCDF9EF04,
    0xAC14F09E, 0x0D5D3197, 0xB4E04D99, 0x849A17C9, 0xB3012F43, 0xA5FEE7E1, 0xCF60D070,
    0x8E96584E, 0x175AE360,
]  # fmt: skip
KAT_U64 = [
    0x65D5BF0E1568ECAE, 0x896A16DB88939597, 0x1C5ED2A72164716D, 0xAC14F09ECDF9EF04,
    0xB4E04D990D5D3197, 0xB3012F43849A17C9, 0xCF60D070A5FEE7E1, 0x175AE3608E96584E,
    0x3017AE8E02184823, 0x94107CE1C3D3E30E, 0xD52BB6BA86143CB4, 0x78658DE5EEBED389,
    0xEDC43F230F4B02C8, 0xFF8353A64CD27079, 0xF9E648D5F8D498EA, 0x9EBA80DAD056EAB7,
]  # fmt: skip


def reference_keystream(seed: bytes, nbytes: int, labels: Labels) -> bytes:
    """AES-256-CTR, zero IV, over zero bytes, computed directly with cryptography."""
    key = derive_key(seed, **labels)
    return Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(nbytes))


@pytest.mark.parametrize(("dtype", "kat"), [(np.uint32, KAT_U32), (np.uint64, KAT_U64)])
def test_prg_known_answer(dtype: type, kat: list[int]) -> None:
    mask = MaskGenerator(16, dtype).mask(SEED, **LABELS)
    assert mask.dtype == np.dtype(dtype) and mask.shape == (16,)
    assert [int(v) for v in mask] == kat
    # Not circular: the words are the raw AES-CTR keystream read little-endian.
    le = np.dtype(dtype).newbyteorder("<")
    stream = reference_keystream(SEED, 16 * le.itemsize, LABELS)
    assert mask.astype(le).tobytes() == stream
    assert [int(v) for v in np.frombuffer(stream, dtype=le)] == kat


@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
@pytest.mark.parametrize("length", [0, 1, 2, 3, 5, 17, 1001])
def test_prg_lengths_match_reference(dtype: type, length: int) -> None:
    gen = MaskGenerator(length, dtype)
    mask = gen.mask(SEED, **LABELS)
    le = np.dtype(dtype).newbyteorder("<")
    assert mask.shape == (length,) and mask.dtype == np.dtype(dtype)
    assert mask.flags.c_contiguous
    assert mask.astype(le).tobytes() == reference_keystream(SEED, length * le.itemsize, LABELS)
    # A prefix of a longer mask: the stream does not depend on the length.
    longer = MaskGenerator(length + 7, dtype).mask(SEED, **LABELS)
    assert np.array_equal(longer[:length], mask)


@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
def test_prg_deterministic_and_fresh_arrays(dtype: type) -> None:
    gen = MaskGenerator(64, dtype)
    a = gen.mask(SEED, **LABELS)
    b = gen.mask(SEED, **LABELS)
    assert np.array_equal(a, b)
    a[0] ^= 1  # masks are independent arrays, not views of shared scratch
    assert not np.array_equal(a, b)
    assert np.array_equal(MaskGenerator(64, dtype).mask(SEED, **LABELS), b)


def test_prg_distinct_labels_give_distinct_masks() -> None:
    gen = MaskGenerator(32, np.uint32)
    variants: list[tuple[bytes, Labels]] = [
        (SEED, LABELS),
        (bytes(32), LABELS),
        (SEED, {**LABELS, "purpose": "pair-mask"}),
        (SEED, {**LABELS, "session": b"session-0002"}),
        (SEED, {**LABELS, "round": 4}),
    ]
    masks = [gen.mask(seed, **labels).tobytes() for seed, labels in variants]
    assert len(set(masks)) == len(masks)


@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
@pytest.mark.parametrize("length", [0, 1, 7, 33])
def test_prg_add_into_matches_python_ints(dtype: type, length: int) -> None:
    bits = np.dtype(dtype).itemsize * 8
    gen = MaskGenerator(length, dtype)
    rng = np.random.default_rng(1)
    acc: npt.NDArray[np.unsignedinteger] = rng.integers(
        0, 2**bits, size=length, dtype=np.uint64, endpoint=False
    ).astype(dtype)
    start = [int(v) for v in acc]
    mask = [int(v) for v in gen.mask(SEED, **LABELS)]

    gen.add_into(acc, SEED, **LABELS)
    assert [int(v) for v in acc] == [(a + m) % 2**bits for a, m in zip(start, mask, strict=True)]
    gen.add_into(acc, SEED, **LABELS, sign=-1)
    assert [int(v) for v in acc] == start
    gen.add_into(acc, SEED, **LABELS, sign=-1)
    assert [int(v) for v in acc] == [(a - m) % 2**bits for a, m in zip(start, mask, strict=True)]


def test_prg_add_into_many_neighbours_cancel() -> None:
    gen = MaskGenerator(1000, np.uint32)
    acc = np.arange(1000, dtype=np.uint32)
    seeds = [bytes([i]) * 32 for i in range(10)]
    for s in seeds:
        gen.add_into(acc, s, **LABELS)
    for s in reversed(seeds):
        gen.add_into(acc, s, **LABELS, sign=-1)
    assert np.array_equal(acc, np.arange(1000, dtype=np.uint32))


def test_prg_rejects_misuse() -> None:
    for bad in (np.int32, np.uint16, np.float64):
        with pytest.raises(ValueError, match="uint32 or uint64"):
            MaskGenerator(4, bad)
    gen = MaskGenerator(4, np.uint32)
    for acc in (np.zeros(5, np.uint32), np.zeros(4, np.uint64), np.zeros(8, np.uint32)[::2]):
        with pytest.raises(ValueError):
            gen.add_into(acc, SEED, **LABELS)
    with pytest.raises(ValueError, match="sign"):
        gen.add_into(np.zeros(4, np.uint32), SEED, **LABELS, sign=2)


# ---------------------------------------------------------------- Shamir


def is_probable_prime(n: int) -> bool:
    """Miller-Rabin with the first 40 primes as fixed bases (deterministic, error < 4^-40).

    A witness found here is a proof of compositeness.
    """
    bases = [p for p in range(2, 200) if all(p % q for q in range(2, p))][:40]
    if n < 2:
        return False
    for p in bases:
        if n % p == 0:
            return n == p
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for a in bases:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def test_prime_is_smallest_prime_above_2_256() -> None:
    assert is_probable_prime(7919) and not is_probable_prime(7917)
    assert not is_probable_prime(3215031751)  # strong pseudoprime to bases 2, 3, 5, 7
    assert PRIME == 2**256 + 297
    assert is_probable_prime(PRIME)
    assert not any(is_probable_prime(n) for n in range(2**256 + 1, PRIME))
    assert (PRIME - 1).bit_length() <= SHARE_LENGTH * 8


def test_shamir_known_answers() -> None:
    # f(x) = 42 + 5x: hand-computed shares.
    secret = (42).to_bytes(32, "big")
    assert reconstruct([Share(1, 47), Share(2, 52)], threshold=2) == secret
    assert reconstruct([Share(7, 77), Share(3, 57)], threshold=2) == secret
    # f(x) = 2^256 - 1 + (PRIME - 1) x wraps around the field.
    top = 2**256 - 1
    shares = [Share(x, (top - x) % PRIME) for x in (1, 2, 3)]
    assert reconstruct(shares, threshold=2) == top.to_bytes(32, "big")
    assert reconstruct_checked(shares, threshold=2) == top.to_bytes(32, "big")
    # split with a deterministic RNG: pins coefficient sampling and share encoding.
    shares = split(
        bytes(range(32)), threshold=3, indices=[1, 2, 3, 4], random_bytes=det_rng(b"kat")
    )
    assert [(s.index, s.to_bytes().hex()) for s in shares] == [
        (1, "00e64a33fbee5ed58201e7a55e388ad7128384c541b638835ed3287e0445821aac"),
        (2, "004f9a494f9b302f611a274e1b576c0b51615a4e3bdeab1c660ad82d1b6a13d935"),
        (3, "003bf141fe0a7913a450c8044268b0aacba991ad018d6ce12cbf28276089d25c0c"),
        (4, "00ab4f1e073c39824ba5c9c7d36c58b5815c2ae192c27dd1b2f0186cd3a4bda331"),
    ]


def test_shamir_value_out_of_secret_range_rejected() -> None:
    # f(x) = 2^256 + 5 + x: a consistent sharing of a value that is not a 32-byte secret.
    shares = [Share(x, 2**256 + 5 + x) for x in (1, 2)]
    with pytest.raises(ShamirError, match="not a valid secret"):
        reconstruct(shares, threshold=2)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), secret=st.binary(min_size=32, max_size=32), seed=st.binary(max_size=8))
def test_shamir_any_threshold_subset_reconstructs(
    data: st.DataObject, secret: bytes, seed: bytes
) -> None:
    n = data.draw(st.integers(1, 40), label="n")
    t = data.draw(st.integers(1, n), label="t")
    indices = data.draw(
        st.lists(st.integers(1, 10_000), min_size=n, max_size=n, unique=True), label="indices"
    )
    shares = split(secret, threshold=t, indices=indices, random_bytes=det_rng(seed))
    assert [s.index for s in shares] == indices
    assert all(0 <= s.value < PRIME for s in shares)
    subset = data.draw(st.permutations(shares), label="order")[:t]
    assert reconstruct(subset, threshold=t) == secret
    assert reconstruct_checked(shares, threshold=t) == secret
    if t > 1:
        with pytest.raises(ShamirError, match="at least"):
            reconstruct(subset[: t - 1], threshold=t)


def test_shamir_fewer_than_threshold_shares_reveal_nothing_usable() -> None:
    secret = b"\x11" * 32
    shares = split(secret, threshold=3, indices=range(1, 6), random_bytes=det_rng(b"t-1"))
    with pytest.raises(ShamirError):
        reconstruct(shares[:2], threshold=3)
    # Lying about the threshold interpolates the wrong polynomial: a wrong secret, and
    # only redundancy (reconstruct_checked) notices.
    assert reconstruct(shares[:2], threshold=2) != secret
    with pytest.raises(ShamirError, match="inconsistent"):
        reconstruct_checked(shares[:3], threshold=2)


def test_shamir_duplicate_indices_rejected() -> None:
    shares = split(b"\x22" * 32, threshold=2, indices=[1, 2, 3])
    with pytest.raises(ShamirError, match="duplicate"):
        reconstruct([shares[0], shares[0], shares[1]], threshold=2)
    with pytest.raises(ShamirError, match="duplicate"):
        reconstruct_checked([shares[0], shares[1], shares[1]], threshold=2)
    with pytest.raises(ShamirError, match="duplicate"):
        split(b"\x22" * 32, threshold=2, indices=[1, 2, 1])


@pytest.mark.parametrize(
    ("secret", "threshold", "indices"),
    [
        (b"\x00" * 31, 1, [1]),
        (b"\x00" * 33, 1, [1]),
        (b"\x00" * 32, 0, [1, 2]),
        (b"\x00" * 32, 3, [1, 2]),
        (b"\x00" * 32, 1, [0, 1]),
        (b"\x00" * 32, 1, [1, PRIME]),
    ],
)
def test_split_rejects_bad_arguments(secret: bytes, threshold: int, indices: list[int]) -> None:
    with pytest.raises(ShamirError):
        split(secret, threshold=threshold, indices=indices)


@given(index=st.integers(1, 2**32), value=st.integers(0, PRIME - 1))
def test_share_bytes_round_trip(index: int, value: int) -> None:
    share = Share(index, value)
    data = share.to_bytes()
    assert len(data) == SHARE_LENGTH == 33
    assert Share.from_bytes(index, data) == share


def test_share_from_bytes_validates() -> None:
    with pytest.raises(ShamirError, match="33 bytes"):
        Share.from_bytes(1, b"\x00" * 32)
    with pytest.raises(ShamirError, match="33 bytes"):
        Share.from_bytes(1, b"\x00" * 34)
    with pytest.raises(ShamirError, match="outside"):
        Share.from_bytes(1, PRIME.to_bytes(33, "big"))
    with pytest.raises(ShamirError, match="index"):
        Share.from_bytes(0, b"\x00" * 33)


@given(index=st.integers(1, 2**32), values=st.lists(st.integers(0, PRIME - 1), max_size=8))
def test_share_from_packed_equals_from_bytes(index: int, values: list[int]) -> None:
    packed = b"".join(Share(index, v).to_bytes() for v in values)
    shares = Share.from_packed(index, packed)
    assert shares == [Share.from_bytes(index, packed[i:i + SHARE_LENGTH])
                      for i in range(0, len(packed), SHARE_LENGTH)]
    assert [hash(s) for s in shares] == [hash(Share(index, v)) for v in values]


def test_share_from_packed_validates() -> None:
    good = Share(1, 5).to_bytes()
    assert Share.from_packed(1, b"") == []
    with pytest.raises(ShamirError, match="multiple of 33"):
        Share.from_packed(1, good + b"\x00")
    with pytest.raises(ShamirError, match="outside"):
        Share.from_packed(1, good + PRIME.to_bytes(33, "big"))
    with pytest.raises(ShamirError, match="index"):
        Share.from_packed(0, good)
    with pytest.raises(ShamirError, match="index"):
        Share.from_packed(PRIME, good)


@settings(max_examples=30, deadline=None)
@given(data=st.data(), secret=st.binary(min_size=32, max_size=32))
def test_reconstruct_checked_detects_corrupted_extra_share(
    data: st.DataObject, secret: bytes
) -> None:
    n = data.draw(st.integers(2, 20), label="n")
    t = data.draw(st.integers(1, n - 1), label="t")
    shares = split(secret, threshold=t, indices=range(1, n + 1), random_bytes=det_rng(secret))
    bad = data.draw(st.integers(t, n - 1), label="bad")
    delta = data.draw(st.integers(1, PRIME - 1), label="delta")
    corrupted = list(shares)
    corrupted[bad] = Share(shares[bad].index, (shares[bad].value + delta) % PRIME)
    # reconstruct ignores extras; reconstruct_checked catches the bad one by index.
    assert reconstruct(corrupted, threshold=t) == secret
    with pytest.raises(ShamirError, match=f"index {shares[bad].index} is inconsistent"):
        reconstruct_checked(corrupted, threshold=t)


def naive_interpolate_at_zero(shares: list[Share]) -> int:
    """Textbook Lagrange at 0, one inversion per share: the reference for the fast paths."""
    total = 0
    for i, si in enumerate(shares):
        num = den = 1
        for j, sj in enumerate(shares):
            if i != j:
                num = num * -sj.index % PRIME
                den = den * (si.index - sj.index) % PRIME
        total += si.value * num * pow(den, -1, PRIME)
    return total % PRIME


def index_sets(draw: st.DrawFn, t: int) -> list[int]:
    """Share indices as the server meets them: dense subsets of 1..n (few gaps, small
    or large n), sparse subsets of 1..n, and large indices, in a random order."""
    kind = draw(st.sampled_from(["dense", "sparse", "large"]))
    if kind == "dense":
        gaps = draw(st.integers(0, max(0, t - 2)))
        pool = list(range(1, t + gaps + 1))
    elif kind == "sparse":
        pool = list(range(1, draw(st.integers(t, 4 * t + 10)) + 1))
    else:
        pool = draw(st.lists(st.integers(1, PRIME - 1), min_size=t, max_size=t, unique=True))
    return draw(st.permutations(pool))[:t]


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_reconstruct_many_equals_reconstruct(data: st.DataObject) -> None:
    t = data.draw(st.integers(1, 40), label="t")
    batch = data.draw(st.integers(0, 6), label="batch")
    # Few distinct holder sets, reused in other orders, as a server batches them.
    holder_sets = [data.draw(st.composite(index_sets)(t), label="holders")
                   for _ in range(data.draw(st.integers(1, 3), label="sets"))]
    share_lists = []
    expected = []
    for k in range(batch):
        holders = data.draw(st.permutations(holder_sets[k % len(holder_sets)]), label="order")
        values = data.draw(st.lists(st.integers(0, PRIME - 1), min_size=t, max_size=t),
                           label="values")
        shares = [Share(x, v) for x, v in zip(holders, values, strict=True)]
        share_lists.append(shares)
        value = naive_interpolate_at_zero(shares)
        expected.append(value.to_bytes(32, "big") if value < 2**256 else None)
    if None in expected:  # a value outside the secret range: both must refuse it
        bad = expected.index(None)
        with pytest.raises(ReconstructionError, match="not a valid secret") as info:
            reconstruct_many(share_lists, threshold=t)
        assert info.value.position == bad
        with pytest.raises(ShamirError, match="not a valid secret"):
            reconstruct(share_lists[bad], threshold=t)
        return
    assert reconstruct_many(share_lists, threshold=t) == expected
    assert reconstruct_many_checked(share_lists, threshold=t) == expected
    assert [reconstruct(shares, threshold=t) for shares in share_lists] == expected


@settings(max_examples=40, deadline=None)
@given(data=st.data(), seed=st.binary(max_size=8))
def test_reconstruct_many_recovers_split_secrets(data: st.DataObject, seed: bytes) -> None:
    n = data.draw(st.integers(1, 60), label="n")
    t = data.draw(st.integers(1, n), label="t")
    secrets = data.draw(st.lists(st.binary(min_size=32, max_size=32), max_size=5),
                        label="secrets")
    sharings = [split(s, threshold=t, indices=range(1, n + 1), random_bytes=det_rng(seed))
                for s in secrets]
    # Any holders, each list in its own order; extra shares only matter to the checked form.
    lists = [data.draw(st.permutations(shares), label="order")[:data.draw(
        st.integers(t, n), label="used")] for shares in sharings]
    assert reconstruct_many(lists, threshold=t) == secrets
    assert reconstruct_many_checked(lists, threshold=t) == secrets


def test_reconstruct_many_large_threshold_dense_and_scattered_holders() -> None:
    # t = 251 of n = 500 (the server of a 500-peer round): the lowest live holders (few
    # gaps below the top index) and a scattered set take different weight computations.
    n, t = 500, 251
    secret = bytes(range(32))
    shares = split(secret, threshold=t, indices=range(1, n + 1), random_bytes=det_rng(b"big"))
    gone = set(range(0, n, 7))
    live = [s for s in shares if s.index - 1 not in gone]
    scattered = live[::-1]
    assert reconstruct_many([live[:t], scattered[:t], scattered[:t][::-1]],
                            threshold=t) == [secret] * 3
    assert reconstruct_many_checked([live[:t + 3]], threshold=t) == [secret]


def test_reconstruct_many_errors_name_the_position() -> None:
    good = split(b"\x33" * 32, threshold=3, indices=range(1, 6), random_bytes=det_rng(b"e"))
    assert reconstruct_many([], threshold=3) == []
    assert reconstruct_many_checked([], threshold=3) == []
    with pytest.raises(ShamirError, match="threshold must be >= 1"):
        reconstruct_many([good], threshold=0)
    with pytest.raises(ReconstructionError, match="secret 1: need at least 3") as info:
        reconstruct_many([good, good[:2]], threshold=3)
    assert info.value.position == 1
    with pytest.raises(ReconstructionError, match="secret 2: duplicate share index") as info:
        reconstruct_many_checked([good, good, [*good[:3], good[0]]], threshold=3)
    assert info.value.position == 2
    corrupted = [*good[:4], Share(5, (good[4].value + 1) % PRIME)]
    # Unchecked, the extra share is ignored; checked, it is caught and named.
    assert reconstruct_many([good, corrupted], threshold=3) == [b"\x33" * 32] * 2
    with pytest.raises(ReconstructionError, match="secret 1: share at index 5 is inconsistent"):
        reconstruct_many_checked([good, corrupted], threshold=3)
    # A consistent sharing of a value that is not a 32-byte secret.
    out_of_range = [Share(x, 2**256 + 5 + x) for x in (1, 2)]
    with pytest.raises(ReconstructionError, match=r"secret 0: .*not a valid secret"):
        reconstruct_many([out_of_range], threshold=2)
    # The single-list functions keep their messages, without a batch position.
    with pytest.raises(ShamirError, match=r"^need at least 3"):
        reconstruct(good[:2], threshold=3)


@settings(max_examples=30, deadline=None)
@given(points=st.lists(st.integers(1, 2**20 - 1), min_size=1, max_size=12, unique=True),
       others=st.lists(st.integers(1, 2**20 - 1), max_size=30), block=st.integers(1, 40))
def test_difference_products_numpy_blocks_are_exact(
    points: list[int], others: list[int], block: int
) -> None:
    # The int64 grouping must never overflow, however the rows are split into blocks.
    expected = [math.prod(o - p for o in others if o != p) for p in points]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(shamir_module, "_NUMPY_BLOCK", block)
        assert shamir_module._difference_products(points, others) == expected


def test_weight_cache_stays_bounded() -> None:
    size = shamir_module._BASIS_CACHE_SIZE
    secret = b"\x44" * 32
    shares = split(secret, threshold=2, indices=range(1, size + 40), random_bytes=det_rng(b"c"))
    lists = [[shares[0], shares[k]] for k in range(1, len(shares))]  # all distinct sets
    assert reconstruct_many(lists, threshold=2) == [secret] * len(lists)
    assert len(shamir_module._BASES) <= size
    assert reconstruct_many(lists[::-1], threshold=2) == [secret] * len(lists)


# ---------------------------------------------------------------- Ed25519


def test_ed25519_rfc8032_vector() -> None:
    # RFC 8032 section 7.1, TEST 1 (empty message).
    seed = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
    key = generate_signing_key(lambda n: seed[:n])
    assert key.public_bytes.hex() == (
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
    )
    signature = sign(key, b"")
    assert signature.hex() == (
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555"
        "fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
    )
    verify(key.public_bytes, b"", signature)


def test_ed25519_sign_verify_and_rejections() -> None:
    rng = det_rng(b"ed25519")
    key, other = generate_signing_key(rng), generate_signing_key(rng)
    message = b"round 3 survivors: 1,2,5"
    signature = sign(key, message)
    verify(key.public_bytes, message, signature)
    with pytest.raises(SignatureError, match="verification failed"):
        verify(key.public_bytes, message + b"!", signature)
    with pytest.raises(SignatureError, match="verification failed"):
        verify(other.public_bytes, message, signature)
    forged = bytearray(signature)
    forged[10] ^= 0x40
    with pytest.raises(SignatureError, match="verification failed"):
        verify(key.public_bytes, message, bytes(forged))
    with pytest.raises(SignatureError, match="public key"):
        verify(key.public_bytes[:31], message, signature)
    with pytest.raises(SignatureError, match="signature"):
        verify(key.public_bytes, message, signature[:63])


def test_signing_key_repr_hides_private() -> None:
    key = SigningKey(private_bytes=b"\xaa" * 32, public_bytes=b"\xbb" * 32)
    assert "private" not in repr(key) and repr(b"\xaa" * 32) not in repr(key)
