"""Weighted federated averaging (FedAvg) over secure aggregation, for PyTorch models.

A client trains locally from the global model, then contributes its model
*delta* with its sample count as weight; the coordinator (``weighted=True``)
learns only the weighted mean delta ``sum(n_i * delta_i) / sum(n_i)`` over the
round's contributors, which every party applies to the global model::

    spec = update_spec(model)                      # dim = spec.size for the coordinator
    client = FedAvgClient(peer)
    outcome = await client.contribute_update(trained.state_dict(), global_state, n_samples)
    ...
    apply_aggregate(global_model, result.outcome.mean, spec)

Coordinator settings that fit: ``weighted=True``, ``dim=spec.size``,
``max_weight`` >= the largest sample count, ``clip`` >= the largest delta
coordinate (larger coordinates are clipped, as in DP-style FedAvg), and
``modulus_bits=64`` for fine quantization. The decoded mean differs from the
exact weighted mean of the clipped deltas by less than
``WeightedEncoding.mean_error_bound(n, total_weight)`` per coordinate
(:mod:`secagg.encoding`).

PyTorch is imported lazily: importing this module works without it, using it
raises an :class:`ImportError` that says how to install it.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from peers.peer import Peer
from secagg.protocol import PeerOutcome

if TYPE_CHECKING:
    import torch

    from secagg.torch_state import StateSpec

__all__ = ["FedAvgClient", "apply_aggregate", "update_spec", "update_vector"]

TORCH_MISSING = ("peers.fedavg needs PyTorch: pip install torch==2.13.0 (CPU build) "
                 "or the project's 'torch' extra")


def _torch_state() -> types.ModuleType:
    """``secagg.torch_state``, or the install hint if PyTorch is missing."""
    try:
        import torch  # noqa: F401

        from secagg import torch_state
    except ImportError as exc:
        raise ImportError(TORCH_MISSING) from exc
    return torch_state


def update_spec(model: torch.nn.Module | Mapping[str, torch.Tensor]) -> StateSpec:
    """The layout of a FedAvg update: the floating entries of the model's state.

    Integer buffers (BatchNorm's ``num_batches_tracked``) are not averaged; each
    party keeps its own. ``update_spec(model).size`` is the coordinator's ``dim``.
    """
    ts = _torch_state()
    state = model.state_dict() if hasattr(model, "state_dict") else model
    spec: StateSpec = ts.state_spec(state, floating_only=True)
    return spec


def update_vector(new_state: Mapping[str, torch.Tensor], old_state: Mapping[str, torch.Tensor],
                  ) -> tuple[np.ndarray, StateSpec]:
    """The flat float64 delta ``new - old`` over the floating entries, and its spec."""
    ts = _torch_state()
    delta = ts.state_delta(new_state, old_state, floating_only=True)
    vector: np.ndarray
    spec: StateSpec
    vector, spec = ts.flatten_state(delta)
    return vector, spec


class FedAvgClient:
    """A FedAvg participant: contributes weighted model deltas through a :class:`Peer`.

    The peer must be started (``async with Peer(...)``) and is not owned: close
    it yourself. One ``contribute_update`` per round, like ``Peer.contribute``.
    """

    def __init__(self, peer: Peer) -> None:
        _torch_state()  # fail early, with the install hint
        self.peer = peer
        self.last_spec: StateSpec | None = None
        self.last_update: np.ndarray | None = None

    @property
    def peer_id(self) -> str:
        return self.peer.peer_id

    async def contribute_update(self, new_state: Mapping[str, torch.Tensor],
                                old_state: Mapping[str, torch.Tensor],
                                num_samples: float) -> PeerOutcome:
        """Contribute ``new_state - old_state`` with weight ``num_samples``; return the outcome.

        ``old_state`` is the global model the local training started from. The
        weight must be positive and at most the coordinator's ``max_weight``
        (the round aborts for this peer otherwise).
        """
        weight = float(num_samples)
        if not np.isfinite(weight) or weight <= 0:
            raise ValueError(f"num_samples must be a positive number, got {num_samples!r}")
        vector, spec = update_vector(new_state, old_state)
        self.last_spec, self.last_update = spec, vector
        return await self.peer.contribute(vector, weight=weight)


def apply_aggregate(model: torch.nn.Module, aggregate: np.ndarray, spec: StateSpec) -> None:
    """Add the aggregated (weighted mean) delta to ``model`` in place.

    ``aggregate`` is the coordinator's decoded weighted mean
    (``RoundResult.outcome.mean``: Σ n_i·delta_i / Σ n_i), laid out as ``spec`` (from
    :func:`update_spec` or a client's ``last_spec``). Entries outside ``spec``
    (integer buffers) keep the model's own values.
    """
    ts = _torch_state()
    delta = ts.unflatten_state(aggregate, spec)
    state = model.state_dict()
    new_state = ts.apply_delta(state, delta)
    model.load_state_dict(new_state)
