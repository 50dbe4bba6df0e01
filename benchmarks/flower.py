"""Benchmark: one FedAvg round on Flower's simulation engine, three ways, in one run.

What is measured
----------------
One ``run_simulation`` (Ray backend) with ``n`` SuperNodes, each holding a model of
``d`` float32 parameters. Its ServerApp runs the same FedAvg round, from the same
global model, through:

- ``plain``: Flower's default fit workflow (no secure aggregation): the floor the
  engine itself sets;
- ``secaggplus``: Flower's ``SecAggPlusWorkflow`` + ``secaggplus_mod``
  (``num_shares=1.0``, ``reconstruction_threshold=0.6``);
- ``secagg``: :class:`server.flower.SecAggWorkflow` + :data:`peers.flower.secagg_mod`
  (complete graph, threshold 0.6).

A fraction ``--failing`` of the clients (30 % by default) fail: in ``plain`` their
fit raises; in the two secure workflows they fail when asked for their masked
input, after the key exchange, so the server must remove their pairwise masks.
The contributors are then the same in all three, and so is the model (``max_abs_diff``
against ``plain``, within quantization).

Per workflow and round, one JSON line: ``wall_seconds`` (the fit workflow, from
``configure_fit`` to the new global model), ``server_cpu_seconds`` (CPU time of the
thread that runs the workflow: the server's own compute), ``server_bytes`` (array
and byte payloads of every message through the server, both ways), ``steps``.
Then one summary line per size: ``overhead`` = secagg / plain and ``speedup`` =
secaggplus / secagg, on wall time (and on server CPU time). Target: overhead <= 1.5.

The first round of a simulation pays Ray's start-up: a warm-up ``plain`` round runs
first and is not reported. ``--quick`` runs n = 6, d = 1,000.

    python benchmarks/flower.py [--clients 50 --dim 100000] [--also 100] [--quick]

The script exits 0: benchmarks report, they do not fail.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

try:
    import flwr.compat.common.recorddict_compat as compat
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.client import ClientApp, NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
    from flwr.server import LegacyContext, ServerApp, ServerConfig
    from flwr.server.compat.app_utils import start_update_client_manager_thread
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
    from flwr.server.workflow.default_workflows import default_fit_workflow
    from flwr.simulation import run_simulation
except ImportError:  # pragma: no cover - depends on the installed extras
    print(json.dumps({"bench": "flower", "status": "skipped",
                      "note": "needs Flower: pip install 'secagg[flower]'"}))
    sys.exit(0)

from peers.flower import RECORD, secagg_mod
from server.flower import SecAggWorkflow

WORKFLOWS = ("plain", "secaggplus", "secagg")
# The message (within its round) at which a failing client fails, per workflow: the
# fit in plain, the masked-input stage in the two secure ones.
FAIL_AT = {"plain": 1, "secaggplus": 3, "secagg": 4}


def failing(pid: int, clients: int, fraction: float) -> bool:
    return pid < round(fraction * clients)


def payload_bytes(content: RecordDict) -> int:
    """Bytes of arrays and byte strings in a message (what dominates its size)."""
    total = 0
    for record in content.values():
        if isinstance(record, ArrayRecord):
            total += sum(len(array.data) for array in record.values())
        elif isinstance(record, ConfigRecord):
            for value in record.values():
                if isinstance(value, bytes):
                    total += len(value)
                elif isinstance(value, list):
                    total += sum(len(v) for v in value if isinstance(v, bytes))
    return total


class MeasuredGrid:
    """The Grid, counting what goes through it."""

    def __init__(self, grid: Any) -> None:
        self.grid = grid
        self.bytes = 0
        self.steps = 0

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> Any:
        messages = list(messages)
        self.steps += 1
        self.bytes += sum(payload_bytes(m.content) for m in messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.bytes += sum(payload_bytes(r.content) for r in replies if r.has_content())
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)


class Client(NumPyClient):  # type: ignore[misc]
    def __init__(self, pid: int) -> None:
        self.pid = pid

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]
            ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        rng = np.random.default_rng(self.pid)
        update = [p + rng.uniform(-0.1, 0.1, size=p.shape).astype(p.dtype) for p in parameters]
        return update, 10 + (self.pid * 37) % 90, {}


def client_app(clients: int, fraction: float) -> ClientApp:
    def route(msg: Message, context: Context, call_next: Callable[..., Message]) -> Message:
        pid = int(context.node_config["partition-id"])
        group = msg.metadata.group_id
        if RECORD in msg.content.config_records:
            workflow = "secagg"
        elif RECORD_KEY_CONFIGS in msg.content.config_records:
            workflow = "secaggplus"
        else:
            workflow = "plain"
        counts = context.state.config_records.get("bench.counts") or ConfigRecord({})
        counts[group] = index = int(counts.get(group, 0)) + 1
        context.state.config_records["bench.counts"] = counts
        if group != "0" and failing(pid, clients, fraction) and index == FAIL_AT[workflow]:
            raise RuntimeError(f"client {pid} fails ({workflow}, message {index})")
        if workflow == "secagg":
            return secagg_mod(msg, context, call_next)
        if workflow == "secaggplus":
            return secaggplus_mod(msg, context, call_next)
        return call_next(msg, context)

    def client_fn(context: Context) -> Any:
        return Client(int(context.node_config["partition-id"])).to_client()

    return ClientApp(client_fn=client_fn, mods=[route])


def run(clients: int, dim: int, fraction: float, repeats: int,
        only: tuple[str, ...] = WORKFLOWS) -> list[dict[str, Any]]:
    initial = [np.linspace(-1, 1, dim, dtype=np.float32)]
    records: list[dict[str, Any]] = []
    workflows: dict[str, Any] = {
        "plain": default_fit_workflow,
        "secaggplus": SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=0.6,
                                         timeout=600.0),
        "secagg": SecAggWorkflow(threshold=0.6, phase_timeout=120.0, fit_timeout=600.0),
    }
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Any, context: Context) -> None:
        strategy = FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=clients,
                          min_available_clients=clients, accept_failures=True)
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=1),
                               strategy=strategy)
        thread, stop, ready = start_update_client_manager_thread(grid, legacy.client_manager)
        ready.wait()
        start = compat.parameters_to_arrayrecord(ndarrays_to_parameters(initial), True)
        cfg = ConfigRecord({"current_round": 0})
        legacy.state.config_records[MAIN_CONFIGS_RECORD] = cfg
        schedule = ["warmup"] + [name for _ in range(repeats) for name in WORKFLOWS
                                 if name in only]
        reference: np.ndarray | None = None
        for number, name in enumerate(schedule):
            cfg["current_round"] = number
            legacy.state.array_records[MAIN_PARAMS_RECORD] = start
            measured = MeasuredGrid(grid)
            workflow = workflows["plain" if name == "warmup" else name]
            cpu, wall = time.thread_time(), time.perf_counter()
            workflow(measured, legacy)
            wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
            if name == "warmup":
                continue
            result = parameters_to_ndarrays(compat.arrayrecord_to_parameters(
                legacy.state.array_records[MAIN_PARAMS_RECORD], True))[0].astype(np.float64)
            if name == "plain":
                reference = result
            records.append({
                "bench": "flower", "workflow": name,
                "params": {"clients": clients, "dim": dim, "failing": fraction},
                "wall_seconds": round(wall, 3), "server_cpu_seconds": round(cpu, 3),
                "server_bytes": measured.bytes, "steps": measured.steps,
                "max_abs_diff": None if reference is None else
                float(np.max(np.abs(result - reference))),
                "step_seconds": [round(x, 3) for x in workflows["secagg"].reports[-1].step_seconds]
                if name == "secagg" else None})
        stop.set()
        thread.join()

    run_simulation(server_app=server_app, client_app=client_app(clients, fraction),
                   num_supernodes=clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    return records


def summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    def best(name: str, key: str) -> float:
        return min(float(r[key]) for r in records if r["workflow"] == name)

    plain, plus, ours = (best(name, "wall_seconds") for name in WORKFLOWS)
    plus_cpu, ours_cpu = best("secaggplus", "server_cpu_seconds"), \
        best("secagg", "server_cpu_seconds")
    return {"bench": "flower", "summary": True, "params": records[0]["params"],
            "plain_seconds": plain, "secaggplus_seconds": plus, "secagg_seconds": ours,
            "overhead": round(ours / plain, 3), "speedup": round(plus / ours, 3),
            "cpu_speedup": round(plus_cpu / max(ours_cpu, 1e-9), 3),
            "target": {"overhead": 1.5}, "meets_target": ours / plain <= 1.5}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--dim", type=int, default=100_000)
    parser.add_argument("--failing", type=float, default=0.3)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--also", type=int, nargs="*", default=[],
                        help="more client counts to run (same dim), each its own simulation")
    parser.add_argument("--only", nargs="+", choices=WORKFLOWS, default=list(WORKFLOWS),
                        help="run only these workflows (the summary needs all three)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    sizes = [(6, 1_000)] if args.quick else \
        [(args.clients, args.dim)] + [(n, args.dim) for n in args.also]
    for clients, dim in sizes:
        records = run(clients, dim, args.failing, args.repeats, tuple(args.only))
        for record in records:
            print(json.dumps(record), flush=True)
        if set(args.only) == set(WORKFLOWS):
            print(json.dumps(summary(records)), flush=True)


if __name__ == "__main__":
    main()
