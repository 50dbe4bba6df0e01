"""Messages on the wire: frozen dataclasses, a msgpack codec, strict validation.

Every frame is one msgpack array ``[version, type, session, round, sender, body]``
where ``body`` is a map from field name to value. The schema of each body is
the dataclass itself: field annotations carry the constraints (``Annotated``
markers below), and :func:`decode` checks every one of them, raising a single
:class:`~secagg.errors.WireError` that names the message, the field and the
problem. Vectors travel as raw little-endian bytes with their dtype; nothing is
ever pickled.

Limits that depend on the round (how many peers, how many coordinates) come in
through :class:`Limits`, so a server configured for ``--dim 1000`` rejects a
frame announcing a million coordinates before allocating anything for it.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, TypeVar, get_args, get_origin, get_type_hints

import msgpack
import numpy as np

from secagg.errors import WireError

WIRE_VERSION = 1
SESSION_BYTES = 16
SERVER = "server"
OUTCOME_LIST_LIMIT = 1000
"""The ``sender`` of every message the coordinator originates."""

_NAME_PATTERN = re.compile(r"[A-Za-z0-9_.:@-]{1,64}\Z")
_VECTOR_DTYPES: dict[str, np.dtype[Any]] = {"u4": np.dtype("<u4"), "u8": np.dtype("<u8")}


# --------------------------------------------------------------------------
# Constraint markers used in Annotated[...] field types.


@dataclass(frozen=True)
class Blob:
    """Bytes whose length is exactly ``exact`` (if set) or at most ``max_len``."""

    exact: int | None = None
    max_len: int = 1 << 16


@dataclass(frozen=True)
class Text:
    """A string of at most ``max_len`` characters, optionally matching ``pattern``."""

    max_len: int = 256
    pattern: re.Pattern[str] | None = None


@dataclass(frozen=True)
class IntRange:
    """An integer in ``[low, high]``."""

    low: int
    high: int


@dataclass(frozen=True)
class RealRange:
    """A finite float in ``[low, high]``."""

    low: float
    high: float


class PeerIndexMarker:
    """An index into the round's roster: ``0 <= i < limits.max_peers``."""


class CountMarker:
    """A peer count: ``0 <= c <= limits.max_peers``."""


class PayloadBlockMarker:
    """A partial sum's payload: exactly ``limits.payload_bytes`` bytes when that is set."""


Key32 = Annotated[bytes, Blob(exact=32)]
OptionalKey32 = Annotated[bytes, Blob(max_len=32)]  # empty when not used
OptionalSignature = Annotated[bytes, Blob(max_len=64)]
ShareBytes = Annotated[bytes, Blob(exact=33)]
Seed = Annotated[bytes, Blob(exact=32)]
Ciphertext = Annotated[bytes, Blob(max_len=1 << 31)]
PayloadBlock = Annotated[bytes, Blob(max_len=1 << 31), PayloadBlockMarker()]
PaillierKey = Annotated[bytes, Blob(max_len=384)]  # n of a 2048- or 3072-bit key; empty if unused
PeerName = Annotated[str, Text(64, _NAME_PATTERN)]
Address = Annotated[str, Text(256)]
Reason = Annotated[str, Text(512)]
PeerIndex = Annotated[int, PeerIndexMarker()]
PeerCount = Annotated[int, CountMarker()]
Round = Annotated[int, IntRange(0, 2**32 - 1)]
SmallInt = Annotated[int, IntRange(0, 2**31 - 1)]
Seconds = Annotated[float, RealRange(0.0, 86_400.0)]
Positive = Annotated[float, RealRange(0.0, 1e300)]


