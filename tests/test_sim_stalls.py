"""Stalled peers in the simulator: connected, reading everything, sending nothing.

A stall is scripted like a dropout (``run_round(stalls={peer: phase})``, the same
phases and the same moments) but nobody sees it at once: the drivers' keepalive
(a ping every ``keepalive_seconds(phase_timeout)``, as long to wait for the pong)
notices it ``2 * keepalive_seconds(phase_timeout)`` of virtual time later, and
only then do the server and the stalled peer's neighbours and tree relatives see
it go. Until then the round waits for it where it would have waited for a live
peer.

The oracle is test_sim's (and test_modes' for paillier), with every stall counted
as a dropout in its phase: on the complete graph the round is exact over U3, U3
excludes every peer that stalled or dropped before its masked input left it, and
the round aborts exactly when a set falls below t. On top of that:

* U3 is exactly the peers that could still contribute (everyone but those), read
  not from the server's view but from the schedule, whenever at most one peer
  faults in R2 or no R2 fault is a stall. (Two R2 faults of which one is a stall
  may legitimately lose a live peer's sum, e.g. a relay that stalls holding it.)
* Every stall that began is noticed exactly 2 keepalive intervals later; the
  stalled peer is fenced: its outcome never says its input counted, and it is
  "aborted" whenever the stall was noticed before the round ended.
* A round takes at most one phase deadline (registration waits its deadline for a
  peer that never registers) plus one detection delay per stall, plus latency.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_modes import check_paillier_round, module_keys
from test_sim import (
    NEVER_CONTRIBUTE,
    THREAT_MODELS,
    Case,
    check_complete_oracle,
    check_soundness,
    quantizer_bound,
    u3_of,
)

from secagg.protocol.common import Mode, keepalive_seconds
from secagg.sim import PHASES, SimResult, peer_name, run_round
from secagg.wire import AdvertiseKeys, RootAggregate, ShareReport

PHASE_TIMEOUT = 10.0
DETECTION = 2 * keepalive_seconds(PHASE_TIMEOUT)
LATENCY_SLACK = 0.5
"""Virtual seconds of message latency a round may add to its deadlines and stalls
(one millisecond per hop; a round of a dozen peers has a few dozen hops in a row)."""
R2_PHASES = frozenset({"masked_input", "relay"})
SCHEDULED_PHASES = ("masked_input", "relay", "unmasking", "share_keys", "consistency_check",
                    "advertise_keys")
assert sorted(SCHEDULED_PHASES) == sorted(PHASES)


@dataclass(frozen=True)
class Schedule:
    n: int
    t: int
    d: int
    fan_in: int
    threat_model: str
    mode: Mode
    seed: int
    dropouts: dict[int, str] = field(default_factory=dict)
    stalls: dict[int, str] = field(default_factory=dict)
    phase_timeout: float = PHASE_TIMEOUT

    def inputs(self) -> np.ndarray:
        return self.as_dropouts().inputs()

    def as_dropouts(self) -> Case:
        """The same round with every stall counted as a dropout in its phase: what
        test_sim's oracle judges."""
        return Case(n=self.n, t=self.t, d=self.d, graph="complete", fan_in=self.fan_in,
                    threat_model=self.threat_model, dropouts={**self.dropouts, **self.stalls},
                    seed=self.seed)

    def run(self) -> SimResult:
        return run_round(self.inputs(), self.t, self.dropouts, seed=self.seed,
                         fan_in=self.fan_in, threat_model=self.threat_model, mode=self.mode,
                         phase_timeout=self.phase_timeout, stalls=self.stalls,
                         paillier_keys=module_keys() if self.mode != "masking" else None)

    def effective(self, schedule: Mapping[int, str]) -> dict[int, str]:
        """Without R3 a fault scripted for "consistency_check" happens in R4."""
        if self.threat_model == "active" and self.mode != "paillier":
            return dict(schedule)
        return {p: "unmasking" if ph == "consistency_check" else ph
                for p, ph in schedule.items()}

    def r2_phases(self) -> frozenset[str]:
        # Without R1 (paillier) the tree is built as soon as the rosters are out, so a
        # peer faulting on its roster faults in R2.
        return R2_PHASES | {"share_keys"} if self.mode == "paillier" else R2_PHASES


