"""FedAvg through secure aggregation (peers.fedavg) vs plaintext FedAvg, and the torch scenario.

The network test runs a real Coordinator and real Peers on 127.0.0.1 in one event
loop, for two rounds with a peer crashing in the second, and checks the securely
averaged model against plaintext FedAvg over exactly the reported contributors,
within the quantization bound documented in ``secagg.encoding``.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
import torch
from torch import nn

from peers import Peer
from peers.fedavg import FedAvgClient, apply_aggregate, update_spec, update_vector
from secagg.encoding import WeightedEncoding
from secagg.protocol import PeerOutcome
from secagg.torch_state import apply_delta, flatten_state, unflatten_state
from server import Coordinator

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ROUND_TIMEOUT = 60.0


def small_model() -> nn.Module:
    torch.manual_seed(0)
    # float64 parameters, so the comparison below is limited by quantization alone.
    return nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).double()


def local_update(global_state: dict[str, torch.Tensor], rng: np.random.Generator,
                 spread: float) -> dict[str, torch.Tensor]:
    """Stand-in for local training: a random move of every floating entry.

    Some coordinates exceed the clip on purpose; the integer counter also moves
    (it must not be averaged).
    """
    _, spec = flatten_state(global_state, floating_only=True)
    move = unflatten_state(rng.uniform(-spread, spread, spec.size), spec)
    new = apply_delta(global_state, move)
    new["1.num_batches_tracked"] = global_state["1.num_batches_tracked"] + 3
    return new


async def test_secure_fedavg_equals_plaintext_fedavg_over_the_same_contributors() -> None:
    n, rounds, clip, max_weight, bits = 5, 2, 0.5, 64.0, 32
    weights = [10, 23, 37, 50, 64]
    crash_in_round = {1: (3, "reported")}  # peer 3 dies before its masked input in round 1
    secure_model, plain_model = small_model(), small_model()
    spec = update_spec(secure_model)
    encoding = WeightedEncoding.for_peers(n, clip=clip, max_weight=max_weight,
                                          modulus_bits=bits)
    rng = np.random.default_rng(42)
    loop = asyncio.get_running_loop()
    peers: list[Peer] = []
    current: dict[str, int] = {}

    def progress_of(i: int):  # type: ignore[no-untyped-def]
        def progress(state: str, round_number: int) -> None:
            victim = crash_in_round.get(round_number)
            if victim == (i, state) and current.get("crashed") != i:
                current["crashed"] = i
                loop.call_soon(peers[i].crash)
        return progress

    async def contribute(client: FedAvgClient, new: dict[str, torch.Tensor],
                         old: dict[str, torch.Tensor], weight: int) -> PeerOutcome | None:
        try:
            return await client.contribute_update(new, old, weight)
        except asyncio.CancelledError:
            return None

    total_bound = 0.0
    async with Coordinator(max_peers=n, threshold=3, dim=spec.size, weighted=True,
                           max_weight=max_weight, clip=clip, modulus_bits=bits,
                           phase_timeout=10.0) as coordinator:
        for i in range(n):
            peer = Peer(coordinator.url, f"fed-{i}", progress=progress_of(i))
            await peer.start()
            peers.append(peer)
        try:
            for r in range(rounds):
                secure_global = {k: v.clone() for k, v in secure_model.state_dict().items()}
                plain_global = {k: v.clone() for k, v in plain_model.state_dict().items()}
                updates = [local_update(secure_global, rng, spread=0.7) for _ in range(n)]
                clients = [FedAvgClient(peer) for peer in peers]
                round_task = asyncio.create_task(coordinator.run_round())
                outcomes = await asyncio.wait_for(asyncio.gather(
                    *(contribute(clients[i], updates[i], secure_global, weights[i])
                      for i in range(n))), ROUND_TIMEOUT)
                result = await asyncio.wait_for(round_task, ROUND_TIMEOUT)
                outcome = result.outcome
                assert outcome.status == "ok", outcome.reason
                expected_contributors = [f"fed-{i}" for i in range(n)
                                         if crash_in_round.get(r, (None,))[0] != i]
                assert list(outcome.contributors) == expected_contributors
                index = [int(name.split("-")[1]) for name in outcome.contributors]
                for i in index:
                    assert outcome_of(outcomes[i]).status == "ok"
                assert outcome.total_weight == sum(weights[i] for i in index)
                assert outcome.aggregate is not None

                # Plaintext FedAvg over the same contributors and the same updates
                # (the updates are moves relative to the global model, so both
                # runs use the same deltas; some coordinates exceed the clip).
                deltas = [update_vector(updates[i], secure_global)[0] for i in index]
                assert any(np.abs(d).max() > clip for d in deltas)
                exact = sum(weights[i] * np.clip(d, -clip, clip)
                            for i, d in zip(index, deltas, strict=True)) / sum(
                                weights[i] for i in index)
                bound = encoding.mean_error_bound(len(index), outcome.total_weight)
                assert outcome.mean is not None
                error = np.abs(outcome.mean - exact)
                assert error.max() < bound
                assert error.max() > 0  # 32-bit quantization is visible, not trivially exact
                total_bound += bound

                apply_aggregate(secure_model, outcome.mean, spec)
                apply_aggregate(plain_model, exact, spec)
                assert torch.equal(secure_model.state_dict()["1.num_batches_tracked"],
                                   plain_global["1.num_batches_tracked"])
                # Rejoin: a crashed Peer cannot be reused; a fresh one takes its id.
                crashed = current.pop("crashed", None)
                if crashed is not None:
                    await peers[crashed].close()
                    peers[crashed] = Peer(coordinator.url, f"fed-{crashed}",
                                          progress=progress_of(crashed))
                    await peers[crashed].start()
        finally:
            for peer in peers:
                await peer.close()

    secure_vector, _ = flatten_state(secure_model.state_dict(), floating_only=True)
    plain_vector, _ = flatten_state(plain_model.state_dict(), floating_only=True)
    difference = np.abs(secure_vector - plain_vector).max()
    assert 0 < difference < total_bound + 1e-12


def outcome_of(value: PeerOutcome | None) -> PeerOutcome:
    assert value is not None
    return value


async def test_client_validates_its_weight_and_apply_checks_the_length() -> None:
    client = FedAvgClient(Peer("ws://127.0.0.1:9", "nobody"))  # never started
    state = small_model().state_dict()
    with pytest.raises(ValueError, match="num_samples"):
        await client.contribute_update(state, state, 0)
    model = small_model()
    spec = update_spec(model)
    with pytest.raises(ValueError, match="coordinates but the spec describes"):
        apply_aggregate(model, np.zeros(spec.size + 1), spec)


def test_quick_scenario_writes_report_and_plot(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))  # for `scenarios`
    from scenarios import fedavg_torch

    status = fedavg_torch.main(["--quick", "--out", str(tmp_path)])
    assert status == 0
    report = json.loads((tmp_path / fedavg_torch.REPORT_NAME).read_text())
    for key in ("config", "data", "initial_accuracy", "rounds", "max_accuracy_diff",
                "max_param_diff", "max_aggregate_error", "agree", "runtime_seconds", "files"):
        assert key in report, key
    assert report["agree"] is True
    assert report["config"]["quick"] is True
    assert len(report["rounds"]) == report["config"]["rounds"] == 2
    for record in report["rounds"]:
        assert record["status"] == "ok"
        assert record["crashed"], "every round crashes at least one peer"
        # Peers that died before their masked input are not contributors.
        before_input = {name for name, phase in record["crashed"].items()
                        if phase in ("sharing", "reported")}
        assert before_input and before_input.isdisjoint(record["contributors"])
        assert record["within_bound"] is True
        assert record["aggregate_error"] < record["aggregate_error_bound"]
        for key in ("secure_accuracy", "plaintext_accuracy"):
            assert 0.0 <= record[key] <= 1.0
    png = (tmp_path / fedavg_torch.PLOT_NAME).read_bytes()
    assert png.startswith(PNG_SIGNATURE)
    assert len(png) > 1000


@pytest.mark.parametrize("mode", ["paillier", "hybrid"])
def test_quick_scenario_in_the_homomorphic_modes(tmp_path: Path, mode: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The torch loop does not care how updates are protected: secure FedAvg still
    matches plaintext FedAvg over the same contributors."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))  # for `scenarios`
    from scenarios import fedavg_torch

    status = fedavg_torch.main(["--quick", "--mode", mode, "--out", str(tmp_path)])
    assert status == 0
    report = json.loads((tmp_path / fedavg_torch.REPORT_NAME).read_text())
    assert report["config"]["mode"] == mode
    assert report["agree"] is True
    assert all(record["status"] == "ok" and record["within_bound"]
               for record in report["rounds"])
