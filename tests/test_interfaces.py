"""What the library tells its user (issue: interfaces that tell the truth).

Real coordinators and peers on 127.0.0.1: clipping is counted (per peer and
securely summed for the round) or refused with ``strict``; a non-finite input
is a ValueError before anything is sent; a peer whose input does not fit the
round withdraws at once instead of costing everyone the deadline; ``contribute``
never waits forever; registration-closed rejections name the setting to raise.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from peers import Peer
from secagg.sim import run_round
from server import Coordinator

HOST = "127.0.0.1"
DIM = 4


async def _round(coordinator: Coordinator, vectors: dict[str, np.ndarray],
                 **contribute: object) -> tuple[object, dict[str, object]]:
    round_task = asyncio.create_task(coordinator.run_round())

    async def one(name: str) -> object:
        async with Peer(coordinator.url, name) as peer:
            try:
                return await peer.contribute(vectors[name], **contribute)  # type: ignore[arg-type]
            except ValueError as exc:
                return exc

    outcomes = await asyncio.gather(*(one(name) for name in vectors))
    async with asyncio.timeout(60):
        result = await round_task
    return result, dict(zip(vectors, outcomes, strict=True))


async def test_clipping_is_counted_for_the_peer_and_summed_for_the_round() -> None:
    # The README's example: 0.1 * i for i < 20 goes up to 1.9 with clip=1.
    vectors = {f"client-{i}": np.full(DIM, 0.1 * i) for i in range(20)}
    async with Coordinator(HOST, 0, max_peers=20, threshold=11, dim=DIM,
                           phase_timeout=20) as coordinator:
        result, outcomes = await _round(coordinator, vectors)
    assert result.status == "ok"  # type: ignore[attr-defined]
    # Inputs 1.1 .. 1.9 (9 peers, 4 coordinates each) are clipped to 1.0.
    assert result.outcome.clipped == 9 * DIM  # type: ignore[attr-defined]
    for i, name in enumerate(vectors):
        assert outcomes[name].clipped == (DIM if 0.1 * i > 1.0 else 0)  # type: ignore[attr-defined]
    # The aggregate is the sum of the clipped inputs, as documented.
    expected = sum(min(0.1 * i, 1.0) for i in range(20))
    assert np.allclose(result.aggregate, expected, atol=1e-6)  # type: ignore[attr-defined]


async def test_strict_peer_withdraws_instead_of_clipping_and_the_round_goes_on() -> None:
    vectors = {f"client-{i}": np.full(DIM, 0.5) for i in range(4)}
    vectors["client-3"] = np.array([100.0, -1e6, 5.0, 0.5])
    async with Coordinator(HOST, 0, max_peers=4, threshold=3, dim=DIM,
                           phase_timeout=30) as coordinator:
        started = time.monotonic()
        result, outcomes = await _round(coordinator, vectors, strict=True)
        elapsed = time.monotonic() - started
    error = outcomes["client-3"]
    assert isinstance(error, ValueError)
    assert "3 of 4 coordinates lie outside" in str(error)
    assert result.status == "ok"  # type: ignore[attr-defined]
    assert result.outcome.dropped == {"client-3": "withdrew"}  # type: ignore[attr-defined]
    assert sorted(result.contributors) == ["client-0", "client-1", "client-2"]  # type: ignore[attr-defined]
    assert elapsed < 30  # registration closed at once, not at the phase deadline


async def test_wrong_length_withdraws_at_once() -> None:
    vectors = {f"client-{i}": np.zeros(DIM) for i in range(4)}
    vectors["client-2"] = np.zeros(DIM + 1)
    async with Coordinator(HOST, 0, max_peers=4, threshold=3, dim=DIM,
                           phase_timeout=30) as coordinator:
        started = time.monotonic()
        result, outcomes = await _round(coordinator, vectors)
        elapsed = time.monotonic() - started
    assert isinstance(outcomes["client-2"], ValueError)
    assert "expects a vector of 4 coordinates, got 5" in str(outcomes["client-2"])
    assert result.outcome.dropped == {"client-2": "withdrew"}  # type: ignore[attr-defined]
    assert result.status == "ok" and elapsed < 30  # type: ignore[attr-defined]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
async def test_non_finite_input_is_a_value_error_before_anything_is_sent(bad: float) -> None:
    async with Coordinator(HOST, 0, max_peers=2, threshold=2, dim=DIM,
                           phase_timeout=5) as coordinator, \
            Peer(coordinator.url, "client-0") as peer:
        vector = np.zeros(DIM)
        vector[2] = bad
        with pytest.raises(ValueError, match=r"non-finite coordinate.*index 2"):
            await peer.contribute(vector)
        assert peer.bytes_sent == 0


async def test_contribute_times_out_when_no_round_opens() -> None:
    async with Coordinator(HOST, 0, max_peers=2, threshold=2, dim=DIM,
                           phase_timeout=5) as coordinator, \
            Peer(coordinator.url, "client-0") as peer:
        with pytest.raises(TimeoutError, match=r"within the 0\.5 s"):
            await peer.contribute(np.zeros(DIM), timeout=0.5)


async def test_registration_closed_says_which_setting_to_raise() -> None:
    vectors = {f"client-{i}": np.zeros(DIM) for i in range(3)}
    async with Coordinator(HOST, 0, max_peers=2, threshold=2, dim=DIM,
                           phase_timeout=10) as coordinator:
        result, outcomes = await _round(coordinator, vectors)
    rejected = [o for o in outcomes.values() if getattr(o, "status", "") == "rejected"]
    assert len(rejected) == 1
    assert "max_peers=2" in rejected[0].reason and "raise max_peers" in rejected[0].reason  # type: ignore[attr-defined]
    assert result.status == "ok"  # type: ignore[attr-defined]


def test_min_peers_is_still_accepted_as_the_old_name() -> None:
    with pytest.warns(DeprecationWarning, match="max_peers"):
        coordinator = Coordinator(HOST, 0, min_peers=5, threshold=3, dim=DIM)
    assert coordinator.max_peers == 5
    with pytest.raises(TypeError, match="max_peers"):
        Coordinator(HOST, 0, threshold=3, dim=DIM)


def test_simulated_rounds_count_clipping_too() -> None:
    inputs = np.array([[0.5, 2.0], [-3.0, 0.1], [0.2, 0.2]])
    result = run_round(inputs, 2)
    assert result.status == "ok" and result.clipped == 2
    assert np.allclose(result.aggregate, [-0.3, 1.3], atol=1e-6)  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["hybrid", "paillier"])
async def test_peers_that_connect_while_registration_is_open_get_the_round_notice(
        mode: str) -> None:
    # The README's example with a mode, as a new user tries it: the round is opened
    # first, the peers (insisting on that mode) connect afterwards. Each must hear the
    # same notice (mode, key size, frame limits) as peers connected beforehand.
    vectors = {f"client-{i}": np.full(DIM, 0.1 * i) for i in range(5)}
    async with Coordinator(HOST, 0, max_peers=5, threshold=3, dim=DIM, mode=mode,
                           phase_timeout=20) as coordinator:
        round_task = asyncio.create_task(coordinator.run_round())
        await asyncio.sleep(0.05)  # registration is open before anyone connects

        async def one(name: str) -> object:
            async with Peer(coordinator.url, name, mode=mode) as peer:  # type: ignore[arg-type]
                return await peer.contribute(vectors[name])

        outcomes = await asyncio.gather(*(one(name) for name in vectors))
        async with asyncio.timeout(60):
            result = await round_task
    assert [o.status for o in outcomes] == ["ok"] * 5  # type: ignore[attr-defined]
    assert result.status == "ok" and result.stats["mode"] == mode
    assert np.allclose(result.aggregate, sum(0.1 * i for i in range(5)), atol=1e-6)  # type: ignore[arg-type]