@st.composite
def schedules(draw: st.DrawFn, modes: tuple[Mode, ...], max_n: int) -> Schedule:
    threat_model = draw(st.sampled_from(THREAT_MODELS))
    n = draw(st.integers(4, max_n))
    lowest = 2 * n // 3 + 1 if threat_model == "active" else n // 2 + 1
    t = draw(st.integers(lowest, n))
    # Mostly schedules near the threshold boundary, sometimes any subset.
    k = draw(st.integers(1, min(n, n - t + 2)) | st.integers(1, n))
    order = draw(st.permutations(range(n)))
    # Hypothesis leans towards the first choice: make that the tree, not registration.
    phases = draw(st.lists(st.sampled_from(SCHEDULED_PHASES), min_size=k, max_size=k))
    stalling = draw(st.lists(st.booleans(), min_size=k, max_size=k))
    stalling[0] = True  # every schedule has a stall
    faults = list(zip(order[:k], phases, stalling, strict=True))
    return Schedule(n=n, t=t, d=draw(st.integers(1, 4)), fan_in=draw(st.sampled_from([2, 3])),
                    threat_model=threat_model, mode=draw(st.sampled_from(modes)),
                    seed=draw(st.integers(0, 2**16)),
                    dropouts={p: ph for p, ph, stalls in faults if not stalls},
                    stalls={p: ph for p, ph, stalls in faults if stalls})


# --------------------------------------------------------------------------
# The oracle


def could_contribute(s: Schedule) -> set[int]:
    """Peers whose masked input leaves them: all but those that stall or drop before."""
    faults = s.effective({**s.dropouts, **s.stalls})
    return {p for p in range(s.n) if faults.get(p) not in NEVER_CONTRIBUTE}


def reaches_r2(s: Schedule) -> bool:
    faults = list(s.effective({**s.dropouts, **s.stalls}).values())
    registered = s.n - faults.count("advertise_keys")
    reporters = registered if s.mode == "paillier" else registered - faults.count("share_keys")
    return registered >= s.t and reporters >= s.t


def u3_is_predictable(s: Schedule) -> bool:
    """At most one peer faults in R2, or none of the R2 faults is a stall (dropouts are
    seen at once). Otherwise a relay that stalls holding a live child's sum loses it."""
    r2 = s.r2_phases()
    in_r2 = [p for p, ph in s.effective({**s.dropouts, **s.stalls}).items() if ph in r2]
    stalled_in_r2 = [p for p, ph in s.effective(s.stalls).items() if ph in r2]
    return len(in_r2) <= 1 or not stalled_in_r2


def check_round(s: Schedule, result: SimResult) -> None:
    case = s.as_dropouts()
    if s.mode == "paillier":
        check_paillier_round(case, result)
    else:
        check_soundness(case, result)
        check_complete_oracle(case, result)
    if reaches_r2(s) and u3_is_predictable(s):
        expected = could_contribute(s)
        assert u3_of(result) == (expected if len(expected) >= s.t else None), \
            (sorted(expected), result.reason, result.stats)
    check_stalls(s, result)


def check_stalls(s: Schedule, result: SimResult) -> None:
    """Who stalled, when it was noticed, what it was told, and how long the round took."""
    stalls = s.effective(s.stalls)
    detection = 2 * keepalive_seconds(s.phase_timeout)
    assert result.stalled.items() <= stalls.items()
    assert {p for p, ph in stalls.items() if ph == "advertise_keys"} <= set(result.stalled)
    assert result.stats["stall_detection_seconds"] == detection
    records = {record["peer"]: record for record in result.stats["stalls"]}
    assert set(records) == set(result.stalled)
    finished = result.stats["virtual_seconds"]
    for p, phase in result.stalled.items():
        record = records[p]
        assert record["phase"] == phase
        assert record["detected"] == pytest.approx(record["since"] + detection)
        outcome = result.peer_outcomes[p]
        # Fenced: never told its input counted, even when it did (a stall in R3/R4).
        assert not outcome.included, outcome
        if record["detected"] <= finished:
            assert outcome.status == "aborted", outcome
        if phase not in ("consistency_check", "unmasking"):
            assert p not in result.contributors
    # Everyone who neither stalled nor dropped was told the round's outcome.
    faulty = set(s.dropouts) | set(s.stalls)
    for p in sorted(set(range(s.n)) - faulty):
        outcome = result.peer_outcomes[p]
        assert outcome.status == result.status, (p, outcome, result.reason)
        assert outcome.included == (p in result.contributors), (p, outcome)
    faults = s.effective({**s.dropouts, **s.stalls}).values()
    registration = s.phase_timeout if "advertise_keys" in faults else 0.0
    bound = registration + detection * len(result.stalled) + LATENCY_SLACK
    assert finished <= bound, (finished, bound, result.stats["stalls"])


# --------------------------------------------------------------------------
# Property tests


