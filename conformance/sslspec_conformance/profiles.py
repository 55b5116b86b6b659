"""Hypothesis profiles of the conformance suite.

``ci`` is derandomised and small, so a run is reproducible and takes minutes;
``thorough`` draws thousands of examples for the value checks. Checks that compile
(``jit``) or build networks cost far more per example and draw fewer.

The profiles are registered under the names ``sslspec-conformance-ci`` and
``sslspec-conformance-thorough`` so that they do not replace profiles of the same
short name that a project's own tests register.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

__all__ = ["PROFILES", "EXAMPLES", "load", "active", "settings_for"]

_COMMON = {
    "deadline": None,
    "print_blob": True,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.filter_too_much],
}

PROFILES = {
    "ci": {**_COMMON, "derandomize": True, "database": None},
    "thorough": {**_COMMON},
}

#: Examples per test for each kind of check.
EXAMPLES = {
    "ci": {"value": 10, "gradient": 5, "jit": 2, "network": 3, "exact": 10},
    "thorough": {
        "value": 2000,
        "gradient": 500,
        "jit": 25,
        "network": 100,
        "exact": 2000,
    },
}

_active = "ci"


def load(name: str) -> None:
    """Register and load profile ``name`` (``"ci"`` or ``"thorough"``)."""
    global _active
    if name not in PROFILES:
        raise ValueError(
            f"unknown conformance profile {name!r}; choose one of {', '.join(PROFILES)}"
        )
    for profile, options in PROFILES.items():
        settings.register_profile(
            f"sslspec-conformance-{profile}",
            max_examples=EXAMPLES[profile]["value"],
            **options,
        )
    settings.load_profile(f"sslspec-conformance-{name}")
    _active = name


def active() -> str:
    """Return the name of the loaded profile (``"ci"`` until one is loaded)."""
    return _active


def settings_for(kind: str) -> settings:
    """Return Hypothesis settings for a check of ``kind`` under the active profile."""
    return settings(max_examples=EXAMPLES[_active][kind])
