"""Which ``Forward`` frames the coordinator relays (and for whom it stops relaying).

A peer without a listener (its roster entry has an empty address: behind NAT) is
reached through the coordinator: the sender wraps its sealed peer-to-peer frame
in a :class:`~secagg.wire.Forward` and the coordinator passes it on. Without
rules, that relay is a free channel for any registered client: to itself, to
anyone, in any phase, as often as it likes (filling a NAT peer's outbox until the
coordinator drops the victim as "not reading"). Honest peers forward exactly two
kinds of frames, and only along the round's structure:

- ``encrypted_shares`` (R1): to a neighbour in the round's graph, once per pair;
- ``encrypted_partial_sum`` (R2): up the accumulation tree, to an ancestor, or to
  the root the server named after the old one was lost; each sum at most once per
  ancestor it is re-routed past.

So a Forward is relayed only when it is for the current session and round, comes
from the registered peer bound to the connection it arrives on and names it as
the inner frame's sender, goes to another roster member that has no listener,
carries the frame kind of the current phase, and follows the graph (shares) or
the tree (sums). The sealed body is never opened; the plaintext envelope around
it is decoded so that these rules can be checked.

Budgets are per sender and per kind, i.e. per phase, and derived from what the
protocol can need, not from a clock (the core reads no clock, and a per-second
limit would cut off the honest burst of R1, where a peer sends all its shares at
once): one share frame per NAT neighbour, and (1 + descendants) × (2 + depth)
partial sums, plus :data:`FORWARD_SLACK` each. Every frame counts, relayed or
dropped as late. Bytes are bounded with them: a share frame may be at most
:data:`SHARE_FRAME_BYTES` long (checked before decoding), a partial-sum frame at
most the round's frame limit, so the bytes relayed per phase are at most budget
× size.

A refused frame is dropped with a reason. Frames that merely arrive late (a share
after R1 ended, a frame of the previous round, to a peer already gone) are
harmless and cost nothing but budget. Frames that no honest peer sends, and frames
beyond the budget, are strikes; past :data:`MAX_FORWARD_STRIKES` the sender is cut
off (``DropReason.FORBIDDEN_FORWARD``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Literal

from secagg.errors import WireError
from secagg.protocol.server.base import ServerState
from secagg.protocol.server.context import ServerContext
from secagg.wire import EncryptedPartialSum, EncryptedShares, Envelope, Forward, Limits, decode

ForwardKind = Literal["shares", "sums", "stale"]
"""The budget a frame counts against: R1 shares, R2 partial sums, or frames of an
earlier round of the session."""

SHARE_FRAME_BYTES = 2048
"""Longest frame relayed before R2: an ``encrypted_shares`` envelope is under 500
bytes (a ciphertext of at most 256 bytes, a 16-byte session, a name of at most 64)."""
FORWARD_SLACK = 16
"""Frames of each kind a sender may forward beyond what the protocol needs."""
MAX_FORWARD_STRIKES = 8
"""Forbidden forwards tolerated from one sender per round before it is cut off: one
is already proof of a modified client, but a few keep a race nobody foresaw from
costing an honest peer its round, and a flood reaches the limit within a few frames."""

_STATE_ORDER = {state: i for i, state in enumerate((
    ServerState.IDLE, ServerState.COLLECTING_KEYS, ServerState.SHARING, ServerState.MASKING,
    ServerState.CONSISTENCY, ServerState.UNMASKING, ServerState.FINISHED))}
# The phase in which each kind of sealed frame travels.
_PHASE_OF = {"shares": ServerState.SHARING, "sums": ServerState.MASKING}
_KIND_OF: dict[str, ForwardKind] = {EncryptedShares.TYPE: "shares",
                                    EncryptedPartialSum.TYPE: "sums"}
_PHASE_NAME = {"shares": "R1", "sums": "R2"}


@dataclass(frozen=True)
class ForwardVerdict:
    """What to do with one Forward: relay it to ``recipient``, or drop it because of
    ``refused``. ``forbidden`` marks a frame no honest peer sends (a strike); ``kind``
    is the budget the frame counts against (None when it is forbidden before its kind
    is known)."""

    kind: ForwardKind | None = None
    recipient: str = ""
    refused: str = ""
    forbidden: bool = False


def _forbidden(detail: str, kind: ForwardKind | None = None) -> ForwardVerdict:
    return ForwardVerdict(kind=kind, refused=detail, forbidden=True)


def _late(detail: str, kind: ForwardKind) -> ForwardVerdict:
    return ForwardVerdict(kind=kind, refused=detail)


def judge_forward(ctx: ServerContext, state: ServerState, origin: str, env: Envelope,
                  limits: Limits | None = None) -> ForwardVerdict:
    """Whether the Forward ``env``, arriving on the connection bound to ``origin`` while
    the round is in ``state``, may be relayed; pure (no budget, no side effect).

    ``limits`` bound the relayed frame's decoding (the round's frame limits)."""
    body = env.body
    if not isinstance(body, Forward):
        return _forbidden(f"a {env.type} is not a forward")
    config = ctx.config
    if env.sender != origin:
        return _forbidden(f"forged sender: the forward claims {env.sender!r} on the "
                          f"connection of {origin!r}")
    if env.session != config.session:
        return _forbidden("for another session")
    if env.round > config.round:
        return _forbidden(f"for round {env.round}, which is not open (this is round "
                          f"{config.round})")
    if env.round < config.round:
        return _late(f"for round {env.round}, which is over", "stale")
    frame = body.frame
    now = _STATE_ORDER.get(state, len(_STATE_ORDER))  # a state unknown here: after R2
    before_r2 = now < _STATE_ORDER[ServerState.MASKING]
    if before_r2 and len(frame) > SHARE_FRAME_BYTES:
        return _forbidden(f"{len(frame)} bytes before R2, where a relayed frame carries "
                          f"shares (at most {SHARE_FRAME_BYTES} bytes)")
    try:
        inner = decode(frame, limits or Limits())
    except WireError as exc:
        return _forbidden(f"the relayed frame does not decode: {exc}")
    kind = _KIND_OF.get(inner.type)
    if kind is None:
        return _forbidden(f"a {inner.type} frame: the coordinator only relays sealed "
                          "shares and partial sums")
    if inner.sender != origin:
        return _forbidden(f"the inner frame names {inner.sender!r} as its sender", kind)
    if (inner.session, inner.round) != (env.session, env.round):
        return _forbidden("the inner frame is for another session or round than its "
                          "forward", kind)
    recipient = body.recipient
    if recipient == origin:
        return _forbidden("to itself", kind)
    v = ctx.index_of(recipient)
    if v is None:
        return _forbidden(f"to {recipient!r}, who is not on the roster", kind)
    if ctx.entries[v].address:
        return _forbidden(f"to {recipient!r}, which has a listener: peers reach it "
                          "directly", kind)
    u = ctx.index_of(origin)
    if u is None:
        return _forbidden(f"from {origin!r}, who is not on this round's roster", kind)
    phase = _STATE_ORDER[_PHASE_OF[kind]]
    if now < phase:
        return _forbidden(f"{inner.type} before {_PHASE_NAME[kind]}", kind)
    if now > phase:
        return _late(f"late: {_PHASE_NAME[kind]} is over", kind)
    if not ctx.live(v):
        return _late(f"{recipient!r} has left the round", kind)
    if kind == "shares":
        graph = ctx.graph
        if graph is None or not graph.are_neighbours(u, v):
            return _forbidden(f"to {recipient!r}, not a neighbour of {origin!r}", kind)
    else:
        tree = ctx.tree
        if tree is None or u not in tree:
            return _forbidden(f"from {origin!r}, which is not in the accumulation tree", kind)
        if v != ctx.root and v not in tree.ancestors(u):
            return _forbidden(f"to {recipient!r}, neither an ancestor of {origin!r} in the "
                              "tree nor the root", kind)
    return ForwardVerdict(kind=kind, recipient=recipient)


class ForwardGate:
    """:func:`judge_forward` with per-sender budgets and strikes, for one round."""

    def __init__(self, ctx: ServerContext, *, slack: int = FORWARD_SLACK,
                 max_strikes: int = MAX_FORWARD_STRIKES) -> None:
        self.ctx = ctx
        self.slack = slack
        self.max_strikes = max_strikes
        self._counts: Counter[tuple[str, ForwardKind]] = Counter()
        self._strikes: Counter[str] = Counter()

    def budget(self, name: str, kind: ForwardKind) -> int:
        """Frames of ``kind`` that ``name`` may forward this round."""
        ctx = self.ctx
        u = ctx.index_of(name)
        needed = 0
        if u is not None and kind == "shares" and ctx.graph is not None:
            # Shares go straight to neighbours with a listener; only NAT ones need us.
            needed = sum(1 for v in ctx.graph.neighbours(u)
                         if v != u and not ctx.entries[v].address)
        elif u is not None and kind == "sums" and ctx.tree is not None and u in ctx.tree:
            tree = ctx.tree
            # Its own sum and every late one passed on, each re-routed at most once per
            # ancestor and once more to a named root.
            needed = len(tree.subtree(u)) * (2 + tree.depth(u))
        return needed + self.slack

    def judge(self, state: ServerState, origin: str, env: Envelope,
              limits: Limits | None = None) -> ForwardVerdict:
        """Judge one Forward from ``origin``, charging its budget; a forbidden frame, or
        one over the budget, is a strike."""
        verdict = judge_forward(self.ctx, state, origin, env, limits)
        if verdict.kind is not None and not verdict.forbidden:
            key = (origin, verdict.kind)
            self._counts[key] += 1
            budget = self.budget(origin, verdict.kind)
            if self._counts[key] > budget:
                verdict = _forbidden(f"over its budget of {budget} forwarded "
                                     f"{verdict.kind} frames for this round", verdict.kind)
        if verdict.forbidden:
            self._strikes[origin] += 1
        return verdict

    def strikes(self, name: str) -> int:
        return self._strikes[name]

    def over_limit(self, name: str) -> bool:
        """Whether ``name`` sent more forbidden forwards than tolerated."""
        return self._strikes[name] > self.max_strikes