@settings(max_examples=60, deadline=None)
@given(schedules(modes=("masking",), max_n=12))
def test_random_stalls_and_dropouts_in_masking_rounds(schedule: Schedule) -> None:
    check_round(schedule, schedule.run())


@settings(max_examples=10, deadline=None)
@given(schedules(modes=("hybrid",), max_n=9))
def test_random_stalls_and_dropouts_in_hybrid_rounds(schedule: Schedule) -> None:
    check_round(schedule, schedule.run())


@settings(max_examples=4, deadline=None)
@given(schedules(modes=("paillier",), max_n=7))
def test_random_stalls_and_dropouts_in_paillier_rounds(schedule: Schedule) -> None:
    check_round(schedule, schedule.run())


# --------------------------------------------------------------------------
# A stalled leaf, relay and root


N, T, FAN_IN, SEED = 8, 5, 2, 1


def _inputs(n: int = N, seed: int = SEED) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1.0, 1.0, size=(n, 3))


def _tree(n: int = N, t: int = T, seed: int = SEED) -> dict[int, int | None]:
    """The accumulation tree of the fault-free round (the same as long as every member
    of U2 is alive when R2 begins): member -> parent."""
    result = run_round(_inputs(n, seed), t, seed=seed, fan_in=FAN_IN)
    assert result.status == "ok" and len(result.tree_parents) == n
    return result.tree_parents


def _depth(tree: Mapping[int, int | None], u: int) -> int:
    parent = tree[u]
    return 0 if parent is None else 1 + _depth(tree, parent)


def _pick(role: str, tree: Mapping[int, int | None]) -> int:
    parents = set(tree.values())
    if role == "root":
        return next(u for u, p in tree.items() if p is None)
    if role == "relay":  # an inner node that holds its children's sums
        return max((u for u, p in tree.items() if p is not None and u in parents),
                   key=lambda u: (len([c for c in tree if tree[c] == u]), -u))
    return max((u for u in tree if u not in parents), key=lambda u: (_depth(tree, u), -u))


@pytest.mark.parametrize(("role", "phase"), [
    ("leaf", "masked_input"),
    ("relay", "relay"),  # stalls holding its children's sums
    ("relay", "masked_input"),  # stalls before its children's sums arrive
    ("root", "relay"),  # stalls holding every sum, as it would send the aggregate
    ("root", "masked_input"),
])
def test_a_stalled_tree_member_costs_only_its_own_input(role: str, phase: str) -> None:
    tree = _tree()
    peer = _pick(role, tree)
    inputs = _inputs()
    result = run_round(inputs, T, seed=SEED, fan_in=FAN_IN, stalls={peer: phase})
    others = [p for p in range(N) if p != peer]
    assert result.status == "ok", result.reason
    assert result.contributors == others
    assert result.aggregate is not None
    assert np.abs(result.aggregate - inputs[others].sum(axis=0)).max() < quantizer_bound(N, 3)
    assert result.dropped == {peer: "no_masked_input"}
    assert result.stalled == {peer: phase}
    (record,) = result.stats["stalls"]
    assert record["detected"] - record["since"] == pytest.approx(DETECTION)
    # The round waited at most for the stall to be noticed (a stalled leaf's parent
    # may give up on it sooner, at its own forward deadline).
    assert result.stats["virtual_seconds"] <= record["detected"] + LATENCY_SLACK
    outcome = result.peer_outcomes[peer]
    assert not outcome.included and outcome.status in ("aborted", "excluded"), outcome
    if outcome.status == "aborted":
        assert "lost the connection to the server" in outcome.reason
    for p in others:
        assert (result.peer_outcomes[p].status, result.peer_outcomes[p].included) == ("ok", True)
    (aggregate,) = [env for env in result.server_view.messages
                    if isinstance(env.body, RootAggregate)]
    assert aggregate.sender != peer_name(peer)  # nothing it held left it
    if role == "root":
        assert result.stats["new_root"] not in (peer_name(peer), None)
        assert aggregate.sender == result.stats["new_root"]
    # A dropout in the same place is seen at once: the difference is the keepalive.
    dropout = run_round(inputs, T, {peer: phase}, seed=SEED, fan_in=FAN_IN)
    assert dropout.contributors == others
    assert dropout.stats["virtual_seconds"] < LATENCY_SLACK < DETECTION


