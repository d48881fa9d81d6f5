"""Settings shared by every unit test."""

from __future__ import annotations

from hypothesis import HealthCheck, settings

# Property tests check behaviour, not speed: on a loaded machine (the lab's VMs share
# its cores) input generation is slow, and that must not fail a run.
settings.register_profile("keyd", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("keyd")
