"""Packed, fast Paillier encryption over ``phe`` (python-paillier).

This is not a second Paillier implementation: keys come from
:func:`phe.generate_paillier_keypair`, the key objects are phe's
:class:`~phe.PaillierPublicKey` / :class:`~phe.PaillierPrivateKey`, and decryption is
phe's ``raw_decrypt`` (CRT over ``p^2`` and ``q^2``). What this module adds is what
makes Paillier affordable for model updates (DESIGN.md section 5):

Scheme
    Public key ``n`` (``g = n + 1``, as phe uses, so ``g^m = 1 + m n mod n^2``).
    A ciphertext of ``0 <= m < n`` is::

        c = (1 + m n) * h^x  mod n^2,    h = r0^n mod n^2,   x uniform in [0, 2^l)

    ``r0`` is drawn once per :class:`FastEncryptor` from ``Z*_n``; ``h`` is then an
    ``n``-th residue and ``h^x`` plays the role of phe's ``r^n`` (a fresh full-size
    ``r`` per ciphertext, i.e. a 2048-bit exponent on a 4096-bit modulus). This is
    the speed-up of Damgård, Jurik and Nielsen ("A generalization of Paillier's
    public-key system with applications to electronic voting", IJIS 2010, section
    on efficient encryption). ``h`` is public information: only ``x`` must stay secret,
    so one precomputed ``h`` may be shared by many encryptors
    (:meth:`FastEncryptor.with_random_bytes`).

    ``h^x`` is computed with a fixed-base table: with byte windows,
    ``h^x = prod_j T[j][x_j]`` where ``x_j`` is byte ``j`` of ``x`` and
    ``T[j][v] = h^(v 2^(8j))``, so an ``l``-bit exponent costs ``l/8`` modular
    multiplications and no squarings (32 for ``l = 256``). Decryption is unchanged:
    ``h^x`` is an ``n``-th residue, which the CRT decryption removes like ``r^n``.

    Adding ciphertexts multiplies them mod ``n^2`` (:func:`add_ciphertexts`); the sum
    is not re-randomised, since every summand already carries its own ``h^x``.

Exponent length (``EXPONENT_BITS = 256``)
    DJN draw the exponent with ``ceil(k/2)`` bits for a ``k``-bit modulus
    (``exponent_bits=key_bits // 2`` reproduces that). We use 256 bits = 2 x 128:
    the best known attacks on a short exponent, Pollard's lambda (kangaroo) method
    and baby-step giant-step (van Oorschot & Wiener, "On Diffie-Hellman key agreement
    with short exponents", EUROCRYPT 1996), cost about ``2^(l/2)`` group operations,
    so ``l = 256`` gives 128-bit security against them. That short exponents are
    indistinguishable from full-length ones is the short-exponent assumption studied
    by Koshiba & Kurosawa ("Short exponent Diffie-Hellman problems", PKC 2004), on
    which the scheme's semantic security then rests together with Paillier's DCR
    assumption. 128 bits is more than the modulus offers: a 2048-bit ``n`` gives
    about 112-bit security and a 3072-bit ``n`` about 128 (NIST SP 800-57 Part 1,
    Table 2), so the exponent is never the weakest link.

Slot layout (packing, as in BatchCrypt)
    Many ``value_bits``-bit unsigned values share one plaintext. Slot ``i`` occupies
    bits ``[i * slot_bits, (i + 1) * slot_bits)``::

        | guard bits | ceil(log2 max_summands) carry bits | value_bits |   (one slot)

    ``slot_bits = value_bits + ceil(log2 max_summands) + guard``, rounded up to a
    multiple of 8 (the rounding only adds guard bits) so that pack and unpack are
    numpy byte views plus one ``int.from_bytes`` / ``int.to_bytes`` per plaintext.
    A sum of at most ``max_summands`` values below ``2^value_bits`` is below
    ``2^(value_bits + ceil(log2 max_summands))``, so slots never carry into each
    other. ``slots = (key_bits - 1) // slot_bits``, so every packed plaintext and
    every permitted sum is below ``2^(key_bits - 1) <= n`` and never wraps mod ``n``.
    Signed values use the offset encoding ``v + 2^(value_bits - 1)``; a sum of ``k``
    vectors is un-offset by ``k 2^(value_bits - 1)`` (:func:`unpack_signed`).
    :func:`unpack_ring` reduces each slot sum mod ``2^value_bits``, which is what the
    masked protocol uses.

Wire format
    A ciphertext array is the concatenation of fixed-width big-endian integers of
    ``2 * key_bits / 8`` bytes each (:func:`ciphertexts_to_bytes`); a public key is
    ``n`` in ``key_bits / 8`` big-endian bytes.

Randomness
    Encryption draws only from the injected ``random_bytes`` (default
    :func:`os.urandom`), so a simulator can make it deterministic. gmpy2 is used for
    the big-integer arithmetic when installed; the pure-Python path computes the
    very same numbers.
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import phe

from secagg.errors import CryptoError, EncodingError

__all__ = [
    "DEFAULT_KEY_BITS",
    "EXPONENT_BITS",
    "HAVE_GMPY2",
    "KEY_BITS",
    "FastEncryptor",
    "PaillierKeyPair",
    "SlotLayout",
    "add_ciphertexts",
    "ciphertexts_from_bytes",
    "ciphertexts_to_bytes",
    "decrypt_vector",
    "generate_keypair",
    "load_public_key",
    "pack",
    "pack_signed",
    "public_key_bytes",
    "unpack",
    "unpack_ring",
    "unpack_signed",
]

KEY_BITS: tuple[int, ...] = (2048, 3072)
DEFAULT_KEY_BITS = 2048
EXPONENT_BITS = 256
# Below this the 2^(l/2) kangaroo attack on the exponent is under 2^64 work.
MIN_EXPONENT_BITS = 128
# Byte windows: the random bytes are the table indices, no bit slicing per ciphertext.
# 8 bits is also the memory sweet spot (2^w entries per window: 4 MiB at 2048 bits).
_WINDOW_BITS = 8
# Extra random bytes when reducing mod n, so the bias of r0 is below 2^-128.
_REDUCTION_SLACK_BYTES = 16
# A random draw misses Z*_n \ {0, 1} with probability ~2^-1023; retrying forever would hang
# on a broken random_bytes (e.g. a constant stream), so give up after a few.
_R0_ATTEMPTS = 8

_gmpy2: Any
try:
    _gmpy2 = importlib.import_module("gmpy2")
except ImportError:  # pragma: no cover - gmpy2 is an optional extra
    _gmpy2 = None
HAVE_GMPY2: bool = _gmpy2 is not None


# ---------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class PaillierKeyPair:
    """A phe key pair. ``repr`` shows only the key size and the public key's hash."""

    public: phe.PaillierPublicKey
    private: phe.PaillierPrivateKey = field(repr=False)

    @property
    def key_bits(self) -> int:
        return int(self.public.n.bit_length())

    def __repr__(self) -> str:
        return (f"PaillierKeyPair(key_bits={self.key_bits}, public={self.public!r}, "
                "private=<hidden>)")


