"""What the phases of one peer's round share.

Three layers, each created once and handed to the phases that need it, so no
phase ever asks whether a field "has been set yet":

- :class:`PeerSettings`: how this peer was constructed (identity, pinned keys,
  the mode and threat model it insists on, injectable randomness and graph
  factory);
- :class:`RoundInput`: what ``start`` fixed: session, round, input vector, fresh
  key pairs;
- :class:`RoundContext`: what the accepted roster fixed: the round's parameters,
  mode strategy, payload codec, contacts, channel keys, and the shares this peer
  holds (forgotten when the round ends).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from secagg.crypto import shamir
from secagg.crypto.aead import TAG_LENGTH, open_sealed, seal
from secagg.crypto.keys import KeyPair, RandomBytes, load_private, validate_public_key
from secagg.crypto.prg import MaskGenerator
from secagg.crypto.signing import SigningKey, verify
from secagg.errors import CryptoError
from secagg.graph import NeighbourGraph
from secagg.protocol.common import (
    PARTIAL_SUM,
    SHARE_KEYS,
    Encoder,
    ThreatModel,
    associated,
    channel_key,
    envelope,
    round_limits,
    signed_keys_message,
)
from secagg.protocol.errors import DropReason, RemoteProtocolError
from secagg.protocol.events import Send
from secagg.protocol.modes import RoundMode
from secagg.protocol.payload import PayloadCodec
from secagg.wire import (
    SERVER,
    EncryptedPartialSum,
    EncryptedShares,
    Envelope,
    Limits,
    Message,
    PeerEntry,
    Roster,
)

log = logging.getLogger("secagg.peer")

GraphFactory = Callable[[str, int, int, bytes, str, Sequence[str]], NeighbourGraph]
"""(kind, n, threshold, seed, threat model, names) -> the round's graph, as
``graph.make_graph``."""

SEALED_PURPOSES: dict[str, str] = {EncryptedShares.TYPE: SHARE_KEYS,
                                   EncryptedPartialSum.TYPE: PARTIAL_SUM}
"""Peer-to-peer messages: each is AEAD-sealed for its receiver under its own purpose."""
SEALED_KINDS: dict[str, str] = {EncryptedShares.TYPE: "shares",
                                EncryptedPartialSum.TYPE: "partial sum"}

MAX_REJECTED = 1024
"""Refused frames kept in ``PeerProtocol.rejected``: remote parties fill that list, so
it is bounded like every other buffer (the log still has every one)."""


def record_rejection(rejected: list[str], name: str, reason: str) -> None:
    log.warning("%s: %s", name, reason)
    if len(rejected) < MAX_REJECTED:
        rejected.append(reason)


@dataclass(frozen=True)
class PeerSettings:
    """What a peer is, independent of any round."""

    name: str
    address: str
    random_bytes: RandomBytes
    identity: SigningKey | None
    trusted_identities: Mapping[str, bytes]
    graph_factory: GraphFactory
    mask_generator: MaskGenerator | None
    required_mode: RoundMode | None
    """The only mode this peer takes part in (None: whatever the server runs)."""
    min_noise_multiplier: float | None = None
    """The least distributed-DP noise this peer accepts (None: DP not required)."""
    required_threat_model: ThreatModel | None = None
    """The only threat model this peer takes part in (None: whatever the server runs)."""


@dataclass(frozen=True)
class RoundInput:
    """What ``start`` fixed for the round: its identity, this peer's input and keys."""

    settings: PeerSettings
    session: bytes
    round: int
    vector: np.ndarray
    weight: float
    channel_keys: KeyPair
    mask_keys: KeyPair
    rejected: list[str]
    """The protocol's list of refused frames (shared, for logs and tests)."""
    self_mask_seed: bytearray
    """b_u, drawn in R0 so that the peer commits to it there; zeroed when the round ends."""

    @property
    def name(self) -> str:
        return self.settings.name

    def envelope(self, body: Message) -> Envelope:
        return envelope(self.session, self.round, self.name, body)

    def to_server(self, body: Message) -> Send:
        return Send(SERVER, self.envelope(body))

    def note(self, reason: str) -> None:
        """Record a frame this peer refused or ignored."""
        record_rejection(self.rejected, self.name, reason)


@dataclass(frozen=True)
class AuthenticatedFrame:
    """A peer-to-peer frame that authenticated under the pair's channel key."""

    sender: int
    name: str
    plaintext: bytes


