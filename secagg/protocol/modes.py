"""Modes as strategies: what a round's mode changes, asked in one place.

A mode decides how an input is protected on its way up the tree (DESIGN
sections 2 and 5). The phases never compare mode names; they ask the round's
:class:`RoundMode` whether there are masks (so keys are shared in R1 and removed
in R4), whether payloads are encrypted, and for the :class:`PayloadCodec` that
turns a ring vector into what travels up the tree and back. Adding a mode means
adding one entry to :data:`ROUND_MODES` (and a codec, if its payload is new).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from secagg.paillier import SlotLayout, load_public_key
from secagg.protocol.payload import RING_DTYPES, CiphertextPayloads, PayloadCodec, RingPayloads

Mode = Literal["masking", "paillier", "hybrid"]
MODES: tuple[Mode, ...] = ("masking", "paillier", "hybrid")


@dataclass(frozen=True)
class RoundMode:
    """The questions the phases ask about a mode."""

    name: Mode
    masks: bool
    """Inputs carry pairwise and self masks: keys are shared in R1 and the masks
    removed in R4 from Shamir shares."""
    encrypts: bool
    """Payloads are Paillier-encrypted under the server's per-round key."""
    description: str

    @property
    def shares_keys(self) -> bool:
        return self.masks

    @property
    def unmasks(self) -> bool:
        return self.masks

    def checks_consistency(self, threat_model: str) -> bool:
        """R3 runs when something is revealed after the aggregate and the server is
        not trusted to report the sets honestly."""
        return self.masks and threat_model == "active"

    def neighbourhood(self, neighbours: tuple[int, ...], own: int) -> tuple[int, ...]:
        """Whose keys a peer needs from the roster: without masks, only its own entry."""
        return neighbours if self.masks else (own,)

    def check_graph(self, graph: str) -> None:
        """ValueError (one line) unless this mode runs on ``graph``."""
        if not self.masks and graph != "complete":
            raise ValueError(f"{self.name} mode needs the complete graph, not {graph!r}: it "
                             "has no masks and so no neighbour graph (the sparse graph is "
                             "for masking and hybrid)")

    def codec(self, *, modulus_bits: int, dim: int, peers: int,
              paillier_key: bytes = b"") -> PayloadCodec:
        """The round's payload codec for ``dim`` ring coordinates of ``modulus_bits``
        summed over at most ``peers`` inputs. ``paillier_key`` is the server's public
        modulus (empty without encryption). CryptoError or EncodingError if unusable."""
        dtype = RING_DTYPES[modulus_bits]
        if not self.encrypts:
            if paillier_key:
                raise ValueError(f"a {self.name}-mode round carries no Paillier key")
            return RingPayloads(dtype, dim)
        public_key = load_public_key(paillier_key)
        layout = slot_layout(key_bits=public_key.n.bit_length(), modulus_bits=modulus_bits,
                             peers=peers)
        return CiphertextPayloads(public_key, layout, dim, dtype)


def slot_layout(*, key_bits: int, modulus_bits: int, peers: int) -> SlotLayout:
    """How a round packs its ring elements into Paillier plaintexts: ``modulus_bits``
    per value, room for the sum of all ``peers`` inputs in every slot."""
    return SlotLayout(value_bits=modulus_bits, max_summands=peers, key_bits=key_bits)


ROUND_MODES: dict[str, RoundMode] = {
    "masking": RoundMode("masking", masks=True, encrypts=False,
                         description="masked vectors y_u = q(x_u) + PRG(b_u) ± Σ PRG(s_uv)"),
    "paillier": RoundMode("paillier", masks=False, encrypts=True,
                          description="q(x_u) packed and encrypted under the server's key"),
    "hybrid": RoundMode("hybrid", masks=True, encrypts=True,
                        description="masked vectors, packed and encrypted"),
}


def round_mode(name: str) -> RoundMode:
    """The strategy of mode ``name``; ValueError (one line) if there is none."""
    mode = ROUND_MODES.get(name)
    if mode is None:
        raise ValueError(f"unknown mode {name!r}: mode must be one of {', '.join(MODES)}")
    return mode


def check_mode(mode: str, graph: str) -> None:
    """ValueError (one line) unless ``mode`` is known and runs on ``graph``."""
    round_mode(mode).check_graph(graph)
