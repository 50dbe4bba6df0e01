"""The Flower integration: SecAggWorkflow + secagg_mod (and secure_sum for the Message API).

Fast tests drive a round over an in-process Grid that hands each message straight to
the client mod (every message in a fresh "process": the peer is rebuilt from its
snapshot in ``context.state``). The slow tests run Flower's own simulation engine
(Ray backend): 20 SuperNodes, FedAvg for three rounds, clients failing at different
steps, and Flower's SecAggPlusWorkflow + secaggplus_mod as the reference.
"""

from __future__ import annotations

import math
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import pytest

flwr = pytest.importorskip("flwr")

import flwr.compat.common.recorddict_compat as compat  # noqa: E402
from flwr.app import (  # noqa: E402
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.app.message_type import MessageType  # noqa: E402
from flwr.common import (  # noqa: E402
    Code,
    FitIns,
    FitRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

import peers.flower.mod as peer_flower  # noqa: E402
from peers.flower import STATE_RECORD, secagg_mod  # noqa: E402
from secagg import wire  # noqa: E402
from server.flower import (  # noqa: E402
    GridRound,
    RoundReport,
    SecAggSettings,
    SecAggWorkflow,
    UnsupportedSetting,
    node_name,
    secure_sum,
)

# --------------------------------------------------------------------------- the app


def local_update(global_arrays: list[np.ndarray], pid: int, round: int) -> list[np.ndarray]:
    """What client ``pid`` trains in ``round``: deterministic, different per client."""
    rng = np.random.default_rng(1000 * round + pid)
    return [a + rng.uniform(-0.5, 0.5, size=a.shape).astype(a.dtype) for a in global_arrays]


def examples(pid: int) -> int:
    return 10 + 7 * pid


INITIAL = [np.linspace(-1, 1, 12).reshape(3, 4), np.zeros(5), np.arange(3, dtype=np.float32)]


def fedavg(global_arrays: list[np.ndarray], pids: list[int], round: int) -> list[np.ndarray]:
    """Plaintext FedAvg over ``pids``."""
    updates = [local_update(global_arrays, pid, round) for pid in pids]
    weights = np.array([examples(pid) for pid in pids], dtype=np.float64)
    return [np.tensordot(weights, np.stack([u[k].astype(np.float64) for u in updates]), 1)
            / weights.sum() for k in range(len(global_arrays))]


def tolerance(report: RoundReport, settings: SecAggSettings, mean: list[np.ndarray]) -> float:
    """How far the decoded weighted mean may lie from plaintext FedAvg: each coordinate of
    Σw·x and of Σw is off by at most the quantizer's bound b, so the mean by at most
    b (1 + |mean|) / (Σw - b); float32 arrays add their rounding."""
    n = len(report.names)
    config = settings.config(session=bytes(16), round=1, peers=n, dim=1)
    bound = config.encoder(n).quantizer.error_bound(n)
    total = report.outcome.total_weight
    assert total is not None
    largest = max(float(np.max(np.abs(a))) for a in mean)
    return bound * (1 + largest) / (total - bound) + 1e-6 * (1 + largest)


# --------------------------------------------------------------------------- in-process Grid


@dataclass
class FakeNode:
    """One SuperNode: its context persists across messages, its ClientApp is the mod
    around a NumPy-style fit. ``faults`` maps the index of a message within a round
    (1 = the first) to "raise" (the ClientApp fails) or "silent" (no reply)."""

    node_id: int
    pid: int
    mod: Callable[..., Message] = secagg_mod
    faults: dict[int, str] = field(default_factory=dict)
    tamper: Callable[[int, Message], Message] | None = None
    message_api: bool = False
    context: Context = field(init=False)
    seen: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.context = Context(run_id=1, node_id=self.node_id,
                               node_config={"partition-id": self.pid}, state=RecordDict(),
                               run_config={})

    def fit(self, msg: Message, context: Context) -> Message:
        round = int(msg.metadata.group_id)
        if self.message_api:
            arrays = next(iter(msg.content.array_records.values())).to_numpy_ndarrays()
            updated = local_update(arrays, self.pid, round)
            return Message(RecordDict({
                "arrays": ArrayRecord(updated),
                "metrics": MetricRecord({"num-examples": examples(self.pid)})}), reply_to=msg)
        fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
        updated = local_update(parameters_to_ndarrays(fitins.parameters), self.pid, round)
        fitres = FitRes(status=Status(Code.OK, ""), parameters=ndarrays_to_parameters(updated),
                        num_examples=examples(self.pid), metrics={"pid": self.pid})
        return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)

    def handle(self, msg: Message) -> Message | None:
        group = msg.metadata.group_id
        self.seen[group] = index = self.seen.get(group, 0) + 1
        fault = self.faults.get(index)
        if fault == "silent":
            return None
        if fault == "raise":
            return Message(Error(code=0, reason=f"pid {self.pid} failed at message {index}"),
                           reply_to=msg)
        reply = self.mod(msg, self.context, self.fit)
        return self.tamper(index, reply) if self.tamper is not None else reply


class FakeGrid:
    """Delivers each message to its node at once; records what went through."""

    def __init__(self, nodes: list[FakeNode]) -> None:
        self.nodes = {node.node_id: node for node in nodes}
        self.steps = 0

    def send_and_receive(self, messages: list[Message], *,
                         timeout: float | None = None) -> list[Message]:
        self.steps += 1
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            reply = self.nodes[msg.metadata.dst_node_id].handle(msg)
            if reply is not None:
                replies.append(reply)
        return replies

    def push_messages(self, messages: list[Message]) -> list[str]:
        """Delivered at once; nobody waits for the answers."""
        self.send_and_receive(messages)
        return [msg.metadata.message_id for msg in messages]


@pytest.fixture
def task_identity() -> Iterator[None]:
    """Flower stamps messages with the running task's identity; here there is none."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


@pytest.fixture
def replay_every_message(monkeypatch: pytest.MonkeyPatch) -> None:
    """No process keeps a live peer: every message restores the snapshot."""
    monkeypatch.setattr(peer_flower, "_LIVE", peer_flower._LivePeers(0))


def make_nodes(n: int, **faults: dict[int, str]) -> list[FakeNode]:
    return [FakeNode(node_id=1000 + 17 * pid, pid=pid, faults=faults.get(f"pid{pid}", {}))
            for pid in range(n)]


def run_round(nodes: list[FakeNode], settings: SecAggSettings, round: int = 1,
              arrays: list[np.ndarray] | None = None) -> tuple[RoundReport, list[np.ndarray]]:
    arrays = INITIAL if arrays is None else arrays
    parameters = ndarrays_to_parameters(arrays)
    starts = {node.node_id: compat.fitins_to_recorddict(FitIns(parameters, {}), True)
              for node in nodes}
    dim = sum(a.size for a in arrays)
    report = GridRound(FakeGrid(nodes), settings, starts, round=round, dim=dim,
                       group_id=str(round)).run()
    return report, arrays


def contributor_pids(report: RoundReport, nodes: list[FakeNode]) -> list[int]:
    pid_of = {node_name(node.node_id): node.pid for node in nodes}
    return sorted(pid_of[name] for name in report.outcome.contributors)


def assert_fedavg(report: RoundReport, settings: SecAggSettings, nodes: list[FakeNode],
                  arrays: list[np.ndarray], round: int = 1) -> list[int]:
    outcome = report.outcome
    assert outcome.status == "ok", outcome.reason
    assert outcome.mean is not None
    pids = contributor_pids(report, nodes)
    expected = np.concatenate([a.ravel() for a in fedavg(arrays, pids, round)])
    assert np.max(np.abs(outcome.mean - expected)) <= tolerance(report, settings, [expected])
    return pids


# --------------------------------------------------------------------------- fast tests

SETTINGS = SecAggSettings(phase_timeout=5.0, fit_timeout=5.0)


@pytest.mark.usefixtures("task_identity", "replay_every_message")
def test_round_over_the_grid_is_exact_fedavg_and_leaves_no_state() -> None:
    nodes = make_nodes(5)
    report, arrays = run_round(nodes, SETTINGS)
    assert assert_fedavg(report, SETTINGS, nodes, arrays) == [0, 1, 2, 3, 4]
    # start, shares, reports, masked inputs, aggregate, unmasking (the outcome is pushed)
    assert report.steps == 6
    assert report.failures == []
    for node in nodes:
        assert STATE_RECORD not in node.context.state.config_records


@pytest.mark.usefixtures("task_identity")
def test_live_peers_in_one_process_skip_the_replay(monkeypatch: pytest.MonkeyPatch) -> None:
    restores = []
    original = peer_flower.RecordedPeer.restore

    def counting(data: bytes, **kwargs: Any) -> Any:
        restores.append(len(data))
        return original(data, **kwargs)

    monkeypatch.setattr(peer_flower.RecordedPeer, "restore", counting)
    nodes = make_nodes(4)
    report, arrays = run_round(nodes, SETTINGS)
    assert_fedavg(report, SETTINGS, nodes, arrays)
    assert restores == []


@pytest.mark.usefixtures("task_identity", "replay_every_message")
@pytest.mark.parametrize("fault", ["raise", "silent"])
@pytest.mark.parametrize("message", [1, 2, 3, 4, 5, 6])
def test_a_node_failing_at_any_step_leaves_exact_fedavg_over_the_rest(
        fault: str, message: int) -> None:
    nodes = make_nodes(6, pid2={message: fault})
    report, arrays = run_round(nodes, SETTINGS)
    pids = assert_fedavg(report, SETTINGS, nodes, arrays)
    assert set(pids) >= {0, 1, 3, 4, 5}
    if message <= 4:  # gone before it sent its masked input
        assert 2 not in pids
    # The last message of a leaf is the outcome, whose reply nobody waits for.
    assert len(report.failures) == (1 if message <= 5 else len(report.failures))
    assert len(report.failures) <= 1
    for node in nodes:
        if node.pid != 2:
            assert STATE_RECORD not in node.context.state.config_records


@pytest.mark.usefixtures("task_identity", "replay_every_message")
def test_two_nodes_failing_in_different_phases() -> None:
    nodes = make_nodes(7, pid1={2: "raise"}, pid4={5: "silent"})
    report, arrays = run_round(nodes, SETTINGS)
    pids = assert_fedavg(report, SETTINGS, nodes, arrays)
    assert 1 not in pids and {0, 2, 3, 5, 6} <= set(pids)


@pytest.mark.usefixtures("task_identity", "replay_every_message")
def test_too_few_survivors_abort_and_reveal_nothing() -> None:
    nodes = make_nodes(5, pid0={2: "raise"}, pid1={2: "raise"}, pid2={3: "silent"})
    report, _ = run_round(nodes, SETTINGS)
    assert report.outcome.status == "aborted"
    assert report.outcome.aggregate is None


@pytest.mark.usefixtures("task_identity", "replay_every_message")
def test_a_malformed_reply_drops_that_node_with_a_reason(caplog: pytest.LogCaptureFixture
                                                         ) -> None:
    def garble(index: int, reply: Message) -> Message:
        if index == 2:
            reply.content.config_records["secagg"]["sends"] = b"\xc1 not msgpack"
        return reply

    nodes = make_nodes(5)
    nodes[3].tamper = garble
    report, arrays = run_round(nodes, SETTINGS)
    pids = assert_fedavg(report, SETTINGS, nodes, arrays)
    assert 3 not in pids
    assert report.outcome.dropped[node_name(nodes[3].node_id)] == "malformed_message"
    assert "malformed_message" in caplog.text


@pytest.mark.usefixtures("task_identity", "replay_every_message")
def test_a_node_flooding_its_reply_is_dropped_not_buffered() -> None:
    # More frames in one reply than a round can need: refused whole, before any is kept.
    def flood(index: int, reply: Message) -> Message:
        if index == 2:
            frames = [[node_name(1000), b"x" * 64] for _ in range(4 * 5 + 65)]
            reply.content.config_records["secagg"]["sends"] = msgpack.packb(frames)
        return reply

    nodes = make_nodes(5)
    nodes[4].tamper = flood
    report, arrays = run_round(nodes, SETTINGS)
    pids = assert_fedavg(report, SETTINGS, nodes, arrays)
    assert 4 not in pids
    assert report.outcome.dropped[node_name(nodes[4].node_id)] == "malformed_message"


@pytest.mark.usefixtures("task_identity", "replay_every_message")
def test_a_relayed_frame_tampered_with_is_rejected_by_its_recipient(
        caplog: pytest.LogCaptureFixture) -> None:
    # Node 0 (or the server relaying for it) flips a byte of every sealed share it sends:
    # the recipients cannot open them, so node 0 cannot be unmasked and is left out.
    def flip(index: int, reply: Message) -> Message:
        record = reply.content.config_records["secagg"]
        sends = msgpack.unpackb(record["sends"])
        for item in sends:
            if item[0] != wire.SERVER:
                frame = bytearray(item[1])
                frame[-1] ^= 1
                item[1] = bytes(frame)
        record["sends"] = msgpack.packb(sends)
        return reply

    nodes = make_nodes(6)
    nodes[0].tamper = flip
    report, arrays = run_round(nodes, SETTINGS)
    pids = assert_fedavg(report, SETTINGS, nodes, arrays)
    assert 0 not in pids and pids == [1, 2, 3, 4, 5]
    assert "authentication_failed" in caplog.text or "does not authenticate" in caplog.text


@pytest.mark.usefixtures("task_identity", "replay_every_message")
def test_a_fit_of_another_size_withdraws_and_the_round_goes_on() -> None:
    nodes = make_nodes(5)
    wrong = nodes[2]
    original = wrong.fit

    def bigger(msg: Message, context: Context) -> Message:
        reply = original(msg, context)
        record = reply.content.array_records["fitres.parameters"]
        record["extra"] = flwr.app.Array(np.ones(3))
        return reply

    wrong.fit = bigger  # type: ignore[method-assign]
    report, arrays = run_round(nodes, SETTINGS)
    pids = assert_fedavg(report, SETTINGS, nodes, arrays)
    assert 2 not in pids
    assert report.outcome.dropped[node_name(wrong.node_id)] == "withdrew"


@pytest.mark.usefixtures("task_identity")
def test_the_mod_refuses_a_train_message_without_the_workflow() -> None:
    node = make_nodes(1)[0]
    msg = Message(compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters(INITIAL), {}),
                                              True), dst_node_id=node.node_id,
                  message_type=MessageType.TRAIN, group_id="1")
    with pytest.raises(ValueError, match="not sent in the clear"):
        secagg_mod(msg, node.context, node.fit)


@pytest.mark.usefixtures("task_identity")
def test_a_step_with_malformed_events_ends_the_round_for_that_peer(
        caplog: pytest.LogCaptureFixture) -> None:
    nodes = make_nodes(4)
    run_round(nodes, SETTINGS)  # a round before: it leaves nothing behind
    node = nodes[0]
    start = compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters(INITIAL), {}), True)
    round = GridRound(FakeGrid(nodes), SETTINGS, {n.node_id: start for n in nodes}, round=2,
                      dim=20, group_id="2")
    notice = wire.encode(round.protocol.round_open())
    start.config_records["secagg"] = ConfigRecord({
        "stage": "start", "notice": notice, "name": node_name(node.node_id),
        "max_weight": 1000.0, "weight_key": "num-examples"})
    first = Message(start, dst_node_id=node.node_id, message_type=MessageType.TRAIN,
                    group_id="2")
    secagg_mod(first, node.context, node.fit)
    assert STATE_RECORD in node.context.state.config_records
    bad = Message(RecordDict({"secagg": ConfigRecord({
        "stage": "step", "session": round.config.session, "round": 2,
        "events": b"\x93\x07\x07"})}), dst_node_id=node.node_id,
        message_type=MessageType.TRAIN, group_id="2")
    reply = secagg_mod(bad, node.context, node.fit)
    assert reply.content.config_records["secagg"]["status"] == "aborted"
    assert STATE_RECORD not in node.context.state.config_records
    assert "malformed_message" in caplog.text


@pytest.mark.usefixtures("task_identity", "replay_every_message")
def test_secure_sum_for_the_message_api() -> None:
    nodes = make_nodes(5)
    for node in nodes:
        node.message_api = True
    nodes[4].faults = {3: "raise"}
    template = Message(RecordDict({"arrays": ArrayRecord(INITIAL),
                                   "config": ConfigRecord({"lr": 0.1})}),
                       dst_node_id=0, message_type=MessageType.TRAIN, group_id="3")
    grid = FakeGrid(nodes)
    result = secure_sum(grid, [node.node_id for node in nodes], template, settings=SETTINGS)
    pids = sorted(node.pid for node in nodes if node.node_id in result.contributors)
    assert pids == [0, 1, 2, 3]
    assert result.total_weight == pytest.approx(sum(examples(p) for p in pids), abs=0.01)
    mean = result.mean()
    assert mean is not None and list(mean.keys()) == list(ArrayRecord(INITIAL).keys())
    got = mean.to_numpy_ndarrays()
    assert [a.dtype for a in got] == [a.dtype for a in INITIAL]
    for have, want in zip(got, fedavg(INITIAL, pids, 3), strict=True):
        assert np.max(np.abs(have - want)) < 1e-4
    assert sorted(result.metrics) == sorted(result.contributors)


def test_settings_map_from_secaggplus_one_to_one() -> None:
    settings = SecAggSettings.from_secaggplus(
        num_shares=1.0, reconstruction_threshold=0.7, clipping_range=4.0, max_weight=500.0,
        modulus_range=2**64, timeout=12.0)
    assert settings.threshold == 0.7 and settings.graph == "complete"
    assert (settings.clip, settings.max_weight, settings.modulus_bits,
            settings.phase_timeout) == (4.0, 500.0, 64, 12.0)
    assert settings.threshold_for(10) == 7
    assert SecAggSettings.from_secaggplus(num_shares=5, reconstruction_threshold=4).graph == \
        "sparse"
    workflow = SecAggWorkflow.from_secaggplus(num_shares=1.0, reconstruction_threshold=0.6)
    assert workflow.settings.threshold == 0.6


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"quantization_range": 2**22}, "quantization_range"),
    ({"modulus_range": 2**20}, "modulus_range"),
    ({"timeout": None}, "timeout"),
    ({"shuffle": True}, "shuffle"),
])
def test_unsupported_secaggplus_settings_say_so_in_one_line(kwargs: dict[str, Any],
                                                            message: str) -> None:
    with pytest.raises(UnsupportedSetting, match=message) as info:
        SecAggSettings.from_secaggplus(num_shares=1.0, reconstruction_threshold=0.6, **kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kwargs", [
    {"threshold": 0.4}, {"threshold": 1}, {"phase_timeout": 0.0}, {"modulus_bits": 16},
    {"threshold": 0.6, "threat_model": "active"}, {"mode": "paillier", "graph": "sparse"},
])
def test_bad_settings_are_refused_at_construction(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        SecAggSettings(**kwargs)


def test_without_flower_the_integration_names_the_extra() -> None:
    code = ("import sys; sys.modules['flwr'] = None\n"
            "for name in ('peers.flower', 'server.flower'):\n"
            "    try:\n"
            "        __import__(name)\n"
            "    except ImportError as exc:\n"
            "        print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.count("pip install 'secagg[flower]'") == 2


# --------------------------------------------------------------------------- simulation

NODES = 20
ROUNDS = 3
PHASE_TIMEOUT = 10.0
FIT_TIMEOUT = 180.0  # the first message of a simulation waits for Ray to start
# (round, partition id) -> (message of the round, how it fails)
FAULTS: dict[tuple[int, int], tuple[int, str]] = {
    (2, 3): (1, "raise"),    # fit fails: never registers
    (2, 7): (3, "raise"),    # shares sent, no share report
    (2, 5): (4, "silent"),   # never sends its masked input
    (3, 0): (2, "raise"),    # registered, never shares
    (3, 11): (5, "raise"),   # masked input sent (a leaf) or aggregate lost (the root)
    (3, 13): (6, "silent"),  # gone during unmasking or at the outcome
}
GONE_BEFORE_MASKING = {2: {3, 5, 7}, 3: {0}}


def fault_mod(msg: Message, context: Context, call_next: Callable[..., Message]) -> Message:
    """Fails this node at the message of the round FAULTS names for it."""
    pid = int(context.node_config["partition-id"])
    round = int(msg.metadata.group_id) if msg.metadata.group_id.isdigit() else 0
    counts = context.state.config_records.get("test.counts") or ConfigRecord({})
    counts[str(round)] = index = int(counts.get(str(round), 0)) + 1
    context.state.config_records["test.counts"] = counts
    fault = FAULTS.get((round, pid))
    if fault is not None and fault[0] == index:
        if fault[1] == "silent":
            time.sleep(PHASE_TIMEOUT + 2)
        raise RuntimeError(f"partition {pid} fails at message {index} of round {round}")
    return call_next(msg, context)


class _NumPyClient(flwr.client.NumPyClient):  # type: ignore[misc]
    def __init__(self, pid: int) -> None:
        self.pid = pid

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]
            ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        round = int(config["round"])
        return local_update(parameters, self.pid, round), examples(self.pid), {"pid": self.pid}


def _client_fn(context: Context) -> Any:
    return _NumPyClient(int(context.node_config["partition-id"])).to_client()


class RecordingFedAvg(flwr.server.strategy.FedAvg):  # type: ignore[misc]
    """FedAvg that remembers each round's global model and aggregate."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.inputs: dict[int, list[np.ndarray]] = {}
        self.outputs: dict[int, list[np.ndarray]] = {}
        self.pids: dict[int, list[int]] = {}

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
        self.inputs[server_round] = parameters_to_ndarrays(parameters)
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
        self.pids[server_round] = sorted(int(res.metrics["pid"]) for _, res in results)
        aggregated, metrics = super().aggregate_fit(server_round, results, failures)
        self.outputs[server_round] = parameters_to_ndarrays(aggregated)
        return aggregated, metrics


def simulate(fit_workflow: Any, mods: list[Any], rounds: int) -> RecordingFedAvg:
    from flwr.server import LegacyContext, ServerApp, ServerConfig
    from flwr.server.workflow import DefaultWorkflow
    from flwr.simulation import run_simulation

    strategy = RecordingFedAvg(
        fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=NODES,
        min_available_clients=NODES, initial_parameters=ndarrays_to_parameters(INITIAL),
        on_fit_config_fn=lambda server_round: {"round": server_round})
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Any, context: Context) -> None:
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=rounds),
                               strategy=strategy)
        DefaultWorkflow(fit_workflow=fit_workflow)(grid, legacy)

    client_app = flwr.client.ClientApp(client_fn=_client_fn, mods=mods)
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=NODES,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    return strategy


