"""What every phase of the server's round shares (fcp's ``SecAggServerProtocolImpl``).

A phase object holds only what its own phase collects; the roster, the sets
U1 ⊇ U2 ⊇ U3 ⊇ U4, who is gone, why peers were dropped and the statistics live
here, so a phase can hand the round to the next one by passing this object on.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from secagg.crypto.keys import RandomBytes
from secagg.graph import AccumulationTree, NeighbourGraph
from secagg.paillier import PaillierKeyPair, SlotLayout, generate_keypair, public_key_bytes
from secagg.protocol.common import Encoder, envelope
from secagg.protocol.errors import DropReason
from secagg.protocol.events import Send, ServerOutcome
from secagg.protocol.modes import RoundMode, round_mode
from secagg.protocol.payload import PayloadCodec
from secagg.protocol.server.config import ServerConfig
from secagg.wire import SERVER, Envelope, Message, PeerEntry, Rejected

log = logging.getLogger("secagg.server")

Holders = Mapping[int, frozenset[int]]
"""Member of U2 -> the peers holding its shares (from R1; empty without shared keys)."""

REASON_LIMIT = 512
"""Longest reason a wire message carries (``wire.Reason``)."""


@dataclass
class ServerContext:
    """The round as every phase sees it."""

    config: ServerConfig
    mode: RoundMode
    encoder: Encoder
    random_bytes: RandomBytes
    paillier_keys: PaillierKeyPair | None
    """The round's key pair when the mode encrypts; the private key is dropped at the end."""
    codec: PayloadCodec
    """The payload codec: sized for ``max_peers`` until the roster is fixed, then for it."""
    slot_layout: SlotLayout | None
    """How ciphertexts pack ring elements (None unless the mode encrypts); follows ``codec``."""
    record_view: bool = False
    view: list[Envelope] = field(default_factory=list)
    """With ``record_view``: every message this server accepted, for privacy checks."""
    shares_received: list[tuple[str, int, int]] = field(default_factory=list)
    """With ``record_view``: (kind, owner, holder) of every unmasking share received."""

    names: list[str] = field(default_factory=list)
    """U1, the roster, in index order (empty until registration closes)."""
    index: dict[str, int] = field(default_factory=dict)
    entries: list[PeerEntry] = field(default_factory=list)
    """The roster's keys and addresses, in index order."""
    graph: NeighbourGraph | None = None
    tree: AccumulationTree | None = None
    root: int = -1
    gone: set[int] = field(default_factory=set)
    """Roster members that left or were cut off: nothing more is awaited from them."""
    told_outcome: set[int] = field(default_factory=set)
    dropped: dict[str, DropReason] = field(default_factory=dict)
    drop_details: dict[str, str] = field(default_factory=dict)
    u2: frozenset[int] = frozenset()
    u3: frozenset[int] = frozenset()
    u4: frozenset[int] = frozenset()
    stats: dict[str, Any] = field(default_factory=dict)
    outcome: ServerOutcome | None = None
    registration_closed: str = ""
    """Why registration closed, for those who arrive later (empty while it is open)."""
    withdrawn: dict[str, str] = field(default_factory=dict)
    """Connected peers that withdrew from the round before registering, and why."""
    rotation_seed: bytes = b""
    """The public seed of the DP rotation (drawn when registration closes, DP rounds)."""

    @classmethod
    def create(cls, config: ServerConfig, *, random_bytes: RandomBytes, record_view: bool,
               paillier_keys: PaillierKeyPair | None) -> ServerContext:
        """Check that the round can run (encoding capacity, key size) and set it up."""
        mode = round_mode(config.mode)
        encoder = config.encoder()  # fails early if the encoding cannot fit
        keys: PaillierKeyPair | None = None
        if mode.encrypts:
            keys = paillier_keys or generate_keypair(config.paillier_key_bits)
            if keys.key_bits != config.paillier_key_bits:
                raise ValueError(f"the Paillier key has {keys.key_bits} bits, the config says "
                                 f"{config.paillier_key_bits}")
        context = cls(config=config, mode=mode, encoder=encoder, random_bytes=random_bytes,
                      paillier_keys=keys, codec=_codec(config, mode, keys, config.max_peers),
                      slot_layout=config.slot_layout(), record_view=record_view)
        return context

    def size_for_roster(self) -> None:
        """Peers size their slots for the roster's n, which may be below max_peers when
        registration closed on its deadline: pack and unpack alike."""
        n = len(self.names)
        self.codec = _codec(self.config, self.mode, self.paillier_keys, n)
        self.slot_layout = self.config.slot_layout(n)

    @property
    def paillier_key(self) -> bytes:
        """The public modulus peers encrypt under (empty unless the mode encrypts)."""
        return public_key_bytes(self.paillier_keys.public) if self.paillier_keys else b""

    # ----------------------------------------------------------- messages

    def envelope(self, body: Message) -> Envelope:
        return envelope(self.config.session, self.config.round, SERVER, body)

    def send(self, u: int, body: Message) -> Send:
        return Send(self.names[u], self.envelope(body))

    def send_to(self, recipient: str, body: Message) -> Send:
        return Send(recipient, self.envelope(body))

    def rejection(self, recipient: str, reason: str) -> Send:
        return self.send_to(recipient, Rejected(reason=reason[:REASON_LIMIT]))

    # ------------------------------------------------------------ the roster

    def live(self, u: int) -> bool:
        return u not in self.gone

    def index_of(self, name: str) -> int | None:
        return self.index.get(name)

    def drop(self, u: int, reason: DropReason, detail: str = "") -> None:
        """Record why ``u`` is not (fully) in the round; the first reason stands."""
        self.drop_name(self.names[u], reason, detail)

    def drop_name(self, name: str, reason: DropReason, detail: str = "") -> None:
        if self.outcome is None and name not in self.dropped:
            self.dropped[name] = reason
            self.drop_details[name] = detail or reason.value

    def dropped_view(self) -> dict[str, str]:
        return {name: reason.value for name, reason in sorted(self.dropped.items())}

    def final_stats(self) -> dict[str, Any]:
        stats = dict(self.stats)
        stats.update(u1=len(self.names), u2=len(self.u2), u3=len(self.u3), u4=len(self.u4),
                     drop_details=dict(sorted(self.drop_details.items())))
        return stats


def _codec(config: ServerConfig, mode: RoundMode, keys: PaillierKeyPair | None,
           peers: int) -> PayloadCodec:
    key = public_key_bytes(keys.public) if keys is not None else b""
    return mode.codec(modulus_bits=config.modulus_bits, dim=config.wire_dim, peers=peers,
                      paillier_key=key)
