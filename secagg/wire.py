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


@dataclass(frozen=True)
class SignedIndex:
    """A peer's R3 signature over (session, round, U3)."""

    index: PeerIndex
    signature: Annotated[bytes, Blob(exact=64)]


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
    body = _encode_value(envelope.body)
    frame = [WIRE_VERSION, envelope.body.TYPE, envelope.session, envelope.round,
             envelope.sender, body]
    packed: bytes = msgpack.packb(frame, use_bin_type=True)
    return packed


def encode_record(record: Any) -> bytes:
    """Serialize a bare dataclass record (AEAD plaintexts) to msgpack."""
    packed: bytes = msgpack.packb(_encode_value(record), use_bin_type=True)
    return packed


def decode(frame: bytes, limits: Limits | None = None) -> Envelope:
    """Parse and validate one frame; raises :class:`WireError` on any problem."""
    limits = limits or Limits()
    raw = _unpack(frame, limits)
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
    cls = _REGISTRY[type_name]
    decoded = _decode_record(cls, body, limits, type_name)
    assert isinstance(decoded, Message)
    return Envelope(session=session, round=round_number, sender=sender, body=decoded)


def decode_record(cls: type[Any], data: bytes, limits: Limits | None = None) -> Any:
    """Parse and validate a bare record produced by :func:`encode_record`."""
    limits = limits or Limits()
    return _decode_record(cls, _unpack(data, limits), limits, cls.__name__)


def _unpack(frame: bytes, limits: Limits) -> Any:
    if not isinstance(frame, bytes | bytearray | memoryview):
        raise WireError(f"frame must be bytes, not {type(frame).__name__}")
    if len(frame) > limits.max_frame_bytes:
        raise WireError(f"frame of {len(frame)} bytes exceeds the limit of "
                        f"{limits.max_frame_bytes} bytes")
    try:
        return msgpack.unpackb(
            frame, raw=False, use_list=True, strict_map_key=True,
            max_bin_len=limits.max_frame_bytes, max_str_len=1 << 16,
            max_array_len=max(limits.max_peers, 16) * 2, max_map_len=64,
            max_ext_len=0,
        )
    except WireError:
        raise
    except Exception as exc:  # msgpack raises a zoo of types for bad input
        raise WireError(f"malformed msgpack: {type(exc).__name__}: {exc}") from None


# --------------------------------------------------------------------------
# Schema-driven encoding and validation.

_HINTS: dict[type[Any], dict[str, Any]] = {}


def _hints(cls: type[Any]) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        module = sys.modules[cls.__module__]
        hints = get_type_hints(cls, globalns=vars(module), include_extras=True)
        hints = {f.name: hints[f.name] for f in dataclasses.fields(cls)}
        _HINTS[cls] = hints
    return hints


