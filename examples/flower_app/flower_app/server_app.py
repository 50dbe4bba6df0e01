"""The ServerApp: FedAvg whose fit rounds run through secagg's SecAggWorkflow.

The only change from Flower's SecAgg+ is the fit workflow:

    DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(num_shares=..., reconstruction_threshold=...))
    DefaultWorkflow(fit_workflow=SecAggWorkflow(threshold=...))
"""

from __future__ import annotations

import json
from typing import Any

from flwr.app import Context
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import Grid, LegacyContext, ServerApp, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow

from flower_app.task import initial_model
from server.flower import SecAggWorkflow

app = ServerApp()


class ReportingFedAvg(FedAvg):  # type: ignore[misc]
    """FedAvg that appends each round's result to a JSON-lines file (if one is given)."""

    def __init__(self, results_file: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.results_file = results_file
        self.global_model: list[Any] = []

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
        self.global_model = parameters_to_ndarrays(parameters)
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
        aggregated, metrics = super().aggregate_fit(server_round, results, failures)
        if self.results_file and aggregated is not None:
            line = {"round": server_round,
                    "contributors": sorted(int(res.metrics["partition-id"])
                                           for _, res in results),
                    "failures": len(failures),
                    "input": [a.tolist() for a in self.global_model],
                    "model": [a.tolist() for a in parameters_to_ndarrays(aggregated)]}
            with open(self.results_file, "a", encoding="utf-8") as out:
                out.write(json.dumps(line) + "\n")
        return aggregated, metrics


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = context.run_config
    nodes = int(config["min-nodes"])  # sample every node, once this many are connected
    strategy = ReportingFedAvg(
        results_file=str(config["results-file"]), fraction_fit=1.0, fraction_evaluate=0.0,
        min_fit_clients=nodes, min_available_clients=nodes,
        initial_parameters=ndarrays_to_parameters(initial_model(int(config["num-features"]))))
    legacy = LegacyContext(context=context,
                           config=ServerConfig(num_rounds=int(config["num-server-rounds"])),
                           strategy=strategy)
    workflow = DefaultWorkflow(fit_workflow=SecAggWorkflow(
        threshold=float(config["threshold"]), phase_timeout=float(config["phase-timeout"]),
        fit_timeout=float(config["fit-timeout"])))
    workflow(grid, legacy)
