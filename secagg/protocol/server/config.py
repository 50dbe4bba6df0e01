"""What the coordinator decides about a round, checked once, before anything runs."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from secagg.dp import DPConfig
from secagg.graph import GraphKind, check_threshold, corrupt_rate_for, sparse_parameters
from secagg.paillier import DEFAULT_KEY_BITS, KEY_BITS, SlotLayout
from secagg.protocol.common import GRAPH_KINDS, THREAT_MODELS, ThreatModel
from secagg.protocol.encoder import Encoder
from secagg.protocol.modes import Mode, check_mode, round_mode, slot_layout
from secagg.wire import SESSION_BYTES

BASE_PHASE_TIMEOUT = 30.0
"""Seconds per phase for the network and small rounds (see derived_phase_timeout)."""
PAIR_SECONDS = 1.5e-3
"""Per neighbour pair: key agreement, sealing both ways, a link (3x measured, 2 cores)."""
MASK_SECONDS = 4e-9
"""Per neighbour pair and coordinate: one mask coordinate expanded and added."""
CIPHERTEXT_SECONDS = 0.02
"""Per peer and ciphertext: one Paillier encryption (2048-bit, with margin)."""


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

    def derived_phase_timeout(self) -> float:
        """A phase deadline that fits this round's size: what the drivers use when no
        deadline is given (``Coordinator(phase_timeout=None)``, ``secagg-server`` without
        ``--phase-timeout``).

        ``BASE_PHASE_TIMEOUT`` for the network and small rounds, plus the work that grows
        with the round when every peer shares one machine (the worst case, and how the
        scale benchmark runs): per neighbour pair, a key agreement, two sealings and a
        link (``PAIR_SECONDS``, three times what 1,000 sparse peers on 2 cores took);
        per pair and coordinate, a mask coordinate expanded (``MASK_SECONDS``); in the
        modes that encrypt, per peer and ciphertext, one Paillier encryption
        (``CIPHERTEXT_SECONDS``). 12 peers: 30 s; 1,000 sparse peers at d = 10,000: about
        115 s. Only a dead or stalled party makes anyone wait that long: the others
        move on as soon as everyone expected has answered.
        """
        n = self.max_peers
        params = sparse_parameters(n, self.threshold,
                                   corrupt_rate=corrupt_rate_for(self.threat_model)) \
            if self.graph == "sparse" else None
        neighbourhood = params.degree + 1 if params is not None else n
        pairs = n * neighbourhood if round_mode(self.mode).masks else n
        seconds = BASE_PHASE_TIMEOUT + pairs * PAIR_SECONDS + pairs * self.dim * MASK_SECONDS
        layout = self.slot_layout()
        if layout is not None:
            seconds += n * layout.ciphertext_count(self.wire_dim) * CIPHERTEXT_SECONDS
        return round(seconds, 1)

    def slot_layout(self, peers: int | None = None) -> SlotLayout | None:
        """How ciphertexts pack the ring elements for ``peers`` summands (``max_peers``
        by default); None when the mode does not encrypt."""
        if not round_mode(self.mode).encrypts:
            return None
        return slot_layout(key_bits=self.paillier_key_bits, modulus_bits=self.modulus_bits,
                           peers=self.max_peers if peers is None else peers)
