"""ServerProtocol: the coordinator's side of a round, as a sans-I/O state machine.

The server never sees an individual masked input: peers sum their inputs along
the accumulation tree and the root sends one combined vector, only with at least
t contributors. The server then collects Shamir shares (of b_u for every
contributor, of s_sk_u for every peer of U2 that did not contribute, never both
for one peer), removes the masks and decodes the sum.

Transitions are the table :data:`SERVER_TRANSITIONS`. :meth:`ServerProtocol.handle`
raises :class:`ProtocolError` for an unlisted message before changing anything;
the driver then calls :meth:`ServerProtocol.reject`, which drops the sender with
reason ``bad_message`` and lets the round go on for everyone else.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np

from secagg.crypto import shamir
from secagg.crypto.keys import RandomBytes, agree, load_private, public_from_private
from secagg.crypto.prg import MaskGenerator
from secagg.crypto.signing import verify
from secagg.errors import CryptoError, EncodingError, ProtocolError
from secagg.graph import (
    AccumulationTree,
    GraphKind,
    NeighbourGraph,
    build_tree,
    check_threshold,
    make_graph,
)
from secagg.masking import remove_pair_mask, remove_self_mask
from secagg.paillier import (
    DEFAULT_KEY_BITS,
    KEY_BITS,
    PaillierKeyPair,
    SlotLayout,
    ciphertexts_from_bytes,
    decrypt_vector,
    generate_keypair,
    public_key_bytes,
)
from secagg.protocol.common import (
    GRAPH_KINDS,
    THREAT_MODELS,
    Encoder,
    Mode,
    ThreatModel,
    check_envelope,
    check_mode,
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
    Disconnect,
    DropReason,
    Event,
    MessageReceived,
    PeerGone,
    RoundFinished,
    Send,
    ServerOutcome,
    SetTimer,
    TimerExpired,
)
from secagg.wire import (
    OUTCOME_LIST_LIMIT,
    SERVER,
    SESSION_BYTES,
    AdvertiseKeys,
    AncestorsUnreachable,
    ConsistencyRequest,
    ConsistencySignature,
    Envelope,
    Limits,
    MaskingStart,
    Message,
    NewRoot,
    PaillierRootAggregate,
    PeerDropped,
    PeerEntry,
    Refusal,
    Rejected,
    RootAbort,
    RootAggregate,
    Roster,
    RoundOutcome,
    ShareReport,
    SignedIndex,
    UnmaskRequest,
    UnmaskShares,
    message_types,
)

log = logging.getLogger("secagg.server")

PHASE_TIMER = "phase"


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
    """Size of the round's Paillier modulus (paillier and hybrid modes)."""

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
        return self.dim + (1 if self.weighted else 0)

    def slot_layout(self) -> SlotLayout | None:
        """How ciphertexts pack the ring elements (None in the masking mode)."""
        if self.mode == "masking":
            return None
        return slot_layout(key_bits=self.paillier_key_bits, modulus_bits=self.modulus_bits,
                           peers=self.min_peers)


class ServerState(StrEnum):
    IDLE = "idle"
    COLLECTING_KEYS = "collecting_keys"  # R0
    SHARING = "sharing"  # R1
    MASKING = "masking"  # R2
    CONSISTENCY = "consistency"  # R3 (active only)
    UNMASKING = "unmasking"  # R4
    FINISHED = "finished"


_S = ServerState
_AFTER_R0 = (_S.SHARING, _S.MASKING, _S.CONSISTENCY, _S.UNMASKING, _S.FINISHED)

SERVER_TRANSITIONS: dict[tuple[ServerState, str], str] = {
    # After the round, stragglers' messages are logged and ignored.
    **{(_S.FINISHED, name): "_on_late" for name in message_types()},
    (_S.COLLECTING_KEYS, AdvertiseKeys.TYPE): "_on_advertise",
    **{(state, AdvertiseKeys.TYPE): "_on_late_registration" for state in _AFTER_R0},
    (_S.SHARING, ShareReport.TYPE): "_on_share_report",
    (_S.MASKING, RootAggregate.TYPE): "_on_root_aggregate",
    (_S.MASKING, PaillierRootAggregate.TYPE): "_on_paillier_aggregate",
    (_S.MASKING, RootAbort.TYPE): "_on_root_abort",
    (_S.MASKING, AncestorsUnreachable.TYPE): "_on_ancestors_unreachable",
    (_S.CONSISTENCY, ConsistencySignature.TYPE): "_on_signature",
    (_S.UNMASKING, UnmaskShares.TYPE): "_on_unmask_shares",
    **{(state, ShareReport.TYPE): "_on_late" for state in _AFTER_R0 if state != _S.SHARING},
    **{(state, AncestorsUnreachable.TYPE): "_on_late"
       for state in (_S.CONSISTENCY, _S.UNMASKING, _S.FINISHED)},
    **{(state, RootAbort.TYPE): "_on_late"
       for state in (_S.CONSISTENCY, _S.UNMASKING, _S.FINISHED)},
    (_S.MASKING, Refusal.TYPE): "_on_refusal",
    (_S.CONSISTENCY, Refusal.TYPE): "_on_refusal",
    (_S.UNMASKING, Refusal.TYPE): "_on_refusal",
}
"""(state, message type) -> handler. Anything else is a ProtocolError."""