@pytest.mark.parametrize(("phase", "reason", "contributes"), [
    ("share_keys", "no_share_report", False),
    ("consistency_check", "signature_missing", True),
    ("unmasking", "unmask_share_missing", True),
])
def test_stalls_in_the_other_phases(phase: str, reason: str, contributes: bool) -> None:
    n, t = 8, 6  # 3t > 2n, as the active model requires
    inputs = _inputs(n)
    result = run_round(inputs, t, seed=SEED, stalls={3: phase}, threat_model="active")
    assert result.status == "ok", result.reason
    assert result.dropped == {3: reason}
    assert (3 in result.contributors) is contributes
    assert result.aggregate is not None
    error = np.abs(result.aggregate - inputs[result.contributors].sum(axis=0))
    assert error.max() < quantizer_bound(n, 3)
    # Its input may be in the sum, but the stalled peer never hears that it is.
    outcome = result.peer_outcomes[3]
    assert (outcome.status, outcome.included) == ("aborted", False)
    assert DETECTION <= result.stats["virtual_seconds"] <= DETECTION + LATENCY_SLACK
    if phase == "unmasking":
        # Its shares never left it: the server unmasked with the other holders'.
        assert all(holder != 3 for _, _, holder in result.server_view.shares)


def test_a_peer_stalled_before_registering_is_not_registered() -> None:
    inputs = _inputs()
    result = run_round(inputs, T, seed=SEED, stalls={2: "advertise_keys"})
    assert result.status == "ok", result.reason
    assert result.dropped == {2: "not_registered"}
    assert result.contributors == [p for p in range(N) if p != 2]
    assert result.stalled == {2: "advertise_keys"}
    assert result.stats["stalls"][0]["since"] == 0.0
    # Nobody knew of it: registration closed at its deadline, as for a dropout.
    assert PHASE_TIMEOUT <= result.stats["virtual_seconds"] <= PHASE_TIMEOUT + LATENCY_SLACK
    assert result.peer_outcomes[2].status == "aborted"


@pytest.mark.parametrize("phase_timeout", [10.0, 60.0, 400.0])
def test_detection_takes_two_keepalive_intervals(phase_timeout: float) -> None:
    # clamp(phase_timeout / 10, 2, 20), twice: 4 s, 12 s and (at the ceiling) 40 s.
    detection = {10.0: 4.0, 60.0: 12.0, 400.0: 40.0}[phase_timeout]
    assert 2 * keepalive_seconds(phase_timeout) == detection
    result = run_round(_inputs(), T, seed=SEED, stalls={5: "share_keys"},
                       phase_timeout=phase_timeout)
    assert result.status == "ok", result.reason
    (record,) = result.stats["stalls"]
    assert record["detected"] - record["since"] == pytest.approx(detection)
    assert detection <= result.stats["virtual_seconds"] <= detection + LATENCY_SLACK


def test_stall_and_dropout_together_below_threshold_abort() -> None:
    n, t = 6, 5
    inputs = _inputs(n)
    one = run_round(inputs, t, seed=SEED, stalls={0: "masked_input"})
    assert one.status == "ok", one.reason
    both = run_round(inputs, t, {1: "share_keys"}, seed=SEED, stalls={0: "masked_input"})
    assert both.status == "aborted"
    assert "masked inputs" in both.reason or "no aggregate" in both.reason, both.reason
    assert both.server_view.revealed_secrets() == {}


def test_a_stall_whose_phase_never_comes_does_not_begin() -> None:
    n, t = 6, 5
    result = run_round(_inputs(n), t, {0: "masked_input", 1: "masked_input"}, seed=SEED,
                       stalls={2: "unmasking"})
    assert result.status == "aborted"  # in R2: there is no unmasking request to stall on
    assert result.stalled == {}
    assert result.stats["stalls"] == []
    assert result.peer_outcomes[2].status == "aborted"
    assert result.stats["virtual_seconds"] < LATENCY_SLACK


def test_stalls_are_reproducible() -> None:
    inputs = _inputs()
    first = run_round(inputs, T, {4: "unmasking"}, seed=SEED, fan_in=FAN_IN,
                      stalls={1: "relay", 6: "share_keys"})
    again = run_round(inputs, T, {4: "unmasking"}, seed=SEED, fan_in=FAN_IN,
                      stalls={1: "relay", 6: "share_keys"})
    assert first.status == again.status == "ok"
    assert first.aggregate is not None and again.aggregate is not None
    assert np.array_equal(first.aggregate, again.aggregate)
    assert first.stats["stalls"] == again.stats["stalls"]
    assert first.stats["virtual_seconds"] == again.stats["virtual_seconds"]
    assert first.stats["events"] == again.stats["events"]


