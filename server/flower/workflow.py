"""The workflows that run a :class:`~server.flower.grid.GridRound`:
:class:`SecAggWorkflow` for Flower's legacy FedAvg path, and :func:`secure_sum` for the
Message API.

The round's result feeds the strategy's ``aggregate_fit`` as Flower's own
workflow does: every contributor's ``FitRes`` carries the weighted average (by
``num_examples``) of the contributors' parameters, so FedAvg returns exactly it.
:func:`secure_sum` is the same round for the Message API: the secure sum, and the
total weight, of the ``ArrayRecord`` the clients return.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

try:
    import flwr.compat.common.recorddict_compat as compat
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.common import FitRes, ndarrays_to_parameters
    from flwr.server.client_proxy import ClientProxy
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
    from flwr.serverapp.grid import Grid
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError("server.flower needs Flower: pip install 'secagg[flower]'") from exc

from server.flower.grid import GridRound, RoundReport
from server.flower.settings import SecAggSettings

log = logging.getLogger("secagg.flower.server")


# --------------------------------------------------------------------------- arrays


@dataclass(frozen=True)
class _Layout:
    """Names, shapes and dtypes of the arrays a vector stands for."""

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[np.dtype[Any], ...]

    @classmethod
    def of(cls, record: ArrayRecord) -> _Layout:
        arrays = record.to_numpy_ndarrays()
        return cls(tuple(record.keys()), tuple(a.shape for a in arrays),
                   tuple(a.dtype for a in arrays))

    @property
    def dim(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes)

    def split(self, vector: np.ndarray) -> list[np.ndarray]:
        arrays, start = [], 0
        for shape, dtype in zip(self.shapes, self.dtypes, strict=True):
            size = math.prod(shape)
            arrays.append(vector[start:start + size].reshape(shape).astype(dtype))
            start += size
        return arrays

    def record(self, vector: np.ndarray) -> ArrayRecord:
        return ArrayRecord(dict(zip(self.keys, [Array(a) for a in self.split(vector)],
                                    strict=True)))


# --------------------------------------------------------------------------- the workflow


class SecAggWorkflow:
    """Secure aggregation for Flower's legacy FedAvg path: a drop-in for
    ``SecAggPlusWorkflow`` (``DefaultWorkflow(fit_workflow=SecAggWorkflow(...))``).

    Arguments are those of :class:`SecAggSettings`. If a round aborts (fewer than
    ``threshold`` nodes stay to the end) the global model is left unchanged, as
    ``SecAggPlusWorkflow`` leaves it when it halts.
    """

    def __init__(self, threshold: int | float | None = None, **settings: Any) -> None:
        self.settings = SecAggSettings(threshold=threshold, **settings)
        self.reports: list[RoundReport] = []
        """One per round run (for measurements and tests)."""

    @classmethod
    def from_secaggplus(cls, num_shares: int | float | None = None,
                        reconstruction_threshold: int | float | None = None,
                        **kwargs: Any) -> SecAggWorkflow:
        """The workflow for ``SecAggPlusWorkflow``'s arguments (see
        :meth:`SecAggSettings.from_secaggplus`)."""
        settings = SecAggSettings.from_secaggplus(num_shares, reconstruction_threshold,
                                                  **kwargs)
        return cls(**dataclasses.asdict(settings))

    def __call__(self, grid: Grid, context: Any) -> None:
        if not isinstance(context, LegacyContext):
            raise TypeError(f"SecAggWorkflow runs in a DefaultWorkflow (a LegacyContext), "
                            f"got {type(context).__name__}")
        cfg = context.state.config_records[MAIN_CONFIGS_RECORD]
        current_round = cast(int, cfg["current_round"])
        global_record = context.state.array_records[MAIN_PARAMS_RECORD]
        parameters = compat.arrayrecord_to_parameters(global_record, keep_input=True)
        instructions = context.strategy.configure_fit(current_round, parameters,
                                                      context.client_manager)
        if not instructions:
            log.info("configure_fit: no clients selected, cancel")
            return
        if len(instructions) < 2:
            log.error("secure aggregation needs at least 2 sampled nodes, got %d",
                      len(instructions))
            return
        proxies = {proxy.node_id: proxy for proxy, _ in instructions}
        starts = {proxy.node_id: compat.fitins_to_recorddict(fitins, True)
                  for proxy, fitins in instructions}
        layout = _Layout.of(compat.parameters_to_arrayrecord(parameters, keep_input=True))
        try:
            grid_round = GridRound(grid, self.settings, starts, round=current_round,
                                   dim=layout.dim, group_id=str(current_round))
        except ValueError as exc:  # e.g. fewer nodes sampled than the threshold
            log.error("secure aggregation round %d cannot run: %s", current_round, exc)
            return
        report = grid_round.run()
        self.reports.append(report)
        outcome = report.outcome
        log.info("secure aggregation round %d: %s %s (%d contributors of %d, %d steps)",
                 current_round, outcome.status, outcome.reason, len(outcome.contributors),
                 len(starts), report.steps)
        if outcome.status != "ok" or outcome.mean is None:
            return
        mean = ndarrays_to_parameters(layout.split(outcome.mean))
        results: list[tuple[ClientProxy, FitRes]] = []
        for node_id in report.contributor_ids():
            fitres = compat.recorddict_to_fitres(report.replies[node_id], keep_input=True)
            fitres.parameters = mean
            results.append((proxies[node_id], fitres))
        aggregated, metrics = context.strategy.aggregate_fit(
            current_round, results, report.failures)  # type: ignore[arg-type]
        if aggregated is not None:
            context.state.array_records[MAIN_PARAMS_RECORD] = \
                compat.parameters_to_arrayrecord(aggregated, True)
            context.history.add_metrics_distributed_fit(server_round=current_round,
                                                        metrics=metrics)


# --------------------------------------------------------------------------- Message API


@dataclass
class SecureSum:
    """The secure sum of the ``ArrayRecord`` the contributors returned."""

    arrays: ArrayRecord | None
    """Σ w·x over the contributors (None if the round aborted)."""
    total_weight: float
    contributors: list[int]
    """Node ids whose input is in the sum."""
    metrics: dict[int, list[MetricRecord]]
    """Each contributor's metric records (as it returned them)."""
    report: RoundReport

    def mean(self) -> ArrayRecord | None:
        """The weighted mean Σ w·x / Σ w (None if the round aborted)."""
        outcome = self.report.outcome
        if self.arrays is None or outcome.mean is None:
            return None
        layout = _Layout.of(self.arrays)
        return layout.record(np.asarray(outcome.mean, dtype=np.float64))