GONE_REASON: dict[ServerState, DropReason] = {
    _S.SHARING: DropReason.NO_SHARE_REPORT,
    _S.MASKING: DropReason.NO_MASKED_INPUT,
    _S.CONSISTENCY: DropReason.SIGNATURE_MISSING,
    _S.UNMASKING: DropReason.UNMASK_SHARE_MISSING,
}
"""Why a peer that vanished in a phase is dropped, when the round aborts there."""


class ServerProtocol:
    """The coordinator of one round."""

    def __init__(self, config: ServerConfig, *, random_bytes: RandomBytes = os.urandom,
                 record_view: bool = False, paillier_keys: PaillierKeyPair | None = None) -> None:
        """``paillier_keys`` is the round's key pair in the paillier and hybrid modes;
        a fresh one of ``config.paillier_key_bits`` is generated if it is not given."""
        self.config = config
        self.encoder = config.encoder()  # fails early if the encoding cannot fit
        # Checked now, for min_peers; fixed for the roster's n when registration closes.
        self.slot_layout = config.slot_layout()
        self._paillier_keys: PaillierKeyPair | None = None
        if self.slot_layout is not None:
            self._paillier_keys = paillier_keys or generate_keypair(config.paillier_key_bits)
            if self._paillier_keys.key_bits != config.paillier_key_bits:
                raise ValueError(f"the Paillier key has {self._paillier_keys.key_bits} bits, "
                                 f"the config says {config.paillier_key_bits}")
        self._random_bytes = random_bytes
        self.state = ServerState.IDLE
        self.outcome: ServerOutcome | None = None
        self.record_view = record_view
        self.view: list[Envelope] = []
        """With ``record_view``: every message this server accepted, for privacy checks."""
        self.shares_received: list[tuple[str, int, int]] = []
        """With ``record_view``: (kind, owner, holder) of every unmasking share received."""

        self._registered: dict[str, AdvertiseKeys] = {}
        self.names: list[str] = []
        self._index: dict[str, int] = {}
        self._entries: list[PeerEntry] = []
        self._graph: NeighbourGraph | None = None
        self._tree: AccumulationTree | None = None
        self._gone: set[int] = set()
        self.dropped: dict[str, DropReason] = {}
        self.drop_details: dict[str, str] = {}
        self._reports: dict[int, frozenset[int]] = {}
        self._holders: dict[int, set[int]] = {}
        self.u2: frozenset[int] = frozenset()
        self.u3: frozenset[int] = frozenset()
        self.u4: frozenset[int] = frozenset()
        self._root = -1
        self._pointed_to: dict[int, int] = {}
        self._aggregate: np.ndarray | None = None
        self._signatures: dict[int, bytes] = {}
        self._told_outcome: set[int] = set()
        self._partition: dict[int, tuple[frozenset[int], frozenset[int]]] = {}
        self._requested: dict[tuple[int, int], set[int]] = {}
        self._pending: dict[int, tuple[set[int], set[int]]] = {}
        self._awaiting_answer: set[int] = set()
        self._answered: set[int] = set()
        self._b_shares: dict[int, list[shamir.Share]] = {}
        self._s_shares: dict[int, list[shamir.Share]] = {}
        self.stats: dict[str, Any] = {}

    # ------------------------------------------------------------------ API

    def start(self) -> list[Action]:
        """Open registration (R0)."""
        if self.state is not ServerState.IDLE:
            raise ProtocolError("round already started")
        self.state = ServerState.COLLECTING_KEYS
        return [SetTimer(PHASE_TIMER, self.config.phase_timeout)]

    def handle(self, event: Event) -> list[Action]:
        if isinstance(event, MessageReceived):
            return self._receive(event.envelope)
        if self.state is ServerState.FINISHED:
            return []
        if isinstance(event, TimerExpired):
            return self._close_phase() if event.name == PHASE_TIMER else []
        if isinstance(event, PeerGone):
            return self._on_peer_gone(event.name)
        if isinstance(event, DeliveryFailed):
            return self._on_peer_gone(event.recipient)
        raise TypeError(f"not a protocol event: {event!r}")

    def reject(self, name: str, reason: str) -> list[Action]:
        """Drop ``name`` for sending a bad frame; the round goes on without it."""
        log.warning("dropping %r: %s", name, reason)
        actions: list[Action] = [Disconnect(name, reason)]
        if name not in self._index and name not in self._registered:
            return actions
        if self.state is ServerState.COLLECTING_KEYS:
            self._registered.pop(name, None)
            return actions
        self.dropped.setdefault(name, DropReason.BAD_MESSAGE)
        self.drop_details.setdefault(name, reason)
        if self.state is ServerState.FINISHED:
            return actions
        return actions + self._on_peer_gone(name)

    def limits(self) -> Limits:
        """Decoding limits for frames arriving at this server."""
        return round_limits(peers=self.config.min_peers, dim=self.config.wire_dim,
                            modulus_bits=self.config.modulus_bits, layout=self.slot_layout)

    @property
    def finished(self) -> bool:
        return self.state is ServerState.FINISHED

    # ------------------------------------------------------------ dispatch

    def _receive(self, env: Envelope) -> list[Action]:
        check_envelope(env, self.config.session, self.config.round)
        if env.sender == SERVER:
            raise ProtocolError("a peer may not claim to be the server")
        handler = SERVER_TRANSITIONS.get((self.state, env.type))
        if handler is None:
            raise ProtocolError(f"server in state {self.state} cannot accept {env.type} "
                                f"from {env.sender!r}")
        if env.type != AdvertiseKeys.TYPE:
            if env.sender not in self._index:
                raise ProtocolError(f"{env.type} from {env.sender!r}, who is not on the roster")
            if self._index[env.sender] in self._gone:
                raise ProtocolError(f"{env.type} from {env.sender!r}, already dropped")
        actions: list[Action] = getattr(self, handler)(env)
        if self.record_view:
            self.view.append(env)
        return actions

    # --------------------------------------------------------------- R0

    def _on_advertise(self, env: Envelope) -> list[Action]:
        keys = env.body
        assert isinstance(keys, AdvertiseKeys)
        if env.sender in self._registered:
            raise ProtocolError(f"duplicate registration for peer id {env.sender!r}")
        if self.config.threat_model == "active":
            try:
                verify(keys.identity_key, signed_keys_message(
                    env.session, env.round, env.sender, keys.channel_key, keys.mask_key),
                    keys.signature)
            except CryptoError as exc:
                raise ProtocolError(f"keys of {env.sender!r} are not validly signed: "
                                    f"{exc}") from None
        if keys.channel_key == keys.mask_key:
            raise ProtocolError(f"{env.sender!r} advertised the same key twice")
        self._registered[env.sender] = keys
        if len(self._registered) >= self.config.min_peers:
            return self._close_registration()
        return []

    def _on_late(self, env: Envelope) -> list[Action]:
        # A message of an earlier phase that crossed the phase change: harmless.
        log.info("ignoring late %s from %r", env.type, env.sender)
        return []

    def _on_late_registration(self, env: Envelope) -> list[Action]:
        reason = "registration for this round is closed"
        if env.sender in self._index:
            reason = f"peer id {env.sender!r} is already registered in this round"
        return [self._send_name(env.sender, Rejected(reason=reason))]

    def _close_registration(self) -> list[Action]:
        count = len(self._registered)
        if count < self.config.threshold:
            self.names = sorted(self._registered)  # so that they are told the outcome
            return self._abort(f"only {count} peers registered, threshold is "
                               f"{self.config.threshold}")
        self.names = sorted(self._registered)
        self._index = {name: i for i, name in enumerate(self.names)}
        n = len(self.names)
        self._entries = [PeerEntry(index=i, name=name, address=keys.address,
                                   channel_key=keys.channel_key, mask_key=keys.mask_key,
                                   identity_key=keys.identity_key, signature=keys.signature)
                         for i, (name, keys) in
                         enumerate((name, self._registered[name]) for name in self.names)]
        graph_seed = self._random_bytes(32)
        self._graph = make_graph(self.config.graph, n, self.config.threshold, graph_seed)
        self.stats.update(registered=n, mode=self.config.mode, graph=self.config.graph,
                          degree=self._graph.degree, share_threshold=self._graph.share_threshold)
        self.state = ServerState.SHARING
        q = self.encoder.quantizer
        mode = self.config.mode
        paillier_key = b""
        if self._paillier_keys is not None:
            paillier_key = public_key_bytes(self._paillier_keys.public)
            # Peers size their slots for the roster's n, which may be below min_peers
            # when registration closed on its deadline: pack and unpack alike.
            self.slot_layout = slot_layout(key_bits=self.config.paillier_key_bits,
                                           modulus_bits=q.modulus_bits, peers=n)
        actions: list[Action] = [SetTimer(PHASE_TIMER, self.config.phase_timeout)]
        for u in range(n):
            # In paillier mode nobody needs anyone's keys until the tree is known.
            neighbours = [u] if mode == "paillier" else self._graph.neighbours(u)
            actions.append(self._send(u, Roster(
                your_index=u, size=n, threshold=self.config.threshold,
                dim=self.config.wire_dim, modulus_bits=q.modulus_bits,
                clip=self.config.clip, scale=q.scale, weighted=self.config.weighted,
                max_weight=self.config.max_weight, threat_model=self.config.threat_model,
                graph_kind=self._graph.kind, graph_seed=graph_seed,
                degree=self._graph.degree, share_threshold=self._graph.share_threshold,
                fan_in=self.config.fan_in, phase_timeout=self.config.phase_timeout,
                neighbours=[self._entries[v] for v in neighbours], mode=mode,
                paillier_key=paillier_key)))
        if mode == "paillier":
            # No secrets to share, so no R1: everyone registered goes up the tree.
            self.u2 = frozenset(range(n))
            self.stats["u2"] = n
            return actions + self._start_masking()
        return actions

    # --------------------------------------------------------------- R1

    def _on_share_report(self, env: Envelope) -> list[Action]:
        report = env.body
        assert isinstance(report, ShareReport) and self._graph is not None
        u = self._index[env.sender]
        if u in self._reports:
            raise ProtocolError(f"duplicate share report from {env.sender!r}")
        missing = frozenset(report.missing_from)
        neighbourhood = frozenset(self._graph.neighbours(u))
        if len(missing) != len(report.missing_from):
            raise ProtocolError("share report lists a peer twice")
        if not missing <= neighbourhood or u in missing:
            raise ProtocolError("share report names peers outside the neighbourhood")
        self._reports[u] = neighbourhood - missing
        return self._close_phase() if self._phase_complete() else []

    def _close_sharing(self) -> list[Action]:
        assert self._graph is not None
        n = len(self.names)
        self._holders = {u: set() for u in range(n)}
        for holder, senders in self._reports.items():
            for u in senders:
                self._holders[u].add(holder)
        survivors = set()
        for u in range(n):
            if u not in self._reports:
                self._drop(u, DropReason.NO_SHARE_REPORT)
            elif len(self._holders[u]) < self._graph.share_threshold:
                self._drop(u, DropReason.SHARE_DELIVERY_FAILED,
                           f"shares reached {len(self._holders[u])} neighbours, "
                           f"{self._graph.share_threshold} needed")
            else:
                survivors.add(u)
        self.u2 = frozenset(survivors)
        self.stats["u2"] = len(self.u2)
        if len(self.u2) < self.config.threshold:
            return self._abort(f"U2 has {len(self.u2)} peers, below the threshold "
                               f"{self.config.threshold}")
        return self._start_masking()

    # --------------------------------------------------------------- R2

    def _start_masking(self) -> list[Action]:
        assert self._graph is not None
        tree_seed = self._random_bytes(32)
        # Route only through peers still connected: a dead relay would make its
        # children wait for a deadline to learn what we already know.
        alive = [u for u in sorted(self.u2) if u not in self._gone]
        if not alive:
            return self._abort("every member of U2 is gone")
        listening = [u for u in alive if self._entries[u].address]
        unreachable = [u for u in alive if not self._entries[u].address]
        if unreachable and listening:
            # Peers without a listener go last in the heap order: they are leaves as
            # long as there are enough listening peers to carry them.
            order = build_tree(listening, tree_seed, self.config.fan_in).order + \
                build_tree(unreachable, tree_seed, self.config.fan_in).order
            tree = AccumulationTree(order=order, fan_in=self.config.fan_in)
        else:
            tree = build_tree(alive, tree_seed, self.config.fan_in)
        self._tree = tree
        self._root = tree.root()
        self.state = ServerState.MASKING
        self.stats["tree_depth"] = tree.max_depth
        self.stats["root"] = self.names[self._root]
        actions: list[Action] = [SetTimer(PHASE_TIMER, self.config.phase_timeout)]
        timeout, depth_slots = self.config.phase_timeout, tree.max_depth + 2
        for u in sorted(self.u2):
            if u in self._gone:
                continue
            descendants = [d for d in tree.subtree(u) if d != u]
            ancestors = list(tree.ancestors(u))
            parents = [tree.parent(d) for d in descendants]
            contacts = [self._entries[p] for p in (*ancestors, *descendants)]
            survivors = [u] if self.config.mode == "paillier" else \
                sorted(self.u2.intersection(self._graph.neighbours(u)))
            # Deeper relays give up waiting earlier, so that a relay's deadline falls
            # before its parent's and the root's before the server's.
            forward_after = timeout * (tree.max_depth - tree.depth(u) + 1) / depth_slots
            actions.append(self._send(u, MaskingStart(
                survivors=survivors, total_survivors=len(self.u2), tree_seed=tree_seed,
                ancestors=ancestors, descendants=descendants,
                descendant_parents=[p for p in parents if p is not None],
                contacts=contacts, forward_after=forward_after)))
        for u in range(len(self.names)):
            if u not in self.u2 and u not in self._gone:
                self._told_outcome.add(u)
                actions.append(self._send(u, RoundOutcome(
                    status="excluded", contributor_count=0, included=False, contributors=[],
                    reason=f"not in U2: {self.drop_details.get(self.names[u], '')}")))
        return actions

    def _on_ancestors_unreachable(self, env: Envelope) -> list[Action]:
        assert self._tree is not None
        u = self._index[env.sender]
        if u not in self.u2:
            raise ProtocolError(f"{env.sender!r} is not in U2")
        if u == self._root:
            # A repeat that crossed our NewRoot naming u: nothing more to do.
            log.info("ignoring a repeated ancestor report from the root %r", env.sender)
            return []
        current = self._root
        pointed_before = self._pointed_to.get(u) == current
        if current != self._tree.root() and current not in self._gone and not pointed_before:
            # A new root is already named and, as far as we know, alive: point at it.
            self._pointed_to[u] = current
            return [self._send(u, NewRoot(root=self._entries[current], expected=[],
                                          contacts=[], forward_after=0.0))]
        # The current root is gone (or unreachable for u twice): the reporter, alive
        # and holding a partial sum, becomes the root.
        self._gone.add(current)
        self._root = u
        # The new root does not know the dead root's subtree: it waits for every live
        # member of U2 to be accounted for (inside some partial sum, or gone).
        expected = [v for v in sorted(self.u2) if v != u and v not in self._gone]
        log.info("root %s unreachable; %s is the new root", self.names[current],
                 self.names[u])
        self.stats["new_root"] = self.names[u]
        return [self._send(u, NewRoot(
            root=self._entries[u], expected=expected,
            contacts=[self._entries[c] for c in expected],
            forward_after=self.config.phase_timeout / (self._tree.max_depth + 2)))]

    def _on_root_aggregate(self, env: Envelope) -> list[Action]:
        aggregate = env.body
        assert isinstance(aggregate, RootAggregate)
        if self.config.mode != "masking":
            raise ProtocolError(f"the round runs in {self.config.mode} mode: the aggregate "
                                "must arrive encrypted")
        contributors = self._check_aggregate(env, aggregate.contributors)
        if aggregate.vector.dtype != self.encoder.dtype:
            raise ProtocolError(f"aggregate dtype {aggregate.vector.dtype} is not the ring "
                                f"{self.encoder.dtype}")
        return self._accept_aggregate(aggregate.vector.copy(), contributors)

    def _on_paillier_aggregate(self, env: Envelope) -> list[Action]:
        aggregate = env.body
        assert isinstance(aggregate, PaillierRootAggregate)
        if self._paillier_keys is None or self.slot_layout is None:
            raise ProtocolError("the round runs in masking mode: the aggregate is a vector")
        contributors = self._check_aggregate(env, aggregate.contributors)
        layout, keys = self.slot_layout, self._paillier_keys
        try:
            layout.check_summands(len(contributors))  # contributors <= U2 <= n: a bug if not
        except EncodingError as exc:
            raise ProtocolError(str(exc)) from None
        try:
            ciphertexts = ciphertexts_from_bytes(aggregate.ciphertexts, keys.public,
                                                 layout.ciphertext_count(self.config.wire_dim))
        except CryptoError as exc:
            raise ProtocolError(f"malformed encrypted aggregate: {exc}") from None
        started = time.perf_counter()
        total = decrypt_vector(keys.private, ciphertexts, layout, self.config.wire_dim,
                               self.encoder.dtype)
        self.stats["decrypt_seconds"] = time.perf_counter() - started
        return self._accept_aggregate(total, contributors)

    def _check_aggregate(self, env: Envelope, listed: list[int]) -> frozenset[int]:
        if self._index[env.sender] != self._root:
            raise ProtocolError(f"{env.sender!r} is not the root and may not send the "
                                "aggregate")
        contributors = frozenset(listed)
        if len(contributors) != len(listed):
            raise ProtocolError("aggregate lists a contributor twice")
        if not contributors <= self.u2:
            raise ProtocolError("aggregate names contributors outside U2")
        if len(contributors) < self.config.threshold:
            raise ProtocolError(f"aggregate has {len(contributors)} contributors, below the "
                                f"threshold {self.config.threshold}")
        return contributors

    def _accept_aggregate(self, total: np.ndarray, contributors: frozenset[int]) -> list[Action]:
        """U3 is fixed: unmask the ring sum (masking, hybrid) or decode it (paillier)."""
        self._aggregate = total
        self.u3 = contributors
        self.stats["u3"] = len(self.u3)
        for u in sorted(self.u2 - self.u3):
            self._drop(u, DropReason.NO_MASKED_INPUT)
        if self.config.mode == "paillier":
            # Nothing is masked and nothing is revealed later, so no R3 or R4.
            self.u4 = self.u3
            return self._decode_and_finish(total)
        if self.config.threat_model == "active":
            return self._start_consistency()
        self.u4 = self.u3
        return self._start_unmasking()

    def _on_root_abort(self, env: Envelope) -> list[Action]:
        body = env.body
        assert isinstance(body, RootAbort)
        if self._index[env.sender] != self._root:
            raise ProtocolError(f"{env.sender!r} is not the root")
        return self._abort(f"only {body.contributor_count} masked inputs reached the root, "
                           f"threshold is {self.config.threshold}")

    # --------------------------------------------------------------- R3

    def _start_consistency(self) -> list[Action]:
        self.state = ServerState.CONSISTENCY
        actions: list[Action] = [SetTimer(PHASE_TIMER, self.config.phase_timeout)]
        contributors = sorted(self.u3)
        for u in contributors:
            if u not in self._gone:
                actions.append(self._send(u, ConsistencyRequest(contributors=contributors)))
        return actions + (self._close_phase() if self._phase_complete() else [])

    def _on_signature(self, env: Envelope) -> list[Action]:
        body = env.body
        assert isinstance(body, ConsistencySignature)
        u = self._index[env.sender]
        if u not in self.u3:
            raise ProtocolError(f"{env.sender!r} is not in U3")
        if u in self._signatures:
            raise ProtocolError(f"duplicate signature from {env.sender!r}")
        try:
            verify(self._entries[u].identity_key,
                   consistency_message(self.config.session, self.config.round, self.u3),
                   body.signature)
        except CryptoError as exc:
            raise ProtocolError(f"invalid consistency signature: {exc}") from None
        self._signatures[u] = body.signature
        return self._close_phase() if self._phase_complete() else []

    def _close_consistency(self) -> list[Action]:
        self.u4 = frozenset(self._signatures)
        self.stats["u4"] = len(self.u4)
        for u in sorted(self.u3 - self.u4):
            self._drop(u, DropReason.SIGNATURE_MISSING)
        if len(self.u4) < self.config.threshold:
            return self._abort(f"only {len(self.u4)} consistency signatures, threshold is "
                               f"{self.config.threshold}")
        return self._start_unmasking()

    # --------------------------------------------------------------- R4

    def _start_unmasking(self) -> list[Action]:
        assert self._graph is not None
        self.state = ServerState.UNMASKING
        dropped_all = self.u2 - self.u3
        for v in sorted(self.u4):
            if v in self._gone:
                self._drop(v, DropReason.UNMASK_SHARE_MISSING)  # gone before R4 began
            else:
                neighbourhood = frozenset(self._graph.neighbours(v))
                self._partition[v] = (self.u3 & neighbourhood, dropped_all & neighbourhood)
        # Every member of U4 gets a request (possibly wanting nothing), so that a peer
        # vanishing now is noticed and recorded.
        return self._request_shares(everyone=True)

    def _request_shares(self, *, everyone: bool = False) -> list[Action]:
        """Ask holders for the shares still missing: t per secret, spread over holders."""
        assert self._graph is not None
        need = self._graph.share_threshold
        wants: dict[int, tuple[set[int], set[int]]] = {}
        for kind, owners, store in ((0, self.u3, self._b_shares),
                                    (1, self.u2 - self.u3, self._s_shares)):
            for u in sorted(owners):
                asked = self._requested.setdefault((kind, u), set())
                outstanding = sum(1 for h in asked
                                  if h in self._awaiting_answer and h not in self._gone)
                deficit = need - len(store.get(u, [])) - outstanding
                if deficit <= 0:
                    continue
                candidates = [h for h in sorted(self._holders.get(u, ()))
                              if h in self._partition and h not in self._gone
                              and h not in asked]
                if len(candidates) < deficit:
                    what = "self mask" if kind == 0 else "mask key"
                    return self._abort(f"cannot unmask: too few live holders of shares of the "
                                       f"{what} of {self.names[u]!r} ({need} needed)")
                start = u % len(candidates)  # spread the load over the holders
                for h in (candidates[start:] + candidates[:start])[:deficit]:
                    wants.setdefault(h, (set(), set()))[kind].add(u)
                    asked.add(h)
        targets = set(wants)
        if everyone:
            targets |= {v for v in self._partition if v not in self._gone}
        if not targets:
            if self._awaiting_answer - self._gone:
                return []
            return self._finish_unmasking()
        full_u3 = self.config.graph == "complete" or self.config.threat_model == "active"
        signatures = [SignedIndex(index=u, signature=sig)
                      for u, sig in sorted(self._signatures.items())]
        actions: list[Action] = [SetTimer(PHASE_TIMER, self.config.phase_timeout)]
        for v in sorted(targets):
            contributors, dropped = self._partition[v]
            wanted_b, wanted_s = wants.get(v, (set(), set()))
            self._pending[v] = (wanted_b, wanted_s)
            self._awaiting_answer.add(v)
            actions.append(self._send(v, UnmaskRequest(
                contributors=sorted(self.u3 if full_u3 else contributors),
                dropped=sorted(dropped), total_contributors=len(self.u3),
                signatures=signatures, self_mask_wanted=sorted(wanted_b),
                secret_key_wanted=sorted(wanted_s))))
        return actions

    def _on_unmask_shares(self, env: Envelope) -> list[Action]:
        body = env.body
        assert isinstance(body, UnmaskShares)
        v = self._index[env.sender]
        if v not in self._awaiting_answer:
            raise ProtocolError(f"unrequested or duplicate unmasking shares from "
                                f"{env.sender!r}")
        wanted_b, wanted_s = self._pending[v]
        b_parsed = self._parse_shares(v, sorted(wanted_b), body.self_mask_shares, "self-mask")
        s_parsed = self._parse_shares(v, sorted(wanted_s), body.secret_key_shares, "secret-key")
        self._awaiting_answer.discard(v)
        self._answered.add(v)
        self._pending[v] = (set(), set())
        for owner, share in b_parsed:
            self._b_shares.setdefault(owner, []).append(share)
        for owner, share in s_parsed:
            self._s_shares.setdefault(owner, []).append(share)
        if self.record_view:
            self.shares_received += [("self_mask", owner, v) for owner, _ in b_parsed]
            self.shares_received += [("secret_key", owner, v) for owner, _ in s_parsed]
        return self._close_phase() if self._phase_complete() else []

    def _parse_shares(self, v: int, owners: list[int], packed: bytes,
                      kind: str) -> list[tuple[int, shamir.Share]]:
        """Split the packed answer to a request for ``owners`` (in that order)."""
        if len(packed) != shamir.SHARE_LENGTH * len(owners):
            raise ProtocolError(f"{kind} shares: {len(packed)} bytes where {len(owners)} "
                                f"shares of {shamir.SHARE_LENGTH} bytes were requested")
        parsed: list[tuple[int, shamir.Share]] = []
        for i, owner in enumerate(owners):
            chunk = packed[i * shamir.SHARE_LENGTH:(i + 1) * shamir.SHARE_LENGTH]
            try:
                parsed.append((owner, shamir.Share.from_bytes(v + 1, chunk)))
            except CryptoError as exc:
                raise ProtocolError(f"malformed {kind} share: {exc}") from None
        return parsed

    def _on_refusal(self, env: Envelope) -> list[Action]:
        body = env.body
        assert isinstance(body, Refusal)
        u = self._index[env.sender]
        log.warning("%s refused: %s", env.sender, body.reason)
        self._drop(u, DropReason.REFUSED, body.reason)
        self._gone.add(u)
        return self._close_phase() if self._phase_complete() else []

    def _finish_unmasking(self) -> list[Action]:
        assert self._graph is not None and self._aggregate is not None
        for u in sorted(self._partition):
            if u not in self._answered:
                self._drop(u, DropReason.UNMASK_SHARE_MISSING)
        threshold = self._graph.share_threshold
        total = self._aggregate.copy()  # a failed attempt must leave the masked sum intact
        generator = MaskGenerator(total.shape[0], total.dtype)
        session, round_number = self.config.session, self.config.round
        try:
            for u in sorted(self.u3):
                seed = self._recover(u, self._b_shares.get(u, []), threshold, "self mask")
                remove_self_mask(total, seed, session=session, round=round_number,
                                 generator=generator)
            for u in sorted(self.u2 - self.u3):
                secret = load_private(
                    self._recover(u, self._s_shares.get(u, []), threshold, "mask key"))
                for v in self._graph.neighbours(u):
                    if v in self.u3:
                        seed = agree(secret, self._entries[v].mask_key)
                        remove_pair_mask(total, dropped=u, survivor=v, seed=seed,
                                         session=session, round=round_number,
                                         generator=generator)
        except ProtocolError as exc:
            return self._abort(str(exc))
        return self._decode_and_finish(total)

    def _decode_and_finish(self, total: np.ndarray) -> list[Action]:
        """Decode the unmasked ring sum and end the round with it."""
        total_weight: float | None = None
        try:
            if self.encoder.weighted is not None:
                aggregate, total_weight = self.encoder.weighted.decode_mean(total)
            else:
                aggregate = self.encoder.quantizer.decode(total)
        except EncodingError as exc:  # e.g. every contributor sent weight 0
            return self._abort(f"cannot decode the aggregate: {exc}")
        return self._finish(ServerOutcome(
            status="ok", round=self.config.round, aggregate=aggregate,
            contributors=tuple(self.names[u] for u in sorted(self.u3)),
            dropped=self._dropped_view(), threshold=self.config.threshold,
            total_weight=total_weight, stats=self._final_stats()))

    def _recover(self, owner: int, shares: list[shamir.Share], threshold: int,
                 what: str) -> bytes:
        name = self.names[owner]
        if len(shares) < threshold:
            raise ProtocolError(f"cannot unmask: {len(shares)} shares of the {what} of "
                                f"{name!r}, {threshold} needed")
        try:
            # t shares suffice. A wrong secret key is caught below against its public
            # key; under the active model the extra shares are also checked for a lie.
            if self.config.threat_model == "active":
                secret = shamir.reconstruct_checked(shares, threshold=threshold)
            else:
                secret = shamir.reconstruct(shares, threshold=threshold)
        except CryptoError as exc:
            raise ProtocolError(f"shares of the {what} of {name!r} are inconsistent: "
                                f"{exc}") from None
        if what == "mask key" and public_from_private(secret) != self._entries[owner].mask_key:
            raise ProtocolError(f"reconstructed mask key of {name!r} does not match its "
                                "advertised public key")
        return secret

    # ----------------------------------------------------- phase control

    def _awaited(self) -> set[int]:
        """Peers whose message the current phase still waits for."""
        if self.state is ServerState.SHARING:
            return {u for u in range(len(self.names)) if u not in self._reports}
        if self.state is ServerState.CONSISTENCY:
            return set(self.u3) - set(self._signatures)
        if self.state is ServerState.UNMASKING:
            return set(self._awaiting_answer)
        return set()

    def _phase_complete(self) -> bool:
        return not (self._awaited() - self._gone)

    def _close_phase(self) -> list[Action]:
        if self.state is ServerState.COLLECTING_KEYS:
            return self._close_registration()
        if self.state is ServerState.SHARING:
            return self._close_sharing()
        if self.state is ServerState.MASKING:
            return self._abort("no aggregate reached the server before the deadline")
        if self.state is ServerState.CONSISTENCY:
            return self._close_consistency()
        if self.state is ServerState.UNMASKING:
            # Holders that did not answer in time are given up; ask others instead.
            self._gone |= self._awaiting_answer
            return self._request_shares()
        return []

    def _on_peer_gone(self, name: str) -> list[Action]:
        if self.state is ServerState.COLLECTING_KEYS:
            self._registered.pop(name, None)
            return []
        u = self._index.get(name)
        if u is None or u in self._gone:
            return []
        self._gone.add(u)
        actions = self._announce_drop(u)
        if self.state in (ServerState.SHARING, ServerState.CONSISTENCY,
                          ServerState.UNMASKING) and self._phase_complete():
            return actions + self._close_phase()
        return actions

    def _announce_drop(self, u: int) -> list[Action]:
        """Tell those who would wait for ``u`` that it is gone."""
        waiting: list[int] = []
        if self.state is ServerState.SHARING and self._graph is not None:
            waiting = [v for v in self._graph.neighbours(u) if v != u]
        elif self.state is ServerState.MASKING and self._tree is not None and u in self._tree:
            # The nearest live ancestor is who collects u's children now.
            ancestor = self._tree.nearest_live_ancestor(u, lambda p: p not in self._gone)
            waiting = [ancestor] if ancestor is not None else []
            if self._root != self._tree.root() and self._root not in (u, ancestor):
                waiting.append(self._root)  # a named new root waits for everyone
            # Dead children of u were announced to u alone; whoever takes u's place must
            # learn of them too, or it waits for their sums until its deadline. (Peers
            # that shared keys see each other go; in paillier mode tree relatives may
            # never have been connected.)
            gone = [u, *self._gone_below(u)]
            return [self._send(v, PeerDropped(peer=g)) for v in waiting
                    if v not in self._gone for g in gone]
        return [self._send(v, PeerDropped(peer=u)) for v in waiting if v not in self._gone]

    def _gone_below(self, u: int) -> list[int]:
        """The gone children of ``u``, their gone children, and so on."""
        assert self._tree is not None
        found: list[int] = []
        stack = [c for c in self._tree.children(u) if c in self._gone]
        while stack:
            child = stack.pop()
            found.append(child)
            stack += [c for c in self._tree.children(child) if c in self._gone]
        return found

    # ------------------------------------------------------------ endings

    def _drop(self, u: int, reason: DropReason, detail: str = "") -> None:
        name = self.names[u]
        if name not in self.dropped:
            self.dropped[name] = reason
            self.drop_details[name] = detail or reason.value

    def _dropped_view(self) -> dict[str, str]:
        return {name: reason.value for name, reason in sorted(self.dropped.items())}

    def _final_stats(self) -> dict[str, Any]:
        stats = dict(self.stats)
        stats.update(u1=len(self.names), u2=len(self.u2), u3=len(self.u3), u4=len(self.u4),
                     drop_details=dict(sorted(self.drop_details.items())))
        return stats

    def _abort(self, reason: str) -> list[Action]:
        log.warning("round %d aborted: %s", self.config.round, reason)
        gone_reason = GONE_REASON.get(self.state)
        if gone_reason is not None:
            for u in sorted(self._gone):
                self._drop(u, gone_reason)
        return self._finish(ServerOutcome(
            status="aborted", round=self.config.round, aggregate=None,
            contributors=(), dropped=self._dropped_view(), threshold=self.config.threshold,
            reason=reason, stats=self._final_stats()))

    def _finish(self, outcome: ServerOutcome) -> list[Action]:
        self.state = ServerState.FINISHED
        self.outcome = outcome
        # The masked aggregate and the shares are not needed any more.
        self._aggregate = None
        self._paillier_keys = None  # one key pair per round: the private key goes now
        self._b_shares.clear()
        self._s_shares.clear()
        listed = list(outcome.contributors) if len(outcome.contributors) <= \
            OUTCOME_LIST_LIMIT else []
        actions: list[Action] = [CancelTimer(PHASE_TIMER)]
        for u, name in enumerate(self.names):
            if u not in self._gone and u not in self._told_outcome:
                notice = RoundOutcome(status=outcome.status,
                                      contributor_count=len(outcome.contributors),
                                      included=u in self.u3 and outcome.status == "ok",
                                      contributors=listed, reason=outcome.reason)
                actions.append(Send(name, envelope(self.config.session, self.config.round,
                                                   SERVER, notice)))
        return actions + [RoundFinished(outcome)]

    # ------------------------------------------------------------ helpers

    def _send(self, u: int, body: Message) -> Send:
        return self._send_name(self.names[u], body)

    def _send_name(self, name: str, body: Message) -> Send:
        return Send(name, envelope(self.config.session, self.config.round, SERVER, body))
