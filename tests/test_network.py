"""Integration: a real Coordinator and real Peers over websockets on 127.0.0.1, one event loop.

Dropouts are injected at every phase with ``Peer.crash()`` (every socket of the
peer aborted at once, as SIGKILL would), scheduled from the progress callback.
Each test checks correctness only, never speed: the round ends ``ok`` with the
exact sum of the contributors' inputs (within the quantization bound n/scale),
peers that died before sending their masked input are not contributors, and
every registered peer that is not a contributor carries a drop reason.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers_network import (
    HOST,
    ROUND_TIMEOUT,
    RawClient,
    Swarm,
    assert_exact_sum,
    crash_first,
    crash_on,
    make_inputs,
    peer_names,
    port_refuses,
    run_round,
    tolerance,
    weighted_tolerance,
)

from peers.peer import Peer
from secagg.protocol import PeerOutcome
from secagg.wire import Roster
from server.coordinator import Coordinator

ROOT = Path(__file__).resolve().parent.parent
N = 20
T = N // 2 + 1  # 11
DIM = 64
# Generous: dropouts are detected from closed sockets, and a deadline that fires
# on a slow CI machine would only make the round slower, never wrong.
PHASE_TIMEOUT = 10.0

# States in which a peer has not yet sent its masked input anywhere.
BEFORE_INPUT = frozenset({"idle", "advertised", "sharing", "reported", "masking"})
ALL_STATES = ("advertised", "sharing", "reported", "masking", "forwarded", "unmasked",
              "finished")


def coordinator(**overrides: Any) -> Coordinator:
    options: dict[str, Any] = dict(max_peers=N, threshold=T, dim=DIM,
                                   phase_timeout=PHASE_TIMEOUT)
    options.update(overrides)
    return Coordinator(HOST, 0, **options)


def check_ok_round(result: Any, outcomes: Mapping[str, PeerOutcome | BaseException],
                   inputs: Mapping[str, np.ndarray], swarm: Swarm, *, n: int = N,
                   threshold: int = T, mode: str = "masking") -> None:
    """The invariants every successful round must satisfy, whatever dropped."""
    aggregate, contributors, stats = result
    outcome = result.outcome
    assert outcome.status == "ok", (outcome.reason, outcome.dropped)
    assert list(contributors) == list(outcome.contributors)
    assert len(contributors) == len(set(contributors)) >= threshold
    assert_exact_sum(aggregate, inputs, contributors, tolerance(n, DIM))
    # Peers that died before their masked input left them cannot be in the sum.
    for name, state in swarm.crashed.items():
        if state in BEFORE_INPUT:
            assert name not in contributors, (name, state)
    # Every registered peer outside the sum has an explicit reason.
    for name in swarm.names:
        if name not in contributors:
            assert outcome.dropped.get(name), (name, outcome.dropped)
    # Everyone dropped took part, but for peers that withdrew before registering.
    assert {name for name, reason in outcome.dropped.items()
            if reason != "withdrew"} <= set(swarm.names)
    # Survivors all learn how the round ended, and agree with the server.
    for name, peer_outcome in outcomes.items():
        if name in swarm.crashed:
            continue
        assert isinstance(peer_outcome, PeerOutcome), (name, peer_outcome)
        assert peer_outcome.status in ("ok", "excluded"), (name, peer_outcome)
        if peer_outcome.status == "ok":
            assert list(peer_outcome.contributors) == list(contributors), name
        if name in contributors:
            assert peer_outcome.status == "ok", name
    assert stats["u1"] == n
    assert stats["u3"] == len(contributors)
    assert stats["bytes_in"] > 0 and stats["bytes_out"] > 0
    phases = {"collecting_keys", "masking"} if mode == "paillier" else \
        {"collecting_keys", "sharing", "masking", "unmasking"}
    assert set(stats["phase_seconds"]) >= phases
    assert stats["mode"] == mode


# ------------------------------------------------------------- no dropouts


@pytest.mark.parametrize("graph", ["complete", "sparse"])
async def test_round_without_dropouts(graph: str) -> None:
    names = peer_names(N)
    inputs = make_inputs(names, DIM, seed=1)
    async with coordinator(graph=graph) as c, Swarm(c.url, names) as swarm:
        result, outcomes = await run_round(c, swarm, inputs)
    check_ok_round(result, outcomes, inputs, swarm)
    assert sorted(result.contributors) == names
    assert result.outcome.dropped == {}
    assert result.stats["graph"] == graph


async def test_progress_reports_every_phase_in_order() -> None:
    """``progress`` sees each state once, in protocol order; relays report "masking"."""
    names = peer_names(N)
    inputs = make_inputs(names, DIM, seed=2)
    async with coordinator(fan_in=2) as c, Swarm(c.url, names) as swarm:
        result, _ = await run_round(c, swarm, inputs)
    assert result.status == "ok"
    relays = 0
    for name in names:
        seen = [s for s in swarm.seen(name) if s != "idle"]
        assert seen == [s for s in ALL_STATES if s in seen], (name, seen)
        assert set(seen) >= set(ALL_STATES) - {"masking"}, (name, seen)
        relays += "masking" in seen
    # With fan-in 2 about half the tree are inner nodes (the root among them).
    assert relays >= 2


# ---------------------------------------------------------------- dropouts


@pytest.mark.slow
@pytest.mark.parametrize("graph", ["complete", "sparse"])
async def test_crash_during_share_exchange(graph: str) -> None:
    names = peer_names(N)
    inputs = make_inputs(names, DIM, seed=3)
    victims = {names[3]: "sharing", names[8]: "sharing", names[15]: "sharing"}
    async with coordinator(graph=graph) as c, \
            Swarm(c.url, names, hook=crash_on(victims)) as swarm:
        result, outcomes = await run_round(c, swarm, inputs)
    assert set(swarm.crashed) == set(victims)
    check_ok_round(result, outcomes, inputs, swarm)
    for name in victims:
        assert name not in result.contributors
        assert result.outcome.dropped[name] in ("no_share_report", "share_delivery_failed")
    assert sorted(result.contributors) == sorted(set(names) - set(victims))


@pytest.mark.parametrize("graph", ["complete", "sparse"])
async def test_crash_after_share_report_before_masked_input(graph: str) -> None:
    names = peer_names(N)
    inputs = make_inputs(names, DIM, seed=4)
    victims = {names[0]: "reported", names[9]: "reported", names[19]: "reported"}
    async with coordinator(graph=graph) as c, \
            Swarm(c.url, names, hook=crash_on(victims)) as swarm:
        result, outcomes = await run_round(c, swarm, inputs)
    assert set(swarm.crashed) == set(victims)
    check_ok_round(result, outcomes, inputs, swarm)
    for name, state in swarm.crashed.items():
        if state == "reported":
            assert result.outcome.dropped[name] == "no_masked_input"
    assert result.stats["u2"] == N
    assert sorted(result.contributors) == sorted(set(names) - set(victims))


@pytest.mark.slow
async def test_truly_sparse_graph_with_dropouts() -> None:
    """60 peers: large enough that the sparse graph is not complete (degree < n - 1)."""
    n, t = 60, 31
    names = peer_names(n)
    inputs = make_inputs(names, DIM, seed=23)
    victims = {names[5]: "sharing", names[33]: "reported", names[47]: "unmasked"}
    async with coordinator(max_peers=n, threshold=t, graph="sparse") as c, \
            Swarm(c.url, names, hook=crash_on(victims)) as swarm:
        result, outcomes = await run_round(c, swarm, inputs)
    assert set(swarm.crashed) == set(victims)
    assert result.stats["degree"] < n - 1
    check_ok_round(result, outcomes, inputs, swarm, n=n, threshold=t)
    assert sorted(result.contributors) == sorted(set(names) - {names[5], names[33]})


async def test_relay_dies_holding_childrens_sums() -> None:
    """Fan-in 2: half the peers are relays. Two die as soon as they start collecting."""
    names = peer_names(N)
    inputs = make_inputs(names, DIM, seed=5)
    async with coordinator(fan_in=2) as c, \
            Swarm(c.url, names, hook=crash_first("masking", 2)) as swarm:
        result, outcomes = await run_round(c, swarm, inputs)
    assert len(swarm.crashed) == 2
    assert "masking" in swarm.crashed.values()
    check_ok_round(result, outcomes, inputs, swarm)
    for name, state in swarm.crashed.items():
        if state == "masking":
            assert result.outcome.dropped[name] == "no_masked_input"
    # The children of a dead relay re-send to the nearest live ancestor: nobody
    # else's input is lost.
    assert sorted(result.contributors) == sorted(set(names) - set(swarm.crashed))


async def test_crash_after_forwarding_masked_input() -> None:
    """Peers die right after their masked input left: it may still count."""
    names = peer_names(N)
    inputs = make_inputs(names, DIM, seed=6)
    victims = {names[2]: "forwarded", names[11]: "forwarded", names[17]: "forwarded"}
    async with coordinator(fan_in=2) as c, \
            Swarm(c.url, names, hook=crash_on(victims)) as swarm:
        result, outcomes = await run_round(c, swarm, inputs)
    assert set(swarm.crashed) == set(victims)
    check_ok_round(result, outcomes, inputs, swarm)
    assert set(result.contributors) >= set(names) - set(victims)


# Regression test (was a strict xfail documenting a bug, since fixed).
async def test_contributor_gone_before_unmasking_has_a_drop_reason() -> None:
    names = peer_names(N)
    inputs = make_inputs(names, DIM, seed=6)
    victims = {names[2]: "forwarded", names[11]: "forwarded", names[17]: "forwarded"}
    async with coordinator(fan_in=2) as c, \
            Swarm(c.url, names, hook=crash_on(victims)) as swarm:
        result, _ = await run_round(c, swarm, inputs)
    assert result.status == "ok"
    # Their masked inputs left before they died: they are contributors that took no
    # part in unmasking, and that must be on record.
    gone_contributors = [name for name in victims if name in result.contributors]
    assert gone_contributors
    for name in gone_contributors:
        assert result.outcome.dropped.get(name) == "unmask_share_missing", \
            result.outcome.dropped


async def test_crash_during_unmasking_before_answering() -> None:
    """The moment the first peer answers its unmask request, four others die unanswered.

    They are crashed synchronously from that peer's progress callback (they are other
    peers, so no peer dies inside its own stack): at that instant exactly one peer has
    answered, so at least three victims hold an unanswered request.
    """
    names = peer_names(N)
    inputs = make_inputs(names, DIM, seed=7)
    victims = [names[1], names[6], names[13], names[18]]

    def hook(swarm: Swarm, name: str, state: str, round_number: int) -> None:
        if state == "unmasked" and not swarm.doomed:
            for victim in victims:
                if victim != name:
                    swarm.crash_now(victim)

    async with coordinator() as c, Swarm(c.url, names, hook=hook) as swarm:
        result, outcomes = await run_round(c, swarm, inputs)
    check_ok_round(result, outcomes, inputs, swarm)
    unanswered = [v for v, state in swarm.crashed.items() if state == "forwarded"]
    assert len(unanswered) >= len(victims) - 1, swarm.crashed
    for name in swarm.crashed:
        # Their masked inputs were in the aggregate before unmasking began.
        assert name in result.contributors
    for name in unanswered:
        assert result.outcome.dropped[name] == "unmask_share_missing"
    assert sorted(result.contributors) == names


async def test_crash_after_answering_unmask_request() -> None:
    names = peer_names(N)
    inputs = make_inputs(names, DIM, seed=8)
    victims = {names[4]: "unmasked", names[10]: "unmasked", names[16]: "unmasked"}
    async with coordinator() as c, Swarm(c.url, names, hook=crash_on(victims)) as swarm:
        result, outcomes = await run_round(c, swarm, inputs)
    assert set(swarm.crashed) == set(victims)
    check_ok_round(result, outcomes, inputs, swarm)
    assert sorted(result.contributors) == names


@pytest.mark.slow
async def test_dropouts_in_every_phase_at_once() -> None:
    names = peer_names(N)
    inputs = make_inputs(names, DIM, seed=9)
    victims = {names[0]: "sharing", names[5]: "reported", names[10]: "forwarded",
               names[15]: "unmasked"}
    hooks = [crash_on(victims), crash_first("masking", 1, among=set(names) - set(victims))]

    def hook(swarm: Swarm, name: str, state: str, round_number: int) -> None:
        for each in hooks:
            each(swarm, name, state, round_number)

    async with coordinator(fan_in=2) as c, Swarm(c.url, names, hook=hook) as swarm:
        result, outcomes = await run_round(c, swarm, inputs)
    assert set(swarm.crashed) >= set(victims)
    check_ok_round(result, outcomes, inputs, swarm)


async def test_too_many_crashes_abort_the_round() -> None:
    """n - t + 1 peers die before sending their masked input: nothing is revealed."""
    names = peer_names(N)
    inputs = make_inputs(names, DIM, seed=10)
    victims = {name: "reported" for name in names[: N - T + 1]}
    async with coordinator() as c, Swarm(c.url, names, hook=crash_on(victims)) as swarm:
        result, outcomes = await run_round(c, swarm, inputs)
    assert set(swarm.crashed) == set(victims)
    aggregate, contributors, _ = result
    assert result.status == "aborted"
    assert aggregate is None and result.outcome.aggregate is None
    assert contributors == []
    assert result.outcome.reason
    for name, outcome in outcomes.items():
        if name not in victims:
            assert isinstance(outcome, PeerOutcome), (name, outcome)
            assert outcome.status == "aborted", (name, outcome)


@pytest.mark.slow
async def test_too_many_crashes_during_share_exchange_abort() -> None:
    """Crashes from outside the peers: the moment a registered client sees the roster."""
    n, t = 9, 5
    names = peer_names(n - 1)
    inputs = make_inputs(names, DIM, seed=11)
    async with coordinator(max_peers=n, threshold=t, phase_timeout=4.0) as c, \
            Swarm(c.url, names) as swarm, RawClient(c.url) as watcher:
        round_task = asyncio.create_task(c.run_round())
        await watcher.register("watcher")
        contributions = asyncio.create_task(swarm.contribute(inputs))
        await watcher.wait_for(Roster.TYPE)
        for name in names[: n - t + 1]:
            swarm.crash_now(name)
        async with asyncio.timeout(ROUND_TIMEOUT):
            outcomes = await contributions
            result = await round_task
    assert result.status == "aborted"
    assert result.aggregate is None
    for name in names[n - t + 1:]:
        outcome = outcomes[name]
        assert isinstance(outcome, PeerOutcome) and outcome.status == "aborted", outcome


# ------------------------------------------------------------ variations


# Regression test (was a strict xfail documenting a bug, since fixed).
async def test_nat_peers_exchange_shares_before_the_share_deadline() -> None:
    names = peer_names(N)
    inputs = make_inputs(names, DIM, seed=22)
    nat = set(names[:12])  # each NAT peer has only 8 listening neighbours, t = 11
    async with coordinator(phase_timeout=4.0) as c, \
            Swarm(c.url, names, listen=lambda name: None if name in nat else (HOST, 0)) \
            as swarm:
        result, outcomes = await run_round(c, swarm, inputs)
    assert result.status == "ok", (result.outcome.reason, result.outcome.dropped)
    check_ok_round(result, outcomes, inputs, swarm)
    assert sorted(result.contributors) == names



@pytest.mark.slow
async def test_peers_behind_nat_mixed_with_listening_peers() -> None:
    """Every other peer has no listener: the coordinator forwards sealed frames."""
    names = peer_names(N)
    inputs = make_inputs(names, DIM, seed=12)
    nat = set(names[1::2])
    async with coordinator(fan_in=3) as c, \
            Swarm(c.url, names, listen=lambda name: None if name in nat else (HOST, 0)) \
            as swarm:
        assert all(swarm.peers[name].address == "" for name in nat)
        result, outcomes = await run_round(c, swarm, inputs)
    check_ok_round(result, outcomes, inputs, swarm)
    assert sorted(result.contributors) == names


@pytest.mark.slow
async def test_nat_peer_crash_is_tolerated() -> None:
    names = peer_names(N)
    inputs = make_inputs(names, DIM, seed=13)
    nat = set(names[::2])
    victims = {names[2]: "reported", names[7]: "reported"}
    async with coordinator(fan_in=3) as c, \
            Swarm(c.url, names, listen=lambda name: None if name in nat else (HOST, 0),
                  hook=crash_on(victims)) as swarm:
        result, outcomes = await run_round(c, swarm, inputs)
    check_ok_round(result, outcomes, inputs, swarm)
    assert sorted(result.contributors) == sorted(set(names) - set(victims))


async def test_two_consecutive_rounds_with_the_same_peers() -> None:
    """FedAvg style: the same connected peers contribute a new vector each round."""
    names = peer_names(N)
    first = make_inputs(names, DIM, seed=14)
    second = make_inputs(names, DIM, seed=15)
    async with coordinator() as c, Swarm(c.url, names) as swarm:
        result0, outcomes0 = await run_round(c, swarm, first)
        result1, outcomes1 = await run_round(c, swarm, second)
    for result, outcomes, inputs, number in ((result0, outcomes0, first, 0),
                                             (result1, outcomes1, second, 1)):
        check_ok_round(result, outcomes, inputs, swarm)
        assert result.outcome.round == number
        assert sorted(result.contributors) == names
        for outcome in outcomes.values():
            assert isinstance(outcome, PeerOutcome) and outcome.round == number
    # The two aggregates differ: round 1 did not reuse round 0's inputs or masks.
    assert not np.allclose(result0.aggregate, result1.aggregate)


@pytest.mark.slow
async def test_second_round_survives_a_crash_in_the_first() -> None:
    names = peer_names(N)
    first = make_inputs(names, DIM, seed=16)
    second = make_inputs(names, DIM, seed=17)
    victim = names[6]
    async with coordinator() as c, \
            Swarm(c.url, names, hook=crash_on({victim: "reported"})) as swarm:
        result0, outcomes0 = await run_round(c, swarm, first)
        survivors = [name for name in names if name != victim]
        # The crashed peer is gone for good: round 1 is run by the others, and the
        # coordinator must not wait for max_peers that can no longer come.
        rest = Swarm(c.url, survivors)
        rest.peers = {name: swarm.peers[name] for name in survivors}
        round_task = asyncio.create_task(c.run_round())
        async with asyncio.timeout(ROUND_TIMEOUT):
            outcomes1 = await rest.contribute(second)
            result1 = await round_task
    check_ok_round(result0, outcomes0, first, swarm)
    assert victim not in result0.contributors
    assert result1.status == "ok"
    assert sorted(result1.contributors) == survivors
    assert_exact_sum(result1.aggregate, second, result1.contributors, tolerance(N, DIM))
    assert result1.outcome.dropped.get(victim) in (None, "not_registered")
    assert all(isinstance(o, PeerOutcome) and o.status == "ok" for o in outcomes1.values())


async def test_weighted_round_gives_the_weighted_mean() -> None:
    names = peer_names(N)
    inputs = make_inputs(names, DIM, seed=18)
    max_weight = 4.0
    rng = np.random.default_rng(19)
    weights = {name: float(rng.uniform(0.25, max_weight)) for name in names}
    victims = {names[12]: "reported"}
    async with coordinator(weighted=True, max_weight=max_weight) as c, \
            Swarm(c.url, names, hook=crash_on(victims)) as swarm:
        result, outcomes = await run_round(c, swarm, inputs, weights)
    assert result.status == "ok", result.outcome.reason
    contributors = result.contributors
    assert sorted(contributors) == sorted(set(names) - set(victims))
    total = sum(weights[name] for name in contributors)
    expected = sum(weights[name] * inputs[name] for name in contributors) / total
    total_weight = result.outcome.total_weight
    assert total_weight is not None
    assert abs(total_weight - total) <= tolerance(N, DIM, clip=max_weight)
    bound = weighted_tolerance(N, DIM, max_weight=max_weight, total_weight=total_weight)
    assert result.aggregate is not None and result.outcome.mean is not None
    assert float(np.max(np.abs(result.outcome.mean - expected))) <= bound
    # The round publishes the weighted sum itself; the mean is one division away.
    assert np.array_equal(result.aggregate, result.outcome.mean * total_weight) or \
        float(np.max(np.abs(result.aggregate / total_weight - result.outcome.mean))) < 1e-12
    for name in contributors:
        outcome = outcomes[name]
        assert isinstance(outcome, PeerOutcome) and outcome.status == "ok"


# ------------------------------------------------------------ lifecycle


async def test_clean_shutdown_leaves_no_tasks_and_no_listeners() -> None:
    before = asyncio.all_tasks()
    names = peer_names(8)
    inputs = make_inputs(names, DIM, seed=20)
    victims = {names[3]: "reported"}
    async with coordinator(max_peers=8, threshold=5) as c:
        server_port = c.port
        async with Swarm(c.url, names, hook=crash_on(victims)) as swarm:
            ports = [int(p.address.rsplit(":", 1)[1]) for p in swarm.peers.values()]
            result, _ = await run_round(c, swarm, inputs)
    assert result.status == "ok"
    # Give cancelled tasks their last step.
    for _ in range(5):
        await asyncio.sleep(0.05)
    leftover = asyncio.all_tasks() - before - {asyncio.current_task()}
    assert not leftover, [repr(task) for task in leftover]
    assert port_refuses(server_port)
    for port in ports:
        assert port_refuses(port), port


@pytest.mark.slow
async def test_peer_arriving_after_registration_closed_is_rejected_promptly() -> None:
    """A registered client that never shares holds the round open in R1."""
    n, t = 6, 4
    names = peer_names(n - 1)
    inputs = make_inputs(names, DIM, seed=21)
    async with coordinator(max_peers=n, threshold=t, phase_timeout=8.0) as c, \
            Swarm(c.url, names) as swarm, RawClient(c.url) as silent:
        round_task = asyncio.create_task(c.run_round())
        await silent.register("silent")
        contributions = asyncio.create_task(swarm.contribute(inputs))
        await silent.wait_for(Roster.TYPE)  # registration is closed now
        async with Peer(c.url, "latecomer") as late:
            # Well within the round's remaining R1 deadline (0.75 * 8 s).
            outcome = await asyncio.wait_for(late.contribute(np.zeros(DIM)), 4.0)
        assert not round_task.done()
        async with asyncio.timeout(ROUND_TIMEOUT):
            outcomes = await contributions
            result = await round_task
    assert outcome.status == "rejected"
    assert "closed" in outcome.reason
    assert result.status == "ok"
    assert sorted(result.contributors) == names
    assert result.outcome.dropped["silent"] == "no_share_report"
    assert "latecomer" not in result.outcome.dropped
    assert_exact_sum(result.aggregate, inputs, result.contributors, tolerance(n, DIM))
    assert all(isinstance(o, PeerOutcome) and o.status == "ok" for o in outcomes.values())


async def test_contribute_with_wrong_dimension_is_refused_locally() -> None:
    names = peer_names(3)
    async with coordinator(max_peers=3, threshold=2) as c, Swarm(c.url, names) as swarm:
        round_task = asyncio.create_task(c.run_round())
        try:
            with pytest.raises(ValueError, match="coordinates"):
                await asyncio.wait_for(swarm.peers[names[0]].contribute(np.zeros(DIM + 1)),
                                       10)
        finally:
            round_task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await round_task


# ------------------------------------------------------------ benchmark


@pytest.mark.slow
def test_e2e_benchmark_quick_smoke() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "e2e.py"), "--quick"],
                          cwd=ROOT, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert records
    for record in records:
        assert record["bench"] == "e2e"
        assert record["status"] == "ok"
        assert record["exact"] is True
        assert record["seconds"] > 0
        assert record["peer_bytes_ratio"] > 0 and record["server_bytes_ratio"] > 0
        assert set(record["targets"]) == {"seconds", "peer_bytes_ratio",
                                          "server_bytes_ratio"}
        assert set(record["phase_seconds"]) >= {"sharing", "masking", "unmasking"}


# ------------------------------------------------------- paillier and hybrid


@pytest.mark.parametrize("mode", ["paillier", "hybrid"])
async def test_homomorphic_modes_survive_crashes_and_nat_peers(mode: str) -> None:
    """Encrypted partial sums over real websockets: a leaf dies before its input
    leaves it, a relay dies holding its children's ciphertexts, and two peers have
    no listener (their sealed frames go through the coordinator, which cannot open
    them)."""
    names = peer_names(N)
    inputs = make_inputs(names, DIM, seed=41)
    nat = {names[17], names[18]}
    victims = {names[3]: "reported"}
    kill_leaf = crash_on(victims)
    kill_relay = crash_first("masking", 1, among=set(names) - set(victims))

    def hook(swarm: Swarm, name: str, state: str, round_number: int) -> None:
        kill_leaf(swarm, name, state, round_number)
        kill_relay(swarm, name, state, round_number)

    async with coordinator(mode=mode, fan_in=3) as c, \
            Swarm(c.url, names, hook=hook,
                  listen=lambda name: None if name in nat else (HOST, 0)) as swarm:
        result, outcomes = await run_round(c, swarm, inputs)
    check_ok_round(result, outcomes, inputs, swarm, mode=mode)
    assert len(swarm.crashed) == 2, swarm.crashed  # the leaf and the first relay
    assert nat <= set(result.contributors)
    assert result.stats["decrypt_seconds"] > 0


async def test_peer_requiring_hybrid_declines_a_paillier_round() -> None:
    names = peer_names(6)
    inputs = make_inputs(names, DIM, seed=42)
    async with coordinator(mode="paillier", max_peers=5, threshold=3) as c:
        strict = Peer(c.url, "strict", mode="hybrid")
        async with strict, Swarm(c.url, names[:5]) as swarm:
            round_task = asyncio.create_task(c.run_round())
            declined = await asyncio.wait_for(strict.contribute(inputs[names[5]]), 30)
            outcomes = await swarm.contribute({n: inputs[n] for n in names[:5]})
            result = await asyncio.wait_for(round_task, 60)
    assert declined.status == "aborted"
    assert "only in hybrid mode" in declined.reason
    assert result.status == "ok"
    # It never registered: it withdrew as soon as it saw the mode, so the round did
    # not wait for it (and its slot went to the fifth peer).
    assert result.outcome.dropped == {"strict": "withdrew"}
    assert len(result.contributors) == 5
    check_ok_round(result, outcomes, {n: inputs[n] for n in names[:5]}, swarm, n=5,
                   threshold=3, mode="paillier")
