"""R0 AdvertiseKeys: start with fresh keys, wait for the roster, and accept it.

Accepting the roster is where the peer decides whether it takes part: a roster
that contradicts itself or this peer (its own keys, the neighbour graph, unsigned
keys under the active model) is the server's fault; a consistent round this peer
will not join (another mode than it insists on, an input of another length,
unusable encoding or Paillier parameters) is declined. Either way the round ends.
"""

from __future__ import annotations

import math
from itertools import pairwise

import numpy as np

from secagg.crypto.keys import generate_keypair
from secagg.crypto.signing import sign
from secagg.dp import DPConfig
from secagg.errors import CryptoError, EncodingError, ProtocolError
from secagg.graph import session_graph_seed
from secagg.protocol.common import (
    Encoder,
    check_round_shape,
    self_mask_commitment,
    signed_keys_message,
)
from secagg.protocol.errors import DropReason, RemoteProtocolError
from secagg.protocol.events import Action
from secagg.protocol.modes import round_mode
from secagg.protocol.peer.context import PeerSettings, RoundContext, RoundInput
from secagg.protocol.peer.live import LivePhase, live_accepts, live_events
from secagg.protocol.peer.phase import PeerPhase, PeerState, Step, to
from secagg.protocol.peer.share import ReportedPhase, start_sharing
from secagg.wire import AdvertiseKeys, EncryptedPartialSum, EncryptedShares, Roster

_S = PeerState


class RoundDeclined(Exception):
    """A consistent round this peer does not take part in (not the server's fault)."""


class IdlePhase(PeerPhase):
    """Constructed, not started: nothing is accepted until ``start``."""

    STATE = _S.IDLE

    def __init__(self, settings: PeerSettings) -> None:
        self.settings = settings

    def start(self, session: bytes, round: int, vector: np.ndarray, weight: float,
              rejected: list[str]) -> tuple[list[Action], AdvertisedPhase]:
        """Generate the round's key pairs and advertise them to the server (R0)."""
        settings = self.settings
        channel_keys = generate_keypair(settings.random_bytes)
        mask_keys = generate_keypair(settings.random_bytes)
        # b_u is drawn now, not in R1, so that R0 can commit to it.
        self_mask_seed = bytearray(settings.random_bytes(32))
        commitment = self_mask_commitment(session, round, settings.name, bytes(self_mask_seed))
        identity_key, signature = b"", b""
        if settings.identity is not None:
            identity_key = settings.identity.public_bytes
            signature = sign(settings.identity, signed_keys_message(
                session, round, settings.name, channel_keys.public_bytes,
                mask_keys.public_bytes, commitment))
        input = RoundInput(settings=settings, session=session, round=round, vector=vector,
                           weight=weight, channel_keys=channel_keys, mask_keys=mask_keys,
                           rejected=rejected, self_mask_seed=self_mask_seed)
        advert = input.to_server(AdvertiseKeys(
            address=settings.address, channel_key=channel_keys.public_bytes,
            mask_key=mask_keys.public_bytes, identity_key=identity_key, signature=signature,
            self_mask_commitment=commitment))
        return [advert], AdvertisedPhase(input)


class AdvertisedPhase(LivePhase):
    """Keys sent; waiting for the roster. Neighbours that got theirs first may already
    send shares (and leaves their partial sums): those wait in the early buffer."""

    STATE = _S.ADVERTISED
    ACCEPTS = live_accepts(STATE, {
        Roster.TYPE: to("on_roster", _S.SHARING, _S.REPORTED, _S.FINISHED)})
    DEFERS = frozenset({EncryptedShares.TYPE, EncryptedPartialSum.TYPE})
    EVENTS = live_events(STATE)

    def __init__(self, input: RoundInput) -> None:
        super().__init__(input, None)

    def on_roster(self, roster: Roster) -> Step:
        try:
            context = accept_roster(self.input, roster)
        except RoundDeclined as declined:
            return self.abort(str(declined))
        if not context.mode.shares_keys:
            # Nothing to share: wait for the tree (which the server sends right away).
            return [], ReportedPhase(context)
        return start_sharing(context)


