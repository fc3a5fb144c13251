"""``fastest``: Algorithm 1's locks, demanders served fastest first.

What it is for: it keeps Algorithm 1's locks (one upload, one download per
node) and changes only the demander order, so it isolates that one rule
(fastest-node-first, rules.py) against ``paper``. No least share
(``min_share=0``): with one upload per seeder there is nothing to share.
On the suite at 100 nodes (bench/RESULTS.md, "Every policy on the suite
(session 8)") it beats ``paper`` on the geometric mean (2.84 against 3.13 x T*)
and meets no shape's every goal.
"""

from __future__ import annotations

from .rules import Rules

FASTEST = Rules(
    "fastest",
    "Algorithm 1's locks, demanders fastest first",
    slots=False,
    min_share=0.0,
)