@pytest.fixture(scope="module")
def secagg_run() -> tuple[RecordingFedAvg, SecAggWorkflow]:
    workflow = SecAggWorkflow(phase_timeout=PHASE_TIMEOUT, fit_timeout=FIT_TIMEOUT)
    return simulate(workflow, [fault_mod, secagg_mod], ROUNDS), workflow


@pytest.mark.slow
def test_simulation_rounds_are_exact_fedavg_over_the_contributors(
        secagg_run: tuple[RecordingFedAvg, SecAggWorkflow]) -> None:
    strategy, workflow = secagg_run
    assert sorted(strategy.outputs) == list(range(1, ROUNDS + 1))
    assert len(workflow.reports) == ROUNDS
    for round, report in enumerate(workflow.reports, start=1):
        outcome = report.outcome
        assert outcome.status == "ok", outcome.reason
        pids = strategy.pids[round]
        assert len(pids) == len(outcome.contributors)
        failed = {pid for (r, pid) in FAULTS if r == round}
        assert set(pids).isdisjoint(GONE_BEFORE_MASKING.get(round, set()))
        assert set(range(NODES)) - failed <= set(pids)
        expected = fedavg(strategy.inputs[round], pids, round)
        bound = tolerance(report, workflow.settings, expected)
        for have, want in zip(strategy.outputs[round], expected, strict=True):
            assert np.max(np.abs(have - want)) <= bound
        # The next round starts from this one's model.
        if round < ROUNDS:
            for have, want in zip(strategy.inputs[round + 1], strategy.outputs[round],
                                  strict=True):
                assert np.array_equal(have, want)
    assert workflow.reports[0].failures == []
    assert len(workflow.reports[1].failures) == 3


