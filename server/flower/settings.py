"""The workflow's settings: :class:`SecAggSettings`, checked on construction, and
their mapping from ``SecAggPlusWorkflow``'s arguments (:class:`UnsupportedSetting` for
what has no counterpart here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from secagg import wire
from secagg.graph import GraphKind, default_threshold
from secagg.paillier import DEFAULT_KEY_BITS
from secagg.protocol import ServerConfig
from secagg.protocol.common import GRAPH_KINDS, MODES, THREAT_MODELS, Mode, ThreatModel

DEFAULT_WEIGHT_KEY = "num-examples"
"""The Message API's metric for the weight (as ``flwr.serverapp`` strategies use)."""


class UnsupportedSetting(ValueError):
    """A SecAggPlusWorkflow setting that has no counterpart here."""


@dataclass(frozen=True)
class SecAggSettings:
    """What every round of the workflow uses; checked on construction.

    ``threshold``: an int, a fraction of the round's sampled nodes (a float in
    (0, 1]), or None for the default of the threat model (more than half; more
    than two thirds under ``active``). ``fan_in`` of the accumulation tree: through
    Flower every frame passes the server anyway, so a flat tree saves steps.
    """

    threshold: int | float | None = None
    graph: GraphKind = "complete"
    mode: Mode = "masking"
    threat_model: ThreatModel = "honest-but-curious"
    phase_timeout: float = 30.0
    fit_timeout: float = 600.0
    fan_in: int = 64
    clip: float = 8.0
    max_weight: float = 1000.0
    modulus_bits: int = 32
    paillier_key_bits: int = DEFAULT_KEY_BITS
    weight_key: str = DEFAULT_WEIGHT_KEY

    def __post_init__(self) -> None:
        threshold = self.threshold
        if isinstance(threshold, bool) or not (
                threshold is None or (isinstance(threshold, int) and threshold >= 2)
                or (isinstance(threshold, float) and 0 < threshold <= 1)):
            raise ValueError(f"threshold must be an int >= 2, a fraction in (0, 1] or None, "
                             f"not {threshold!r}")
        if self.graph not in GRAPH_KINDS:
            raise ValueError(f"graph must be one of {GRAPH_KINDS}, not {self.graph!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {self.mode!r}")
        if self.threat_model not in THREAT_MODELS:
            raise ValueError(f"threat_model must be one of {THREAT_MODELS}")
        for name in ("phase_timeout", "clip", "max_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be positive and finite, got {value!r}")
        if not (math.isfinite(self.fit_timeout) and self.fit_timeout > 0):
            raise ValueError(f"fit_timeout must be positive and finite, got {self.fit_timeout}")
        if self.modulus_bits not in (32, 64):
            raise ValueError(f"modulus_bits must be 32 or 64, not {self.modulus_bits}")
        floor = 2 / 3 if self.threat_model == "active" else 1 / 2
        if isinstance(threshold, float) and threshold <= floor:
            raise ValueError(f"a threshold fraction must be above {floor:.3g} under the "
                             f"{self.threat_model} threat model, got {threshold}")
        # The rest (fan_in, key sizes, the encoding's capacity) as a round checks it.
        peers = threshold if isinstance(threshold, int) else 3
        self.config(session=bytes(wire.SESSION_BYTES), round=0, peers=peers, dim=1).encoder()

    def threshold_for(self, peers: int) -> int:
        if self.threshold is None:
            return default_threshold(peers, self.threat_model)
        if isinstance(self.threshold, float):
            return max(2, math.ceil(self.threshold * peers))
        return self.threshold

    def config(self, *, session: bytes, round: int, peers: int, dim: int) -> ServerConfig:
        """The round's ServerConfig (ValueError naming what to change if it cannot be)."""
        return ServerConfig(
            session=session, round=round, max_peers=peers, threshold=self.threshold_for(peers),
            dim=dim,
            threat_model=self.threat_model, graph=self.graph, fan_in=self.fan_in,
            clip=self.clip, modulus_bits=self.modulus_bits, weighted=True,
            max_weight=self.max_weight, phase_timeout=self.phase_timeout, mode=self.mode,
            paillier_key_bits=self.paillier_key_bits)

    @classmethod
    def from_secaggplus(cls, num_shares: int | float | None = None,
                        reconstruction_threshold: int | float | None = None,
                        **kwargs: Any) -> SecAggSettings:
        """Settings from ``SecAggPlusWorkflow``'s arguments: ``reconstruction_threshold``
        -> threshold, ``clipping_range`` -> clip, ``max_weight`` -> max weight,
        ``modulus_range`` -> modulus bits, ``timeout`` -> phase timeout; our own
        arguments pass through. Anything else is an UnsupportedSetting naming it."""
        mapped: dict[str, Any] = {}
        if num_shares is not None:
            # SecAgg+'s share count is its graph: all nodes, or a sparse neighbourhood.
            mapped["graph"] = "complete" if num_shares == 1.0 or num_shares == 1 else "sparse"
        if reconstruction_threshold is not None:
            if isinstance(reconstruction_threshold, int) and reconstruction_threshold == 1:
                reconstruction_threshold = 1.0
            mapped["threshold"] = reconstruction_threshold
        renames = {"clipping_range": "clip", "max_weight": "max_weight",
                   "timeout": "phase_timeout"}
        for key, value in kwargs.items():
            if key in renames:
                if value is None:
                    raise UnsupportedSetting(f"{key}=None: secagg waits a bounded time; give "
                                             "a timeout in seconds")
                mapped[renames[key]] = float(value)
            elif key == "modulus_range":
                bits = int(value).bit_length() - 1
                if value not in (1 << 32, 1 << 64):
                    raise UnsupportedSetting(f"modulus_range={value}: secagg masks in "
                                             "2**32 or 2**64")
                mapped["modulus_bits"] = bits
            elif key == "quantization_range":
                raise UnsupportedSetting("quantization_range: secagg picks the quantization "
                                         "scale from clip, max_weight, the node count and "
                                         "modulus bits; drop it (raise modulus_range for "
                                         "precision)")
            elif key in cls.__dataclass_fields__:
                mapped[key] = value
            else:
                raise UnsupportedSetting(f"{key}: not a SecAggPlusWorkflow setting secagg "
                                         "supports")
        return cls(**mapped)
