"""``--systems`` names: ``rbd`` is the coordinator's default policy, ``rbd:<policy>`` any other.

A lab report's ``rbd`` row is what an operator gets without configuring a
policy, and what ``python -m bench.sim --compare`` simulates by default.
"""

from __future__ import annotations

import pytest

from bench.lab.__main__ import make_system
from bench.lab.rbd_system import RbdSystem
from rainbowd.core.sched.scheduler import DEFAULT_POLICY


def test_rbd_runs_the_default_policy_under_the_plain_name() -> None:
    system = make_system("rbd")
    assert isinstance(system, RbdSystem)
    assert (system.name, system.policy) == ("rbd", DEFAULT_POLICY)


def test_another_policy_is_named_after_it() -> None:
    other = "paper" if DEFAULT_POLICY != "paper" else "relay"
    system = make_system(f"rbd:{other}")
    assert isinstance(system, RbdSystem)
    assert (system.name, system.policy) == (f"rbd:{other}", other)


def test_naming_the_default_policy_gives_the_plain_name() -> None:
    assert make_system(f"rbd:{DEFAULT_POLICY}").name == "rbd"


def test_unknown_systems_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown system"):
        make_system("kraken")