@dataclass(frozen=True)
class Limits:
    """Bounds a decoder enforces; sized from the round's configuration."""

    max_peers: int = 100_000
    max_dim: int = 10_000_000
    max_frame_bytes: int = 64 << 20
    dim: int | None = None
    """When set, every vector must have exactly this many coordinates."""
    payload_bytes: int | None = None
    """When set, every partial-sum payload must be exactly this long."""

    @classmethod
    def for_round(cls, *, max_peers: int, dim: int, modulus_bits: int = 64,
                  payload_bytes: int | None = None) -> Limits:
        """Limits for a round of at most ``max_peers`` peers and ``dim`` coordinates.

        ``payload_bytes`` is the exact size of the round's partial-sum payload (a
        ring vector, or the encrypted vector in the paillier and hybrid modes);
        None allows any payload up to the frame limit.
        """
        largest = max(dim * (modulus_bits // 8), payload_bytes or 0)
        # The largest legitimate frame is a vector or a ciphertext block (possibly
        # AEAD-wrapped) plus a contributor list and the roster-sized bookkeeping;
        # leave generous slack. A roster entry is about 250 bytes on the wire (350
        # with an identity key).
        frame = largest + 512 * max_peers + (1 << 16)
        return cls(max_peers=max_peers, max_dim=dim, max_frame_bytes=frame, dim=dim,
                   payload_bytes=payload_bytes)


# --------------------------------------------------------------------------
# Message base and registry.


class Message:
    """Base of every message body. Subclasses are frozen dataclasses with a TYPE."""

    TYPE: ClassVar[str]


_REGISTRY: dict[str, type[Message]] = {}
M = TypeVar("M", bound=type[Message])


def message(cls: M) -> M:
    """Register a frozen dataclass as a wire message type."""
    if cls.TYPE in _REGISTRY:
        raise RuntimeError(f"duplicate message type {cls.TYPE!r}")
    _REGISTRY[cls.TYPE] = cls
    return cls


def message_types() -> dict[str, type[Message]]:
    """Every registered message type, by wire name."""
    return dict(_REGISTRY)


# --------------------------------------------------------------------------
# Records nested inside messages.


@dataclass(frozen=True)
class PeerEntry:
    """One roster entry: what a peer advertised in R0, with its roster index."""

    index: PeerIndex
    name: PeerName
    address: Address
    channel_key: Key32
    mask_key: Key32
    identity_key: OptionalKey32 = b""
    signature: OptionalSignature = b""
    self_mask_commitment: OptionalKey32 = b""


@dataclass(frozen=True)
class SignedIndex:
    """A peer's R3 signature over (session, round, U3)."""

    index: PeerIndex
    signature: Annotated[bytes, Blob(exact=64)]


@dataclass(frozen=True)
class DPSettings:
    """A round's distributed-DP parameters as announced (``secagg.dp.DPConfig``, with
    the scale the server derived); ``mechanism`` is empty in a round without DP."""

    mechanism: Annotated[str, Text(16)] = ""
    noise_multiplier: Positive = 0.0
    clip: Positive = 0.0
    delta: Annotated[float, RealRange(0.0, 1.0)] = 0.0
    k_stddevs: Positive = 0.0
    beta: Annotated[float, RealRange(0.0, 1.0)] = 0.0
    scale: Positive = 0.0
    max_sensitivity_inflation: Positive = 0.0
    rotation_seed: OptionalKey32 = b""
    """The round's public seed of the random rotation."""


NO_DP = DPSettings()


# --------------------------------------------------------------------------
# R0: AdvertiseKeys


@message
@dataclass(frozen=True)
class AdvertiseKeys(Message):
    """Peer -> server: register for the round with fresh public keys."""

    TYPE: ClassVar[str] = "advertise_keys"
    address: Address
    channel_key: Key32
    mask_key: Key32
    identity_key: OptionalKey32 = b""
    signature: OptionalSignature = b""
    self_mask_commitment: OptionalKey32 = b""
    """SHA-256 binding b_u to the session, round and peer (common.self_mask_commitment):
    the server checks every reconstructed b_u against it."""


@message
@dataclass(frozen=True)
class Roster(Message):
    """Server -> peer: U1 closed; the round's parameters and the peer's neighbours."""

    TYPE: ClassVar[str] = "roster"
    your_index: PeerIndex
    size: PeerCount
    threshold: PeerCount
    dim: Annotated[int, IntRange(1, 2**31 - 1)]
    modulus_bits: Annotated[int, IntRange(32, 64)]
    clip: Positive
    scale: Positive
    weighted: bool
    max_weight: Positive
    threat_model: Annotated[str, Text(32)]
    graph_kind: Annotated[str, Text(16)]
    graph_seed: Seed
    degree: PeerCount
    share_threshold: PeerCount
    fan_in: Annotated[int, IntRange(2, 1024)]
    phase_timeout: Seconds
    neighbours: list[PeerEntry]
    """The peer's neighbourhood (itself included); just the peer itself in paillier mode."""
    mode: Annotated[str, Text(16)] = "masking"
    paillier_key: PaillierKey = b""
    """The server's Paillier public modulus n (paillier and hybrid modes)."""
    input_dim: Annotated[int, IntRange(0, 2**31 - 1)] = 0
    """Coordinates of each peer's input (``dim`` counts the ring coordinates)."""
    dp: DPSettings = NO_DP
    """Distributed DP: how each peer noises its input (``mechanism`` empty: none)."""
    names: list[PeerName] = dataclasses.field(default_factory=list)
    """Every rostered peer's name in roster order (sorted), when the sparse graph's ring
    is keyed by names (``secagg.graph``); empty: keyed by roster index."""


# --------------------------------------------------------------------------
# R1: ShareKeys


@message
@dataclass(frozen=True)
class EncryptedShares(Message):
    """Peer -> peer: the sender's shares of b_u and s_sk_u, AEAD-sealed for the receiver."""

    TYPE: ClassVar[str] = "encrypted_shares"
    ciphertext: Annotated[bytes, Blob(max_len=256)]


@dataclass(frozen=True)
class SharePair:
    """The AEAD plaintext of :class:`EncryptedShares`."""

    self_mask_share: ShareBytes
    secret_key_share: ShareBytes


@message
@dataclass(frozen=True)
class ShareReport(Message):
    """Peer -> server: whose shares this peer does *not* hold (usually nobody's).

    Listing the missing neighbours rather than the received ones keeps the report
    a few bytes long however large the neighbourhood is.
    """

    TYPE: ClassVar[str] = "share_report"
    missing_from: list[PeerIndex]


# --------------------------------------------------------------------------
# R2: MaskedInput, accumulated along the tree


@message
@dataclass(frozen=True)
class MaskingStart(Message):
    """Server -> peer: U2 (restricted to the neighbours) and the peer's place in the tree."""

    TYPE: ClassVar[str] = "masking_start"
    survivors: list[PeerIndex]
    """U2 ∩ N(u): the neighbours whose pairwise masks enter y_u."""
    total_survivors: PeerCount
    tree_seed: Seed
    ancestors: list[PeerIndex]
    """Nearest first, root last; empty for the root."""
    descendants: list[PeerIndex]
    """Every peer below this one in the tree (its subtree without itself)."""
    descendant_parents: list[PeerIndex]
    """The tree parent of each descendant, aligned with ``descendants``."""
    contacts: list[PeerEntry]
    """Entries (address, channel key) of every ancestor and descendant: a peer
    whose parent is gone re-routes its sum to the nearest live ancestor."""
    forward_after: Seconds
    """Deadline, relative to receipt, after which a relay forwards what it has."""


@message
@dataclass(frozen=True)
class EncryptedPartialSum(Message):
    """Peer -> tree ancestor: a masked partial sum, AEAD-sealed for the receiver."""

    TYPE: ClassVar[str] = "encrypted_partial_sum"
    ciphertext: Ciphertext


@message
@dataclass(frozen=True)
class PartialSum(Message):
    """The AEAD plaintext of :class:`EncryptedPartialSum` (also a message for tests).

    ``payload`` is the partial sum in the round's payload encoding (see
    ``secagg.protocol.payload``): the ring vector's little-endian bytes in the
    masking mode, packed Paillier ciphertexts in the paillier and hybrid modes.
    """

    TYPE: ClassVar[str] = "partial_sum"
    payload: PayloadBlock
    contributors: list[PeerIndex]


@message
@dataclass(frozen=True)
class AncestorsUnreachable(Message):
    """Peer -> server: no ancestor of mine is reachable; name a new root."""

    TYPE: ClassVar[str] = "ancestors_unreachable"
    tried: list[PeerIndex]


@message
@dataclass(frozen=True)
class NewRoot(Message):
    """Server -> peer: the root is gone; ``root`` now collects (and may be you)."""

    TYPE: ClassVar[str] = "new_root"
    root: PeerEntry
    expected: list[PeerIndex]
    """For the new root: whose partial sums to wait for."""
    contacts: list[PeerEntry]
    """For the new root: entries of the peers in ``expected``."""
    forward_after: Seconds
    """For the new root: how long to wait for ``expected`` before releasing."""


@message
@dataclass(frozen=True)
class PeerDropped(Message):
    """Server -> peer: ``peer`` has left the round; stop waiting for it.

    Sent during R1 to the peer's neighbours and during R2 to its tree parent, so
    that nobody waits for a deadline to learn what the server already knows.
    """

    TYPE: ClassVar[str] = "peer_dropped"
    peer: PeerIndex


@message
@dataclass(frozen=True)
class RootAggregate(Message):
    """Root -> server: the combined sum, sent only with at least t contributors.

    ``payload`` is in the round's payload encoding, as in :class:`PartialSum`.
    """

    TYPE: ClassVar[str] = "root_aggregate"
    payload: PayloadBlock
    contributors: list[PeerIndex]


@message
@dataclass(frozen=True)
class RootAbort(Message):
    """Root -> server: fewer than t contributors reached the root; nothing is released."""

    TYPE: ClassVar[str] = "root_abort"
    contributor_count: PeerCount


# --------------------------------------------------------------------------
# R3: ConsistencyCheck (active threat model only)


@message
@dataclass(frozen=True)
class ConsistencyRequest(Message):
    """Server -> peer in U3: sign U3."""

    TYPE: ClassVar[str] = "consistency_request"
    contributors: list[PeerIndex]


@message
@dataclass(frozen=True)
class ConsistencySignature(Message):
    """Peer -> server: Ed25519 signature over (session, round, U3)."""

    TYPE: ClassVar[str] = "consistency_signature"
    signature: Annotated[bytes, Blob(exact=64)]


# --------------------------------------------------------------------------
# R4: Unmasking


@message
@dataclass(frozen=True)
class UnmaskRequest(Message):
    """Server -> peer in U3: reveal shares of b_u for contributors, of s_sk_u for the dropped.

    ``contributors`` and ``dropped`` describe the whole partition the peer checks;
    the ``*_wanted`` lists say which of those shares the server needs from this
    peer (t of them per secret in total, spread over the holders). A follow-up
    request, after some holders vanished, repeats the same partition.
    """

    TYPE: ClassVar[str] = "unmask_request"
    contributors: list[PeerIndex]
    """U3 ∩ N(v) (all of U3 on the complete graph or under the active model)."""
    dropped: list[PeerIndex]
    """(U2 \\ U3) ∩ N(v)."""
    total_contributors: PeerCount
    signatures: list[SignedIndex]
    self_mask_wanted: list[PeerIndex]
    secret_key_wanted: list[PeerIndex]


@message
@dataclass(frozen=True)
class UnmaskShares(Message):
    """Peer -> server: the requested shares, 33 bytes each, in the order requested
    (ascending owner index), so no owner list travels with them."""

    TYPE: ClassVar[str] = "unmask_shares"
    self_mask_shares: Annotated[bytes, Blob(max_len=33 * 200_000)]
    secret_key_shares: Annotated[bytes, Blob(max_len=33 * 200_000)]


@message
@dataclass(frozen=True)
class Refusal(Message):
    """Peer -> server: the peer refuses the request and aborts the round."""

    TYPE: ClassVar[str] = "refusal"
    reason: Reason


# --------------------------------------------------------------------------
# End of round and session control


@message
@dataclass(frozen=True)
class RoundOutcome(Message):
    """Server -> peer: how the round ended."""

    TYPE: ClassVar[str] = "round_outcome"
    status: Annotated[str, Text(16)]
    contributor_count: PeerCount
    included: bool
    """Whether the recipient's own input is in the aggregate."""
    contributors: list[PeerName]
    """The contributors' ids, only for rounds of at most OUTCOME_LIST_LIMIT
    contributors (the list to every peer would otherwise cost O(n^2) bytes)."""
    reason: Reason


@message
@dataclass(frozen=True)
class RoundOpen(Message):
    """Server -> connected peer: registration for the envelope's session and round is open."""

    TYPE: ClassVar[str] = "round_open"
    dim: Annotated[int, IntRange(1, 2**31 - 1)]
    """Coordinates of the caller's vector (without the weight coordinate)."""
    weighted: bool
    max_peers: PeerCount
    mode: Annotated[str, Text(16)] = "masking"
    paillier_key_bits: Annotated[int, IntRange(0, 16384)] = 0
    """With ``mode``: lets a peer size its frame limits for encrypted partial sums."""
    phase_timeout: Seconds = 0.0
    """The round's phase deadline: lets a peer bound how long it waits for the round."""
    clip: Positive = 0.0
    """The clipping range c of the round's inputs (0: not announced): per coordinate,
    or of the L2 norm in a DP round, so a peer can tell before registering whether
    its input would be clipped."""
    dp_noise_multiplier: Positive = 0.0
    """The distributed-DP noise multiplier of the round (0: no DP), so a peer with a
    noise floor can decline before registering."""
    threat_model: Annotated[str, Text(32)] = ""
    """The round's threat model ("": not announced), so a peer that insists on one can
    decline before registering (the roster says it again, and binds)."""


@message
@dataclass(frozen=True)
class Withdraw(Message):
    """Peer -> server: this peer cannot take part in the announced round (its input
    failed a local check); drop it now instead of waiting for it."""

    TYPE: ClassVar[str] = "withdraw"
    reason: Reason


@message
@dataclass(frozen=True)
class Rejected(Message):
    """Server -> client: the request cannot be served (e.g. registration closed)."""

    TYPE: ClassVar[str] = "rejected"
    reason: Reason


@message
@dataclass(frozen=True)
class Forward(Message):
    """Peer <-> server: an opaque peer-to-peer frame relayed for a peer without a listener."""

    TYPE: ClassVar[str] = "forward"
    recipient: PeerName
    frame: Ciphertext


# --------------------------------------------------------------------------
# The envelope and the codec.


@dataclass(frozen=True)
class Envelope:
    """A message with the routing fields every frame carries."""

    session: bytes
    round: int
    sender: str
    body: Message

    @property
    def type(self) -> str:
        return self.body.TYPE


def encode(envelope: Envelope) -> bytes:
    """Serialize an envelope to a msgpack frame."""
    body = _record_codec(type(envelope.body)).encode(envelope.body)
    frame = [WIRE_VERSION, envelope.body.TYPE, envelope.session, envelope.round,
             envelope.sender, body]
    packed: bytes = msgpack.packb(frame, use_bin_type=True)
    return packed


def encode_record(record: Any) -> bytes:
    """Serialize a bare dataclass record (AEAD plaintexts) to msgpack."""
    packed: bytes = msgpack.packb(_encode_value(record), use_bin_type=True)
    return packed


_DEFAULT_LIMITS = Limits()


def decode(frame: bytes, limits: Limits | None = None) -> Envelope:
    """Parse and validate one frame; raises :class:`WireError` on any problem."""
    limits = limits or _DEFAULT_LIMITS
    raw = _unpack(frame, limits, _envelope_shape())
    if not isinstance(raw, list) or len(raw) != 6:
        raise WireError("frame is not a 6-element envelope array")
    version, type_name, session, round_number, sender, body = raw
    if type(version) is not int or version != WIRE_VERSION:
        raise WireError(f"unsupported wire version {version!r} (expected {WIRE_VERSION})")
    if not isinstance(type_name, str) or type_name not in _REGISTRY:
        raise WireError(f"unknown message type {type_name!r}")
    if not isinstance(session, bytes) or len(session) != SESSION_BYTES:
        raise WireError(f"session must be {SESSION_BYTES} bytes")
    if type(round_number) is not int or not 0 <= round_number < 2**32:
        raise WireError("round must be an integer in [0, 2^32)")
    if not isinstance(sender, str) or not (sender == SERVER or _NAME_PATTERN.match(sender)):
        raise WireError("sender must be a peer name (1-64 chars of [A-Za-z0-9_.:@-])")
    decoded = _decode_record(_REGISTRY[type_name], body, limits, type_name)
    assert isinstance(decoded, Message)
    if not _ENVELOPE_PLAIN:
        return Envelope(session=session, round=round_number, sender=sender, body=decoded)
    # Built like the records (see _RecordCodec): every field was checked above.
    envelope = object.__new__(Envelope)
    envelope.__dict__.update(session=session, round=round_number, sender=sender, body=decoded)
    return envelope


_ENVELOPE_PLAIN = not hasattr(Envelope, "__post_init__") and "__slots__" not in vars(Envelope)


def decode_record(cls: type[Any], data: bytes, limits: Limits | None = None) -> Any:
    """Parse and validate a bare record produced by :func:`encode_record`."""
    limits = limits or _DEFAULT_LIMITS
    return _decode_record(cls, _unpack(data, limits, _record_codec(cls).shape), limits,
                          cls.__name__)


# --------------------------------------------------------------------------
# Bounded unpacking.
#
# msgpack turns every byte into Python objects: an empty array (1 byte) becomes a
# 72-byte list, and an array header declaring n items reserves up to 80 KB of slots
# before a single item is read, so a frame of nested headers would expand thousands
# of times before being rejected. Every frame is therefore scanned first (headers
# only: str/bin payloads are skipped by length) against bounds taken from the schema,
# and only then unpacked:
#
# - nesting no deeper than the deepest message (an envelope holds a body map, which
#   holds lists of records: 4 levels);
# - containers pay for themselves: a valid frame spends at least `min_container_bytes`
#   on each container beyond the envelope and body (a container-valued field's key,
#   or a record's required fields), so a frame of n bytes holds at most
#   2 + n // min_container_bytes of them;
# - every declared item needs at least one byte, so the items owed by all open
#   containers never exceed the bytes left (this bounds what msgpack reserves);
# - arrays and maps no longer than any message needs, no ext types.
#
# What is left is the cost of scalars: at most ~20x for a frame of 2-character
# strings, against 64x for a frame of empty arrays before (tests/test_wire.py).


@dataclass(frozen=True)
class _Shape:
    """Structural bounds of a valid frame, computed from the schema."""

    max_depth: int
    min_container_bytes: int


_SCALAR_SIZE = [0] * 256
"""Encoded size of the scalar starting with this byte, 0 if not a fixed-size scalar."""
for _b in range(0x00, 0x80):
    _SCALAR_SIZE[_b] = 1  # positive fixint
for _b in range(0xE0, 0x100):
    _SCALAR_SIZE[_b] = 1  # negative fixint
for _b in range(0xA0, 0xC0):
    _SCALAR_SIZE[_b] = 1 + (_b & 0x1F)  # fixstr
for _b, _size in ((0xC0, 1), (0xC2, 1), (0xC3, 1), (0xCA, 5), (0xCB, 9), (0xCC, 2), (0xCD, 3),
                  (0xCE, 5), (0xCF, 9), (0xD0, 2), (0xD1, 3), (0xD2, 5), (0xD3, 9)):
    _SCALAR_SIZE[_b] = _size
_LENGTH_BYTES = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4}
"""bin8/16/32 and str8/16/32: how many bytes of big-endian length follow the type byte."""
_MAX_MAP_LEN = 64
_MAX_STR_LEN = 1 << 16
_RUN_MIN = 8
_ONE_BYTE = bytes(b for b in range(256) if _SCALAR_SIZE[b] == 1)
_RUNS = {0: re.compile(b"[" + re.escape(_ONE_BYTE) + b"]*")}
"""Runs of tokens of one size: one-byte scalars (key 0), or the 2- and 3-byte scalars
starting with that type byte (uint8, int8, uint16, int16, 1- and 2-char fixstr)."""
for _b in range(256):
    if _SCALAR_SIZE[_b] in (2, 3):
        _RUNS[_b] = re.compile(b"(?:" + re.escape(bytes([_b])) + b"." * (_SCALAR_SIZE[_b] - 1)
                               + b")*", re.DOTALL)


def _scan(data: bytes, shape: _Shape, max_array: int) -> None:
    """Walk the msgpack headers of ``data``; raise WireError where a bound is broken.

    Written for speed: a scalar costs one table lookup and two additions, and running
    off the end of ``data`` (a truncated frame) surfaces as IndexError.
    """
    end = len(data)
    max_containers = 2 + end // shape.min_container_bytes
    max_depth = shape.max_depth
    scalar_size = _SCALAR_SIZE
    length_bytes = _LENGTH_BYTES
    pos = 0
    left = 1  # items still to read in the innermost open container (the top: one object)
    stack: list[int] = []  # items left in each enclosing container
    containers = 0
    try:
        while True:
            b = data[pos]
            size = scalar_size[b]
            if size:
                # Runs of same-size integers (index lists) are skipped in one regex call
                # (it stops at the end of the data, so a cut token ends the run). Not
                # worth a call for the few scalars of an envelope or a record.
                if left > _RUN_MIN and size <= 3:
                    run = _RUNS[b if size > 1 else 0].match(data, pos, pos + left * size)
                    count = (run.end() - pos) // size if run is not None else 0
                    if count:
                        pos += count * size
                        left -= count
                        if left:
                            continue
                    else:
                        pos += size
                        left -= 1
                        if left:
                            continue
                else:
                    pos += size
                    left -= 1
                    if left:
                        continue
            elif b in length_bytes:
                k = length_bytes[b]
                length = int.from_bytes(data[pos + 1:pos + 1 + k], "big")
                if b >= 0xD9 and length > _MAX_STR_LEN:
                    raise WireError(f"malformed msgpack: string of {length} bytes")
                pos += 1 + k + length
                left -= 1
                if left:
                    continue
            else:
                if 0x80 <= b <= 0x9F:
                    count, is_array = b & 0x0F, b >= 0x90
                    pos += 1
                elif 0xDC <= b <= 0xDF:
                    k = 2 if b in (0xDC, 0xDE) else 4
                    count, is_array = int.from_bytes(data[pos + 1:pos + 1 + k], "big"), b <= 0xDD
                    pos += 1 + k
                else:
                    raise WireError(f"malformed msgpack: unsupported type byte 0x{b:02x}")
                containers += 1
                if len(stack) >= max_depth:
                    raise WireError(f"malformed msgpack: nested deeper than {max_depth}")
                if containers > max_containers:
                    raise WireError(f"malformed msgpack: more than {max_containers} arrays and "
                                    f"maps in a frame of {end} bytes")
                if count > (max_array if is_array else _MAX_MAP_LEN):
                    kind = "array" if is_array else "map"
                    raise WireError(f"malformed msgpack: {kind} of {count} entries exceeds "
                                    "the limit")
                items = count if is_array else 2 * count
                # Each item still owed, here or in an enclosing container, needs a byte.
                if left - 1 + sum(stack) + items > end - pos:
                    raise WireError("malformed msgpack: truncated frame")
                if items:
                    stack.append(left - 1)
                    left = items
                    continue
                left -= 1
                if left:
                    continue
            while not left:
                if not stack:
                    if pos > end:
                        raise WireError("malformed msgpack: truncated frame")
                    if pos < end:
                        raise WireError("malformed msgpack: extra data after the frame")
                    return
                left = stack.pop()
    except IndexError:
        raise WireError("malformed msgpack: truncated frame") from None


def _unpack(frame: bytes | bytearray | memoryview, limits: Limits, shape: _Shape) -> Any:
    if not isinstance(frame, bytes | bytearray | memoryview):
        raise WireError(f"frame must be bytes, not {type(frame).__name__}")
    size = frame.nbytes if isinstance(frame, memoryview) else len(frame)
    if size > limits.max_frame_bytes:
        raise WireError(f"frame of {size} bytes exceeds the limit of "
                        f"{limits.max_frame_bytes} bytes")
    data = frame if isinstance(frame, bytes) else bytes(frame)
    max_array = max(limits.max_peers, 16) * 2
    _scan(data, shape, max_array)
    try:
        return msgpack.unpackb(
            data, raw=False, use_list=True, strict_map_key=True,
            max_bin_len=len(data), max_str_len=_MAX_STR_LEN,
            max_array_len=max_array, max_map_len=_MAX_MAP_LEN, max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises a zoo of types for bad input
        raise WireError(f"malformed msgpack: {type(exc).__name__}: {exc}") from None


# --------------------------------------------------------------------------
# Schema-driven encoding and validation, compiled once per record type.
#
# Each field's annotation is turned into a checker closure when its class is first
# used; decoding a record is then one pass over precomputed (name, checker) pairs.
# Checkers raise _Invalid with the path below their field; the record and list
# levels prefix their part on the way up, so the location string is only built for
# a frame that fails.

Checker = Callable[[Any, Limits], Any]


class _Invalid(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.path = ""


def _hints(cls: type[Any]) -> dict[str, Any]:
    module = sys.modules[cls.__module__]
    hints = get_type_hints(cls, globalns=vars(module), include_extras=True)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


class _RecordCodec:
    """Encoder, validator and structural bounds of one dataclass record."""

    def __init__(self, cls: type[Any]) -> None:
        self.cls = cls
        hints = _hints(cls)
        self.names = frozenset(hints)
        self.fields: list[tuple[str, Checker, bool]] = []
        self.encoders: list[tuple[str, Any, Callable[[Any], Any] | None]] = []
        # _RecordCodec objects are cached before their fields compile, so a
        # recursive record type would not loop; none exists today.
        _CODECS[cls] = self
        depth = 0
        min_container = _NO_CONTAINER
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            required = (f.default is dataclasses.MISSING
                        and f.default_factory is dataclasses.MISSING)
            self.fields.append((f.name, _compile(hint), required))
            self.encoders.append((f.name, f.default, _compile_encoder(hint)))
            field_depth, own, inner = _structure(hint)
            depth = max(depth, field_depth)
            if own < _NO_CONTAINER:  # a container-valued field costs its key too
                min_container = min(min_container, 1 + len(f.name) + own)
            min_container = min(min_container, inner)
        self.depth = 1 + depth
        """How deep this record nests, counting its own map."""
        self.min_bytes = 1 + sum(1 + len(f.name) + 1 for f in dataclasses.fields(cls)
                                 if f.default is dataclasses.MISSING
                                 and f.default_factory is dataclasses.MISSING)
        """A lower bound on the encoded size of a valid instance."""
        self.min_container_bytes = min_container
        """The least bytes any container inside a valid instance takes (its own map,
        like an envelope's body, is free)."""
        self.shape = _Shape(max_depth=self.depth, min_container_bytes=self.min_container_bytes)
        # Filling __dict__ directly saves the frozen __setattr__ per field (about half
        # the cost of a small record). Only for plain generated __init__s: a type with
        # __post_init__, init=False fields, slots or its own __init__ is constructed.
        init = getattr(cls.__init__, "__code__", None)
        self._fast_new = (init is not None and init.co_filename == "<string>"
                          and not hasattr(cls, "__post_init__")
                          and "__slots__" not in vars(cls)
                          and all(f.init for f in dataclasses.fields(cls)))
        self._defaults = {f.name: f.default for f in dataclasses.fields(cls)
                          if f.default is not dataclasses.MISSING}
        self._factories = {f.name: f.default_factory for f in dataclasses.fields(cls)
                           if f.default_factory is not dataclasses.MISSING}

    def decode(self, raw: Any, limits: Limits) -> Any:
        if not isinstance(raw, dict):
            raise _Invalid("body must be a map")
        if not raw.keys() <= self.names:
            unknown = set(raw) - self.names
            raise _Invalid(f"unknown field(s) {sorted(map(str, unknown))}")
        values: dict[str, Any] = {}
        for name, check, required in self.fields:
            if name in raw:
                try:
                    values[name] = check(raw[name], limits)
                except _Invalid as exc:
                    exc.path = f".{name}{exc.path}"
                    raise
            elif required:
                raise _Invalid(f"missing field {name!r}")
        if not self._fast_new:
            return self.cls(**values)
        if len(values) < len(self.fields):
            for name, default in self._defaults.items():
                values.setdefault(name, default)
            for name, factory in self._factories.items():
                if name not in values:
                    values[name] = factory()
        obj = object.__new__(self.cls)
        obj.__dict__.update(values)
        return obj

    def encode(self, value: Any) -> dict[str, Any]:
        # Fields left at their default are omitted: the decoder restores them.
        out: dict[str, Any] = {}
        for name, default, encoder in self.encoders:
            item = getattr(value, name)
            if default is not dataclasses.MISSING and item == default:
                continue
            out[name] = item if encoder is None else encoder(item)
        return out


_CODECS: dict[type[Any], _RecordCodec] = {}
_NO_CONTAINER = 1 << 30


def _record_codec(cls: type[Any]) -> _RecordCodec:
    codec = _CODECS.get(cls)
    return codec if codec is not None else _RecordCodec(cls)


def _decode_record(cls: type[Any], raw: Any, limits: Limits, where: str) -> Any:
    try:
        return _record_codec(cls).decode(raw, limits)
    except _Invalid as exc:
        raise WireError(f"{where}{exc.path}: {exc.message}") from None


_ENVELOPE_SHAPES: dict[int, _Shape] = {}


def _envelope_shape() -> _Shape:
    """Bounds for whole frames: the envelope array around any registered message."""
    shape = _ENVELOPE_SHAPES.get(len(_REGISTRY))  # recomputed if a type is registered late
    if shape is None:
        codecs = [_record_codec(cls) for cls in _REGISTRY.values()]
        shape = _Shape(max_depth=1 + max(c.depth for c in codecs),
                       min_container_bytes=min(c.min_container_bytes for c in codecs))
        _ENVELOPE_SHAPES.clear()
        _ENVELOPE_SHAPES[len(_REGISTRY)] = shape
    return shape


def _structure(hint: Any) -> tuple[int, int, int]:
    """(nesting depth, least bytes of the value if it is a container, least bytes of any
    container inside it) of a field type; a scalar is (0, _NO_CONTAINER, _NO_CONTAINER)."""
    if get_origin(hint) is Annotated:
        hint = get_args(hint)[0]
    if hint is np.ndarray:
        return 1, 1 + len("dtype") + 1 + 3 + 1 + len("data") + 1 + 2, _NO_CONTAINER
    if get_origin(hint) is list:
        item_depth, item_own, item_inner = _structure(get_args(hint)[0])
        return 1 + item_depth, 1, min(item_own, item_inner)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        codec = _record_codec(hint)
        return codec.depth, codec.min_bytes, codec.min_container_bytes
    return 0, _NO_CONTAINER, _NO_CONTAINER


def _compile(hint: Any) -> Checker:
    """The checker of one field type (see _check_* below for what each enforces)."""
    markers: tuple[Any, ...] = ()
    if get_origin(hint) is Annotated:
        hint, *extra = get_args(hint)
        markers = tuple(extra)
    if hint is np.ndarray:
        return _check_vector
    if hint is bool:
        return _check_bool
    if hint is int:
        return _int_checker(markers)
    if hint is float:
        return _float_checker(markers)
    if hint is str:
        return _str_checker(markers)
    if hint is bytes:
        return _bytes_checker(markers)
    if get_origin(hint) is list:
        (item_hint,) = get_args(hint)
        return _list_checker(item_hint, _compile(item_hint))
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        codec = _record_codec(hint)
        return codec.decode
    raise TypeError(f"no wire schema for {hint!r}")


def _check_bool(value: Any, limits: Limits) -> Any:
    if type(value) is not bool:
        raise _Invalid("expected a boolean")
    return value


def _int_bounds(markers: tuple[Any, ...]) -> tuple[int | None, int | None, bool, bool]:
    """(low, high) of the IntRange markers, and whether the value is a peer index/count."""
    low: int | None = None
    high: int | None = None
    for marker in markers:
        if isinstance(marker, IntRange):
            low = marker.low if low is None else max(low, marker.low)
            high = marker.high if high is None else min(high, marker.high)
    return (low, high, any(isinstance(m, PeerIndexMarker) for m in markers),
            any(isinstance(m, CountMarker) for m in markers))


def _int_checker(markers: tuple[Any, ...]) -> Checker:
    ranges = [m for m in markers if isinstance(m, IntRange)]
    index = any(isinstance(m, PeerIndexMarker) for m in markers)
    count = any(isinstance(m, CountMarker) for m in markers)

    def check_int(value: Any, limits: Limits) -> Any:
        if type(value) is not int:
            raise _Invalid("expected an integer")
        for marker in ranges:
            if not marker.low <= value <= marker.high:
                raise _Invalid(f"{value} outside [{marker.low}, {marker.high}]")
        if index and not 0 <= value < limits.max_peers:
            raise _Invalid(f"peer index {value} outside [0, {limits.max_peers})")
        if count and not 0 <= value <= limits.max_peers:
            raise _Invalid(f"count {value} outside [0, {limits.max_peers}]")
        return value

    return check_int


def _float_checker(markers: tuple[Any, ...]) -> Checker:
    ranges = [m for m in markers if isinstance(m, RealRange)]

    def check_float(value: Any, limits: Limits) -> Any:
        if type(value) not in (float, int) or not math.isfinite(value):
            raise _Invalid("expected a finite number")
        for marker in ranges:
            if not marker.low <= value <= marker.high:
                raise _Invalid(f"{value} outside [{marker.low}, {marker.high}]")
        return float(value)

    return check_float


def _str_checker(markers: tuple[Any, ...]) -> Checker:
    texts = [m for m in markers if isinstance(m, Text)]

    def check_str(value: Any, limits: Limits) -> Any:
        if not isinstance(value, str):
            raise _Invalid("expected a string")
        for marker in texts:
            if len(value) > marker.max_len:
                raise _Invalid(f"string longer than {marker.max_len}")
            if marker.pattern is not None and not marker.pattern.match(value):
                raise _Invalid(f"{value[:70]!r} is not a valid name")
        return value

    return check_str


def _bytes_checker(markers: tuple[Any, ...]) -> Checker:
    blobs = [m for m in markers if isinstance(m, Blob)]
    payload = any(isinstance(m, PayloadBlockMarker) for m in markers)

    def check_bytes(value: Any, limits: Limits) -> Any:
        if not isinstance(value, bytes):
            raise _Invalid("expected bytes")
        for marker in blobs:
            if marker.exact is not None and len(value) != marker.exact:
                raise _Invalid(f"expected {marker.exact} bytes, got {len(value)}")
            if len(value) > marker.max_len:
                raise _Invalid(f"more than {marker.max_len} bytes")
        if payload and limits.payload_bytes is not None and len(value) != limits.payload_bytes:
            raise _Invalid(f"payload of {len(value)} bytes, the round's payload has "
                           f"{limits.payload_bytes}")
        return value

    return check_bytes


_JUST_INT = frozenset({int})


def _list_checker(item_hint: Any, check_item: Checker) -> Checker:
    def check_items(value: list[Any], limits: Limits) -> list[Any]:
        out = []
        for i, item in enumerate(value):
            try:
                out.append(check_item(item, limits))
            except _Invalid as exc:
                exc.path = f"[{i}]{exc.path}"
                raise
        return out

    def check_list(value: Any, limits: Limits) -> Any:
        if not isinstance(value, list):
            raise _Invalid("expected a list")
        if len(value) > limits.max_peers:
            raise _Invalid(f"list of {len(value)} exceeds {limits.max_peers} entries")
        return check_items(value, limits)

    if get_origin(item_hint) is not Annotated or get_args(item_hint)[0] is not int:
        return check_list
    # Lists of integers (indices, counts): check the whole list at C speed, and fall
    # back to the item-by-item walk only to name the first bad entry.
    low, high, index, count = _int_bounds(tuple(get_args(item_hint)[1:]))

    def check_int_list(value: Any, limits: Limits) -> Any:
        if not isinstance(value, list):
            raise _Invalid("expected a list")
        if len(value) > limits.max_peers:
            raise _Invalid(f"list of {len(value)} exceeds {limits.max_peers} entries")
        if not value:
            return value
        if frozenset(map(type, value)) != _JUST_INT:
            return check_items(value, limits)
        smallest, largest = min(value), max(value)
        if (low is not None and smallest < low) or (high is not None and largest > high):
            return check_items(value, limits)
        if index and (smallest < 0 or largest >= limits.max_peers):
            return check_items(value, limits)
        if count and (smallest < 0 or largest > limits.max_peers):
            return check_items(value, limits)
        return value  # a fresh list from the unpacker: nobody else holds it

    return check_int_list


def _check_vector(value: Any, limits: Limits) -> np.ndarray:
    if not isinstance(value, dict) or set(value) != {"dtype", "data"}:
        raise _Invalid("a vector is a map with exactly 'dtype' and 'data'")
    dtype = _VECTOR_DTYPES.get(value["dtype"]) if isinstance(value["dtype"], str) else None
    if dtype is None:
        raise _Invalid(f"vector dtype must be one of {sorted(_VECTOR_DTYPES)}")
    data = value["data"]
    if not isinstance(data, bytes) or len(data) % dtype.itemsize:
        raise _Invalid(f"vector data must be bytes, a multiple of {dtype.itemsize}")
    length = len(data) // dtype.itemsize
    if length > limits.max_dim:
        raise _Invalid(f"vector of {length} coordinates exceeds {limits.max_dim}")
    if limits.dim is not None and length != limits.dim:
        raise _Invalid(f"vector has {length} coordinates, the round has {limits.dim}")
    # frombuffer is zero-copy and read-only; callers copy before accumulating.
    vector: np.ndarray = np.frombuffer(data, dtype=dtype)
    return vector.astype(dtype.newbyteorder("="), copy=False)


def _compile_encoder(hint: Any) -> Callable[[Any], Any] | None:
    """How to turn a field's value into msgpack-ready data; None when it already is."""
    if get_origin(hint) is Annotated:
        hint = get_args(hint)[0]
    if hint is np.ndarray:
        return _encode_value
    if get_origin(hint) is list:
        item = _compile_encoder(get_args(hint)[0])
        if item is None:
            return _encode_list
        return lambda value: [item(v) for v in value]
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _encode_value
    return None


def _encode_list(value: Any) -> Any:
    # msgpack packs a list or a tuple of scalars as is; anything else takes the
    # generic path (which also rejects bad vectors).
    return value if isinstance(value, list | tuple) else _encode_value(value)


def _encode_value(value: Any) -> Any:
    """Generic encoding, by the runtime type of ``value``."""
    if isinstance(value, np.ndarray):
        dtype = value.dtype.newbyteorder("<")
        code = {np.dtype("<u4"): "u4", np.dtype("<u8"): "u8"}.get(dtype)
        if code is None or value.ndim != 1:
            raise WireError(f"vectors must be 1-D uint32/uint64, not {value.dtype}{value.shape}")
        data = np.ascontiguousarray(value, dtype=dtype)
        return {"dtype": code, "data": data.tobytes()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _record_codec(type(value)).encode(value)
    if isinstance(value, list | tuple):
        return [_encode_value(item) for item in value]
    return value


def validate_names(names: list[str]) -> None:
    """Raise WireError unless every name is a valid peer name."""
    for name in names:
        if not _NAME_PATTERN.match(name):
            raise WireError(f"{name[:70]!r} is not a valid peer name")
