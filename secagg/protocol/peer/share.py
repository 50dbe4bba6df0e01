"""R1 ShareKeys: send Shamir shares of b_u and s_sk_u to every neighbour, collect
theirs, and report to the server whose shares are missing.

The peer reports as soon as every neighbour has either sent its shares or is
known gone, and at the latest at its share deadline (a little before the
server's). It keeps the set of neighbours still awaited, so each arriving share
costs O(1) and the report check is a length test.
"""

from __future__ import annotations

from secagg.crypto import shamir
from secagg.errors import CryptoError
from secagg.protocol.common import SHARE_KEYS
from secagg.protocol.errors import DropReason, RemoteProtocolError
from secagg.protocol.events import Action, CancelTimer, SetTimer
from secagg.protocol.peer.context import AuthenticatedFrame, RoundContext
from secagg.protocol.peer.finished import SHARE_TIMER
from secagg.protocol.peer.live import LivePhase, live_accepts, live_events
from secagg.protocol.peer.phase import SETTLE, PeerState, Step, timer, to
from secagg.protocol.peer.tree import enter_tree
from secagg.wire import (
    EncryptedPartialSum,
    EncryptedShares,
    MaskingStart,
    SharePair,
    ShareReport,
    decode_record,
    encode_record,
)

_S = PeerState

SHARE_REPORT_FRACTION = 0.75
"""A peer reports its shares a little before the server's phase deadline."""


def start_sharing(context: RoundContext) -> Step:
    """Split b_u and s_sk_u over the neighbourhood and send each neighbour its pair."""
    random_bytes = context.settings.random_bytes
    points = [v + 1 for v in context.neighbours]
    threshold = context.share_threshold
    b_shares = shamir.split(context.self_mask_seed, threshold=threshold, indices=points,
                            random_bytes=random_bytes)
    s_shares = shamir.split(context.input.mask_keys.private_bytes, threshold=threshold,
                            indices=points, random_bytes=random_bytes)
    actions: list[Action] = []
    for neighbour, b_share, s_share in zip(context.neighbours, b_shares, s_shares,
                                           strict=True):
        if neighbour == context.index:
            context.shares[neighbour] = (b_share, s_share)
            continue
        plaintext = encode_record(SharePair(self_mask_share=b_share.to_bytes(),
                                            secret_key_share=s_share.to_bytes()))
        try:
            sealed = context.seal_for(neighbour, SHARE_KEYS, plaintext)
        except CryptoError as exc:
            raise RemoteProtocolError(f"the roster's channel key of peer {neighbour} is "
                                      f"unusable: {exc}", DropReason.INVALID_KEYS) from None
        actions.append(context.to_peer(neighbour, EncryptedShares(ciphertext=sealed)))
    actions.append(SetTimer(SHARE_TIMER, context.roster.phase_timeout * SHARE_REPORT_FRACTION))
    awaited = context.neighbour_set - {context.index} - context.gone
    return actions, SharingPhase(context, set(awaited))


def open_share_pair(context: RoundContext,
                    frame: AuthenticatedFrame) -> tuple[shamir.Share, shamir.Share]:
    """The two shares a neighbour sealed for this peer (RemoteProtocolError if it is not
    a neighbour or sent them before, WireError if the record is malformed)."""
    if frame.sender not in context.neighbour_set:
        raise RemoteProtocolError(f"shares from {frame.name!r}, who is not a neighbour",
                                  DropReason.UNEXPECTED_MESSAGE)
    if frame.sender in context.shares:
        raise RemoteProtocolError(f"duplicate shares from {frame.name!r} (replay)",
                                  DropReason.DUPLICATE_MESSAGE)
    pair = decode_record(SharePair, frame.plaintext)
    point = context.index + 1
    try:
        return (shamir.Share.from_bytes(point, pair.self_mask_share),
                shamir.Share.from_bytes(point, pair.secret_key_share))
    except CryptoError as exc:
        raise RemoteProtocolError(f"shares from {frame.name!r}: {exc}",
                                  DropReason.INVALID_SHARES) from None


class SharingPhase(LivePhase):
    """Shares sent; collecting the neighbours' shares until all are in or gone."""

    STATE = _S.SHARING
    ACCEPTS = live_accepts(STATE, {EncryptedShares.TYPE: to("on_shares", STATE)})
    DEFERS = frozenset({EncryptedPartialSum.TYPE})
    EVENTS = live_events(STATE, {timer(SHARE_TIMER): to("on_share_deadline", _S.REPORTED),
                                 SETTLE: to("settle", STATE, _S.REPORTED)})

    def __init__(self, context: RoundContext, awaited: set[int]) -> None:
        super().__init__(context.input, context)
        self.ctx = context
        self.awaited = awaited
        """Neighbours whose shares have neither arrived nor been given up on."""

    def on_shares(self, frame: AuthenticatedFrame) -> Step:
        self.ctx.shares[frame.sender] = open_share_pair(self.ctx, frame)
        self.awaited.discard(frame.sender)
        return [], self

    def departed(self, index: int) -> Step:
        self.ctx.gone.add(index)
        self.awaited.discard(index)
        return [], self

    def settle(self) -> Step:
        return self.report() if not self.awaited else ([], self)

    def on_share_deadline(self) -> Step:
        return self.report()

    def report(self) -> Step:
        missing = sorted(self.ctx.neighbour_set - self.ctx.shares.keys())
        return [CancelTimer(SHARE_TIMER), self.ctx.to_server(ShareReport(missing_from=missing))
                ], ReportedPhase(self.ctx)


class ReportedPhase(LivePhase):
    """Share report sent (or nothing to share): waiting for U2 and the tree."""

    STATE = _S.REPORTED
    ACCEPTS = live_accepts(STATE, {
        EncryptedShares.TYPE: to("on_late_shares", STATE),
        MaskingStart.TYPE: to("on_masking_start", _S.MASKING, _S.FINISHED),
    })
    DEFERS = frozenset({EncryptedPartialSum.TYPE})
    EVENTS = live_events(STATE)

    def __init__(self, context: RoundContext) -> None:
        super().__init__(context.input, context)
        self.ctx = context
        self.late: set[int] = set()

    def on_late_shares(self, frame: AuthenticatedFrame) -> Step:
        # Already reported without them: the server counts only reported holders and
        # never asks for these, so they are authenticated, checked and dropped.
        if frame.sender in self.late:
            raise RemoteProtocolError(f"duplicate shares from {frame.name!r} (replay)",
                                      DropReason.DUPLICATE_MESSAGE)
        open_share_pair(self.ctx, frame)
        self.late.add(frame.sender)
        return [], self

    def on_masking_start(self, start: MaskingStart) -> Step:
        return enter_tree(self.ctx, start)
