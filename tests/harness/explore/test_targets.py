"""explore.targets: the reference service as the explorer's target (no database here).

Driving it is tested in test_engine.py and test_plan.py; an app as the target in test_app.py.
"""

from __future__ import annotations

import pytest

from payrace.harness.explore.scenario import ScenarioError
from payrace.harness.explore.targets import ReferenceTarget
from payrace.harness.gateway.signing import GatewayKeys
from payrace.harness.model.profile import Profile


def test_the_reference_target_is_named_by_strategy_and_isolation() -> None:
    target = ReferenceTarget("for_update", "rr")
    assert (target.name, target.isolation) == ("for_update", "REPEATABLE READ")
    assert target.exact_pids and target.model is None  # its probes name every backend
    assert target.profile.oracle == Profile.reference().oracle


def test_which_strategies_lock_the_payment_read() -> None:
    locks = {s: ReferenceTarget(s, "rc").lock_rows for s in ("naive", "for_update", "advisory")}
    assert locks == {"naive": False, "for_update": True, "advisory": True}


def test_the_reference_profile_carries_the_keys_it_is_given() -> None:
    keys = GatewayKeys(key_id="rzp_test_other", key_secret="s1", webhook_secret="s2")
    assert ReferenceTarget("naive", "rc", keys).profile.keys == keys


def test_an_unknown_strategy_names_the_known_ones() -> None:
    with pytest.raises(ScenarioError, match="unknown strategy fastest; choose from naive"):
        ReferenceTarget("fastest", "rc")
