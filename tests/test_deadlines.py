"""Default phase deadlines fit the round: derived from n, the graph's degree and d."""

from __future__ import annotations

import pytest

from secagg.protocol import ServerConfig
from secagg.protocol.common import stall_detection_seconds
from secagg.protocol.server.collect import forward_deadline
from secagg.protocol.server.config import BASE_PHASE_TIMEOUT
from server.coordinator import Coordinator


def _config(n: int, t: int, dim: int, graph: str = "complete", mode: str = "masking",
            threat_model: str = "honest-but-curious") -> ServerConfig:
    return ServerConfig(session=bytes(16), round=0, max_peers=n, threshold=t, dim=dim,
                        graph=graph, mode=mode, threat_model=threat_model)  # type: ignore[arg-type]


def test_small_rounds_keep_the_base_deadline() -> None:
    assert BASE_PHASE_TIMEOUT <= _config(12, 7, 100).derived_phase_timeout() < 31


def test_deadline_grows_with_peers_degree_and_dimension() -> None:
    small = _config(100, 51, 1000).derived_phase_timeout()
    assert _config(200, 101, 1000).derived_phase_timeout() > small
    assert _config(100, 51, 100_000).derived_phase_timeout() > small
    # The sparse graph has fewer neighbours per peer than the complete one.
    sparse = _config(1000, 501, 10_000, "sparse").derived_phase_timeout()
    complete = _config(1000, 501, 10_000).derived_phase_timeout()
    assert sparse < complete
    # 1,000 sparse peers at d = 10,000 needed 120 s where 30 s aborted in sharing.
    assert 90 <= sparse <= 200


def test_the_coordinator_derives_its_deadline_unless_given() -> None:
    derived = Coordinator(max_peers=1000, threshold=501, dim=10_000, graph="sparse")
    assert derived.phase_timeout == _config(1000, 501, 10_000, "sparse").derived_phase_timeout()
    given = Coordinator(max_peers=1000, threshold=501, dim=10_000, graph="sparse",
                        phase_timeout=12.5)
    assert given.phase_timeout == 12.5


@pytest.mark.parametrize("phase_timeout", [3.0, 5.0, 10.0, 30.0, 120.0, 600.0])
@pytest.mark.parametrize("depth", [1, 2, 3, 6])
def test_the_root_waits_a_stall_detection_past_every_relay(phase_timeout: float,
                                                           depth: int) -> None:
    root = forward_deadline(phase_timeout, depth, 0)
    relays = [forward_deadline(phase_timeout, depth, d) for d in range(1, depth + 1)]
    assert relays == sorted(relays, reverse=True)  # deeper relays give up earlier
    detect = min(stall_detection_seconds(phase_timeout), phase_timeout / 2)
    assert root >= relays[0] + detect
    assert root < phase_timeout  # and the server's own deadline comes last
