"""R2 MaskedInput: compute this peer's payload, collect the children's partial sums,
forward up the tree, and keep the data path alive when relatives die.

The masking phase collects until every expected child has arrived or is gone (or
the staggered forward deadline fires); the forwarded phase passes late sums on
unchanged, re-routes sums whose ancestor died, and waits for R3/R4. Both share
one :class:`~secagg.protocol.peer.relay.Relay`.
"""

from __future__ import annotations

import logging

import numpy as np

from secagg.crypto.keys import load_private
from secagg.crypto.prg import MaskGenerator
from secagg.errors import CryptoError
from secagg.masking import masked_input, pair_seed
from secagg.protocol.errors import DropReason, RemoteProtocolError
from secagg.protocol.events import Action, CancelTimer, SetTimer
from secagg.protocol.payload import Partial, Payload, decode_partial
from secagg.protocol.peer.consistency import answer_consistency_request
from secagg.protocol.peer.context import AuthenticatedFrame, RoundContext
from secagg.protocol.peer.finished import FORWARD_TIMER, abort_round
from secagg.protocol.peer.live import LivePhase, live_accepts, live_events
from secagg.protocol.peer.phase import SETTLE, PeerState, Step, timer, to
from secagg.protocol.peer.relay import Relay
from secagg.protocol.peer.unmask import answer_unmask_request
from secagg.wire import (
    ConsistencyRequest,
    EncryptedPartialSum,
    Envelope,
    MaskingStart,
    NewRoot,
    UnmaskRequest,
)

log = logging.getLogger("secagg.peer")

_S = PeerState


def enter_tree(context: RoundContext, start: MaskingStart) -> Step:
    """Check U2 and this peer's place in the tree, compute its payload, start collecting."""
    survivors = frozenset(start.survivors)
    if not survivors <= context.neighbour_set or context.index not in survivors:
        raise RemoteProtocolError("U2 announced to this peer is not a subset of its "
                                  "neighbourhood, or omits the peer itself",
                                  DropReason.BAD_MESSAGE)
    roster = context.roster
    if start.total_survivors < roster.threshold or (
            roster.graph_kind == "complete" and context.mode.masks
            and len(survivors) != start.total_survivors):
        return abort_round(context.input, context,
                           f"U2 has {start.total_survivors} members, below the threshold "
                           f"{roster.threshold}, or is inconsistent")
    if len(start.descendants) != len(start.descendant_parents):
        raise RemoteProtocolError("descendants and their parents are not aligned",
                                  DropReason.BAD_MESSAGE)
    context.add_contacts(start.contacts)
    unknown = [p for p in (*start.ancestors, *start.descendants) if p not in context.contacts]
    if unknown:
        raise RemoteProtocolError(f"no contact entry for tree relatives {unknown[:5]}",
                                  DropReason.BAD_MESSAGE)
    children_of: dict[int, list[int]] = {}
    for child, parent in zip(start.descendants, start.descendant_parents, strict=True):
        children_of.setdefault(parent, []).append(child)
    relay = Relay(context, survivors=survivors, ancestors=list(start.ancestors),
                  children_of=children_of, own_payload=own_payload(context, survivors))
    return [SetTimer(FORWARD_TIMER, start.forward_after)], MaskingPhase(context, relay)


def own_payload(context: RoundContext, survivors: frozenset[int]) -> Payload:
    """This peer's contribution: its encoded input, masked if the mode masks, sealed by
    the codec (as is, or encrypted under the server's Paillier key)."""
    random_bytes = context.settings.random_bytes
    rng = np.random.default_rng(np.frombuffer(random_bytes(32), dtype=np.uint32))
    input = context.input
    encoded = context.encoder.encode(input.vector, input.weight, rng,
                                     context.roster.dp.rotation_seed)
    context.clipped = encoded.clipped
    clip = context.encoder.quantizer.clip
    if encoded.clipped and context.encoder.dp is not None:
        log.info("%s: the input's L2 norm was clipped to %g", input.settings.name, clip)
    elif encoded.clipped:
        log.warning("%s: %d of %d input coordinates were clipped to [-%g, %g]",
                    input.settings.name, encoded.clipped, input.vector.shape[0], clip, clip)
    ring = encoded.ring
    if context.mode.masks:
        own_private = load_private(input.mask_keys.private_bytes)
        try:
            pair_seeds = [(v, pair_seed(own_private, context.contacts[v].mask_key))
                          for v in sorted(survivors) if v != context.index]
        except CryptoError as exc:
            raise RemoteProtocolError(f"a neighbour's mask key is unusable: {exc}",
                                      DropReason.INVALID_KEYS) from None
        generator = context.settings.mask_generator
        if generator is None or generator.length != ring.shape[0]:
            generator = MaskGenerator(ring.shape[0], ring.dtype)
        ring = masked_input(ring, owner=context.index, self_seed=context.self_mask_seed,
                            pair_seeds=pair_seeds, session=input.session, round=input.round,
                            generator=generator)
    return context.codec.seal_ring(ring, random_bytes)


