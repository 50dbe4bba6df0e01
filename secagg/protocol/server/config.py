"""What the coordinator decides about a round, checked once, before anything runs."""

from __future__ import annotations

from dataclasses import dataclass

from secagg.graph import GraphKind, check_threshold
from secagg.paillier import DEFAULT_KEY_BITS, KEY_BITS, SlotLayout
from secagg.protocol.common import GRAPH_KINDS, THREAT_MODELS, Encoder, ThreatModel
from secagg.protocol.modes import Mode, check_mode, round_mode, slot_layout
from secagg.wire import SESSION_BYTES


@dataclass(frozen=True)
class ServerConfig:
    """Everything the coordinator decides about a round. Validated on construction."""

    session: bytes
    round: int
    min_peers: int
    threshold: int
    dim: int
    threat_model: ThreatModel = "honest-but-curious"
    graph: GraphKind = "complete"
    fan_in: int = 8
    clip: float = 1.0
    scale: float | None = None
    modulus_bits: int = 32
    weighted: bool = False
    max_weight: float = 1.0
    phase_timeout: float = 30.0
    mode: Mode = "masking"
    paillier_key_bits: int = DEFAULT_KEY_BITS
    """Size of the round's Paillier modulus (modes that encrypt)."""

    def __post_init__(self) -> None:
        if len(self.session) != SESSION_BYTES:
            raise ValueError(f"session id must be {SESSION_BYTES} bytes")
        if self.min_peers < 2:
            raise ValueError(f"min_peers must be at least 2, got {self.min_peers}")
        check_threshold(self.min_peers, self.threshold)
        if self.dim < 1:
            raise ValueError(f"dim must be positive, got {self.dim}")
        if self.threat_model not in THREAT_MODELS:
            raise ValueError(f"threat model must be one of {THREAT_MODELS}")
        if self.graph not in GRAPH_KINDS:
            raise ValueError(f"graph must be one of {GRAPH_KINDS}")
        if self.fan_in < 2:
            raise ValueError(f"fan_in must be at least 2, got {self.fan_in}")
        if not self.phase_timeout > 0:
            raise ValueError("phase_timeout must be positive")
        check_mode(self.mode, self.graph)
        if self.paillier_key_bits not in KEY_BITS:
            raise ValueError(f"paillier_key_bits must be one of {KEY_BITS}")

    def encoder(self) -> Encoder:
        return Encoder.create(n=self.min_peers, dim=self.dim, clip=self.clip, scale=self.scale,
                              modulus_bits=self.modulus_bits, weighted=self.weighted,
                              max_weight=self.max_weight)

    @property
    def wire_dim(self) -> int:
        """Ring coordinates on the wire: the vector, plus the weight when weighted."""
        return self.dim + (1 if self.weighted else 0)

    def slot_layout(self, peers: int | None = None) -> SlotLayout | None:
        """How ciphertexts pack the ring elements for ``peers`` summands (``min_peers``
        by default); None when the mode does not encrypt."""
        if not round_mode(self.mode).encrypts:
            return None
        return slot_layout(key_bits=self.paillier_key_bits, modulus_bits=self.modulus_bits,
                           peers=self.min_peers if peers is None else peers)
