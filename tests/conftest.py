"""Shared test settings: the hypothesis profiles.

`pytest` uses the "ci" profile (bounded: the fuzzed tests take a few minutes in all);
`pytest --hypothesis-profile=long` runs many more examples per test, with no deadline.
"""
import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=40, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "long", max_examples=2000, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("NORMCORE_HYPOTHESIS_PROFILE", "ci"))