def secure_sum(grid: Grid, node_ids: Iterable[int], message: Message | RecordDict, *,
               round: int | None = None, settings: SecAggSettings | None = None
               ) -> SecureSum:
    """Run one secure-aggregation round with the Message API (``flwr.serverapp``).

    ``message`` is the round's train message (or its content): one ``ArrayRecord``
    (the global model) and any config records. Every node in ``node_ids`` gets a copy;
    its ClientApp (with :data:`peers.flower.secagg_mod`) replies with one
    ``ArrayRecord`` of the same layout and a metric ``settings.weight_key`` (default
    "num-examples") as its weight. Returns the secure sum of the contributors'
    arrays weighted by that metric, and the total weight.
    """
    settings = settings or SecAggSettings()
    content = message.content if isinstance(message, Message) else message
    group_id = message.metadata.group_id if isinstance(message, Message) else ""
    if round is None:
        round = int(group_id) if group_id.isdigit() else 0
    records = list(content.array_records.values())
    if len(records) != 1:
        raise ValueError(f"the round's message must hold one ArrayRecord, not {len(records)}")
    layout = _Layout.of(records[0])
    ids = list(dict.fromkeys(node_ids))
    if len(ids) < 2:
        raise ValueError(f"secure aggregation needs at least 2 nodes, got {len(ids)}")
    starts = {node_id: _copy(content) for node_id in ids}
    report = GridRound(grid, settings, starts, round=round, dim=layout.dim,
                       group_id=group_id or str(round)).run()
    outcome = report.outcome
    contributors = report.contributor_ids() if outcome.status == "ok" else []
    arrays = None
    if outcome.status == "ok" and outcome.aggregate is not None:
        arrays = layout.record(np.asarray(outcome.aggregate, dtype=np.float64))
    metrics = {node_id: list(report.replies[node_id].metric_records.values())
               for node_id in contributors}
    return SecureSum(arrays=arrays, total_weight=float(outcome.total_weight or 0.0),
                     contributors=contributors, metrics=metrics, report=report)


def _copy(content: RecordDict) -> RecordDict:
    copied = RecordDict()
    for key, record in content.items():
        if isinstance(record, ArrayRecord):
            copied[key] = ArrayRecord(dict(record.items()))
        elif isinstance(record, ConfigRecord):
            copied[key] = ConfigRecord(dict(record.items()))
        else:
            copied[key] = MetricRecord(dict(record.items()))
    return copied