def generate_keypair(key_bits: int = DEFAULT_KEY_BITS) -> PaillierKeyPair:
    """A fresh key pair from :func:`phe.generate_paillier_keypair` (n of exactly key_bits)."""
    if key_bits not in KEY_BITS:
        raise ValueError(f"Paillier key size must be one of {KEY_BITS}, got {key_bits}")
    public, private = phe.generate_paillier_keypair(n_length=key_bits)
    return PaillierKeyPair(public=public, private=private)


def _key_bits(public: phe.PaillierPublicKey) -> int:
    bits = int(public.n).bit_length()
    if bits not in KEY_BITS:
        raise CryptoError(f"Paillier modulus has {bits} bits, expected one of {KEY_BITS}")
    return bits


def public_key_bytes(public: phe.PaillierPublicKey) -> bytes:
    """``n`` as exactly ``key_bits // 8`` big-endian bytes (``g = n + 1`` is implied)."""
    return int(public.n).to_bytes(_key_bits(public) // 8, "big")


def load_public_key(data: bytes) -> phe.PaillierPublicKey:
    """Parse :func:`public_key_bytes`; CryptoError unless a plausible modulus of a known size."""
    if len(data) * 8 not in KEY_BITS:
        raise CryptoError(
            f"Paillier public key must be {[b // 8 for b in KEY_BITS]} bytes, got {len(data)}"
        )
    n = int.from_bytes(data, "big")
    # The top-bit check pins the key size; n even cannot be a product of two odd primes.
    if n.bit_length() != len(data) * 8:
        raise CryptoError("Paillier modulus does not have its top bit set")
    if n % 2 == 0:
        raise CryptoError("Paillier modulus is even")
    return phe.PaillierPublicKey(n)


# ---------------------------------------------------------------------------
# Slot layout, pack and unpack
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SlotLayout:
    """How ``value_bits``-bit values are packed so that ``max_summands`` of them can be added.

    Derived fields: ``carry_bits = ceil(log2 max_summands)``, ``slot_bits`` (a multiple
    of 8), ``guard_bits = slot_bits - value_bits - carry_bits``, ``slots`` per
    plaintext and ``ciphertext_bytes``.
    """

    value_bits: int
    max_summands: int
    key_bits: int
    min_guard_bits: int = 1
    carry_bits: int = field(init=False)
    slot_bits: int = field(init=False)
    guard_bits: int = field(init=False)
    slots: int = field(init=False)
    ciphertext_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        for name in ("value_bits", "max_summands", "key_bits", "min_guard_bits"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise EncodingError(f"SlotLayout.{name} must be an int, got {value!r}")
        if not 8 <= self.value_bits <= 64 or self.value_bits % 8:
            raise EncodingError(
                f"value_bits must be a multiple of 8 in [8, 64], got {self.value_bits}"
            )
        if self.max_summands < 1:
            raise EncodingError(f"max_summands must be >= 1, got {self.max_summands}")
        if self.min_guard_bits < 0:
            raise EncodingError(f"min_guard_bits must be >= 0, got {self.min_guard_bits}")
        if self.key_bits < 16 or self.key_bits % 8:
            raise EncodingError(f"key_bits must be a multiple of 8, got {self.key_bits}")
        carry = (self.max_summands - 1).bit_length()  # ceil(log2 max_summands)
        slot_bits = -(-(self.value_bits + carry + self.min_guard_bits) // 8) * 8
        slots = (self.key_bits - 1) // slot_bits
        if slots < 1:
            raise EncodingError(
                f"a slot of {slot_bits} bits (value_bits={self.value_bits}, "
                f"max_summands={self.max_summands}, min_guard_bits={self.min_guard_bits}) "
                f"does not fit in a {self.key_bits}-bit plaintext"
            )
        object.__setattr__(self, "carry_bits", carry)
        object.__setattr__(self, "slot_bits", slot_bits)
        object.__setattr__(self, "guard_bits", slot_bits - self.value_bits - carry)
        object.__setattr__(self, "slots", slots)
        object.__setattr__(self, "ciphertext_bytes", 2 * self.key_bits // 8)

    @property
    def slot_bytes(self) -> int:
        return self.slot_bits // 8

    @property
    def value_bytes(self) -> int:
        return self.value_bits // 8

    def ciphertext_count(self, dim: int) -> int:
        """Plaintexts (hence ciphertexts) needed for ``dim`` values."""
        if dim < 0:
            raise EncodingError(f"dim must be >= 0, got {dim}")
        return -(-dim // self.slots)

    def check_summands(self, count: int) -> None:
        """Refuse adding ``count`` vectors if that sum could carry into the next slot."""
        if count < 0:
            raise EncodingError(f"summand count must be >= 0, got {count}")
        if count > self.max_summands:
            raise EncodingError(
                f"{count} summands exceed max_summands={self.max_summands}: a slot of "
                f"{self.slot_bits} bits could carry into the next one"
            )


def _check_integer_array(values: npt.ArrayLike) -> npt.NDArray[Any]:
    array = np.asarray(values)
    if array.dtype.kind not in "iu":
        raise EncodingError(f"values must be an integer array, got dtype {array.dtype}")
    if array.ndim != 1:
        raise EncodingError(f"values must be one-dimensional, got shape {array.shape}")
    return array


def _pack_unsigned(values: npt.NDArray[np.uint64], layout: SlotLayout) -> list[int]:
    """Values already validated, as uint64: write their low bytes into byte-aligned slots."""
    dim = values.shape[0]
    count = layout.ciphertext_count(dim)
    slot_bytes, value_bytes = layout.slot_bytes, layout.value_bytes
    buffer = np.zeros((count * layout.slots, slot_bytes), dtype=np.uint8)
    # Little-endian bytes: byte k of slot i is byte i*slot_bytes + k of the plaintext.
    low_bytes = values.astype("<u8", copy=False).view(np.uint8).reshape(dim, 8)
    buffer[:dim, :value_bytes] = low_bytes[:, :value_bytes]
    raw = buffer.tobytes()
    width = layout.slots * slot_bytes
    return [int.from_bytes(raw[k * width:(k + 1) * width], "little") for k in range(count)]


def pack(values: npt.ArrayLike, layout: SlotLayout) -> list[int]:
    """Pack unsigned integers in ``[0, 2^value_bits)`` into ``ciphertext_count(dim)`` plaintexts."""
    array = _check_integer_array(values)
    if array.size:
        low, high = int(array.min()), int(array.max())
        if low < 0 or high >> layout.value_bits:
            raise EncodingError(
                f"values must lie in [0, 2^{layout.value_bits}), got range [{low}, {high}]"
            )
    return _pack_unsigned(array.astype(np.uint64, copy=False), layout)


def pack_signed(values: npt.ArrayLike, layout: SlotLayout) -> list[int]:
    """Pack signed ints in ``[-2^(b-1), 2^(b-1))`` (b = value_bits), offset by ``2^(b-1)``."""
    array = _check_integer_array(values)
    bits = layout.value_bits
    half = 1 << (bits - 1)
    if array.size:
        low, high = int(array.min()), int(array.max())
        if low < -half or high >= half:
            raise EncodingError(
                f"values must lie in [-2^{bits - 1}, 2^{bits - 1}), got range [{low}, {high}]"
            )
    # In range, so the int64 cast is exact; v + 2^(b-1) mod 2^b is two's complement with
    # the top bit flipped, which also covers b = 64 without overflowing int64.
    as_unsigned = array.astype(np.int64, copy=False).view(np.uint64)
    if bits == 64:
        shifted = as_unsigned ^ np.uint64(half)
    else:
        shifted = (as_unsigned + np.uint64(half)) & np.uint64((1 << bits) - 1)
    return _pack_unsigned(shifted, layout)


def _slot_bytes(plaintexts: Iterable[int], layout: SlotLayout, dim: int) -> npt.NDArray[np.uint8]:
    """The plaintexts' slots as a (dim, slot_bytes) little-endian byte matrix."""
    values = list(plaintexts)
    expected = layout.ciphertext_count(dim)
    if len(values) != expected:
        raise EncodingError(f"{dim} values need {expected} plaintexts, got {len(values)}")
    width = layout.slots * layout.slot_bytes
    try:
        raw = b"".join(int(p).to_bytes(width, "little") for p in values)
    except OverflowError:
        # Negative, or wider than the slots: not a sum this layout can have produced.
        raise EncodingError(
            f"a plaintext does not fit {layout.slots} slots of {layout.slot_bits} bits"
        ) from None
    matrix = np.frombuffer(raw, dtype=np.uint8).reshape(-1, layout.slot_bytes)
    return matrix[:dim]


def _bytes_to_uint(matrix: npt.NDArray[np.uint8], itemsize: int) -> npt.NDArray[Any]:
    """Rows of at most ``itemsize`` little-endian bytes -> native unsigned ints."""
    rows, width = matrix.shape
    padded = np.zeros((rows, itemsize), dtype=np.uint8)
    padded[:, :width] = matrix
    return padded.view(f"<u{itemsize}").reshape(rows).astype(f"=u{itemsize}", copy=False)


def unpack(plaintexts: Iterable[int], layout: SlotLayout, dim: int) -> npt.NDArray[Any]:
    """Exact slot values: uint64 if ``slot_bits <= 64``, else an object array of Python ints."""
    matrix = _slot_bytes(plaintexts, layout, dim)
    if layout.slot_bytes <= 8:
        result: npt.NDArray[Any] = _bytes_to_uint(matrix, 8).astype(np.uint64, copy=False)
        return result
    # Wider slots: combine 64-bit limbs as Python ints.
    total = np.zeros(dim, dtype=object)
    for start in range(0, layout.slot_bytes, 8):
        limb = _bytes_to_uint(matrix[:, start:start + 8], 8).astype(object)
        total = total + (limb << (8 * start))
    return total


def unpack_ring(
    plaintexts: Iterable[int], layout: SlotLayout, dim: int, dtype: npt.DTypeLike
) -> npt.NDArray[Any]:
    """Slot sums mod ``2^value_bits`` as an unsigned dtype of exactly ``value_bits`` bits."""
    target = np.dtype(dtype)
    if target.kind != "u" or target.itemsize * 8 != layout.value_bits:
        raise EncodingError(
            f"ring dtype must be unsigned with {layout.value_bits} bits, got {target}"
        )
    matrix = _slot_bytes(plaintexts, layout, dim)
    # The low value_bytes of a slot are its sum mod 2^value_bits.
    ring = np.ascontiguousarray(matrix[:, :layout.value_bytes])
    result: npt.NDArray[Any] = _bytes_to_uint(ring, target.itemsize).astype(target, copy=False)
    return result


def unpack_signed(
    plaintexts: Iterable[int], layout: SlotLayout, dim: int, summands: int
) -> npt.NDArray[Any]:
    """Exact sums of ``summands`` :func:`pack_signed` vectors: int64 when they fit, else object."""
    layout.check_summands(summands)
    half = 1 << (layout.value_bits - 1)
    offset = summands * half
    largest = summands * ((1 << layout.value_bits) - 1)  # every value at 2^(b-1) - 1
    fits_int64 = offset <= 1 << 63  # the result lies in [-offset, offset)
    sums = unpack(plaintexts, layout, dim)
    if sums.dtype == np.uint64:
        if sums.size and int(sums.max()) > largest:
            raise EncodingError(f"a slot sum exceeds what {summands} summands can produce")
        if fits_int64:
            # Wrapping uint64 arithmetic, exact because the true result fits in int64.
            shifted: npt.NDArray[Any] = (sums - np.uint64(offset)).view(np.int64)
            return shifted
        return sums.astype(object) - offset
    if sums.size and max(sums) > largest:
        raise EncodingError(f"a slot sum exceeds what {summands} summands can produce")
    exact = sums - offset
    return exact.astype(np.int64) if fits_int64 else exact


# ---------------------------------------------------------------------------
# Encryption
# ---------------------------------------------------------------------------


class FastEncryptor:
    """Encrypts under ``public`` as ``(1 + m n) h^x mod n^2`` with a short random ``x``.

    Setup draws ``r0`` from ``random_bytes``, computes ``h = r0^n mod n^2`` and a
    fixed-base table of ``ceil(exponent_bits / 8) * 256`` residues mod ``n^2``
    (8192 entries, about 4.5 MB at 2048 bits); each encryption then costs
    ``ceil(exponent_bits / 8) + 1`` multiplications mod ``n^2``.
    """

    __slots__ = ("_exponent_bytes", "_gmp", "_n", "_nsquare", "_public", "_random_bytes",
                 "_table", "_top_mask", "exponent_bits")

    def __init__(
        self,
        public: phe.PaillierPublicKey,
        *,
        random_bytes: Callable[[int], bytes] = os.urandom,
        exponent_bits: int = EXPONENT_BITS,
        use_gmpy2: bool | None = None,
    ) -> None:
        if use_gmpy2 is None:
            use_gmpy2 = HAVE_GMPY2
        if use_gmpy2 and not HAVE_GMPY2:
            raise CryptoError("use_gmpy2=True but gmpy2 is not installed")
        n = int(public.n)
        if not MIN_EXPONENT_BITS <= exponent_bits <= 2 * n.bit_length():
            raise CryptoError(
                f"exponent_bits must be in [{MIN_EXPONENT_BITS}, {2 * n.bit_length()}], "
                f"got {exponent_bits}"
            )
        self._public = public
        self._random_bytes = random_bytes
        self._gmp: bool = use_gmpy2
        self.exponent_bits = exponent_bits
        self._exponent_bytes = -(-exponent_bits // _WINDOW_BITS)
        self._top_mask = (1 << (exponent_bits - 8 * (self._exponent_bytes - 1))) - 1
        self._n: Any = _gmpy2.mpz(n) if use_gmpy2 else n
        self._nsquare: Any = self._n * self._n
        self._table: list[list[Any]] = self._build_table(self._draw_r0(n))

    def _draw_r0(self, n: int) -> int:
        size = (n.bit_length() + 7) // 8 + _REDUCTION_SLACK_BYTES
        for _ in range(_R0_ATTEMPTS):
            drawn = self._random_bytes(size)
            if len(drawn) != size:
                raise CryptoError("random_bytes returned the wrong number of bytes")
            r0 = int.from_bytes(drawn, "big") % n
            # r0 must be a unit; a non-unit would reveal a factor of n (probability ~2^-1023).
            if r0 > 1 and math.gcd(r0, n) == 1:
                return r0
        raise CryptoError("random_bytes keeps producing values outside Z*_n: not random")

    def _build_table(self, r0: int) -> list[list[Any]]:
        nsquare = self._nsquare
        if self._gmp:
            h = _gmpy2.powmod(_gmpy2.mpz(r0), self._n, nsquare)
            one = _gmpy2.mpz(1)
        else:
            h = pow(r0, self._n, nsquare)
            one = 1
        table: list[list[Any]] = []
        base = h  # h^(2^(8j)) for window j
        for _ in range(self._exponent_bytes):
            row = [one, base]
            for _ in range(2, 1 << _WINDOW_BITS):
                row.append(row[-1] * base % nsquare)
            table.append(row)
            base = row[-1] * base % nsquare
        return table

    def with_random_bytes(self, random_bytes: Callable[[int], bytes]) -> FastEncryptor:
        """An encryptor sharing this one's ``h`` and table but drawing ``x`` from ``random_bytes``.

        ``h`` is public, so sharing it is safe; this skips the setup (``r0^n`` and the
        table) and its memory when one process runs many encrypting peers.
        """
        clone = object.__new__(FastEncryptor)
        for name in FastEncryptor.__slots__:
            setattr(clone, name, getattr(self, name))
        clone._random_bytes = random_bytes
        return clone

    @property
    def public(self) -> phe.PaillierPublicKey:
        return self._public

    def __repr__(self) -> str:
        return (f"FastEncryptor(public={self._public!r}, exponent_bits={self.exponent_bits}, "
                f"gmpy2={self._gmp})")

    def _encrypt_all(self, plaintexts: Sequence[int]) -> list[int]:
        n, nsquare, table = self._n, self._nsquare, self._table
        step = self._exponent_bytes
        # One draw for the whole batch; a byte stream gives the same x's as one draw each.
        randomness = bytearray(self._random_bytes(step * len(plaintexts)))
        if len(randomness) != step * len(plaintexts):
            raise CryptoError("random_bytes returned the wrong number of bytes")
        limit = int(n)
        out: list[int] = []
        for k, plaintext in enumerate(plaintexts):
            m = int(plaintext)
            if not 0 <= m < limit:
                raise CryptoError("Paillier plaintext must lie in [0, n)")
            exponent = randomness[k * step:(k + 1) * step]
            exponent[-1] &= self._top_mask  # byte j is window j: little-endian x
            acc = m * n + 1  # g^m with g = n + 1; below n^2 since m < n
            for row, window in zip(table, exponent, strict=True):
                acc = acc * row[window] % nsquare
            out.append(int(acc))
        return out

    def encrypt(self, plaintext: int) -> int:
        """A fresh ciphertext of ``0 <= plaintext < n`` (as a Python int)."""
        return self._encrypt_all([plaintext])[0]

    def encrypt_vector(self, values: npt.ArrayLike, layout: SlotLayout) -> list[int]:
        """:func:`pack` the unsigned ``values`` under ``layout``, then encrypt each plaintext."""
        _check_layout(layout, self._public)
        return self._encrypt_all(pack(values, layout))


def _check_layout(layout: SlotLayout, public: phe.PaillierPublicKey) -> None:
    bits = int(public.n).bit_length()
    if layout.key_bits != bits:
        raise EncodingError(f"layout is for {layout.key_bits}-bit keys, the key has {bits} bits")


# ---------------------------------------------------------------------------
# Homomorphic addition, wire encoding, decryption
# ---------------------------------------------------------------------------


def add_ciphertexts(total: list[int], other: Sequence[int], public: phe.PaillierPublicKey) -> None:
    """In place ``total[i] = total[i] * other[i] mod n^2``: the plaintexts add slot-wise.

    No re-randomisation: each summand already carries its own random ``h^x``.
    """
    if len(total) != len(other):
        raise CryptoError(f"cannot add {len(other)} ciphertexts to {len(total)}")
    if HAVE_GMPY2:
        nsquare: Any = _gmpy2.mpz(int(public.nsquare))
        mpz = _gmpy2.mpz
        for i, c in enumerate(other):
            total[i] = int(mpz(total[i]) * c % nsquare)
    else:  # pragma: no cover - exercised only without gmpy2
        nsquare = int(public.nsquare)
        for i, c in enumerate(other):
            total[i] = total[i] * c % nsquare


def ciphertexts_to_bytes(ciphertexts: Sequence[int], public: phe.PaillierPublicKey) -> bytes:
    """Fixed-width big-endian ``2 * key_bits / 8`` bytes per ciphertext, concatenated."""
    width = 2 * _key_bits(public) // 8
    nsquare = int(public.nsquare)
    parts = []
    for c in ciphertexts:
        value = int(c)
        if not 0 < value < nsquare:
            raise CryptoError("ciphertext is not in [1, n^2)")
        parts.append(value.to_bytes(width, "big"))
    return b"".join(parts)


def ciphertexts_from_bytes(data: bytes, public: phe.PaillierPublicKey, count: int) -> list[int]:
    """Parse :func:`ciphertexts_to_bytes`; CryptoError: bad length, or a value not in [1, n^2)."""
    width = 2 * _key_bits(public) // 8
    if count < 0 or len(data) != count * width:
        raise CryptoError(
            f"expected {count} ciphertexts of {width} bytes ({count * width} bytes), "
            f"got {len(data)} bytes"
        )
    nsquare = int(public.nsquare)
    view = memoryview(data)
    out = [int.from_bytes(view[k * width:(k + 1) * width], "big") for k in range(count)]
    for c in out:
        if not 0 < c < nsquare:
            raise CryptoError("ciphertext is not in [1, n^2)")
    return out


def decrypt_vector(
    private: phe.PaillierPrivateKey,
    ciphertexts: Sequence[int],
    layout: SlotLayout,
    dim: int,
    dtype: npt.DTypeLike,
) -> npt.NDArray[Any]:
    """Decrypt each ciphertext with phe's CRT ``raw_decrypt``, then :func:`unpack_ring`."""
    _check_layout(layout, private.public_key)
    plaintexts = [int(private.raw_decrypt(int(c))) for c in ciphertexts]
    return unpack_ring(plaintexts, layout, dim, dtype)
