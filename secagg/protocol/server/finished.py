"""The end of a round: the outcome, the notices to the peers, and the phase after it."""

from __future__ import annotations

import logging

import numpy as np

from secagg.dp import noise_report
from secagg.errors import EncodingError
from secagg.protocol.errors import DropReason
from secagg.protocol.events import Action, CancelTimer, RoundFinished, ServerOutcome
from secagg.protocol.server.base import PHASE_TIMER, ServerPhase, ServerState, Step, accepts, on
from secagg.protocol.server.context import ServerContext
from secagg.wire import OUTCOME_LIST_LIMIT, AdvertiseKeys, Envelope, RoundOutcome, message_types

log = logging.getLogger("secagg.server")

_FINISHED = ServerState.FINISHED


class FinishedPhase(ServerPhase):
    """After the outcome: stragglers' messages are logged and ignored."""

    STATE = _FINISHED
    ACCEPTS = accepts({
        **{name: on("ignore_late", _FINISHED) for name in message_types()},
        AdvertiseKeys.TYPE: on("reject_registration", _FINISHED),
    })
    ON_TIMER = on("on_timer", _FINISHED)
    ON_PEER_GONE = on("on_peer_gone", _FINISHED)

    def on_connected(self, token: str) -> list[Action]:
        return []  # between rounds a connection waits for the driver's next round

    def check_sender(self, env: Envelope) -> None:
        return  # anyone's late message is as harmless as any other

    def on_timer(self) -> Step:
        return [], self

    def on_peer_gone(self, name: str) -> Step:
        return [], self

    def cut_off(self, name: str, reason: DropReason, detail: str) -> Step:
        return [], self  # the outcome, and who is dropped in it, is fixed

    def reject_registration(self, origin: str, env: Envelope) -> Step:
        return self.turn_away(origin, env, f"round {self.ctx.config.round} is over; wait "
                                           "for the next round's notice")


def finish(ctx: ServerContext, outcome: ServerOutcome) -> Step:
    """End the round with ``outcome``; every live roster member not yet told hears it."""
    ctx.outcome = outcome
    ctx.paillier_keys = None  # one key pair per round: the private key goes now
    listed = list(outcome.contributors) if len(outcome.contributors) <= \
        OUTCOME_LIST_LIMIT else []
    actions: list[Action] = [CancelTimer(PHASE_TIMER)]
    ok = outcome.status == "ok"
    for u, name in enumerate(ctx.names):
        if u not in ctx.gone and u not in ctx.told_outcome:
            notice = RoundOutcome(status=outcome.status,
                                  contributor_count=len(outcome.contributors),
                                  included=ok and u in ctx.u3, contributors=listed,
                                  reason=outcome.reason[:512])
            actions.append(ctx.send_to(name, notice))
    return actions + [RoundFinished(outcome)], FinishedPhase(ctx)


def abort(ctx: ServerContext, reason: str, gone_reason: DropReason | None) -> Step:
    """End the round without an aggregate; peers gone so far are dropped for
    ``gone_reason`` (the phase they did not complete)."""
    log.warning("round %d aborted: %s", ctx.config.round, reason)
    if gone_reason is not None:
        for u in sorted(ctx.gone):
            ctx.drop(u, gone_reason)
    return finish(ctx, ServerOutcome(
        status="aborted", round=ctx.config.round, aggregate=None, contributors=(),
        dropped=ctx.dropped_view(), threshold=ctx.config.threshold, reason=reason,
        stats=ctx.final_stats()))


def decode_and_finish(ctx: ServerContext, total: np.ndarray,
                      gone_reason: DropReason | None) -> Step:
    """Decode the unmasked ring sum of U3 and end the round with it."""
    try:
        decoded = ctx.encoder.decode(total, ctx.rotation_seed)
    except EncodingError as exc:  # e.g. every contributor sent weight 0
        return abort(ctx, f"cannot decode the aggregate: {exc}", gone_reason)
    if decoded.clipped:
        log.warning("round %d: %d coordinates were clipped to [-%g, %g]; raise clip",
                    ctx.config.round, decoded.clipped, ctx.config.clip, ctx.config.clip)
    ctx.stats["clipped"] = decoded.clipped
    if ctx.encoder.dp is not None:
        report = noise_report(ctx.encoder.dp, len(ctx.u3))
        ctx.stats["dp"] = {"mechanism": ctx.encoder.dp.config.mechanism,
                           "noise_multiplier": ctx.encoder.dp.config.noise_multiplier,
                           "achieved_noise_multiplier": report.effective_noise_multiplier,
                           "noise_stddev": report.noise_stddev,
                           "noise_variance_over_target": report.noise_variance / (
                               ctx.encoder.dp.central_stddev ** 2),
                           "delta": ctx.encoder.dp.config.delta,
                           "bits": ctx.encoder.dp.config.modulus_bits,
                           "scale": ctx.encoder.dp.scale}
    return finish(ctx, ServerOutcome(
        status="ok", round=ctx.config.round, aggregate=decoded.total,
        contributors=tuple(ctx.names[u] for u in sorted(ctx.u3)),
        dropped=ctx.dropped_view(), threshold=ctx.config.threshold,
        total_weight=decoded.total_weight, stats=ctx.final_stats(),
        clipped=decoded.clipped))