@pytest.mark.parametrize(("dropouts", "stalls", "words"), [
    ({}, {0: "lunch"}, "unknown stall phase 'lunch'"),
    ({}, {8: "share_keys"}, "stall for peer 8, but peers are 0..7"),
    ({}, {-1: "share_keys"}, "stall for peer -1"),
    ({}, {"3": "share_keys"}, "stall for peer '3'"),
    ({2: "relay"}, {2: "unmasking"}, "peers [2] are scripted both to drop and to stall"),
])
def test_bad_stall_schedules_are_refused(dropouts: dict[int, str], stalls: dict[int, str],
                                         words: str) -> None:
    with pytest.raises(ValueError) as refused:
        run_round(_inputs(), T, dropouts, stalls=stalls)
    assert words in str(refused.value)


# --------------------------------------------------------------------------
# Regressions: stalls noticed late used to lose live peers' sums. The forward
# deadlines now leave the root a stall-detection delay after the last relay's, and
# a new root gets a root's deadline (server/collect.py forward_deadline).


def test_new_root_waits_for_relays_that_wait_for_a_stalled_child() -> None:
    n, t, seed = 12, 7, 3
    inputs = _inputs(n, seed)
    tree = _tree(n, t, seed)
    root = _pick("root", tree)
    # A deepest leaf whose parent is not the root: that parent waits for it, until the
    # stall is noticed or its deadline, 2T/(depth + 2) after R2 began.
    leaf = max((u for u in tree if u not in set(tree.values()) and tree[u] != root),
               key=lambda u: (_depth(tree, u), -u))
    result = run_round(inputs, t, {root: "masked_input"}, seed=seed, fan_in=FAN_IN,
                       stalls={leaf: "masked_input"})
    assert "new_root" in result.stats
    # Ten peers sent their masked inputs: the round should sum all ten.
    assert result.status == "ok", result.reason
    assert result.contributors == [p for p in range(n) if p not in (root, leaf)]


def test_a_relay_stalling_after_a_stalled_child_keeps_its_other_childrens_sums() -> None:
    n, t, seed = 12, 7, 3
    inputs = _inputs(n, seed)
    tree = _tree(n, t, seed)
    children = {u: [c for c, p in tree.items() if p == u] for u in tree}
    relay = next(u for u in sorted(tree, key=lambda u: (_depth(tree, u), u))
                 if tree[u] is not None and len(children[u]) >= 2)
    stalled_child, live_child = children[relay][:2]
    result = run_round(inputs, t, seed=seed, fan_in=FAN_IN,
                       stalls={stalled_child: "masked_input", relay: "relay"})
    assert result.stalled == {stalled_child: "masked_input", relay: "relay"}
    assert result.status == "ok", result.reason
    assert live_child in result.contributors  # it is alive and its sum left it in time
    assert result.contributors == [p for p in range(n) if p not in (relay, stalled_child)]


def test_a_stalled_relay_costs_only_itself_with_a_short_phase_timeout() -> None:
    phase_timeout = 5.0
    assert 2 * keepalive_seconds(phase_timeout) > phase_timeout * 3 / 4
    tree = _tree()
    root = _pick("root", tree)
    relay = max((u for u, p in tree.items() if p == root),
                key=lambda u: (len([c for c in tree if tree[c] == u]), -u))
    inputs = _inputs()
    result = run_round(inputs, T, seed=SEED, fan_in=FAN_IN, stalls={relay: "relay"},
                       phase_timeout=phase_timeout)
    assert result.stalled == {relay: "relay"}
    # Seven peers sent their masked inputs and live: the round should sum all seven.
    assert result.status == "ok", result.reason
    assert result.contributors == [p for p in range(N) if p != relay]


def test_the_server_never_hears_from_a_stalled_peer_after_its_stall() -> None:
    inputs = _inputs()
    relay = _pick("relay", _tree())
    share_staller = 6 if relay != 6 else 7
    result = run_round(inputs, T, seed=SEED, fan_in=FAN_IN,
                       stalls={relay: "relay", share_staller: "share_keys"})
    assert result.status == "ok", result.reason
    assert result.stalled == {relay: "relay", share_staller: "share_keys"}
    heard: dict[str, list[str]] = {}
    for env in result.server_view.messages:
        heard.setdefault(env.sender, []).append(env.type)
    # Each was heard up to its stall, and never after.
    assert heard[peer_name(share_staller)] == [AdvertiseKeys.TYPE]
    assert heard[peer_name(relay)] == [AdvertiseKeys.TYPE, ShareReport.TYPE]
    assert ShareReport.TYPE in heard[peer_name(next(p for p in range(N)
                                                    if p not in (relay, share_staller)))]
