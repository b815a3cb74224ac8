"""Hypothesis profiles for the fuzz suite: NODEMESH_FUZZ_EXAMPLES is the total case budget.

`make test` runs the default (about 10,000 cases over all properties, derandomized so CI is
reproducible); `make fuzz` sets NODEMESH_FUZZ_EXAMPLES=1000000 and random seeds.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

PROPERTIES = 4  # the number of @given tests in tests/fuzz; the budget is split evenly
TOTAL = int(os.environ.get("NODEMESH_FUZZ_EXAMPLES", "10000"))
settings.register_profile(
    "nodemesh",
    max_examples=max(1, TOTAL // PROPERTIES),
    deadline=None,
    derandomize=TOTAL <= 10000,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much],
)
settings.load_profile("nodemesh")
