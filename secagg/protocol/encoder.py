"""What a peer's float input becomes in the ring, and what the ring sum decodes to.

Both ends build the same :class:`Encoder` from the round's parameters (the
server from its config, a peer from the roster), so the layout of the ring
vector is defined once:

    [ data | weight (weighted rounds) | clipped (rounds without DP) ]

- ``data`` is the quantized input (``secagg.encoding``) or, in a round with
  distributed DP, the rotated, clipped, rounded and noised input
  (``secagg.dp``), ``padded_dim`` coordinates long.
- ``weight`` rides as one more coordinate, so the server learns only the sum
  of the weights.
- ``clipped`` is how many of the peer's coordinates fell outside
  ``[-clip, clip]``, as a plain integer: the server learns how many were clipped
  this round, summed securely with everything else, never whose. DP rounds do
  not carry it, since it would be released without noise.

Decoding gives the (weighted) sum, never a mean: the total weight comes with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from secagg.dp import DPConfig, DPParameters, decode_sum, encode_update
from secagg.encoding import Quantizer, WeightedEncoding, to_signed
from secagg.errors import EncodingError


@dataclass(frozen=True)
class Encoded:
    """A peer's ring vector and how many of its coordinates were clipped."""

    ring: np.ndarray
    clipped: int


@dataclass(frozen=True)
class Decoded:
    """The decoded ring sum: the sum of the inputs (Σ w·x when weighted), the total
    weight (weighted rounds), and how many coordinates the contributors clipped
    (None in DP rounds, which do not count them)."""

    total: np.ndarray
    total_weight: float | None
    clipped: int | None


@dataclass(frozen=True)
class Encoder:
    """The encoding of one round, identical at every peer and at the server."""

    quantizer: Quantizer
    weighted: WeightedEncoding | None
    dim: int
    """Coordinates of the caller's vector."""
    peers: int
    dp: DPParameters | None = None

    @classmethod
    def create(cls, *, n: int, dim: int, clip: float, scale: float | None, modulus_bits: int,
               weighted: bool, max_weight: float, threshold: int | None = None,
               dp: DPConfig | None = None) -> Encoder:
        """Build (and capacity-check for ``n`` peers) the encoder a round uses.

        ``dim`` is the caller's vector length. With ``dp`` the data are encoded by
        the distributed-DP pipeline for threshold ``threshold`` instead of the
        quantizer (whose scale then only bounds the clipped counter's range).
        """
        if dp is not None:
            if weighted:
                raise EncodingError("distributed DP with weighted rounds is not supported: "
                                    "a weight changes the sensitivity; use weighted=False")
            if threshold is None:
                raise EncodingError("distributed DP needs the round's threshold")
            params = DPParameters.derive(n, threshold, dim, dp)
            quantizer = Quantizer(clip=dp.clip, scale=params.scale,
                                  modulus_bits=dp.modulus_bits)
            return cls(quantizer=quantizer, weighted=None, dim=dim, peers=n, dp=params)
        if weighted:
            encoding = WeightedEncoding.for_peers(n, clip=clip, max_weight=max_weight,
                                                  modulus_bits=modulus_bits, scale=scale)
            return cls(quantizer=encoding.quantizer, weighted=encoding, dim=dim, peers=n)
        return cls(quantizer=Quantizer.for_peers(n, clip=clip, modulus_bits=modulus_bits,
                                                 scale=scale), weighted=None, dim=dim, peers=n)

    @property
    def dtype(self) -> np.dtype[np.unsignedinteger]:
        dtype: np.dtype[np.unsignedinteger] = self.quantizer.dtype
        return dtype

    @property
    def counts_clipping(self) -> bool:
        return self.dp is None

    @property
    def data_dim(self) -> int:
        return self.dp.padded_dim if self.dp is not None else self.dim

    @property
    def wire_dim(self) -> int:
        """Ring coordinates per vector: data, the weight, the clipped counter."""
        return self.data_dim + (1 if self.weighted is not None else 0) + \
            (1 if self.counts_clipping else 0)

    @property
    def max_clipped(self) -> int:
        """The largest count one peer reports, so that n counts cannot overflow."""
        room = (1 << (self.quantizer.modulus_bits - 1)) - 1
        return min(self.dim, room // max(self.peers, 1))

    def encode(self, values: np.ndarray, weight: float, rng: np.random.Generator,
               rotation_seed: bytes = b"") -> Encoded:
        """``values`` (``dim`` finite floats) as the round's ring vector."""
        if values.shape != (self.dim,):
            raise ValueError(f"the round expects {self.dim} coordinates, got {values.shape}")
        if self.dp is not None:
            ring, was_clipped = encode_update(values, self.dp, rotation_seed, rng)
            return Encoded(np.asarray(ring, dtype=self.dtype), int(was_clipped))
        clip = self.quantizer.clip
        clipped = int(np.count_nonzero(np.abs(values) > clip))
        if self.weighted is not None:
            data = self.weighted.encode(values, weight, rng)
        else:
            data = self.quantizer.encode(values, rng)
        counter = np.array([min(clipped, self.max_clipped)], dtype=self.dtype)
        return Encoded(np.concatenate([data, counter]), clipped)

    def decode(self, total: np.ndarray, rotation_seed: bytes = b"") -> Decoded:
        """The ring sum of the contributors' vectors, decoded (EncodingError if it
        cannot be: e.g. a weighted round whose weights sum to zero)."""
        ring = np.asarray(total)
        if ring.shape != (self.wire_dim,):
            raise EncodingError(f"expected {self.wire_dim} ring coordinates, got {ring.shape}")
        if self.dp is not None:
            return Decoded(decode_sum(ring, self.dp, rotation_seed, self.dim), None, None)
        clipped = int(to_signed(ring[-1:])[0])
        body = ring[:-1]
        if self.weighted is not None:
            decoded = self.quantizer.decode(body)
            total_weight = float(decoded[-1])
            if total_weight <= 0.0:
                raise EncodingError(
                    f"total weight decoded as {total_weight} <= 0: no contributor sent a "
                    "positive weight, so there is nothing to average")
            return Decoded(decoded[:-1], total_weight, clipped)
        return Decoded(self.quantizer.decode(body), None, clipped)

    def describe(self) -> dict[str, Any]:
        """What the round's result reports about the encoding."""
        info: dict[str, Any] = {"modulus_bits": self.quantizer.modulus_bits,
                                "scale": self.quantizer.scale, "clip": self.quantizer.clip}
        if self.dp is not None:
            info["dp"] = self.dp.to_dict()
        return info
