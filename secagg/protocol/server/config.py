"""What the coordinator decides about a round, checked once, before anything runs."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from secagg.dp import DPConfig
from secagg.graph import GraphKind, check_threshold
from secagg.paillier import DEFAULT_KEY_BITS, KEY_BITS, SlotLayout
from secagg.protocol.common import GRAPH_KINDS, THREAT_MODELS, ThreatModel
from secagg.protocol.encoder import Encoder
from secagg.protocol.modes import Mode, check_mode, round_mode, slot_layout
from secagg.wire import SESSION_BYTES


@dataclass(frozen=True)
class ServerConfig:
    """Everything the coordinator decides about a round. Validated on construction."""

    session: bytes
    round: int
    max_peers: int
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
    dp: DPConfig | None = None
    """Distributed differential privacy: each peer adds a share of the noise."""

    def __post_init__(self) -> None:
        if len(self.session) != SESSION_BYTES:
            raise ValueError(f"session id must be {SESSION_BYTES} bytes")
        if self.max_peers < 2:
            raise ValueError(f"max_peers must be at least 2, got {self.max_peers}")
        check_threshold(self.max_peers, self.threshold, self.threat_model)
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
        if self.dp is not None and self.dp.modulus_bits != self.modulus_bits:
            raise ValueError(f"the DP config uses modulus_bits={self.dp.modulus_bits} but the "
                             f"round uses {self.modulus_bits}: make them equal")

    def encoder(self, peers: int | None = None) -> Encoder:
        """The round's encoding for ``peers`` contributors (``max_peers`` by default);
        EncodingError if it cannot be built (the message names what to change)."""
        return Encoder.create(n=self.max_peers if peers is None else peers, dim=self.dim,
                              clip=self.clip, scale=self.scale,
                              modulus_bits=self.modulus_bits, weighted=self.weighted,
                              max_weight=self.max_weight, threshold=self.threshold,
                              dp=self.dp)

    @cached_property
    def wire_dim(self) -> int:
        """Ring coordinates on the wire: the (padded) vector, plus the weight when
        weighted, plus the clipped counter (see secagg.protocol.encoder)."""
        return self.encoder().wire_dim

    def slot_layout(self, peers: int | None = None) -> SlotLayout | None:
        """How ciphertexts pack the ring elements for ``peers`` summands (``max_peers``
        by default); None when the mode does not encrypt."""
        if not round_mode(self.mode).encrypts:
            return None
        return slot_layout(key_bits=self.paillier_key_bits, modulus_bits=self.modulus_bits,
                           peers=self.max_peers if peers is None else peers)