class RoundContext:
    """The round as this peer accepted it from the roster, and what it learns on the way."""

    def __init__(self, input: RoundInput, roster: Roster, mode: RoundMode,
                 codec: PayloadCodec, encoder: Encoder, neighbours: tuple[int, ...]) -> None:
        self.input = input
        self.settings = input.settings
        self.roster = roster
        self.mode = mode
        self.codec = codec
        self.encoder = encoder
        self.index = roster.your_index
        self.neighbours = neighbours
        """N(u), this peer included (just this peer when the mode has no masks)."""
        self.neighbour_set = frozenset(neighbours)
        self.share_threshold = roster.share_threshold
        """Shares needed to rebuild a secret (t on the complete graph)."""
        self.active = roster.threat_model == "active"
        self.limits: Limits = round_limits(peers=roster.size, dim=roster.dim,
                                           modulus_bits=roster.modulus_bits,
                                           payload_bytes=codec.byte_length)
        self.contacts: dict[int, PeerEntry] = {}
        self.index_of: dict[str, int] = {}
        self.gone: set[int] = set()
        """Peers whose connection closed or that the server reported dropped."""
        self.shares: dict[int, tuple[shamir.Share, shamir.Share]] = {}
        """owner -> (share of b_owner, share of s_sk_owner) held by this peer."""
        self.clipped = 0
        """How many of this peer's coordinates its encoding clipped (set in R2)."""
        self._channel_private = load_private(input.channel_keys.private_bytes)
        self._channel_keys: dict[int, bytes] = {}
        self._seen: set[tuple[int, bytes]] = set()

    # ---------------------------------------------------------------- contacts

    def add_contacts(self, entries: Iterable[PeerEntry]) -> None:
        """Learn peers' entries (roster, tree relatives, a new root). All are checked
        before any is stored; under the active model, or when this peer pins identities,
        every new key must be signed by a (pinned) identity, or the server could
        substitute the identity keys that R3 signatures are checked against."""
        fresh: dict[int, PeerEntry] = {}
        names: dict[str, int] = {}
        for entry in entries:
            known = self.contacts.get(entry.index) or fresh.get(entry.index)
            if known is not None:
                if known != entry:
                    raise RemoteProtocolError(f"conflicting entries for peer {entry.index}",
                                              DropReason.INVALID_KEYS)
                continue
            owner = self.index_of.get(entry.name, names.get(entry.name))
            if owner is not None and owner != entry.index:
                raise RemoteProtocolError(f"duplicate peer name {entry.name!r}",
                                          DropReason.INVALID_KEYS)
            try:
                validate_public_key(entry.channel_key)
                validate_public_key(entry.mask_key)
            except CryptoError as exc:
                raise RemoteProtocolError(f"keys of {entry.name!r}: {exc}",
                                          DropReason.INVALID_KEYS) from None
            if self.active or self.settings.trusted_identities:
                self._verify_signed(entry)
            fresh[entry.index] = entry
            names[entry.name] = entry.index
        self.contacts.update(fresh)
        self.index_of.update(names)

    def _verify_signed(self, entry: PeerEntry) -> None:
        """The entry's keys are signed by its identity key, which is the pinned one when
        this peer pins identities: the pin list is closed, or a server could add peers of
        its own making (each signing its keys with a fresh identity of its own)."""
        pins = self.settings.trusted_identities
        if pins:
            pinned = pins.get(entry.name)
            if pinned is None:
                raise RemoteProtocolError(f"peer {entry.name!r} is not among this peer's "
                                          "trusted identities", DropReason.INVALID_KEYS)
            if pinned != entry.identity_key:
                raise RemoteProtocolError(f"identity key of {entry.name!r} does not match "
                                          "the pinned key", DropReason.INVALID_KEYS)
        try:
            verify(entry.identity_key, signed_keys_message(
                self.input.session, self.input.round, entry.name, entry.channel_key,
                entry.mask_key, entry.self_mask_commitment), entry.signature)
        except CryptoError as exc:
            raise RemoteProtocolError(f"keys of {entry.name!r} are not validly signed: {exc}",
                                      DropReason.INVALID_KEYS) from None

    def name_of(self, index: int) -> str | None:
        entry = self.contacts.get(index)
        return entry.name if entry is not None else None

    # ---------------------------------------------------------------- sealing

    def channel_key(self, index: int) -> bytes:
        """The pair's AEAD key, derived on first use: a root learns the entries of its
        whole subtree but exchanges frames with only a few of them. CryptoError if the
        other's key is unusable (a low-order point)."""
        key = self._channel_keys.get(index)
        if key is None:
            key = channel_key(self._channel_private, self.contacts[index].channel_key,
                              self.input.session, self.input.round)
            self._channel_keys[index] = key
        return key

    def seal_for(self, receiver: int, purpose: str, plaintext: bytes) -> bytes:
        return seal(self.channel_key(receiver), plaintext,
                    associated(self.input.session, self.input.round, purpose, self.index,
                               receiver), self.settings.random_bytes)

    def open(self, env: Envelope, ciphertext: bytes) -> AuthenticatedFrame:
        """Authenticate a peer-to-peer frame: its sender must be a known contact and the
        AEAD must open under the pair's key with this round, purpose and direction. A
        byte-identical second copy is a replay: it proves nothing about the connection
        it came on, so it is refused here, before anything could bind that connection."""
        sender = self.index_of.get(env.sender)
        if sender is None or sender == self.index:
            raise RemoteProtocolError(f"{env.type} from unknown peer {env.sender!r}",
                                      DropReason.NOT_ON_ROSTER)
        try:
            plaintext = open_sealed(self.channel_key(sender), ciphertext, associated(
                self.input.session, self.input.round, SEALED_PURPOSES[env.type], sender,
                self.index))
        except CryptoError as exc:
            raise RemoteProtocolError(f"{env.type} from {env.sender!r} does not authenticate "
                                      f"under the pair's channel key: {exc}",
                                      DropReason.AUTHENTICATION_FAILED) from None
        tag = (sender, ciphertext[-TAG_LENGTH:])
        if tag in self._seen:
            raise RemoteProtocolError(f"duplicate {SEALED_KINDS[env.type]} from "
                                      f"{env.sender!r}: a replay of a frame already received",
                                      DropReason.DUPLICATE_MESSAGE)
        self._seen.add(tag)
        return AuthenticatedFrame(sender, env.sender, plaintext)

    # ---------------------------------------------------------------- sending

    def to_server(self, body: Message) -> Send:
        return self.input.to_server(body)

    def to_peer(self, index: int, body: Message) -> Send:
        entry = self.contacts[index]
        return Send(entry.name, self.input.envelope(body), entry.address)

    @property
    def self_mask_seed(self) -> bytes:
        """b_u (all zero bytes once the round has ended)."""
        return bytes(self.input.self_mask_seed)

    def forget_secrets(self) -> None:
        """Nothing after the round needs the shares or the self-mask seed."""
        self.shares.clear()
        seed = self.input.self_mask_seed
        seed[:] = bytes(len(seed))
