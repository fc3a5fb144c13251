"""Capacity-aware scheduling policies (everything but ``paper``), behind :class:`Scheduler`.

Why: on a mixed cluster the bound T* (PAPER.md, "The physical limit") is
usually set by the slowest *download*, while Algorithm 1 lets one seeder
serve one demander at a time and treats a 4 Mbit/s node like a 32 Mbit/s one.
Most upload capacity then sits idle and the slowest nodes start last. The
policies here plan with *bandwidth*, not with locks.

One concern per file:

* rules.py -- :class:`Rules`, every rule the planner knows and its weights;
* fastest.py, slots.py, relay.py, swarm.py, deadline.py -- one policy each
  (a :class:`Rules` entry and why its weights are what they are), gathered in
  :data:`RULES`;
* state.py -> seeders.py -> demanders.py -> fit.py -> merge.py -> walk.py ->
  planner.py -- the :class:`Planner`, one class per concern, each built on the
  one before: its state, the seeder and demander indexes, the fit and start of
  one transfer, the merge of the per-layer indexes, the walk over waiting
  demanders, and transfers ending and speeds observed.

The planner keeps standing indexes so a :meth:`Planner.plan` call costs about
the transfers it starts: per layer, the holders with free upload sorted by
free upload; the waiting demanders sorted by speed and by need. It sees the
scheduler only through :class:`~rainbowd.core.sched.view.SchedulerView`: it
reads the node records (records.py: holdings, demands, what is in flight) and
starts transfers through it, so every other rule of the scheduler (avoided
pairs, suspects, adopt, node down) holds unchanged, and no module here
imports scheduler.py.
"""

from __future__ import annotations

from .deadline import DEADLINE
from .fastest import FASTEST
from .planner import Planner
from .relay import RELAY
from .rules import Rules
from .slots import SLOTS
from .state import (
    FAILURES_TO_SLOW,
    MIN_OBSERVE_S,
    MIN_TRANSFER_BPS,
    RELAY_HOP_S,
    UNKNOWN_LAYER_BYTES,
)
from .swarm import SWARM

__all__ = [
    "FAILURES_TO_SLOW",
    "MIN_OBSERVE_S",
    "MIN_TRANSFER_BPS",
    "RELAY_HOP_S",
    "RULES",
    "UNKNOWN_LAYER_BYTES",
    "Planner",
    "Rules",
]

#: every capacity-aware policy by name (the scheduler adds ``paper``), in this order
RULES: dict[str, Rules] = {r.name: r for r in (FASTEST, SLOTS, RELAY, SWARM, DEADLINE)}
