"""PeerProtocol: one peer's side of a round, as a sans-I/O state machine.

The driver calls :meth:`PeerProtocol.start` with the peer's input, then feeds
every event to :meth:`PeerProtocol.handle` and carries out the returned actions.
Transitions are the table :data:`PEER_TRANSITIONS`; a message that is not listed
for the current state raises :class:`ProtocolError` before anything changes, so
the driver can drop the message (and the connection it came on) and go on.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from enum import StrEnum
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from secagg.crypto import shamir
from secagg.crypto.aead import open_sealed, seal
from secagg.crypto.keys import KeyPair, RandomBytes, generate_keypair, load_private
from secagg.crypto.prg import MaskGenerator
from secagg.crypto.signing import SigningKey, sign, verify
from secagg.errors import CryptoError, EncodingError, ProtocolError, WireError
from secagg.graph import NeighbourGraph, make_graph
from secagg.masking import masked_input, pair_seed
from secagg.paillier import FastEncryptor, load_public_key
from secagg.protocol.common import (
    MODES,
    PARTIAL_SUM,
    SHARE_KEYS,
    Encoder,
    Mode,
    associated,
    channel_key,
    check_envelope,
    check_round_shape,
    consistency_message,
    envelope,
    round_limits,
    signed_keys_message,
    slot_layout,
)
from secagg.protocol.events import (
    Action,
    CancelTimer,
    DeliveryFailed,
    Event,
    MessageReceived,
    PeerGone,
    PeerOutcome,
    RoundFinished,
    Send,
    SetTimer,
    TimerExpired,
)
from secagg.protocol.payload import CiphertextPayloads, Partial, Payload, Payloads, RingPayloads
from secagg.wire import (
    SERVER,
    AdvertiseKeys,
    AncestorsUnreachable,
    ConsistencyRequest,
    ConsistencySignature,
    EncryptedPartialSum,
    EncryptedShares,
    Envelope,
    Limits,
    MaskingStart,
    NewRoot,
    PeerDropped,
    PeerEntry,
    Refusal,
    Rejected,
    RootAbort,
    Roster,
    RoundOutcome,
    SharePair,
    ShareReport,
    UnmaskRequest,
    UnmaskShares,
    decode_record,
    encode_record,
)

log = logging.getLogger("secagg.peer")

SHARE_TIMER = "share_keys"
FORWARD_TIMER = "forward"
# A peer reports its shares a little before the server's phase deadline.
SHARE_REPORT_FRACTION = 0.75
# Early frames (a neighbour that got the roster first) are buffered, up to this many.
MAX_BUFFERED = 4096


class PeerState(StrEnum):
    IDLE = "idle"
    ADVERTISED = "advertised"  # keys sent, waiting for the roster
    SHARING = "sharing"  # shares sent, collecting the neighbours' shares
    REPORTED = "reported"  # share report sent, waiting for U2 and the tree
    MASKING = "masking"  # y_u computed; collecting children's partial sums
    FORWARDED = "forwarded"  # partial sum sent up (or held, waiting for a new root)
    SIGNED = "signed"  # R3 signature sent (active threat model)
    UNMASKED = "unmasked"  # unmasking shares sent, waiting for the outcome
    FINISHED = "finished"


_S = PeerState
_ANY_LIVE = (_S.ADVERTISED, _S.SHARING, _S.REPORTED, _S.MASKING, _S.FORWARDED, _S.SIGNED,
             _S.UNMASKED)

PEER_TRANSITIONS: dict[tuple[PeerState, str], str] = {
    (_S.ADVERTISED, Roster.TYPE): "_on_roster",
    (_S.ADVERTISED, EncryptedShares.TYPE): "_buffer",
    (_S.SHARING, EncryptedShares.TYPE): "_on_shares",
    (_S.REPORTED, EncryptedShares.TYPE): "_on_late_shares",
    (_S.REPORTED, MaskingStart.TYPE): "_on_masking_start",
    (_S.ADVERTISED, EncryptedPartialSum.TYPE): "_buffer",
    (_S.SHARING, EncryptedPartialSum.TYPE): "_buffer",
    (_S.REPORTED, EncryptedPartialSum.TYPE): "_buffer",
    (_S.MASKING, EncryptedPartialSum.TYPE): "_on_partial_sum",
    (_S.FORWARDED, EncryptedPartialSum.TYPE): "_on_late_partial_sum",
    (_S.MASKING, NewRoot.TYPE): "_on_new_root",
    (_S.FORWARDED, NewRoot.TYPE): "_on_new_root",
    (_S.FORWARDED, ConsistencyRequest.TYPE): "_on_consistency_request",
    (_S.FORWARDED, UnmaskRequest.TYPE): "_on_unmask_request",
    (_S.SIGNED, UnmaskRequest.TYPE): "_on_unmask_request",
    (_S.UNMASKED, UnmaskRequest.TYPE): "_on_unmask_followup",
    **{(state, PeerDropped.TYPE): "_on_peer_dropped" for state in _ANY_LIVE},
    **{(state, RoundOutcome.TYPE): "_on_outcome" for state in _ANY_LIVE},
    **{(state, Rejected.TYPE): "_on_rejected" for state in _ANY_LIVE},
}
"""(state, message type) -> handler. Anything else is a ProtocolError."""

SERVER_MESSAGES = frozenset({Roster.TYPE, MaskingStart.TYPE, NewRoot.TYPE, PeerDropped.TYPE,
                             ConsistencyRequest.TYPE, UnmaskRequest.TYPE, RoundOutcome.TYPE,
                             Rejected.TYPE})
PEER_MESSAGES = frozenset({EncryptedShares.TYPE, EncryptedPartialSum.TYPE})

GraphFactory = Callable[[str, int, int, bytes], NeighbourGraph]


class PeerProtocol:
    """One peer's participation in one round."""

    def __init__(
        self,
        name: str,
        *,
        address: str = "",
        random_bytes: RandomBytes = os.urandom,
        identity: SigningKey | None = None,
        trusted_identities: Mapping[str, bytes] | None = None,
        graph_factory: GraphFactory = make_graph,  # type: ignore[assignment]
        mask_generator: MaskGenerator | None = None,
        mode: Mode | None = None,
    ) -> None:
        if mode is not None and mode not in MODES:
            raise ValueError(f"mode must be one of {MODES} or None, not {mode!r}")
        self.name = name
        self.required_mode = mode
        """The only mode this peer takes part in (None: whatever the server runs)."""
        self.address = address
        self._random_bytes = random_bytes
        self._identity = identity
        self._trusted_identities = dict(trusted_identities or {})
        self._graph_factory = graph_factory
        self._generator = mask_generator
        self.state = PeerState.IDLE
        self.outcome: PeerOutcome | None = None
        self.rejected: list[str] = []
        """Reasons for every frame this peer refused (for logs and tests)."""

        self.session = b""
        self.round = 0
        self._vector: np.ndarray | None = None
        self._weight = 1.0
        self._channel_keys_pair: KeyPair | None = None
        self._channel_private: X25519PrivateKey | None = None
        self._mask_keys_pair: KeyPair | None = None
        self._buffered: list[Envelope] = []
        # Set from the roster.
        self.index = -1
        self._roster: Roster | None = None
        self._graph: NeighbourGraph | None = None
        self._encoder: Encoder | None = None
        self._payloads: Payloads | None = None
        self._contacts: dict[int, PeerEntry] = {}
        self._index_of: dict[str, int] = {}
        self._channel_keys: dict[int, bytes] = {}
        self._neighbours: tuple[int, ...] = ()
        self._self_mask_seed = b""
        self._gone: set[int] = set()
        self._held: dict[int, tuple[shamir.Share, shamir.Share]] = {}
        self._late_shares: set[int] = set()
        # Set from MaskingStart.
        self._survivors: frozenset[int] = frozenset()
        self._ancestors: list[int] = []
        self._dead_ancestors: set[int] = set()
        self._tree_children: dict[int, list[int]] = {}
        self._expected: set[int] = set()
        self._is_root = False
        self._sum: Payload | None = None
        self._contributors: set[int] = set()
        self._forwarded: set[int] = set()
        self._in_flight: dict[int, tuple[int, Partial]] = {}
        self._awaiting_new_root: list[Partial] = []
        self._signed_u3: tuple[int, ...] | None = None
        self._unmask_partition: tuple[frozenset[int], frozenset[int], int] = (
            frozenset(), frozenset(), 0)

    # ------------------------------------------------------------------ API

    def start(self, session: bytes, round: int, vector: np.ndarray,
              weight: float = 1.0) -> list[Action]:
        """Begin a round with this peer's input: generate keys and advertise them (R0)."""
        if self.state is not PeerState.IDLE:
            raise ProtocolError(f"peer {self.name!r} already started (state {self.state})")
        vector = np.asarray(vector, dtype=np.float64)
        if vector.ndim != 1:
            raise ValueError(f"input must be a 1-D vector, got shape {vector.shape}")
        self.session, self.round = session, round
        self._vector, self._weight = vector, float(weight)
        self._channel_keys_pair = generate_keypair(self._random_bytes)
        self._mask_keys_pair = generate_keypair(self._random_bytes)
        self._channel_private = load_private(self._channel_keys_pair.private_bytes)
        identity_key, signature = b"", b""
        if self._identity is not None:
            identity_key = self._identity.public_bytes
            signature = sign(self._identity, signed_keys_message(
                session, round, self.name, self._channel_keys_pair.public_bytes,
                self._mask_keys_pair.public_bytes))
        self.state = PeerState.ADVERTISED
        return [self._to_server(AdvertiseKeys(
            address=self.address, channel_key=self._channel_keys_pair.public_bytes,
            mask_key=self._mask_keys_pair.public_bytes, identity_key=identity_key,
            signature=signature))]

    def handle(self, event: Event) -> list[Action]:
        """Process one event; return the actions the driver must carry out."""
        if isinstance(event, MessageReceived):
            return self._receive(event.envelope)
        if self.state is PeerState.FINISHED:
            return []
        if isinstance(event, TimerExpired):
            return self._on_timer(event.name)
        if isinstance(event, PeerGone):
            return self._on_peer_gone(event.name)
        if isinstance(event, DeliveryFailed):
            return self._on_delivery_failed(event.recipient, event.envelope)
        raise TypeError(f"not a protocol event: {event!r}")

    def limits(self) -> Limits:
        """Decoding limits for frames addressed to this peer in the current round."""
        if self._roster is None:
            return Limits()
        layout = None
        if isinstance(self._payloads, CiphertextPayloads):
            layout = self._payloads.layout
        return round_limits(peers=self._roster.size, dim=self._roster.dim,
                            modulus_bits=self._roster.modulus_bits, layout=layout)

    @property
    def mode(self) -> str:
        """The round's mode, as announced in the roster ("" before it arrives)."""
        return self._roster.mode if self._roster is not None else ""

    @property
    def phase_timeout(self) -> float:
        """The round's phase timeout (0 before the roster arrives)."""
        return self._roster.phase_timeout if self._roster is not None else 0.0

    def name_of(self, index: int) -> str | None:
        entry = self._contacts.get(index)
        return entry.name if entry is not None else None

    @property
    def finished(self) -> bool:
        return self.state is PeerState.FINISHED

    # ------------------------------------------------------------ dispatch

    def _receive(self, env: Envelope) -> list[Action]:
        if env.type in SERVER_MESSAGES and env.sender != SERVER:
            raise ProtocolError(f"{env.type} may only come from the server, "
                                f"not from {env.sender!r}")
        if env.type in PEER_MESSAGES and env.sender == SERVER:
            raise ProtocolError(f"{env.type} must come from a peer")
        check_envelope(env, self.session, self.round)
        handler = PEER_TRANSITIONS.get((self.state, env.type))
        if handler is None:
            raise ProtocolError(f"peer {self.name!r} in state {self.state} cannot "
                                f"accept {env.type} from {env.sender!r}")
        result: list[Action] = getattr(self, handler)(env)
        return result

    def _buffer(self, env: Envelope) -> list[Action]:
        if len(self._buffered) >= MAX_BUFFERED:
            raise ProtocolError("too many early peer frames buffered")
        self._buffered.append(env)
        return []

    def _replay_buffered(self) -> list[Action]:
        actions: list[Action] = []
        pending, self._buffered = self._buffered, []
        for env in pending:
            try:
                actions += self._receive(env)
            except (ProtocolError, WireError, CryptoError) as exc:
                self._reject(env, exc)
        return actions

    def _reject(self, env: Envelope, exc: Exception) -> None:
        reason = f"{env.type} from {env.sender!r} rejected: {exc}"
        log.warning("%s: %s", self.name, reason)
        self.rejected.append(reason)

    def _note_rejected(self, env: Envelope, why: str) -> None:
        reason = f"{env.type} from {env.sender!r} ignored: {why}"
        log.info("%s: %s", self.name, reason)
        self.rejected.append(reason)

    # --------------------------------------------------------------- R1

    def _on_roster(self, env: Envelope) -> list[Action]:
        roster = env.body
        assert isinstance(roster, Roster)
        check_round_shape(roster.size, roster.threshold, roster.threat_model, roster.graph_kind,
                          roster.mode)
        if not 0 <= roster.your_index < roster.size:
            raise ProtocolError("roster index out of range")
        if self.required_mode is not None and roster.mode != self.required_mode:
            # A server must not talk a peer into a weaker mode than it agreed to.
            return self._abort(f"the round runs in {roster.mode} mode, this peer takes part "
                               f"only in {self.required_mode} mode")
        graph: NeighbourGraph | None = None
        if roster.mode == "paillier":
            # No masks, so no neighbourhood: the roster carries the peer's own entry.
            neighbours: tuple[int, ...] = (roster.your_index,)
        else:
            graph = self._graph_factory(roster.graph_kind, roster.size, roster.threshold,
                                        roster.graph_seed)
            if (graph.degree, graph.share_threshold) != (roster.degree,
                                                         roster.share_threshold):
                raise ProtocolError("roster graph parameters do not match the graph seed")
            neighbours = graph.neighbours(roster.your_index)
        entries = {entry.index: entry for entry in roster.neighbours}
        if sorted(entries) != list(neighbours) or len(entries) != len(roster.neighbours):
            raise ProtocolError("roster neighbour list does not match the neighbour graph")
        own = entries[roster.your_index]
        assert self._channel_keys_pair is not None and self._mask_keys_pair is not None
        if (own.name, own.channel_key, own.mask_key) != (
                self.name, self._channel_keys_pair.public_bytes,
                self._mask_keys_pair.public_bytes):
            raise ProtocolError("the roster does not carry this peer's own keys")
        try:
            encoder = Encoder.create(
                n=roster.size, dim=roster.dim, clip=roster.clip, scale=roster.scale,
                modulus_bits=roster.modulus_bits, weighted=roster.weighted,
                max_weight=roster.max_weight)
        except EncodingError as exc:
            return self._abort(f"unusable encoding parameters: {exc}")
        assert self._vector is not None
        wire_dim = self._vector.shape[0] + (1 if roster.weighted else 0)
        if wire_dim != roster.dim:
            return self._abort(f"input has {self._vector.shape[0]} coordinates but the round "
                               f"expects {roster.dim - (1 if roster.weighted else 0)}")
        try:
            payloads = self._payloads_for(roster, encoder)
        except (CryptoError, EncodingError) as exc:
            return self._abort(f"unusable Paillier parameters: {exc}")
        if roster.threat_model == "active":
            self._verify_entries(roster.neighbours)

        self._roster, self._graph, self._encoder = roster, graph, encoder
        self._payloads = payloads
        self.index = roster.your_index
        self._neighbours = neighbours
        self._add_contacts(roster.neighbours)
        if roster.mode == "paillier":
            # Nothing to share: wait for the tree (which the server sends right away).
            self.state = PeerState.REPORTED
            return self._replay_buffered()
        self.state = PeerState.SHARING
        return self._send_shares() + [
            SetTimer(SHARE_TIMER, roster.phase_timeout * SHARE_REPORT_FRACTION)
        ] + self._replay_buffered() + self._maybe_report()

    def _payloads_for(self, roster: Roster, encoder: Encoder) -> Payloads:
        if roster.mode == "masking":
            if roster.paillier_key:
                raise ProtocolError("a masking-mode roster carries a Paillier key")
            return RingPayloads(encoder.dtype)
        public_key = load_public_key(roster.paillier_key)
        layout = slot_layout(key_bits=public_key.n.bit_length(),
                             modulus_bits=roster.modulus_bits, peers=roster.size)
        return CiphertextPayloads(public_key, layout, layout.ciphertext_count(roster.dim))

    def _verify_entries(self, entries: list[PeerEntry]) -> None:
        """Under the active model, every key we use must be signed by a (pinned) identity.

        This covers tree contacts and new roots too, not only the roster: otherwise a
        server could substitute the identity keys that R3 signatures are checked against.
        """
        for entry in entries:
            pinned = self._trusted_identities.get(entry.name)
            if pinned is not None and pinned != entry.identity_key:
                raise ProtocolError(f"identity key of {entry.name!r} does not match the "
                                    "pinned key")
            try:
                verify(entry.identity_key, signed_keys_message(
                    self.session, self.round, entry.name, entry.channel_key, entry.mask_key),
                    entry.signature)
            except CryptoError as exc:
                raise ProtocolError(f"keys of {entry.name!r} are not validly signed: "
                                    f"{exc}") from None

    def _add_contacts(self, entries: list[PeerEntry]) -> None:
        if self._roster is not None and self._roster.threat_model == "active":
            self._verify_entries([e for e in entries if self._contacts.get(e.index) != e])
        for entry in entries:
            known = self._contacts.get(entry.index)
            if known is not None:
                if known != entry:
                    raise ProtocolError(f"conflicting entries for peer {entry.index}")
                continue
            if entry.name in self._index_of:
                raise ProtocolError(f"duplicate peer name {entry.name!r}")
            self._contacts[entry.index] = entry
            self._index_of[entry.name] = entry.index

    def _channel_key(self, index: int) -> bytes:
        """The pair's AEAD key, derived on first use: a root learns the entries of its
        whole subtree but exchanges frames with only a few of them."""
        key = self._channel_keys.get(index)
        if key is None:
            assert self._channel_private is not None
            key = channel_key(self._channel_private, self._contacts[index].channel_key,
                              self.session, self.round)
            self._channel_keys[index] = key
        return key

    def _send_shares(self) -> list[Action]:
        assert self._graph is not None and self._mask_keys_pair is not None
        self._self_mask_seed = self._random_bytes(32)
        points = [v + 1 for v in self._neighbours]
        threshold = self._graph.share_threshold
        b_shares = shamir.split(self._self_mask_seed, threshold=threshold, indices=points,
                                random_bytes=self._random_bytes)
        s_shares = shamir.split(self._mask_keys_pair.private_bytes, threshold=threshold,
                                indices=points, random_bytes=self._random_bytes)
        actions: list[Action] = []
        for neighbour, b_share, s_share in zip(self._neighbours, b_shares, s_shares,
                                               strict=True):
            if neighbour == self.index:
                self._held[self.index] = (b_share, s_share)
                continue
            plaintext = encode_record(SharePair(self_mask_share=b_share.to_bytes(),
                                                secret_key_share=s_share.to_bytes()))
            sealed = seal(self._channel_key(neighbour), plaintext,
                          associated(self.session, self.round, SHARE_KEYS, self.index,
                                     neighbour), self._random_bytes)
            actions.append(self._to_peer(neighbour, EncryptedShares(ciphertext=sealed)))
        return actions

    def _sender_index(self, env: Envelope) -> int:
        index = self._index_of.get(env.sender)
        if index is None or index == self.index:
            raise ProtocolError(f"{env.type} from unknown peer {env.sender!r}")
        return index

    def _on_shares(self, env: Envelope) -> list[Action]:
        self._store_shares(env)
        return self._maybe_report()

    def _on_late_shares(self, env: Envelope) -> list[Action]:
        # Already reported without them: the server counts only reported holders and
        # will never ask for these, so they are authenticated and then dropped.
        self._store_shares(env)
        sender = self._sender_index(env)
        self._late_shares.add(sender)
        del self._held[sender]
        return []

    def _store_shares(self, env: Envelope) -> None:
        sender = self._sender_index(env)
        if sender not in self._neighbours:
            raise ProtocolError(f"shares from {env.sender!r}, who is not a neighbour")
        if sender in self._held or sender in self._late_shares:
            raise ProtocolError(f"duplicate shares from {env.sender!r} (replay)")
        body = env.body
        assert isinstance(body, EncryptedShares)
        plaintext = open_sealed(self._channel_key(sender), body.ciphertext,
                                associated(self.session, self.round, SHARE_KEYS, sender,
                                           self.index))
        pair = decode_record(SharePair, plaintext)
        point = self.index + 1
        self._held[sender] = (shamir.Share.from_bytes(point, pair.self_mask_share),
                              shamir.Share.from_bytes(point, pair.secret_key_share))

    def _maybe_report(self) -> list[Action]:
        if self.state is not PeerState.SHARING:
            return []
        missing = [v for v in self._neighbours if v not in self._held and v not in self._gone]
        return [] if missing else self._report()

    def _report(self) -> list[Action]:
        self.state = PeerState.REPORTED
        missing = sorted(set(self._neighbours) - set(self._held))
        return [CancelTimer(SHARE_TIMER), self._to_server(ShareReport(missing_from=missing))]

    # --------------------------------------------------------------- R2

    def _on_masking_start(self, env: Envelope) -> list[Action]:
        start = env.body
        assert isinstance(start, MaskingStart)
        assert self._roster is not None and self._encoder is not None
        survivors = frozenset(start.survivors)
        if not survivors <= set(self._neighbours) or self.index not in survivors:
            raise ProtocolError("U2 announced to this peer is not a subset of its "
                                "neighbourhood, or omits the peer itself")
        if start.total_survivors < self._roster.threshold or (
                self._roster.graph_kind == "complete" and self._roster.mode != "paillier"
                and len(survivors) != start.total_survivors):
            return self._abort(f"U2 has {start.total_survivors} members, below the threshold "
                               f"{self._roster.threshold}, or is inconsistent")
        if len(start.descendants) != len(start.descendant_parents):
            raise ProtocolError("descendants and their parents are not aligned")
        self._add_contacts(start.contacts)
        tree_members = {*start.ancestors, *start.descendants}
        unknown = [p for p in tree_members if p not in self._contacts]
        if unknown:
            raise ProtocolError(f"no contact entry for tree relatives {unknown[:5]}")
        self._survivors = survivors
        self._ancestors = list(start.ancestors)
        self._is_root = not start.ancestors
        self._tree_children = {}
        for child, parent in zip(start.descendants, start.descendant_parents, strict=True):
            self._tree_children.setdefault(parent, []).append(child)
        self._expected = set(self._tree_children.get(self.index, []))
        for gone in self._gone & self._expected:
            self._expect_children_of(gone)

        self._sum = self._own_payload(survivors)
        self._contributors = {self.index}
        self.state = PeerState.MASKING
        return [SetTimer(FORWARD_TIMER, start.forward_after)] + self._replay_buffered() + \
            self._maybe_forward()

    def _own_payload(self, survivors: frozenset[int]) -> Payload:
        """This peer's contribution: y_u (masking), Enc(q(x_u)) (paillier) or Enc(y_u)."""
        assert self._vector is not None and self._encoder is not None
        assert self._roster is not None and self._mask_keys_pair is not None
        rng = np.random.default_rng(np.frombuffer(self._random_bytes(32), dtype=np.uint32))
        encoded = self._encoder.encode(self._vector, self._weight, rng)
        if self._roster.mode == "paillier":
            return self._encrypt(encoded)
        own_private = load_private(self._mask_keys_pair.private_bytes)
        pair_seeds = [(v, pair_seed(own_private, self._contacts[v].mask_key))
                      for v in sorted(survivors) if v != self.index]
        generator = self._generator
        if generator is None or generator.length != encoded.shape[0]:
            generator = MaskGenerator(encoded.shape[0], encoded.dtype)
        masked = masked_input(encoded, owner=self.index, self_seed=self._self_mask_seed,
                              pair_seeds=pair_seeds, session=self.session, round=self.round,
                              generator=generator)
        return masked if self._roster.mode == "masking" else self._encrypt(masked)

    def _encrypt(self, values: np.ndarray) -> list[int]:
        assert isinstance(self._payloads, CiphertextPayloads)
        encryptor = FastEncryptor(self._payloads.public_key, random_bytes=self._random_bytes)
        return encryptor.encrypt_vector(values, self._payloads.layout)

    def _expect_children_of(self, gone: int) -> None:
        # The gone peer's children re-route their sums to us, the nearest live ancestor.
        for child in self._tree_children.get(gone, []):
            self._expected.add(child)
            if child in self._gone:
                self._expect_children_of(child)

    def _open_partial_sum(self, env: Envelope) -> Partial | None:
        """Authenticate and validate a partial sum; None for a harmless duplicate."""
        sender = self._sender_index(env)
        body = env.body
        assert isinstance(body, EncryptedPartialSum) and self._payloads is not None
        plaintext = open_sealed(self._channel_key(sender), body.ciphertext,
                                associated(self.session, self.round, PARTIAL_SUM, sender,
                                           self.index))
        try:
            partial = self._payloads.decode_partial(plaintext, self.limits())
        except ProtocolError as exc:
            raise ProtocolError(f"partial sum from {env.sender!r}: {exc}") from None
        members = set(partial.contributors)
        if not members or len(members) != len(partial.contributors):
            raise ProtocolError(f"partial sum from {env.sender!r} has an empty or repeated "
                                "contributor set")
        overlap = members & (self._contributors | self._forwarded)
        if overlap:
            # A re-sent copy (its sender saw an ancestor die) of a sum that already
            # reached us inside a larger one: counting it again would double it.
            self._note_rejected(env, f"overlaps contributors already counted: "
                                     f"{sorted(overlap)[:5]}")
            return None
        return partial

    def _on_partial_sum(self, env: Envelope) -> list[Action]:
        partial = self._open_partial_sum(env)
        if partial is None:
            return []
        assert self._sum is not None and self._payloads is not None
        self._sum = self._payloads.add(self._sum, partial.payload)
        self._contributors |= set(partial.contributors)
        return self._maybe_forward()

    def _on_late_partial_sum(self, env: Envelope) -> list[Action]:
        if self._is_root:
            # Authenticated but too late: the aggregate is released, its contributors
            # fixed. The sender's input counts as dropped.
            self._sender_index(env)
            self._note_rejected(env, "arrived after the root released the aggregate")
            return []
        partial = self._open_partial_sum(env)
        if partial is None:
            return []
        # Pass it on unchanged: our own sum already left, and a sum with several
        # contributors keeps the same privacy upstream.
        self._forwarded |= set(partial.contributors)
        return self._send_up(partial)

    def _maybe_forward(self) -> list[Action]:
        if self.state is not PeerState.MASKING:
            return []
        pending = self._expected - self._contributors - self._gone
        return [] if pending else self._forward()

    def _forward(self) -> list[Action]:
        assert self._sum is not None and self._roster is not None
        assert self._payloads is not None
        self.state = PeerState.FORWARDED
        actions: list[Action] = [CancelTimer(FORWARD_TIMER)]
        partial = Partial(self._sum, tuple(sorted(self._contributors)))
        self._forwarded |= self._contributors
        if self._is_root:
            if len(partial.contributors) >= self._roster.threshold:
                return actions + [self._to_server(self._payloads.root_message(partial))]
            return actions + [self._to_server(RootAbort(
                contributor_count=len(partial.contributors)))]
        return actions + self._send_up(partial)

    def _send_up(self, partial: Partial) -> list[Action]:
        target = next((a for a in self._ancestors
                       if a not in self._dead_ancestors and a not in self._gone), None)
        if target is None:
            already_reported = bool(self._awaiting_new_root)
            self._awaiting_new_root.append(partial)
            if already_reported or self._is_root:
                return []  # the server already knows; the NewRoot answer covers this sum
            return [self._to_server(AncestorsUnreachable(tried=list(self._ancestors)))]
        assert self._payloads is not None
        sealed = seal(self._channel_key(target), self._payloads.encode_partial(partial),
                      associated(self.session, self.round, PARTIAL_SUM, self.index, target),
                      self._random_bytes)
        body = EncryptedPartialSum(ciphertext=sealed)
        self._in_flight[id(body)] = (target, partial)
        return [self._to_peer(target, body)]

    def _on_new_root(self, env: Envelope) -> list[Action]:
        new_root = env.body
        assert isinstance(new_root, NewRoot)
        self._add_contacts([new_root.root, *new_root.contacts])
        if new_root.root.index == self.index:
            # We become the root: our undelivered sums are the start of the aggregate.
            self._is_root = True
            self._ancestors = []
            held, self._awaiting_new_root = self._awaiting_new_root, []
            assert self._sum is not None and self._payloads is not None
            # The sum we sent up may still be held for a re-send: add into a copy.
            self._sum = self._payloads.copy(self._sum)
            for partial in held:
                members = set(partial.contributors)
                if members.isdisjoint(self._contributors):  # our own sum is counted already
                    self._sum = self._payloads.add(self._sum, partial.payload)
                    self._contributors |= members
            self._forwarded -= self._contributors
            self._expected = set(new_root.expected)
            self.state = PeerState.MASKING
            return [SetTimer(FORWARD_TIMER, new_root.forward_after)] + self._maybe_forward()
        self._ancestors = [new_root.root.index]
        self._dead_ancestors.discard(new_root.root.index)
        held, self._awaiting_new_root = self._awaiting_new_root, []
        actions: list[Action] = []
        for partial in held:
            actions += self._send_up(partial)
        return actions

    # --------------------------------------------------------------- R3, R4

    def _on_consistency_request(self, env: Envelope) -> list[Action]:
        request = env.body
        assert isinstance(request, ConsistencyRequest)
        refusal = self._check_contributors(request.contributors, len(request.contributors))
        if refusal:
            return self._refuse(refusal)
        if self._identity is None:
            return self._refuse("the round runs under the active threat model but this peer "
                                "has no identity key")
        self._signed_u3 = tuple(sorted(request.contributors))
        signature = sign(self._identity, consistency_message(self.session, self.round,
                                                             self._signed_u3))
        self.state = PeerState.SIGNED
        return [self._to_server(ConsistencySignature(signature=signature))]

    def _check_contributors(self, contributors: list[int], total: int) -> str:
        assert self._roster is not None
        u3 = set(contributors)
        if len(u3) != len(contributors):
            return "U3 lists a peer twice"
        if self.index not in u3:
            return "asked to unmask although this peer is not in U3"
        if total < self._roster.threshold or len(u3) > total:
            return (f"U3 has {total} members, below the threshold {self._roster.threshold}; "
                    "revealing shares could expose an input")
        if self._roster.graph_kind == "complete" and len(u3) != total:
            return "U3 count disagrees with the list on the complete graph"
        local = u3 & set(self._neighbours)
        if not local <= self._survivors:
            return "U3 contains neighbours that were not in U2"
        return ""

    def _on_unmask_request(self, env: Envelope) -> list[Action]:
        request = env.body
        assert isinstance(request, UnmaskRequest) and self._roster is not None
        refusal = self._check_contributors(request.contributors, request.total_contributors)
        if refusal:
            return self._refuse(refusal)
        all_contributors = set(request.contributors)
        dropped = set(request.dropped)
        both = all_contributors & dropped
        if both:
            return self._refuse(f"asked for both the self-mask and the secret-key share of "
                                f"peer(s) {sorted(both)[:5]}: that would reveal an input")
        if len(dropped) != len(request.dropped):
            return self._refuse("the dropped set lists a peer twice")
        contributors = all_contributors & set(self._neighbours)
        if contributors | dropped != self._survivors:
            return self._refuse("U3 and U2 \\ U3 do not partition the U2 this peer was shown")
        if self._roster.threat_model == "active":
            refusal = self._check_signatures(request)
            if refusal:
                return self._refuse(refusal)
        self._unmask_partition = (frozenset(contributors), frozenset(dropped),
                                  request.total_contributors)
        self.state = PeerState.UNMASKED
        return self._send_unmask_shares(request)

    def _on_unmask_followup(self, env: Envelope) -> list[Action]:
        request = env.body
        assert isinstance(request, UnmaskRequest)
        contributors = set(request.contributors) & set(self._neighbours)
        partition = (frozenset(contributors), frozenset(request.dropped),
                     request.total_contributors)
        if partition != self._unmask_partition:
            return self._refuse("a follow-up unmask request changes U3 or the dropped set")
        return self._send_unmask_shares(request)

    def _send_unmask_shares(self, request: UnmaskRequest) -> list[Action]:
        """Answer with the wanted shares; each must belong to the checked partition."""
        contributors, dropped, _ = self._unmask_partition
        wanted_b = set(request.self_mask_wanted)
        wanted_s = set(request.secret_key_wanted)
        if not wanted_b <= contributors or not wanted_s <= dropped:
            return self._refuse("the server wants shares outside the announced partition")
        missing = sorted((wanted_b | wanted_s) - set(self._held))
        if missing:
            return self._refuse(f"asked for shares this peer never reported holding: "
                                f"{missing[:5]}")
        return [self._to_server(UnmaskShares(
            self_mask_shares=b"".join(self._held[u][0].to_bytes() for u in sorted(wanted_b)),
            secret_key_shares=b"".join(self._held[u][1].to_bytes() for u in sorted(wanted_s))))]

    def _check_signatures(self, request: UnmaskRequest) -> str:
        assert self._graph is not None and self._roster is not None
        if self._signed_u3 is None or tuple(sorted(request.contributors)) != self._signed_u3:
            return "U3 in the unmask request differs from the U3 this peer signed"
        message = consistency_message(self.session, self.round, self._signed_u3)
        valid: set[int] = set()
        for signed in request.signatures:
            entry = self._contacts.get(signed.index)
            if entry is None or signed.index not in self._signed_u3:
                continue
            try:
                verify(entry.identity_key, message, signed.signature)
            except CryptoError:
                return f"invalid consistency signature from peer {signed.index}"
            valid.add(signed.index)
        needed = (self._roster.threshold if self._roster.graph_kind == "complete"
                  else self._graph.share_threshold)
        if len(valid) < needed:
            return f"only {len(valid)} valid consistency signatures, {needed} required"
        return ""

    # ------------------------------------------------------------ endings

    def _on_outcome(self, env: Envelope) -> list[Action]:
        outcome = env.body
        assert isinstance(outcome, RoundOutcome)
        return self._finish(PeerOutcome(status=outcome.status, round=self.round,
                                        contributors=tuple(outcome.contributors),
                                        contributor_count=outcome.contributor_count,
                                        included=outcome.included,
                                        reason=outcome.reason))

    def _on_rejected(self, env: Envelope) -> list[Action]:
        assert isinstance(env.body, Rejected)
        return self._finish(PeerOutcome(status="rejected", round=self.round,
                                        reason=env.body.reason))

    def _refuse(self, reason: str) -> list[Action]:
        log.warning("%s refuses: %s", self.name, reason)
        return [self._to_server(Refusal(reason=reason))] + self._abort(reason)

    def _abort(self, reason: str) -> list[Action]:
        return self._finish(PeerOutcome(status="aborted", round=self.round, reason=reason))

    def _finish(self, outcome: PeerOutcome) -> list[Action]:
        self.state = PeerState.FINISHED
        self.outcome = outcome
        # Forget the secrets: nothing after the round needs them.
        self._held.clear()
        self._self_mask_seed = b""
        return [CancelTimer(SHARE_TIMER), CancelTimer(FORWARD_TIMER), RoundFinished(outcome)]

    # ------------------------------------------------------- non-messages

    def _on_timer(self, name: str) -> list[Action]:
        if name == SHARE_TIMER and self.state is PeerState.SHARING:
            return self._report()
        if name == FORWARD_TIMER and self.state is PeerState.MASKING:
            pending = sorted(self._expected - self._contributors - self._gone)
            log.info("%s: forward deadline; still missing %d expected sums %s", self.name,
                     len(pending), pending[:8])
            return self._forward()
        return []

    def _on_peer_dropped(self, env: Envelope) -> list[Action]:
        body = env.body
        assert isinstance(body, PeerDropped)
        entry = self._contacts.get(body.peer)
        return self._on_peer_gone(entry.name) if entry is not None else []

    def _on_peer_gone(self, name: str) -> list[Action]:
        if name == SERVER:
            return self._abort("lost the connection to the server")
        index = self._index_of.get(name)
        if index is None:
            return []
        self._gone.add(index)
        if self.state is PeerState.SHARING:
            return self._maybe_report()
        if self.state in (PeerState.MASKING, PeerState.FORWARDED):
            if index in self._expected:
                self._expect_children_of(index)
            # An ancestor that died may have died holding our sum: send it again to
            # the nearest live ancestor. If the sum had already gone further up, that
            # ancestor rejects the overlapping copy, so nothing is counted twice.
            actions: list[Action] = []
            for key, (target, partial) in list(self._in_flight.items()):
                if target == index:
                    del self._in_flight[key]
                    self._dead_ancestors.add(index)
                    actions += self._send_up(partial)
            return actions + self._maybe_forward()
        return []

    def _on_delivery_failed(self, recipient: str, env: Envelope) -> list[Action]:
        index = self._index_of.get(recipient)
        if index is not None:
            self._gone.add(index)
        if recipient == SERVER:
            return self._abort("cannot reach the server")
        flight = self._in_flight.pop(id(env.body), None)
        if flight is None:
            # e.g. shares for a neighbour that vanished: it simply won't count, and
            # we no longer wait for its shares either.
            return self._maybe_report()
        target, partial = flight
        self._dead_ancestors.add(target)
        return self._send_up(partial)

    # ------------------------------------------------------------ helpers

    def _to_server(self, body: Any) -> Send:
        return Send(SERVER, envelope(self.session, self.round, self.name, body))

    def _to_peer(self, index: int, body: Any) -> Send:
        entry = self._contacts[index]
        return Send(entry.name, envelope(self.session, self.round, self.name, body),
                    entry.address)