def accept_roster(input: RoundInput, roster: Roster) -> RoundContext:
    """The round's context from ``roster``: RemoteProtocolError if the roster is
    inconsistent, RoundDeclined if this peer does not take part."""
    settings = input.settings
    try:
        check_round_shape(roster.size, roster.threshold, roster.threat_model,
                          roster.graph_kind, roster.mode)
    except ProtocolError as exc:
        raise RemoteProtocolError(str(exc), DropReason.BAD_MESSAGE) from None
    if not 0 <= roster.your_index < roster.size:
        raise RemoteProtocolError("roster index out of range", DropReason.BAD_MESSAGE)
    mode = round_mode(roster.mode)
    required = settings.required_mode
    if required is not None and mode != required:
        # A server must not talk a peer into another mode than it agreed to.
        raise RoundDeclined(f"the round runs in {mode.name} mode, this peer takes part "
                            f"only in {required.name} mode")
    required_threat = settings.required_threat_model
    if required_threat is not None and roster.threat_model != required_threat:
        # Nor into another threat model: under honest-but-curious nobody checks the
        # signatures that a peer holding identity keys relies on.
        raise RoundDeclined(f"the round runs under the {roster.threat_model} threat model, "
                            f"this peer takes part only under {required_threat}")
    if roster.graph_seed != session_graph_seed(input.session):
        # One graph per session: a server may not redraw it until it suits it.
        raise RemoteProtocolError("roster graph seed is not the session's",
                                  DropReason.BAD_MESSAGE)
    names = roster.names
    if bool(names) != (roster.graph_kind == "sparse"):
        # One way to draw each kind: a server may not pick the ring that suits it.
        raise RemoteProtocolError("a sparse roster lists every name, a complete one none",
                                  DropReason.BAD_MESSAGE)
    if names:
        # The ring is keyed by every rostered name: they must be the roster, in its
        # order, with this peer at its index (its neighbours' are checked below).
        if len(names) != roster.size or any(a >= b for a, b in pairwise(names)):
            raise RemoteProtocolError("roster names are not the roster's, sorted and "
                                      "unique", DropReason.BAD_MESSAGE)
        if names[roster.your_index] != settings.name:
            raise RemoteProtocolError("roster names do not put this peer at its index",
                                      DropReason.BAD_MESSAGE)
    try:
        graph = settings.graph_factory(roster.graph_kind, roster.size, roster.threshold,
                                       roster.graph_seed, roster.threat_model, names)
    except ValueError as exc:
        raise RemoteProtocolError(f"roster graph: {exc}", DropReason.BAD_MESSAGE) from None
    if (graph.degree, graph.share_threshold) != (roster.degree, roster.share_threshold):
        raise RemoteProtocolError("roster graph parameters do not match the graph seed",
                                  DropReason.BAD_MESSAGE)
    neighbours = mode.neighbourhood(graph.neighbours(roster.your_index), roster.your_index)
    entries = {entry.index: entry for entry in roster.neighbours}
    if sorted(entries) != list(neighbours) or len(entries) != len(roster.neighbours):
        raise RemoteProtocolError("roster neighbour list does not match the neighbour graph",
                                  DropReason.BAD_MESSAGE)
    if names and any(names[v] != entry.name for v, entry in entries.items()):
        raise RemoteProtocolError("roster neighbour names do not match the roster's names",
                                  DropReason.BAD_MESSAGE)
    own = entries[roster.your_index]
    if (own.name, own.channel_key, own.mask_key) != (
            settings.name, input.channel_keys.public_bytes, input.mask_keys.public_bytes):
        raise RemoteProtocolError("the roster does not carry this peer's own keys",
                                  DropReason.INVALID_KEYS)
    encoder = round_encoder(roster, settings.min_noise_multiplier)
    if encoder.dim != input.vector.shape[0]:
        raise RoundDeclined(f"input has {input.vector.shape[0]} coordinates but the round "
                            f"expects {encoder.dim}")
    try:
        codec = mode.codec(modulus_bits=roster.modulus_bits, dim=roster.dim,
                           peers=roster.size, paillier_key=roster.paillier_key)
    except (CryptoError, EncodingError) as exc:
        raise RoundDeclined(f"unusable Paillier parameters: {exc}") from None
    except ValueError as exc:  # a Paillier key in a round without encryption
        raise RemoteProtocolError(str(exc), DropReason.BAD_MESSAGE) from None
    context = RoundContext(input, roster, mode, codec, encoder, neighbours)
    context.add_contacts(roster.neighbours)
    return context


