"""Pieces both ends of the protocol must compute identically.

Round parameters, the encoder they imply, the byte strings that get signed,
channel keys and associated data: each is defined once here so the peer and
the server cannot drift apart.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable
from typing import Literal

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from secagg.crypto.aead import AssociatedData
from secagg.crypto.kdf import PROTOCOL_ID, derive_key
from secagg.crypto.keys import agree
from secagg.errors import ProtocolError
from secagg.graph import GraphKind, check_threshold
from secagg.protocol.encoder import Encoder as Encoder
from secagg.protocol.modes import MODES as MODES
from secagg.protocol.modes import Mode as Mode
from secagg.protocol.modes import check_mode as check_mode
from secagg.protocol.modes import slot_layout as slot_layout
from secagg.wire import Envelope, Limits, Message

ThreatModel = Literal["honest-but-curious", "active"]
THREAT_MODELS: tuple[ThreatModel, ...] = ("honest-but-curious", "active")
GRAPH_KINDS: tuple[GraphKind, ...] = ("complete", "sparse")

CHANNEL = "channel"
SHARE_KEYS = "share-keys"
PARTIAL_SUM = "partial-sum"


def round_limits(*, peers: int, dim: int, modulus_bits: int,
                 payload_bytes: int | None) -> Limits:
    """Decoding limits for a round whose partial sums are ``payload_bytes`` long."""
    return Limits.for_round(max_peers=peers, dim=dim, modulus_bits=modulus_bits,
                            payload_bytes=payload_bytes)


def signed_keys_message(session: bytes, round: int, name: str, channel_key: bytes,
                        mask_key: bytes, self_mask_commitment: bytes) -> bytes:
    """What a peer signs in R0 under the active threat model."""
    return b"|".join([PROTOCOL_ID, b"advertise", session, struct.pack(">Q", round),
                      name.encode(), channel_key, mask_key, self_mask_commitment])


def self_mask_commitment(session: bytes, round: int, name: str, seed: bytes) -> bytes:
    """A peer's R0 commitment to its self-mask seed b_u: SHA-256 over the seed bound to
    the session, round and peer. b_u has 256 bits of entropy, so the hash hides it; the
    server checks each reconstructed b_u against it, which catches a wrong share (or a
    wrong-but-consistent set of them) that would otherwise leave a wrong aggregate."""
    return hashlib.sha256(b"|".join([PROTOCOL_ID, b"self-mask-commitment", session,
                                     struct.pack(">Q", round), name.encode(), seed])).digest()


def consistency_message(session: bytes, round: int, contributors: Iterable[int]) -> bytes:
    """What a peer signs in R3: the session, the round and U3."""
    members = sorted(contributors)
    return b"|".join([PROTOCOL_ID, b"consistency", session, struct.pack(">Q", round),
                      struct.pack(f">{len(members)}I", *members)])


def channel_key(own_private: bytes | X25519PrivateKey, other_public: bytes, session: bytes,
                round: int) -> bytes:
    """The symmetric AEAD key of a pair of peers for this round."""
    return derive_key(agree(own_private, other_public), purpose=CHANNEL, session=session,
                      round=round)


def associated(session: bytes, round: int, purpose: str, sender: int,
               receiver: int) -> AssociatedData:
    return AssociatedData(session=session, round=round, purpose=purpose, sender=sender,
                          receiver=receiver)


def check_round_shape(size: int, threshold: int, threat_model: str, graph_kind: str,
                      mode: str = "masking") -> None:
    """Raise ProtocolError unless the announced round shape is one we accept."""
    if mode not in MODES:
        raise ProtocolError(f"unknown mode {mode!r}")
    if threat_model not in THREAT_MODELS:
        raise ProtocolError(f"unknown threat model {threat_model!r}")
    if graph_kind not in GRAPH_KINDS:
        raise ProtocolError(f"unknown graph kind {graph_kind!r}")
    try:
        check_threshold(size, threshold, threat_model)
    except ValueError as exc:
        raise ProtocolError(str(exc)) from None


def envelope(session: bytes, round: int, sender: str, body: Message) -> Envelope:
    return Envelope(session=session, round=round, sender=sender, body=body)


def check_envelope(env: Envelope, session: bytes, round: int) -> None:
    """Reject frames from another session or round (replays) with a precise error."""
    if env.session != session:
        raise ProtocolError(f"{env.type} from {env.sender!r} belongs to another session "
                            "(replayed or misdirected)")
    if env.round != round:
        raise ProtocolError(f"{env.type} from {env.sender!r} is for round {env.round}, "
                            f"this is round {round} (replayed or late)")


def keepalive_seconds(phase_timeout: float) -> float:
    """Ping interval (and pong timeout) of every connection in a round with this phase
    deadline.

    A stalled party (a stopped process, a frozen laptop) keeps its connections
    open; only an unanswered ping shows it. Pinging every tenth of the deadline
    and waiting as long for the pong notices a stall within a fifth of a phase,
    so the live parties treat it as gone (re-route around it, name a new root)
    well before their own deadlines. The floor of 2 s keeps an event loop that is
    busy with cryptography for a moment from being mistaken for a stall.
    """
    return min(20.0, max(2.0, phase_timeout / 10))


def stall_detection_seconds(phase_timeout: float) -> float:
    """The longest a stalled party goes unnoticed: one ping interval until the next ping,
    one pong timeout until its connections are closed. The tree's forward deadlines
    leave the root this much time after the last relay's (see server/collect.py)."""
    return 2 * keepalive_seconds(phase_timeout)
