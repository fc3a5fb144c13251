"""``deadline``: slots + least slack first + direct small layers + measured speeds (EWMA).

What it is for: the slowest downloads decide T*, so they start first
(``slack_margin=0.3``, within half of each seeder's upload: ``urgent_share=0.5``);
a layer a seeder can send to every waiting demander within ``direct_s=0.5`` s
goes straight to all of them (the DID crossover, per layer: in the simulator a
30 kB image reached all 100 nodes within the time of 100 direct pulls from the
origin); and achieved rates correct the estimates (``ewma=0.5``; two failures
in a row halve a seeder's). bench/RESULTS.md, "Policies (issue 6)" and
"Every policy on the suite (session 8)": 2.43 x T* geometric mean at 100 nodes.
"""

from __future__ import annotations

from .rules import Rules

DEADLINE = Rules(
    "deadline",
    "slots + least slack first + direct small layers + measured speeds (EWMA)",
    slack_margin=0.3,
    urgent_share=0.5,
    direct_s=0.5,
    ewma=0.5,
)
