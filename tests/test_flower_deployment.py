"""Flower's deployment engine: a SuperLink and SuperNode processes on 127.0.0.1 (insecure),
the example app (examples/flower_app) started with ``flwr run``, one SuperNode killed
with SIGKILL in the middle of a round; the round completes, exact over the rest."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("flwr")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "flower_app"
BIN = Path(sys.executable).parent
NODES = 4
ROUNDS = 1
KILLED = 2  # the partition whose SuperNode is killed
KILL_AT = (1, 4)  # (round, message of the round): asked for its masked input
FEATURES = 8
# Each message starts a fresh ClientApp process: about 15 s a step on 2 busy cores.
PHASE_TIMEOUT = 60.0
DEADLINE = 900.0

STALL_CLIENT = '''\
"""The example's ClientApp, with one node that stops at a given message so that the
test can kill its SuperNode while the round is in progress."""

import time
from pathlib import Path

from flwr.client import ClientApp

from flower_app.task import client_fn
from peers.flower import secagg_mod

KILLED, ROUND, MESSAGE, MARKER = {killed}, {round}, {message}, {marker!r}


def stall_mod(msg, context, call_next):
    if int(context.node_config["partition-id"]) == KILLED and msg.metadata.group_id == str(ROUND):
        counts = context.state.config_records.get("test.count")
        index = int(counts["n"]) + 1 if counts is not None else 1
        from flwr.app import ConfigRecord
        context.state.config_records["test.count"] = ConfigRecord({{"n": index}})
        if index == MESSAGE:
            Path(MARKER).write_text("stalled")
            time.sleep(600)  # killed meanwhile
    return call_next(msg, context)


app = ClientApp(client_fn=client_fn, mods=[stall_mod, secagg_mod])
'''


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(predicate: Any, what: str, deadline: float) -> None:
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.5)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in started:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)


@pytest.mark.slow
def test_deployment_round_survives_a_killed_supernode(
        tmp_path: Path, processes: list[subprocess.Popen[bytes]]) -> None:
    app = tmp_path / "app"
    shutil.copytree(EXAMPLE, app, ignore=shutil.ignore_patterns("__pycache__"))
    marker = tmp_path / "stalled"
    (app / "flower_app" / "stall_client.py").write_text(STALL_CLIENT.format(
        killed=KILLED, round=KILL_AT[0], message=KILL_AT[1], marker=str(marker)))
    pyproject = app / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace(
        'clientapp = "flower_app.client_app:app"', 'clientapp = "flower_app.stall_client:app"'))
    results = tmp_path / "results.jsonl"
    logs = tmp_path / "logs"
    logs.mkdir()
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr"), "PYTHONUNBUFFERED": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}

    def start(name: str, *args: str) -> subprocess.Popen[bytes]:
        out = (logs / f"{name}.log").open("wb")
        proc = subprocess.Popen([str(BIN / args[0]), *args[1:]], stdout=out,
                                stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
                                start_new_session=True)
        processes.append(proc)
        return proc

    link_port = free_port()
    start("superlink", "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port",
          str(link_port), "--disable-runtime-dependency-installation")
    nodes = [start(f"supernode-{pid}", "flower-supernode", "--insecure", "--superlink",
                   f"127.0.0.1:{link_port}", "--port", str(free_port()), "--node-config",
                   f"partition-id={pid} num-partitions={NODES}")
             for pid in range(NODES)]
    (tmp_path / "flwr").mkdir()
    (tmp_path / "flwr" / "config.toml").write_text(
        '[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\n'
        f'address = "127.0.0.1:{link_port}"\ninsecure = true\n')
    run_config = (f'num-server-rounds={ROUNDS} min-nodes={NODES} num-features={FEATURES} '
                  f'phase-timeout={PHASE_TIMEOUT} fit-timeout=300.0 results-file="{results}"')
    deadline = time.monotonic() + DEADLINE
    while True:
        submitted = subprocess.run([str(BIN / "flwr"), "run", str(app), "deploy",
                                    "--run-config", run_config], env=env, cwd=tmp_path,
                                   capture_output=True, timeout=120, check=False)
        if submitted.returncode == 0:
            break
        assert time.monotonic() < deadline, submitted.stdout + submitted.stderr
        time.sleep(2)  # the SuperLink is still starting

    wait_for(marker.exists, "the node to stall mid-round", deadline)
    os.killpg(nodes[KILLED].pid, signal.SIGKILL)  # the SuperNode and its ClientApp
    nodes[KILLED].wait(timeout=15)
    wait_for(lambda: results.exists() and len(results.read_text().splitlines()) >= ROUNDS,
             f"{ROUNDS} rounds (logs in {logs})", deadline)

    sys.path.insert(0, str(app))
    try:
        from flower_app.task import local_update
    finally:
        sys.path.remove(str(app))
    rounds = [json.loads(line) for line in results.read_text().splitlines()]
    for record in rounds:
        pids = record["contributors"]
        if record["round"] == KILL_AT[0]:
            assert pids == [pid for pid in range(NODES) if pid != KILLED]
        else:
            assert pids == list(range(NODES))
        model = [np.array(record["input"][0])]
        updates = [local_update(model, pid, FEATURES) for pid in pids]
        weights = np.array([count for _, count in updates], dtype=np.float64)
        expected = sum(w * u[0][0] for w, u in zip(weights, updates, strict=True)) / weights.sum()
        # 32-bit ring, clip 8, max weight 1000, 5 nodes: each coordinate of Σw·x is within
        # 5 / scale ~ 0.04 of exact, so the mean within 0.04 · (1 + |mean|) / Σw.
        bound = 0.04 * (1 + np.max(np.abs(expected))) / (weights.sum() - 0.04)
        assert np.max(np.abs(np.array(record["model"][0]) - expected)) <= bound
