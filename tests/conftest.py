"""Shared test configuration: deterministic hypothesis profiles.

``deterministic`` (the default) derandomizes every property test, so a run is
reproducible and CI cannot flake; ``explore`` draws fresh random examples and
more of them, for hunting bugs locally::

    HYPOTHESIS_PROFILE=explore .venv/bin/python -m pytest tests/test_sim.py
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "deterministic",
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "explore",
    derandomize=False,
    deadline=None,
    max_examples=500,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))
