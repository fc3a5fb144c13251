"""``slots``: uploads sized to capacity, several layers per demander, best fit, fastest first.

What it is for: the base of the capacity-aware policies (rules.py: slots,
best fit, fastest-node-first) with the default weights of :class:`Rules`: a new
transfer gets at least half the demander's speed (``min_share=0.5``), so slow
seeders are not handed fast demanders, and a demander with nothing in flight
takes any seeder after ``patience_s`` (5 s). bench/RESULTS.md, "Policies
(issue 6)" and "Every policy on the suite (session 8)": 2.22 x T* on the
suite's geometric mean at 100 nodes (``paper`` 3.13).
"""

from __future__ import annotations

from .rules import Rules

SLOTS = Rules(
    "slots",
    "uploads sized to capacity, several layers per demander, best fit, fastest first",
)