def _encode_value(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        dtype = value.dtype.newbyteorder("<")
        code = {np.dtype("<u4"): "u4", np.dtype("<u8"): "u8"}.get(dtype)
        if code is None or value.ndim != 1:
            raise WireError(f"vectors must be 1-D uint32/uint64, not {value.dtype}{value.shape}")
        data = np.ascontiguousarray(value, dtype=dtype)
        return {"dtype": code, "data": data.tobytes()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        # Fields left at their default are omitted: the decoder restores them.
        return {f.name: _encode_value(getattr(value, f.name)) for f in dataclasses.fields(value)
                if f.default is dataclasses.MISSING or getattr(value, f.name) != f.default}
    if isinstance(value, list | tuple):
        return [_encode_value(item) for item in value]
    return value


def _decode_record(cls: type[Any], raw: Any, limits: Limits, where: str) -> Any:
    if not isinstance(raw, dict):
        raise WireError(f"{where}: body must be a map")
    hints = _hints(cls)
    unknown = set(raw) - set(hints)
    if unknown:
        raise WireError(f"{where}: unknown field(s) {sorted(map(str, unknown))}")
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        if field.name not in raw:
            has_default = (field.default is not dataclasses.MISSING
                           or field.default_factory is not dataclasses.MISSING)
            if has_default:
                continue
            raise WireError(f"{where}: missing field {field.name!r}")
        values[field.name] = _check(hints[field.name], raw[field.name], limits,
                                    f"{where}.{field.name}")
    return cls(**values)


def _check(hint: Any, value: Any, limits: Limits, where: str) -> Any:
    markers: tuple[Any, ...] = ()
    if get_origin(hint) is Annotated:
        hint, *extra = get_args(hint)
        markers = tuple(extra)
    origin = get_origin(hint)
    if hint is np.ndarray:
        return _check_vector(value, limits, where)
    if hint is bool:
        if type(value) is not bool:
            raise WireError(f"{where}: expected a boolean")
        return value
    if hint is int:
        if type(value) is not int:
            raise WireError(f"{where}: expected an integer")
        for marker in markers:
            _check_int(marker, value, limits, where)
        return value
    if hint is float:
        if type(value) not in (float, int) or not math.isfinite(value):
            raise WireError(f"{where}: expected a finite number")
        for marker in markers:
            if isinstance(marker, RealRange) and not marker.low <= value <= marker.high:
                raise WireError(f"{where}: {value} outside [{marker.low}, {marker.high}]")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise WireError(f"{where}: expected a string")
        for marker in markers:
            if isinstance(marker, Text):
                if len(value) > marker.max_len:
                    raise WireError(f"{where}: string longer than {marker.max_len}")
                if marker.pattern is not None and not marker.pattern.match(value):
                    raise WireError(f"{where}: {value[:70]!r} is not a valid name")
        return value
    if hint is bytes:
        if not isinstance(value, bytes):
            raise WireError(f"{where}: expected bytes")
        for marker in markers:
            if isinstance(marker, Blob):
                if marker.exact is not None and len(value) != marker.exact:
                    raise WireError(f"{where}: expected {marker.exact} bytes, got {len(value)}")
                if len(value) > marker.max_len:
                    raise WireError(f"{where}: more than {marker.max_len} bytes")
            if isinstance(marker, PayloadBlockMarker) and limits.payload_bytes is not None \
                    and len(value) != limits.payload_bytes:
                raise WireError(f"{where}: payload of {len(value)} bytes, the round's "
                                f"payload has {limits.payload_bytes}")
        return value
    if origin is list:
        (item_hint,) = get_args(hint)
        if not isinstance(value, list):
            raise WireError(f"{where}: expected a list")
        if len(value) > limits.max_peers:
            raise WireError(f"{where}: list of {len(value)} exceeds {limits.max_peers} entries")
        return [_check(item_hint, item, limits, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _decode_record(hint, value, limits, where)
    raise WireError(f"{where}: no wire schema for {hint!r}")  # pragma: no cover


def _check_int(marker: Any, value: int, limits: Limits, where: str) -> None:
    if isinstance(marker, IntRange) and not marker.low <= value <= marker.high:
        raise WireError(f"{where}: {value} outside [{marker.low}, {marker.high}]")
    if isinstance(marker, PeerIndexMarker) and not 0 <= value < limits.max_peers:
        raise WireError(f"{where}: peer index {value} outside [0, {limits.max_peers})")
    if isinstance(marker, CountMarker) and not 0 <= value <= limits.max_peers:
        raise WireError(f"{where}: count {value} outside [0, {limits.max_peers}]")


def _check_vector(value: Any, limits: Limits, where: str) -> np.ndarray:
    if not isinstance(value, dict) or set(value) != {"dtype", "data"}:
        raise WireError(f"{where}: a vector is a map with exactly 'dtype' and 'data'")
    dtype = _VECTOR_DTYPES.get(value["dtype"]) if isinstance(value["dtype"], str) else None
    if dtype is None:
        raise WireError(f"{where}: vector dtype must be one of {sorted(_VECTOR_DTYPES)}")
    data = value["data"]
    if not isinstance(data, bytes) or len(data) % dtype.itemsize:
        raise WireError(f"{where}: vector data must be bytes, a multiple of {dtype.itemsize}")
    length = len(data) // dtype.itemsize
    if length > limits.max_dim:
        raise WireError(f"{where}: vector of {length} coordinates exceeds {limits.max_dim}")
    if limits.dim is not None and length != limits.dim:
        raise WireError(f"{where}: vector has {length} coordinates, the round has {limits.dim}")
    # frombuffer is zero-copy and read-only; callers copy before accumulating.
    vector: np.ndarray = np.frombuffer(data, dtype=dtype)
    return vector.astype(dtype.newbyteorder("="), copy=False)


def validate_names(names: list[str]) -> None:
    """Raise WireError unless every name is a valid peer name."""
    for name in names:
        if not _NAME_PATTERN.match(name):
            raise WireError(f"{name[:70]!r} is not a valid peer name")