@pytest.mark.slow
def test_secaggplus_reference_gives_the_same_model_when_nobody_drops(
        secagg_run: tuple[RecordingFedAvg, SecAggWorkflow]) -> None:
    from flwr.client.mod import secaggplus_mod
    from flwr.server.workflow import SecAggPlusWorkflow

    ours, _ = secagg_run
    reference = simulate(SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=0.6,
                                            timeout=FIT_TIMEOUT), [secaggplus_mod], 1)
    assert reference.pids[1] == ours.pids[1] == list(range(NODES))
    plain = fedavg(INITIAL, list(range(NODES)), 1)
    for theirs, mine, want in zip(reference.outputs[1], ours.outputs[1], plain, strict=True):
        # SecAgg+ quantizes to 2**22 levels over [-8, 8]: its error is the larger one.
        assert np.max(np.abs(theirs - want)) < 1e-4
        assert np.max(np.abs(mine - theirs)) < 1e-4
        assert not math.isnan(float(np.sum(mine)))


@pytest.mark.slow
def test_the_benchmark_runs_and_reports_the_three_workflows() -> None:
    import json
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "flower.py"
    proc = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    rows = {r["workflow"]: r for r in records if "workflow" in r}
    assert sorted(rows) == ["plain", "secagg", "secaggplus"]
    for row in rows.values():
        assert row["wall_seconds"] > 0 and row["server_bytes"] > 0
    # Same contributors in all three: the same model, within quantization.
    assert rows["secagg"]["max_abs_diff"] < 1e-4
    (summary,) = [r for r in records if r.get("summary")]
    assert summary["overhead"] > 0 and summary["speedup"] > 0