def open_partial_sum(context: RoundContext, relay: Relay,
                     frame: AuthenticatedFrame) -> Partial | None:
    """Parse an authenticated partial sum; None for a harmless re-sent copy."""
    try:
        partial = decode_partial(context.codec, frame.plaintext, context.limits)
    except RemoteProtocolError as exc:
        raise RemoteProtocolError(f"partial sum from {frame.name!r}: {exc}",
                                  exc.reason) from None
    overlap = relay.overlap(partial)
    if overlap:
        context.input.note(f"{EncryptedPartialSum.TYPE} from {frame.name!r} ignored: "
                           f"overlaps contributors already counted: {sorted(overlap)[:5]}")
        return None
    return partial


class TreePhase(LivePhase):
    """A phase that holds the relay: departures may re-route sums."""

    def __init__(self, context: RoundContext, relay: Relay) -> None:
        super().__init__(context.input, context)
        self.ctx = context
        self.relay = relay

    def departed(self, index: int) -> Step:
        self.ctx.gone.add(index)
        return self.relay.lost(index), self

    def undeliverable(self, index: int, envelope: Envelope) -> Step:
        # Unreachable from here, not known dead: nothing is waited for from it any more,
        # but its children still send to it. Only an undelivered partial sum moves what
        # was in flight to it.
        self.ctx.gone.add(index)
        self.relay.waiting_for.discard(index)
        if envelope.type != EncryptedPartialSum.TYPE:
            return [], self
        return self.relay.reroute(index), self

    def on_new_root(self, new_root: NewRoot) -> Step:
        context, relay = self.ctx, self.relay
        context.add_contacts([new_root.root, *new_root.contacts])
        if new_root.root.index != context.index:
            return relay.follow(new_root.root.index), self
        relay.become_root(list(new_root.expected))
        return [SetTimer(FORWARD_TIMER, new_root.forward_after)], MaskingPhase(context, relay)


class MaskingPhase(TreePhase):
    """Own payload computed; collecting the children's partial sums."""

    STATE = _S.MASKING
    ACCEPTS = live_accepts(STATE, {EncryptedPartialSum.TYPE: to("on_partial_sum", STATE),
                                   NewRoot.TYPE: to("on_new_root", STATE)})
    EVENTS = live_events(STATE, {timer(FORWARD_TIMER): to("on_forward_deadline", _S.FORWARDED),
                                 SETTLE: to("settle", STATE, _S.FORWARDED)})

    def on_partial_sum(self, frame: AuthenticatedFrame) -> Step:
        partial = open_partial_sum(self.ctx, self.relay, frame)
        if partial is not None:
            self.relay.add(partial)
        return [], self

    def settle(self) -> Step:
        return self.forward() if self.relay.complete else ([], self)

    def on_forward_deadline(self) -> Step:
        pending = sorted(self.relay.waiting_for)
        log.info("%s: forward deadline; still missing %d expected sums %s", self.input.name,
                 len(pending), pending[:8])
        return self.forward()

    def forward(self) -> Step:
        actions: list[Action] = [CancelTimer(FORWARD_TIMER), *self.relay.forward()]
        return actions, ForwardedPhase(self.ctx, self.relay)


class ForwardedPhase(TreePhase):
    """Partial sum sent up (or held for a new root): pass late sums on, wait for R3/R4."""

    STATE = _S.FORWARDED
    ACCEPTS = live_accepts(STATE, {
        EncryptedPartialSum.TYPE: to("on_late_partial_sum", STATE),
        NewRoot.TYPE: to("on_new_root", STATE, _S.MASKING),
        ConsistencyRequest.TYPE: to("on_consistency_request", _S.SIGNED, _S.FINISHED),
        UnmaskRequest.TYPE: to("on_unmask_request", _S.UNMASKED, _S.FINISHED),
    })
    EVENTS = live_events(STATE)

    def on_late_partial_sum(self, frame: AuthenticatedFrame) -> Step:
        if self.relay.is_root:
            # Authenticated but too late: the aggregate is released, its contributors
            # fixed. The sender's input counts as dropped.
            self.input.note(f"{EncryptedPartialSum.TYPE} from {frame.name!r} ignored: "
                            "arrived after the root released the aggregate")
            return [], self
        partial = open_partial_sum(self.ctx, self.relay, frame)
        if partial is None:
            return [], self
        # Pass it on unchanged: our own sum already left, and a sum with several
        # contributors keeps the same privacy upstream.
        self.relay.forwarded.update(partial.contributors)
        return self.relay.send_up(partial), self

    def on_consistency_request(self, request: ConsistencyRequest) -> Step:
        return answer_consistency_request(self, self.ctx, self.relay.survivors, request)

    def on_unmask_request(self, request: UnmaskRequest) -> Step:
        return answer_unmask_request(self, self.ctx, self.relay.survivors, None, request)
