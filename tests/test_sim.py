"""Whole rounds in the in-memory simulator: property tests over dropout schedules.

The oracle (derived from the protocol code, complete graph):

* U1 = peers that registered = n - #"advertise_keys" droppers; abort if U1 < t.
* Every peer that gets the roster and does not die shares with, and receives the
  shares of, every other live peer; so U2 = reporters = U1 - #"share_keys"
  droppers when reporters >= t, else the round aborts ("U2 ... below the threshold").
* U3 (the contributor set of the root's aggregate) loses the "masked_input" and
  "relay" droppers, and whatever sums a dying relay held; it is read from the
  server's view. Abort if |U3| < t.
* Under ``active``, U4 = U3 minus the "consistency_check" droppers in U3; abort if
  |U4| < t. (Under honest-but-curious the simulator treats "consistency_check" as
  "unmasking", and U4 = U3.)
* Every member of U4 is sent an unmask request; the "unmasking" droppers die on
  it. Each responder holds a share of every U2 member, so the round succeeds iff
  responders = |U4 - unmasking droppers| >= t.

On a sparse graph, thresholds apply per neighbourhood, so only soundness is
checked: ok => exact sum and >= t contributors; aborted => a below-threshold reason.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secagg.protocol.common import Encoder
from secagg.sim import PHASES, SimResult, peer_name, run_round
from secagg.wire import RootAggregate, UnmaskShares

THREAT_MODELS = ("honest-but-curious", "active")
NEVER_CONTRIBUTE = frozenset({"advertise_keys", "share_keys", "masked_input", "relay"})
BELOW_THRESHOLD_REASONS = ("registered", "U2", "masked inputs", "no aggregate",
                           "consistency signatures", "cannot unmask", "threshold",
                           "below", "too few")


def quantizer_bound(n: int, d: int, modulus_bits: int = 32) -> float:
    quantizer = Encoder.create(n=n, dim=d, clip=1.0, scale=None, modulus_bits=modulus_bits,
                               weighted=False, max_weight=1.0).quantizer
    return quantizer.error_bound(n) + 1e-9


def effective_phases(dropouts: Mapping[int, str], threat_model: str) -> dict[int, str]:
    """The simulator runs "consistency_check" deaths as "unmasking" without R3."""
    if threat_model == "active":
        return dict(dropouts)
    return {p: "unmasking" if ph == "consistency_check" else ph for p, ph in dropouts.items()}


def index_of(name: str) -> int:
    prefix, number = name.split("-")
    assert prefix == "peer" and peer_name(int(number)) == name
    return int(number)


def u3_of(result: SimResult) -> set[int] | None:
    vectors = result.server_view.vectors()
    assert len(vectors) <= 1, "the server accepted more than one aggregate"
    return {index_of(name) for name in vectors[0]} if vectors else None


@dataclass(frozen=True)
class Case:
    n: int
    t: int
    d: int
    graph: str
    fan_in: int
    threat_model: str
    dropouts: dict[int, str]
    seed: int

    def inputs(self) -> np.ndarray:
        rng = np.random.default_rng(self.seed)
        return rng.uniform(-1.0, 1.0, size=(self.n, self.d))

    def run(self) -> SimResult:
        return run_round(self.inputs(), self.t, self.dropouts, graph=self.graph,  # type: ignore[arg-type]
                         seed=self.seed, fan_in=self.fan_in, threat_model=self.threat_model)


@st.composite
def cases(draw: st.DrawFn, min_n: int = 3, max_n: int = 40,
          graphs: tuple[str, ...] = ("complete", "sparse")) -> Case:
    n = draw(st.integers(min_n, max_n))
    threat_model = draw(st.sampled_from(THREAT_MODELS))
    # The least threshold each model accepts: n/2 < t, and 2n/3 < t under active.
    least = 2 * n // 3 + 1 if threat_model == "active" else n // 2 + 1
    t = draw(st.integers(least, n))
    d = draw(st.integers(1, 8))
    # Mostly schedules near the threshold boundary, sometimes any subset.
    k = draw(st.integers(0, min(n, n - t + 2)) | st.integers(0, n))
    order = draw(st.permutations(range(n)))
    phases = draw(st.lists(st.sampled_from(PHASES), min_size=k, max_size=k))
    return Case(n=n, t=t, d=d, graph=draw(st.sampled_from(graphs)),
                fan_in=draw(st.sampled_from([2, 3, 8])),
                threat_model=threat_model,
                dropouts=dict(zip(order[:k], phases, strict=True)),
                seed=draw(st.integers(0, 2**16)))


def check_soundness(case: Case, result: SimResult) -> None:
    """Invariants (1)-(3): hold on every graph, in every run."""
    n, t = case.n, case.t
    inputs = case.inputs()
    phases = effective_phases(case.dropouts, case.threat_model)
    revealed = result.server_view.revealed_secrets()
    # (2) never both secrets of one peer
    for name, kinds in revealed.items():
        assert kinds <= {"self_mask", "secret_key"}
        assert len(kinds) == 1, f"server holds both secrets of {name}"
    # (3) every vector the server saw has at least t contributors
    for members in result.server_view.vectors():
        assert len(set(members)) == len(members)
        assert len(members) >= t, f"vector with {len(members)} < t contributors"
    assert result.status in ("ok", "aborted")
    if result.status == "ok":
        # (1) the exact sum of at least t contributors, none of them dead before R2 ended
        assert result.aggregate is not None and result.aggregate.shape == (case.d,)
        contributors = result.contributors
        assert contributors == sorted(set(contributors))
        assert len(contributors) >= t
        assert not {p for p, ph in phases.items() if ph in NEVER_CONTRIBUTE} & set(contributors)
        assert set(contributors) == u3_of(result)
        error = np.abs(result.aggregate - inputs[contributors].sum(axis=0))
        assert error.max() < quantizer_bound(n, case.d)
        assert result.reason == ""
        for stat in ("u1", "u2", "u3"):
            assert result.stats[stat] >= t
        if case.threat_model == "active":
            assert result.stats["u4"] >= t
        assert result.stats["u1"] >= result.stats["u2"] >= result.stats["u3"]
    else:
        assert result.aggregate is None and result.contributors == []
        assert any(word in result.reason for word in BELOW_THRESHOLD_REASONS), result.reason
        if result.stats.get("u4", 0) < t:
            # Aborted before unmasking: not a single share left a peer.
            assert revealed == {}
            assert not any(isinstance(env.body, UnmaskShares)
                           for env in result.server_view.messages)


def expected_outcome(case: Case, result: SimResult) -> tuple[str, str]:
    """The complete-graph oracle: ("ok" | "aborted", a word the abort reason contains)."""
    n, t = case.n, case.t
    phases = effective_phases(case.dropouts, case.threat_model)
    dying = {ph: {p for p, q in phases.items() if q == ph} for ph in PHASES}
    u1 = n - len(dying["advertise_keys"])
    if u1 < t:
        return "aborted", "registered"
    reporters = u1 - len(dying["share_keys"])
    if reporters < t:
        return "aborted", "U2"
    assert result.stats["u2"] == reporters
    u3 = u3_of(result)
    if u3 is None or len(u3) < t:
        return "aborted", "root" if u3 is None else "masked inputs"
    assert result.stats["u3"] == len(u3)
    # Nobody alive at the end of R2 is missing unless a dead relay held its sum.
    assert not u3 & (dying["masked_input"] | dying["relay"])
    u4 = u3 - dying["consistency_check"] if case.threat_model == "active" else u3
    if len(u4) < t:
        return "aborted", "consistency signatures"
    responders = u4 - dying["unmasking"]
    if len(responders) < t:
        return "aborted", "cannot unmask"
    return "ok", ""


def check_complete_oracle(case: Case, result: SimResult) -> None:
    """Invariant (4): on the complete graph the round aborts exactly when a set is below t."""
    status, word = expected_outcome(case, result)
    assert result.status == status, (status, word, result.reason, result.stats)
    if status == "aborted":
        if word == "root":
            assert "no aggregate" in result.reason or "masked inputs" in result.reason
        else:
            assert word in result.reason, (word, result.reason)
        return
    phases = effective_phases(case.dropouts, case.threat_model)
    u3 = set(result.contributors)
    for p in range(case.n):
        ph = phases.get(p)
        reason = result.dropped.get(p)
        if ph == "advertise_keys":
            assert reason == "not_registered"
        elif ph == "share_keys":
            assert reason == "no_share_report"
        elif ph in ("masked_input", "relay") or (ph is not None and p not in u3):
            assert reason == "no_masked_input"
        elif ph == "consistency_check":
            assert reason == "signature_missing"
        elif ph == "unmasking":
            assert reason == "unmask_share_missing"
        else:
            # A live peer is missing only if a dying relay took its sum along.
            assert reason is None if p in u3 else reason == "no_masked_input"
    assert result.stats["u1"] == case.n - len([1 for ph in phases.values()
                                                if ph == "advertise_keys"])


def effectively_complete(case: Case, result: SimResult) -> bool:
    if case.graph == "complete":
        return True
    u1 = case.n - sum(1 for ph in case.dropouts.values() if ph == "advertise_keys")
    return result.stats.get("degree") == u1 - 1


# --------------------------------------------------------------------------
# Property tests


@settings(max_examples=300, deadline=None)
@given(cases())
def test_any_dropout_schedule_is_sound_and_matches_the_oracle(case: Case) -> None:
    result = case.run()
    check_soundness(case, result)
    if effectively_complete(case, result):
        check_complete_oracle(case, result)


@pytest.mark.slow
@settings(max_examples=12, deadline=None)
@given(cases(min_n=50, max_n=90, graphs=("sparse",)))
def test_sparse_rounds_are_sound(case: Case) -> None:
    check_soundness(case, case.run())


@settings(max_examples=8, deadline=None)
@given(st.integers(50, 70), st.integers(0, 2**16))
def test_truly_sparse_round_with_few_dropouts_is_sound(n: int, seed: int) -> None:
    # Under active the graph assumes a corrupt fraction (graph.ACTIVE_CORRUPT_RATE) and is
    # sparse only from about n = 200: see test_active_sparse_round_at_n_200_is_sound.
    threat_model = "honest-but-curious"
    rng = np.random.default_rng(seed)
    t = n // 2 + 1
    victims = rng.choice(n, size=3, replace=False)
    dropouts = {int(p): str(rng.choice(PHASES)) for p in victims}
    case = Case(n=n, t=t, d=3, graph="sparse", fan_in=8, threat_model=threat_model,
                dropouts=dropouts, seed=seed)
    result = case.run()
    assert result.stats["degree"] < n - 1  # the SecAgg+ graph, not the fallback
    check_soundness(case, result)


@pytest.mark.slow
def test_active_sparse_round_at_n_200_is_sound() -> None:
    n = 200
    case = Case(n=n, t=2 * n // 3 + 1, d=3, graph="sparse", fan_in=8, threat_model="active",
                dropouts={3: "share_keys", 50: "masked_input", 120: "consistency_check",
                          170: "unmasking"}, seed=5)
    result = case.run()
    assert result.stats["degree"] < n - 1  # the SecAgg+ graph, not the fallback
    check_soundness(case, result)


# --------------------------------------------------------------------------
# Deterministic scenarios


def test_example_from_the_issue() -> None:
    n = 12
    inputs = np.random.default_rng(7).uniform(-1.0, 1.0, size=(n, 5))
    result = run_round(inputs, 7, dropouts={3: "share_keys", 7: "masked_input", 9: "unmasking"})
    assert result.status == "ok", result.reason
    assert result.contributors == [0, 1, 2, 4, 5, 6, 8, 9, 10, 11]
    assert result.dropped == {3: "no_share_report", 7: "no_masked_input",
                              9: "unmask_share_missing"}
    assert result.aggregate is not None
    error = np.abs(result.aggregate - inputs[result.contributors].sum(axis=0))
    assert error.max() < quantizer_bound(n, 5)
    assert (result.stats["u1"], result.stats["u2"], result.stats["u3"]) == (12, 11, 10)
    revealed = result.server_view.revealed_secrets()
    assert revealed.get(peer_name(7)) == {"secret_key"}
    assert revealed.get(peer_name(9)) == {"self_mask"}
    assert peer_name(3) not in revealed


@pytest.mark.parametrize("threat_model", THREAT_MODELS)
def test_same_seed_gives_identical_results(threat_model: str) -> None:
    inputs = np.random.default_rng(1).uniform(-1.0, 1.0, size=(9, 4))
    dropouts = {2: "masked_input", 5: "unmasking"}
    first = run_round(inputs, 7, dropouts, seed=42, threat_model=threat_model)
    second = run_round(inputs, 7, dropouts, seed=42, threat_model=threat_model)
    assert first.status == second.status == "ok"
    assert first.aggregate is not None and second.aggregate is not None
    assert np.array_equal(first.aggregate, second.aggregate)
    assert first.contributors == second.contributors
    assert first.dropped == second.dropped
    masked = [env.body.payload for env in first.server_view.messages
              if isinstance(env.body, RootAggregate)]
    again = [env.body.payload for env in second.server_view.messages
             if isinstance(env.body, RootAggregate)]
    assert len(masked) == 1 and masked[0] == again[0]
    # Another seed draws other masks (and other stochastic rounding).
    other = run_round(inputs, 7, dropouts, seed=43, threat_model=threat_model)
    other_masked = [env.body.payload for env in other.server_view.messages
                    if isinstance(env.body, RootAggregate)]
    assert masked[0] != other_masked[0]


def test_encoding_frames_does_not_change_the_result() -> None:
    inputs = np.random.default_rng(2).uniform(-1.0, 1.0, size=(8, 3))
    dropouts = {1: "share_keys", 4: "relay"}
    encoded = run_round(inputs, 5, dropouts, seed=5, encode_frames=True)
    direct = run_round(inputs, 5, dropouts, seed=5, encode_frames=False)
    assert encoded.status == direct.status
    assert encoded.contributors == direct.contributors
    assert encoded.dropped == direct.dropped
    if encoded.status == "ok":
        assert encoded.aggregate is not None and direct.aggregate is not None
        assert np.array_equal(encoded.aggregate, direct.aggregate)


def _root(inputs: np.ndarray, t: int, seed: int, fan_in: int) -> int:
    result = run_round(inputs, t, seed=seed, fan_in=fan_in)
    assert result.status == "ok"
    (root,) = {env.sender for env in result.server_view.messages
               if isinstance(env.body, RootAggregate)}
    return index_of(root)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("fan_in", [2, 3, 8])
def test_root_dying_as_relay_is_survived(seed: int, fan_in: int) -> None:
    # The root dies holding every partial sum, just as it would send the aggregate.
    # Its children see it go and re-send their (still held) sums to the nearest live
    # ancestor; having none, they report it, the server names one of them the new
    # root, and the round succeeds without the old root's own input.
    n = 10
    inputs = np.random.default_rng(seed).uniform(-1.0, 1.0, size=(n, 3))
    root = _root(inputs, 6, seed, fan_in=fan_in)
    result = run_round(inputs, 6, {root: "relay"}, seed=seed, fan_in=fan_in)
    assert result.status == "ok", result.reason
    assert result.stats["root"] == peer_name(root)
    assert result.stats["new_root"] != peer_name(root)
    assert result.contributors == [p for p in range(n) if p != root]
    assert result.dropped == {root: "no_masked_input"}
    assert len(result.server_view.vectors()) == 1
    assert result.aggregate is not None
    error = np.abs(result.aggregate - inputs[result.contributors].sum(axis=0))
    assert error.max() < quantizer_bound(n, 3)


def test_relay_dying_with_its_children_sums_loses_only_its_own_input() -> None:
    n, fan_in, seed = 12, 2, 3
    inputs = np.random.default_rng(seed).uniform(-1.0, 1.0, size=(n, 2))
    baseline = run_round(inputs, 7, seed=seed, fan_in=fan_in)
    assert baseline.status == "ok"
    # An inner node of the tree: it has children whose sums it holds when it dies.
    for relay in range(n):
        if peer_name(relay) == baseline.stats["root"]:
            continue
        result = run_round(inputs, 7, {relay: "relay"}, seed=seed, fan_in=fan_in)
        assert result.status == "ok", (relay, result.reason)
        assert result.contributors == [p for p in range(n) if p != relay]
        assert result.dropped == {relay: "no_masked_input"}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("fan_in", [2, 8])
def test_root_dying_before_its_masked_input_is_replaced(seed: int, fan_in: int) -> None:
    n = 10
    inputs = np.random.default_rng(seed).uniform(-1.0, 1.0, size=(n, 3))
    root = _root(inputs, 6, seed, fan_in)
    result = run_round(inputs, 6, {root: "masked_input"}, seed=seed, fan_in=fan_in)
    assert result.status == "ok", result.reason
    assert "new_root" in result.stats
    assert result.stats["new_root"] != peer_name(root)
    assert result.contributors == [p for p in range(n) if p != root]
    assert result.dropped == {root: "no_masked_input"}
    assert result.aggregate is not None
    error = np.abs(result.aggregate - inputs[result.contributors].sum(axis=0))
    assert error.max() < quantizer_bound(n, 3)


def test_weighted_mean_is_within_bound() -> None:
    n, d = 15, 6
    rng = np.random.default_rng(3)
    inputs = rng.uniform(-1.0, 1.0, size=(n, d))
    weights = rng.uniform(0.5, 4.0, size=n)
    result = run_round(inputs, 8, {0: "masked_input", 4: "unmasking"}, weights=weights, seed=3)
    assert result.status == "ok", result.reason
    c = result.contributors
    assert c == [p for p in range(n) if p != 0]
    encoding = Encoder.create(n=n, dim=d, clip=1.0, scale=None, modulus_bits=64, weighted=True,
                              max_weight=float(weights.max())).weighted
    assert encoding is not None
    assert result.total_weight is not None
    assert abs(result.total_weight - weights[c].sum()) < encoding.quantizer.error_bound(n)
    expected = (weights[c, None] * inputs[c]).sum(axis=0) / weights[c].sum()
    assert result.aggregate is not None and result.aggregate.shape == (d,)
    assert result.mean is not None
    bound = encoding.mean_error_bound(n, result.total_weight)
    assert np.abs(result.mean - expected).max() < bound
    # The aggregate is the weighted sum: exact up to the quantization of the sum.
    expected_sum = (weights[c, None] * inputs[c]).sum(axis=0)
    assert np.abs(result.aggregate - expected_sum).max() < encoding.quantizer.error_bound(n)
    # The weight rides as one more coordinate in the 64-bit ring, and so does the
    # count of clipped coordinates.
    (payload,) = [env.body.payload for env in result.server_view.messages
                  if isinstance(env.body, RootAggregate)]
    assert len(payload) == 8 * (d + 2)


def test_modulus_64_bits() -> None:
    n, d = 9, 4
    inputs = np.random.default_rng(4).uniform(-1.0, 1.0, size=(n, d))
    result = run_round(inputs, 5, {8: "share_keys"}, modulus_bits=64, seed=4)
    assert result.status == "ok", result.reason
    (payload,) = [env.body.payload for env in result.server_view.messages
                  if isinstance(env.body, RootAggregate)]
    assert len(payload) == 8 * (d + 1)  # 64-bit ring elements, and the clipped counter
    assert result.aggregate is not None
    error = np.abs(result.aggregate - inputs[: n - 1].sum(axis=0))
    bound64 = quantizer_bound(n, d, 64)
    assert bound64 < quantizer_bound(n, d, 32)  # 64 bits buy precision
    assert error.max() < bound64


def test_clipping_applies_to_out_of_range_inputs() -> None:
    inputs = np.array([[5.0, -5.0], [0.5, 0.25], [-3.0, 0.0], [0.0, 2.0]])
    result = run_round(inputs, 3, seed=6)
    assert result.status == "ok"
    assert result.aggregate is not None
    expected = np.clip(inputs, -1.0, 1.0).sum(axis=0)
    assert np.abs(result.aggregate - expected).max() < quantizer_bound(4, 2)


@pytest.mark.parametrize(("phase", "reason"), [
    ("advertise_keys", "not_registered"),
    ("share_keys", "no_share_report"),
    ("masked_input", "no_masked_input"),
    ("unmasking", "unmask_share_missing"),
])
@pytest.mark.parametrize("threat_model", THREAT_MODELS)
def test_dropped_peer_gets_the_right_reason(phase: str, reason: str, threat_model: str) -> None:
    n = 8
    inputs = np.random.default_rng(8).uniform(-1.0, 1.0, size=(n, 2))
    result = run_round(inputs, 6, {6: phase}, seed=8, threat_model=threat_model)
    assert result.status == "ok", result.reason
    assert result.dropped == {6: reason}
    in_sum = phase == "unmasking"
    assert (6 in result.contributors) is in_sum
    assert len(result.contributors) == (n if in_sum else n - 1)


def test_consistency_check_dropper_is_signature_missing_under_active() -> None:
    n = 8
    inputs = np.random.default_rng(9).uniform(-1.0, 1.0, size=(n, 2))
    result = run_round(inputs, 6, {1: "consistency_check"}, seed=9, threat_model="active")
    assert result.status == "ok", result.reason
    assert result.dropped == {1: "signature_missing"}
    assert 1 in result.contributors  # its masked input is in; it just did not sign
    assert (result.stats["u3"], result.stats["u4"]) == (8, 7)


@pytest.mark.parametrize(("dropouts", "word"), [
    ({0: "advertise_keys", 1: "advertise_keys"}, "registered"),
    ({0: "share_keys", 1: "share_keys"}, "U2"),
    ({0: "masked_input", 1: "masked_input"}, "masked inputs"),
    ({0: "unmasking", 1: "unmasking"}, "cannot unmask"),
])
def test_losing_one_peer_too_many_aborts_with_the_reason(dropouts: dict[int, str],
                                                         word: str) -> None:
    n, t = 6, 5
    inputs = np.random.default_rng(10).uniform(-1.0, 1.0, size=(n, 2))
    one_less = dict(list(dropouts.items())[:1])
    assert run_round(inputs, t, one_less, seed=10).status == "ok"
    result = run_round(inputs, t, dropouts, seed=10)
    assert result.status == "aborted"
    assert word in result.reason, result.reason
    assert result.aggregate is None


def test_active_consistency_signatures_below_threshold_abort() -> None:
    n, t = 6, 5
    inputs = np.random.default_rng(11).uniform(-1.0, 1.0, size=(n, 2))
    result = run_round(inputs, t, {2: "consistency_check", 3: "consistency_check"}, seed=11,
                       threat_model="active")
    assert result.status == "aborted"
    assert "consistency signatures" in result.reason
    assert result.server_view.revealed_secrets() == {}


def test_run_round_validates_its_arguments() -> None:
    inputs = np.zeros((4, 2))
    with pytest.raises(ValueError):
        run_round(inputs, 3, {4: "share_keys"})
    with pytest.raises(ValueError):
        run_round(inputs, 3, {0: "lunch"})
    with pytest.raises(ValueError):
        run_round(np.zeros(4), 3)
    with pytest.raises(ValueError):
        run_round(inputs, 2)  # t must exceed n/2
    with pytest.raises(ValueError):
        run_round(inputs, 3, weights=np.array([1.0, -1.0, 1.0, 1.0]))


# --------------------------------------------------------------------------
# Determinism across processes


_DETERMINISM_SCRIPT = """
import json, logging
import numpy as np
logging.disable(logging.CRITICAL)
from secagg.sim import run_round
inputs = np.random.default_rng(729).uniform(-1.0, 1.0, size=(12, 2))
r = run_round(inputs, 10, {1: "relay"}, seed=729, fan_in=2)
print(json.dumps([r.status, r.contributors, r.reason, r.aggregate.tolist(), r.dropped,
                  r.stats["events"], r.stats["virtual_seconds"], sorted(r.stats["rejections"]),
                  r.stats["max_peer_bytes_sent"], r.stats["server_bytes_in"]]))
