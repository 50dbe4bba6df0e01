"""R0, registration: peers advertise their keys until ``max_peers`` have, or the deadline.

Registration is judged here alone: a connection registers under a name (and is
bound to it) only with a valid, first registration of that name while
registration is open. Closing it fixes the roster U1, draws the neighbour graph
and sends each peer its roster.

With the number of connections told of the round known, a connection that answers
without registering (withdraws) or leaves (its process died, registered or not)
ends the wait for it: once every connection still there answered and at least the
threshold registered, registration closes instead of waiting out its deadline.
"""

from __future__ import annotations

import logging

from secagg.crypto.signing import verify
from secagg.errors import CryptoError
from secagg.graph import make_graph, session_graph_seed
from secagg.protocol.common import signed_keys_message
from secagg.protocol.errors import DropReason, RemoteProtocolError
from secagg.protocol.events import Action, Bind, SetTimer, is_connection_token
from secagg.protocol.server.base import PHASE_TIMER, ServerPhase, ServerState, Step, accepts, on
from secagg.protocol.server.collect import begin_collect
from secagg.protocol.server.context import ServerContext
from secagg.protocol.server.finished import abort
from secagg.protocol.server.share import SharePhase
from secagg.wire import (
    NO_DP,
    AdvertiseKeys,
    DPSettings,
    Envelope,
    PeerEntry,
    Roster,
    RoundOpen,
    Withdraw,
)

_S = ServerState
log = logging.getLogger("secagg.server")


def round_open(ctx: ServerContext) -> Envelope:
    """The round's notice: the one every peer gets, whenever it connects."""
    config = ctx.config
    return ctx.envelope(RoundOpen(
        dim=config.dim, weighted=config.weighted, max_peers=config.max_peers,
        mode=config.mode,
        paillier_key_bits=config.paillier_key_bits if ctx.mode.encrypts else 0,
        phase_timeout=config.phase_timeout,
        clip=config.dp.clip if config.dp is not None else config.clip,
        dp_noise_multiplier=config.dp.noise_multiplier if config.dp is not None else 0.0,
        threat_model=config.threat_model))


def dp_settings(ctx: ServerContext) -> DPSettings:
    """The round's DP parameters as the roster announces them (none without DP)."""
    params = ctx.encoder.dp
    if params is None:
        return NO_DP
    config = params.config
    return DPSettings(mechanism=config.mechanism, noise_multiplier=config.noise_multiplier,
                      clip=config.clip, delta=config.delta, k_stddevs=config.k_stddevs,
                      beta=config.beta, scale=params.scale,
                      max_sensitivity_inflation=config.max_sensitivity_inflation,
                      rotation_seed=ctx.rotation_seed)


def begin_registration(ctx: ServerContext, connected: int | None = None) -> Step:
    return [SetTimer(PHASE_TIMER, ctx.config.phase_timeout)], RegisterPhase(ctx, connected)