def round_encoder(roster: Roster, min_noise_multiplier: float | None) -> Encoder:
    """The round's encoding as the roster announces it, checked against this peer's own
    floor (RoundDeclined) and for consistency (RemoteProtocolError)."""
    announced = roster.dp
    dp: DPConfig | None = None
    if announced.mechanism:
        dp = DPConfig(noise_multiplier=announced.noise_multiplier, clip=announced.clip,
                      mechanism=announced.mechanism,  # type: ignore[arg-type]
                      delta=announced.delta, modulus_bits=roster.modulus_bits,
                      k_stddevs=announced.k_stddevs, beta=announced.beta,
                      scale=announced.scale,
                      max_sensitivity_inflation=announced.max_sensitivity_inflation)
    if min_noise_multiplier is not None:
        offered = dp.noise_multiplier if dp is not None else 0.0
        if offered < min_noise_multiplier:
            raise RoundDeclined(f"the round adds distributed-DP noise of multiplier "
                                f"{offered:g}, below this peer's floor "
                                f"min_noise_multiplier={min_noise_multiplier:g}")
    # A roster without input_dim (hand-made, or an older server): the ring carries the
    # input, the weight when weighted, and the clipped counter.
    input_dim = roster.input_dim or roster.dim - (1 if roster.weighted else 0) - 1
    try:
        encoder = Encoder.create(n=roster.size, dim=input_dim, clip=roster.clip,
                                 scale=roster.scale, modulus_bits=roster.modulus_bits,
                                 weighted=roster.weighted, max_weight=roster.max_weight,
                                 threshold=roster.threshold, dp=dp)
    except (EncodingError, ValueError) as exc:
        raise RoundDeclined(f"unusable encoding parameters: {exc}") from None
    if encoder.wire_dim != roster.dim:
        raise RemoteProtocolError(f"the roster's ring has {roster.dim} coordinates, its "
                                  f"encoding needs {encoder.wire_dim}", DropReason.BAD_MESSAGE)
    if dp is not None and len(announced.rotation_seed) != 32:
        raise RemoteProtocolError("a DP round's roster lacks the 32-byte rotation seed",
                                  DropReason.BAD_MESSAGE)
    return encoder


def checked_input(vector: np.ndarray, weight: float) -> tuple[np.ndarray, float]:
    """The round's input, checked once before anything is sent (ValueError otherwise)."""
    values = np.array(vector, dtype=np.float64)  # a copy: the caller may reuse its array
    if values.ndim != 1:
        raise ValueError(f"input must be a 1-D vector, got shape {values.shape}")
    bad = ~np.isfinite(values)
    if bad.any():
        first = int(np.argmax(bad))
        raise ValueError(f"input contains NaN or inf ({int(bad.sum())} coordinates, the "
                         f"first is {first}: {values[first]})")
    checked = float(weight)
    if not math.isfinite(checked) or checked < 0:
        raise ValueError(f"weight must be finite and >= 0, got {weight!r}")
    return values, checked