"""


# Regression test (was a strict xfail documenting a bug, since fixed).
def test_same_seed_gives_the_same_round_in_every_process() -> None:
    outputs = set()
    procs = []
    for hash_seed in range(6):
        env = {**os.environ, "PYTHONHASHSEED": str(hash_seed)}
        procs.append(subprocess.Popen([sys.executable, "-c", _DETERMINISM_SCRIPT], env=env,
                                      cwd=os.path.dirname(os.path.dirname(__file__)),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"simulation subprocess failed: {err}")
        outputs.add(out.strip())
    assert len(outputs) == 1, outputs


# --------------------------------------------------------------------------
# Scale


@pytest.mark.slow
def test_thousand_peers_on_the_sparse_graph() -> None:
    n, d = 1000, 100
    rng = np.random.default_rng(1000)
    inputs = rng.uniform(-1.0, 1.0, size=(n, d))
    victims = rng.choice(n, size=50, replace=False)
    phases = ["advertise_keys", "share_keys", "masked_input", "unmasking", "relay"]
    dropouts = {int(p): phases[i % len(phases)] for i, p in enumerate(victims)}
    t = n // 2 + 1
    result = run_round(inputs, t, dropouts, graph="sparse", seed=1000)
    assert result.status == "ok", result.reason
    assert result.stats["degree"] < 100  # SecAgg+: O(log n) neighbours
    assert len(result.contributors) >= t
    assert not {p for p, ph in dropouts.items() if ph in NEVER_CONTRIBUTE} & set(
        result.contributors)
    assert result.aggregate is not None
    error = np.abs(result.aggregate - inputs[result.contributors].sum(axis=0))
    assert error.max() < quantizer_bound(n, d)
    revealed = result.server_view.revealed_secrets()
    assert all(len(kinds) == 1 for kinds in revealed.values())
    for p, ph in dropouts.items():
        if ph == "advertise_keys":
            assert result.dropped[p] == "not_registered"
        elif ph == "share_keys":
            assert result.dropped[p] == "no_share_report"
