"""A peer's place in the accumulation tree and the partial sums passing through it.

The :class:`Relay` is the straight data path of R2, shared by the masking and the
forwarded phase: the running sum and its contributors, the children still
awaited, the sums sent up and kept until they are known to be counted above
(in-flight, keyed by the ancestor they went to), re-routing to the nearest live
ancestor, and becoming the new root. It never looks inside a payload: the round's
:class:`~secagg.protocol.payload.PayloadCodec` adds, copies and serialises them.
"""

from __future__ import annotations

import logging

from secagg.errors import CryptoError
from secagg.protocol.common import PARTIAL_SUM
from secagg.protocol.events import Action
from secagg.protocol.payload import Partial, Payload, encode_partial
from secagg.protocol.peer.context import RoundContext
from secagg.wire import AncestorsUnreachable, EncryptedPartialSum, RootAbort, RootAggregate

log = logging.getLogger("secagg.peer")


class Relay:
    """The partial sums of one peer's subtree (itself included)."""

    def __init__(self, context: RoundContext, *, survivors: frozenset[int],
                 ancestors: list[int], children_of: dict[int, list[int]],
                 own_payload: Payload) -> None:
        self.ctx = context
        self.survivors = survivors
        """U2 ∩ N(u), as announced in MaskingStart (checked again in R3 and R4)."""
        self.ancestors = ancestors
        """Nearest first, root last; empty for the root."""
        self.is_root = not ancestors
        self.children_of = children_of
        self.total: Payload = own_payload
        self.contributors: set[int] = {context.index}
        self.forwarded: set[int] = set()
        """Contributors already sent up (in our own sum or in a late one passed on)."""
        self.expected: set[int] = set()
        """Peers whose sums this peer collects: its children, and the orphans of gone ones."""
        self.waiting_for: set[int] = set()
        """The expected peers whose sums have neither arrived nor been given up on."""
        self.in_flight: dict[int, list[Partial]] = {}
        """ancestor -> the sums sent to it: kept until the round ends, because a dead
        ancestor may have died holding them."""
        self.dead_ancestors: set[int] = set()
        self.awaiting_new_root: list[Partial] = []
        for child in children_of.get(context.index, []):
            self.expect(child)

    # ---------------------------------------------------------- collecting

    def expect(self, child: int) -> None:
        self.expected.add(child)
        if child in self.ctx.gone:
            # Its children re-route their sums to us, the nearest live ancestor.
            for grandchild in self.children_of.get(child, []):
                self.expect(grandchild)
        elif child not in self.contributors:
            self.waiting_for.add(child)

    @property
    def complete(self) -> bool:
        return not self.waiting_for

    def overlap(self, partial: Partial) -> list[int]:
        """Contributors of ``partial`` already counted here: a re-sent copy (its sender
        saw an ancestor die) of a sum that already reached us inside a larger one.
        Counting it again would double it."""
        return [u for u in partial.contributors
                if u in self.contributors or u in self.forwarded]

    def add(self, partial: Partial) -> None:
        self.total = self.ctx.codec.add(self.total, partial.payload)
        self.contributors.update(partial.contributors)
        self.waiting_for.difference_update(partial.contributors)

    # ---------------------------------------------------------- forwarding

    def forward(self) -> list[Action]:
        """Send this subtree's sum up (the root: the aggregate, or an abort, to the server)."""
        partial = Partial(self.total, tuple(sorted(self.contributors)))
        self.forwarded.update(self.contributors)
        if not self.is_root:
            return self.send_up(partial)
        ctx = self.ctx
        if len(partial.contributors) >= ctx.roster.threshold:
            return [ctx.to_server(RootAggregate(payload=ctx.codec.to_bytes(partial.payload),
                                                contributors=list(partial.contributors)))]
        return [ctx.to_server(RootAbort(contributor_count=len(partial.contributors)))]

    def send_up(self, partial: Partial) -> list[Action]:
        """Seal ``partial`` for the nearest live ancestor, or hold it for a new root."""
        ctx = self.ctx
        plaintext = encode_partial(ctx.codec, partial)
        for target in self.ancestors:
            if target in self.dead_ancestors or target in ctx.gone:
                continue
            try:
                sealed = ctx.seal_for(target, PARTIAL_SUM, plaintext)
            except CryptoError as exc:  # an unusable key from the server: try further up
                log.warning("%s: cannot seal for ancestor %d: %s", ctx.input.name, target, exc)
                self.dead_ancestors.add(target)
                continue
            self.in_flight.setdefault(target, []).append(partial)
            return [ctx.to_peer(target, EncryptedPartialSum(ciphertext=sealed))]
        already_reported = bool(self.awaiting_new_root)
        self.awaiting_new_root.append(partial)
        if already_reported or self.is_root:
            return []  # the server already knows; the NewRoot answer covers this sum
        return [ctx.to_server(AncestorsUnreachable(tried=list(self.ancestors)))]

    # ---------------------------------------------------------- departures

    def lost(self, index: int) -> list[Action]:
        """Peer ``index`` is gone: collect its orphans instead; re-send what it held."""
        self.waiting_for.discard(index)
        if index in self.expected:
            for child in self.children_of.get(index, []):
                self.expect(child)
        return self.reroute(index)

    def reroute(self, target: int) -> list[Action]:
        """An ancestor that died may have died holding our sums: send them again to the
        nearest live ancestor. If a sum had already gone further up, that ancestor
        rejects the overlapping copy, so nothing is counted twice."""
        sums = self.in_flight.pop(target, [])
        if not sums:
            return []
        self.dead_ancestors.add(target)
        actions: list[Action] = []
        for partial in sums:
            actions += self.send_up(partial)
        return actions

    # ---------------------------------------------------------- new root

    def follow(self, root: int) -> list[Action]:
        """Another peer is the new root: send it what waited for one."""
        self.ancestors = [root]
        self.dead_ancestors.discard(root)
        held, self.awaiting_new_root = self.awaiting_new_root, []
        actions: list[Action] = []
        for partial in held:
            actions += self.send_up(partial)
        return actions

    def become_root(self, expected: list[int]) -> None:
        """This peer is the new root: its undelivered sums start the aggregate."""
        codec = self.ctx.codec
        self.is_root = True
        self.ancestors = []
        held, self.awaiting_new_root = self.awaiting_new_root, []
        # The sum we sent up may still be held for a re-send: add into a copy.
        self.total = codec.copy(self.total)
        for partial in held:
            if self.contributors.isdisjoint(partial.contributors):  # ours is counted already
                self.total = codec.add(self.total, partial.payload)
                self.contributors.update(partial.contributors)
        self.forwarded -= self.contributors
        self.expected = set()
        self.waiting_for = set()
        for child in expected:
            self.expected.add(child)
            if child not in self.contributors and child not in self.ctx.gone:
                self.waiting_for.add(child)
