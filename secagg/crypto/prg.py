"""The mask PRG: an AES-256-CTR keystream written straight into numpy buffers.

Each (seed, session, round, purpose) gets its own HKDF-derived AES key, so the zero
IV is safe: no key ever encrypts more than one stream. The keystream is produced by
encrypting a reusable zero buffer with ``update_into``, so no per-neighbour
allocation happens in ``add_into``.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from secagg.crypto.kdf import derive_key

_ZERO_IV = bytes(16)
# cryptography's update_into wants len(out) >= len(in) + block_size - 1.
_UPDATE_INTO_SLACK = 15
_BIG_ENDIAN = sys.byteorder == "big"


class MaskGenerator:
    """Expands seeds into pseudorandom vectors of ``length`` unsigned ints (mod 2^bits)."""

    __slots__ = ("_dtype", "_length", "_nbytes", "_pad", "_scratch", "_scratch_bytes", "_zeros")

    def __init__(self, length: int, dtype: np.dtype[Any] | type) -> None:
        self._dtype: np.dtype[np.unsignedinteger] = np.dtype(dtype)
        if self._dtype.type not in (np.uint32, np.uint64):
            raise ValueError(f"mask dtype must be uint32 or uint64, got {self._dtype}")
        if length < 0:
            raise ValueError(f"mask length must be >= 0, got {length}")
        self._length = length
        self._nbytes = length * self._dtype.itemsize
        # Whole elements of padding so the padded buffer stays aligned for the dtype.
        self._pad = -(-_UPDATE_INTO_SLACK // self._dtype.itemsize)
        self._zeros = bytes(self._nbytes)
        scratch = np.empty(length + self._pad, dtype=self._dtype)
        self._scratch = scratch[:length]
        # cryptography's buffer conversion wants a byte-format buffer, hence the uint8 view.
        self._scratch_bytes = scratch.view(np.uint8).data

    @property
    def length(self) -> int:
        """Number of elements in each mask."""
        return self._length

    @property
    def dtype(self) -> np.dtype[np.unsignedinteger]:
        """Element type of each mask (uint32 or uint64)."""
        return self._dtype

    def _fill(
        self, out_bytes: memoryview, seed: bytes, session: bytes, round: int, purpose: str
    ) -> None:
        key = derive_key(seed, purpose=purpose, session=session, round=round)
        encryptor = Cipher(algorithms.AES(key), modes.CTR(_ZERO_IV)).encryptor()
        encryptor.update_into(self._zeros, out_bytes)

    def mask(
        self, seed: bytes, *, session: bytes, round: int, purpose: str
    ) -> npt.NDArray[np.unsignedinteger]:
        """Return a new (length,) array: the keystream read as little-endian words."""
        padded = np.empty(self._length + self._pad, dtype=self._dtype)
        self._fill(padded.view(np.uint8).data, seed, session, round, purpose)
        out = padded[: self._length]
        if _BIG_ENDIAN:
            out.byteswap(inplace=True)  # the keystream is defined as little-endian words
        return out

    def add_into(
        self,
        acc: npt.NDArray[np.unsignedinteger],
        seed: bytes,
        *,
        session: bytes,
        round: int,
        purpose: str,
        sign: int = 1,
    ) -> None:
        """In place: ``acc = acc + sign * mask  (mod 2^bits)``; ``sign`` is +1 or -1."""
        if acc.dtype != self._dtype or acc.shape != (self._length,):
            raise ValueError(
                f"accumulator must have shape ({self._length},) and dtype {self._dtype}, "
                f"got {acc.shape} {acc.dtype}"
            )
        if not acc.flags.c_contiguous or not acc.flags.writeable:
            raise ValueError("accumulator must be a writeable C-contiguous array")
        self._fill(self._scratch_bytes, seed, session, round, purpose)
        scratch = self._scratch
        if _BIG_ENDIAN:
            scratch.byteswap(inplace=True)
        if sign == 1:
            np.add(acc, scratch, out=acc)
        elif sign == -1:
            np.subtract(acc, scratch, out=acc)
        else:
            raise ValueError(f"sign must be +1 or -1, got {sign}")
