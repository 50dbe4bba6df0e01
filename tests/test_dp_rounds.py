"""Distributed DP inside the protocol: in the simulator (every mode) and over
websockets (a coordinator announcing DP, peers with a noise floor, privacy spent
across rounds). The DP mechanism itself is tested in test_dp.py."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from peers import Peer
from secagg.dp import DPConfig, DPParameters
from secagg.paillier import PaillierKeyPair, generate_keypair
from secagg.protocol import PeerProtocol
from secagg.sim import run_round
from server import Coordinator

HOST = "127.0.0.1"


@pytest.fixture(scope="module")
def keys() -> PaillierKeyPair:
    return generate_keypair(2048)


def _inputs(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True) * 0.5  # inside the clip


@pytest.mark.parametrize("mode", ["masking", "hybrid", "paillier"])
def test_dp_round_carries_the_calibrated_noise_in_every_mode(mode: str,
                                                            keys: PaillierKeyPair) -> None:
    n, t, d = 12, 7, 1500
    inputs = _inputs(n, d, seed=3)
    config = DPConfig(noise_multiplier=1.0, clip=1.0)
    result = run_round(inputs, t, {2: "masked_input"}, dp=config, mode=mode,
                       paillier_keys=keys if mode != "masking" else None, seed=5)
    assert result.status == "ok", result.reason
    contributors = result.contributors
    assert len(contributors) == n - 1
    error = result.aggregate - inputs[contributors].sum(axis=0)  # type: ignore[operator]
    params = DPParameters.derive(n, t, d, config)
    # Each contributor adds sigma^2 / t (in scaled units); rounding adds < 1/4 each.
    expected = (len(contributors) / t * params.central_stddev ** 2
                + len(contributors) / 4) / params.scale ** 2
    assert abs(error.mean()) < 4 * np.sqrt(expected / d)
    assert 0.85 * expected < error.var() < 1.15 * expected
    report = result.stats["dp"]
    assert report["noise_variance_over_target"] == pytest.approx(len(contributors) / t)
    assert report["noise_multiplier"] == 1.0 and report["bits"] == 32
    assert result.clipped is None  # DP rounds release no unnoised count


def test_dp_refuses_a_weighted_round() -> None:
    with pytest.raises(ValueError, match="weighted"):
        run_round(_inputs(4, 8, 0), 3, weights=np.ones(4),
                  dp=DPConfig(noise_multiplier=1.0, clip=1.0, modulus_bits=64))


def test_a_peer_with_a_noise_floor_declines_a_round_below_it() -> None:
    with pytest.raises(ValueError, match="min_noise_multiplier"):
        PeerProtocol("p", min_noise_multiplier=-1.0)


async def test_coordinator_reports_privacy_spent_and_floors_are_enforced() -> None:
    dim = 16
    config = DPConfig(noise_multiplier=2.0, clip=1.0)
    names = [f"client-{i}" for i in range(5)]
    inputs = {name: _inputs(1, dim, seed=i)[0] for i, name in enumerate(names)}
    floors = {"client-4": 3.0}  # this one wants more noise than the round offers
    epsilons = []
    async with Coordinator(HOST, 0, max_peers=5, threshold=3, dim=dim, phase_timeout=20,
                           dp=config) as coordinator:
        peers = [Peer(coordinator.url, name, min_noise_multiplier=floors.get(name, 1.0))
                 for name in names]
        for peer in peers:
            await peer.start()
        try:
            for _ in range(2):
                round_task = asyncio.create_task(coordinator.run_round())
                outcomes = await asyncio.gather(*(peer.contribute(inputs[peer.peer_id])
                                                  for peer in peers))
                async with asyncio.timeout(60):
                    result = await round_task
                assert result.status == "ok", result.outcome.reason
                assert result.outcome.dropped == {"client-4": "withdrew"}
                declined = outcomes[-1]
                assert declined.status == "aborted"
                assert "below this peer's floor min_noise_multiplier=3" in declined.reason
                epsilons.append(result.stats["dp"]["epsilon"])
                assert result.stats["dp"]["achieved_noise_multiplier"] > 2.0
        finally:
            for peer in peers:
                await peer.close()
    assert 0 < epsilons[0] < epsilons[1]  # privacy spent only grows over the session
