"""R4 Unmasking: reveal, for each contributor, the share of its self mask, and for
each dropped peer, the share of its secret key — never both for one peer.

Everything the server claims is checked against what this peer saw (U2, and under
the active model the U3 it signed and the others' signatures) before a single share
leaves; a follow-up request must repeat the partition already checked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from secagg.crypto.signing import verify
from secagg.errors import CryptoError
from secagg.protocol.common import consistency_message
from secagg.protocol.errors import DropReason, RemoteProtocolError
from secagg.protocol.peer.context import RoundContext
from secagg.protocol.peer.live import LivePhase, live_accepts, live_events
from secagg.protocol.peer.phase import PeerState, Step, to
from secagg.wire import UnmaskRequest, UnmaskShares

_S = PeerState


@dataclass(frozen=True)
class Partition:
    """What an unmask request claims, restricted to this peer's neighbourhood."""

    contributors: frozenset[int]
    """U3 ∩ N(u): whose self-mask shares may be revealed."""
    dropped: frozenset[int]
    """(U2 \\ U3) ∩ N(u): whose secret-key shares may be revealed."""
    total_contributors: int

    @classmethod
    def of(cls, context: RoundContext, request: UnmaskRequest) -> Partition:
        return cls(frozenset(request.contributors) & context.neighbour_set,
                   frozenset(request.dropped), request.total_contributors)


def check_contributors(context: RoundContext, survivors: frozenset[int],
                       contributors: Sequence[int], total: int) -> str:
    """Why this peer must not act on the announced U3 ("" if it may)."""
    roster = context.roster
    u3 = set(contributors)
    if len(u3) != len(contributors):
        return "U3 lists a peer twice"
    if context.index not in u3:
        return "asked to unmask although this peer is not in U3"
    if total < roster.threshold or len(u3) > total:
        return (f"U3 has {total} members, below the threshold {roster.threshold}; "
                "revealing shares could expose an input")
    if roster.graph_kind == "complete" and len(u3) != total:
        return "U3 count disagrees with the list on the complete graph"
    if not (u3 & context.neighbour_set) <= survivors:
        return "U3 contains neighbours that were not in U2"
    return ""


def answer_unmask_request(phase: LivePhase, context: RoundContext, survivors: frozenset[int],
                          signed_u3: tuple[int, ...] | None, request: UnmaskRequest) -> Step:
    """The first unmask request: check it all, then answer (or refuse and abort)."""
    if not context.mode.unmasks:
        raise RemoteProtocolError("an unmask request in a round without masks",
                                  DropReason.UNEXPECTED_MESSAGE)
    refusal = check_contributors(context, survivors, request.contributors,
                                 request.total_contributors)
    if refusal:
        return phase.refuse(refusal)
    partition = Partition.of(context, request)
    both = set(request.contributors) & partition.dropped
    if both:
        return phase.refuse(f"asked for both the self-mask and the secret-key share of "
                            f"peer(s) {sorted(both)[:5]}: that would reveal an input")
    if len(partition.dropped) != len(request.dropped):
        return phase.refuse("the dropped set lists a peer twice")
    if partition.contributors | partition.dropped != survivors:
        return phase.refuse("U3 and U2 \\ U3 do not partition the U2 this peer was shown")
    if context.mode.checks_consistency(context.roster.threat_model):
        refusal = check_signatures(context, signed_u3, request)
        if refusal:
            return phase.refuse(refusal)
    return UnmaskedPhase(context, partition).answer(request)


def check_signatures(context: RoundContext, signed_u3: tuple[int, ...] | None,
                     request: UnmaskRequest) -> str:
    """Under the active model: U3 is the one this peer signed, and at least the share
    threshold of its members signed it too ("" if so)."""
    if signed_u3 is None or tuple(sorted(request.contributors)) != signed_u3:
        return "U3 in the unmask request differs from the U3 this peer signed"
    message = consistency_message(context.input.session, context.input.round, signed_u3)
    members = frozenset(signed_u3)
    valid: set[int] = set()
    for signed in request.signatures:
        entry = context.contacts.get(signed.index)
        if entry is None or signed.index not in members:
            continue
        try:
            verify(entry.identity_key, message, signed.signature)
        except CryptoError:
            return f"invalid consistency signature from peer {signed.index}"
        valid.add(signed.index)
    # The share threshold is t on the complete graph, and what a neighbourhood needs
    # on the sparse one.
    needed = context.share_threshold
    if len(valid) < needed:
        return f"only {len(valid)} valid consistency signatures, {needed} required"
    return ""


class UnmaskedPhase(LivePhase):
    """Unmasking shares sent; answering follow-ups under the same partition."""

    STATE = _S.UNMASKED
    ACCEPTS = live_accepts(STATE, {
        UnmaskRequest.TYPE: to("on_unmask_followup", STATE, _S.FINISHED)})
    EVENTS = live_events(STATE)

    def __init__(self, context: RoundContext, partition: Partition) -> None:
        super().__init__(context.input, context)
        self.ctx = context
        self.partition = partition

    def on_unmask_followup(self, request: UnmaskRequest) -> Step:
        if Partition.of(self.ctx, request) != self.partition:
            return self.refuse("a follow-up unmask request changes U3 or the dropped set")
        return self.answer(request)

    def answer(self, request: UnmaskRequest) -> Step:
        """Send the wanted shares; each must belong to the checked partition."""
        wanted_b = set(request.self_mask_wanted)
        wanted_s = set(request.secret_key_wanted)
        if not wanted_b <= self.partition.contributors or \
                not wanted_s <= self.partition.dropped:
            return self.refuse("the server wants shares outside the announced partition")
        held = self.ctx.shares
        missing = sorted(u for u in wanted_b | wanted_s if u not in held)
        if missing:
            return self.refuse(f"asked for shares this peer never reported holding: "
                               f"{missing[:5]}")
        return [self.ctx.to_server(UnmaskShares(
            self_mask_shares=b"".join(held[u][0].to_bytes() for u in sorted(wanted_b)),
            secret_key_shares=b"".join(held[u][1].to_bytes() for u in sorted(wanted_s))))
        ], self