class RegisterPhase(ServerPhase):
    """R0: collecting keys."""

    STATE = _S.COLLECTING_KEYS
    ACCEPTS = accepts({
        AdvertiseKeys.TYPE: on("on_advertise", _S.COLLECTING_KEYS, _S.SHARING, _S.MASKING,
                               _S.FINISHED),
        Withdraw.TYPE: on("on_withdraw", _S.COLLECTING_KEYS, _S.SHARING, _S.MASKING,
                          _S.FINISHED),
    })
    ON_TIMER = on("on_timer", _S.SHARING, _S.MASKING, _S.FINISHED)
    ON_PEER_GONE = on("on_peer_gone", _S.COLLECTING_KEYS, _S.SHARING, _S.MASKING,
                      _S.FINISHED)

    def __init__(self, ctx: ServerContext, connected: int | None = None) -> None:
        super().__init__(ctx)
        self.connected = connected
        """Connections told of the round (None: unknown, so withdrawals and departures
        cannot end the wait)."""
        self.registered: dict[str, AdvertiseKeys] = {}
        self.cut_off_names: set[str] = set()
        """Names whose registration was cut off: they may not come back this round."""
        self.withdrawn: set[str] = set()
        self.withdrew_on: set[str] = set()
        """Connections (tokens, or names bound in an earlier round) that withdrew: their
        closing is no news."""
        self.departed = 0
        """Connections told of the round that left without withdrawing (registered or
        not): each is one answer that will not come."""
        self.counted_gone: set[str] = set()
        """Connections whose departure is counted: a cut-off is followed by the closing
        of the same connection, one departure told twice."""

    def on_connected(self, token: str) -> list[Action]:
        if self.connected is not None:
            self.connected += 1
        return [self.ctx.send_to(token, round_open(self.ctx).body)]

    def check_sender(self, env: Envelope) -> None:
        return  # nobody is on a roster yet: the registration handler judges

    def on_advertise(self, origin: str, env: Envelope) -> Step:
        keys = env.body
        assert isinstance(keys, AdvertiseKeys)
        ctx, name = self.ctx, env.sender
        token = is_connection_token(origin)
        # A new connection is turned away (told why, then closed: see the dispatcher);
        # a registered peer registering again on its own connection is a replay.
        if name in self.registered and token:
            raise RemoteProtocolError(f"peer id {name!r} is already registered in this "
                                      "round (duplicate id)", DropReason.DUPLICATE_ID)
        if name in self.registered:
            raise RemoteProtocolError(f"duplicate registration for peer id {name!r}",
                                      DropReason.DUPLICATE_MESSAGE)
        if name in self.cut_off_names:
            raise RemoteProtocolError(f"peer id {name!r} was dropped from this round: "
                                      f"{ctx.drop_details.get(name, '')}",
                                      DropReason.NOT_REGISTERED)
        if ctx.config.threat_model == "active":
            try:
                verify(keys.identity_key, signed_keys_message(
                    env.session, env.round, name, keys.channel_key, keys.mask_key,
                    keys.self_mask_commitment), keys.signature)
            except CryptoError as exc:
                raise RemoteProtocolError(f"keys of {name!r} are not validly signed: {exc}",
                                          DropReason.INVALID_KEYS) from None
        if keys.channel_key == keys.mask_key:
            raise RemoteProtocolError(f"{name!r} advertised the same key twice",
                                      DropReason.INVALID_KEYS)
        if ctx.mode.masks and len(keys.self_mask_commitment) != 32:
            # Without it a wrong share of b_u would go unnoticed in R4.
            raise RemoteProtocolError(f"{name!r} did not commit to its self-mask seed",
                                      DropReason.INVALID_KEYS)
        self.registered[name] = keys
        self.withdrawn.discard(name)
        self.withdrew_on.discard(origin)
        # Back under this name on a new connection: its next departure is news again.
        self.counted_gone.discard(name)
        # Bound first, so that the roster below reaches the connection by its name.
        actions: list[Action] = [Bind(origin, name)] if token else []
        return self._maybe_close(actions)

    def on_withdraw(self, origin: str, env: Envelope) -> Step:
        """A connected peer cannot take part (its input failed a check of its own): it
        is dropped now and counts towards closing registration, so that the round
        does not wait its deadline for it. Its connection stays for later rounds."""
        body = env.body
        assert isinstance(body, Withdraw)
        ctx, name = self.ctx, env.sender
        if name in self.registered:
            raise RemoteProtocolError(f"{name!r} withdrew after registering",
                                      DropReason.UNEXPECTED_MESSAGE)
        log.warning("%s withdrew from round %d: %s", name, ctx.config.round, body.reason)
        self.withdrawn.add(name)
        self.withdrew_on.add(origin)
        ctx.withdrawn[name] = body.reason
        ctx.drop_name(name, DropReason.WITHDREW, body.reason)
        return self._maybe_close([])

    def _maybe_close(self, actions: list[Action]) -> Step:
        ctx = self.ctx
        answered = len(self.registered) + len(self.withdrawn) + self.departed
        # Only once someone withdrew or left: in a plain start-up every connection
        # registering may still be followed by peers on their way.
        everyone_answered = (self.connected is not None
                             and bool(self.withdrawn or self.departed)
                             and answered >= self.connected
                             and len(self.registered) >= ctx.config.threshold)
        if len(self.registered) >= ctx.config.max_peers or everyone_answered:
            ctx.registration_closed = (
                f"registration for this round is closed: max_peers={ctx.config.max_peers} "
                "peers already registered; raise max_peers to admit more")
            if len(self.registered) < ctx.config.max_peers:
                ctx.registration_closed = ("registration for this round is closed: every "
                                           "connected peer registered, withdrew or left")
            more, phase = self._close()
            return actions + more, phase
        return actions, self

    def on_timer(self) -> Step:
        self.ctx.registration_closed = (
            f"registration for this round is closed: its deadline passed with "
            f"{len(self.registered)} peers registered; raise phase_timeout to wait longer")
        return self._close()

    def on_peer_gone(self, name: str) -> Step:
        """A connection told of the round closed (``name`` is the name it registered or
        is bound to, else its token): not on a roster yet, so simply not registered, and
        one answer fewer to wait for."""
        self.registered.pop(name, None)
        if self.connected is None or name in self.counted_gone or name in self.withdrew_on:
            return [], self  # (without the count of connections, departures end no wait)
        self.counted_gone.add(name)
        self.departed += 1
        return self._maybe_close([])

    def cut_off(self, name: str, reason: DropReason, detail: str) -> Step:
        if name in self.registered:
            self.ctx.drop_name(name, reason, detail)
            self.cut_off_names.add(name)
        return self.on_peer_gone(name)

    def _close(self) -> Step:
        """Fix U1, draw the graph, send the rosters; R1 next (R2 without shared keys)."""
        ctx, config = self.ctx, self.ctx.config
        ctx.names = sorted(self.registered)
        ctx.index = {name: u for u, name in enumerate(ctx.names)}
        n = len(ctx.names)
        if n < config.threshold:
            # The registered are on the list only so that they are told the outcome.
            return abort(ctx, f"only {n} peers registered, threshold is {config.threshold}",
                         None)
        ctx.entries = [PeerEntry(index=u, name=name, address=keys.address,
                                 channel_key=keys.channel_key, mask_key=keys.mask_key,
                                 identity_key=keys.identity_key, signature=keys.signature,
                                 self_mask_commitment=keys.self_mask_commitment)
                       for u, (name, keys) in
                       enumerate((name, self.registered[name]) for name in ctx.names)]
        graph_seed = session_graph_seed(config.session)
        # The sparse ring is keyed by names, so that a roster that changed by a few
        # peers keeps most neighbourhoods, and with them most links (secagg.graph).
        graph = make_graph(config.graph, n, config.threshold, graph_seed, config.threat_model,
                           ctx.names)
        names = ctx.names if graph.kind == "sparse" else []  # (sparse may fall back)
        ctx.graph = graph
        ctx.size_for_roster()
        ctx.stats.update(registered=n, mode=config.mode, graph=config.graph,
                         degree=graph.degree, share_threshold=graph.share_threshold)
        quantizer, paillier_key = ctx.encoder.quantizer, ctx.paillier_key
        if ctx.encoder.dp is not None:
            ctx.rotation_seed = ctx.random_bytes(32)  # public: every peer rotates alike
        dp = dp_settings(ctx)
        actions: list[Action] = [SetTimer(PHASE_TIMER, config.phase_timeout)]
        for u in range(n):
            # Without masks nobody needs anyone's keys until the tree is known.
            neighbours = ctx.mode.neighbourhood(graph.neighbours(u), u)
            actions.append(ctx.send(u, Roster(
                your_index=u, size=n, threshold=config.threshold, dim=ctx.encoder.wire_dim,
                modulus_bits=quantizer.modulus_bits, clip=config.clip, scale=quantizer.scale,
                weighted=config.weighted, max_weight=config.max_weight,
                threat_model=config.threat_model, graph_kind=graph.kind,
                graph_seed=graph_seed, degree=graph.degree,
                share_threshold=graph.share_threshold, fan_in=config.fan_in,
                phase_timeout=config.phase_timeout,
                neighbours=[ctx.entries[v] for v in neighbours], mode=config.mode,
                paillier_key=paillier_key, input_dim=config.dim, dp=dp, names=names)))
        if not ctx.mode.shares_keys:
            # No secrets to share, so no R1: everyone registered goes up the tree.
            ctx.u2 = frozenset(range(n))
            ctx.stats["u2"] = n
            more, phase = begin_collect(ctx, graph, holders={})
            return actions + more, phase
        return actions, SharePhase(ctx, graph)
