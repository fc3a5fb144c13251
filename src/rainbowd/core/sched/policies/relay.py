"""``relay``: slots + cut-through relay (lag-bounded) + rarest layer first + least slack first.

What it is for: whole layers, but a node still receiving one seeds it
(rules.py, cut-through relay), so a layer crosses a tree of nodes in about one
layer time plus a chunk per hop, instead of one layer time per level.

Its weights (bench/RESULTS.md, "Policies (issue 6)" and the relay sessions):

* ``relay_lag_s=1.5`` -- the chain's lag budget up to 100 nodes: simulator,
  paper profile, 1.5 s gave 1.06 x T* and 2 s 1.10 x (at 10,000 nodes the
  budget grows by one ``relay_lag_s`` per tenfold; there 3 s gave 1.53 x, 4 s
  1.46 x, 5 s 1.47 x). Each hop is planned at a chunk's time on the link into
  the relay plus ``RELAY_HOP_S`` (0.15 s, state.py).
* ``min_share=0.8``, ``patience_s=15`` -- slow seeders are kept from fast
  demanders more strictly than under ``slots`` (0.5, 5 s); the runs that chose
  these two are not recorded in bench/RESULTS.md.
* ``slack_margin=0.3``, ``urgent_share=0.25`` -- least slack first: the
  slowest downloads start early, within a quarter of a seeder's upload (more,
  the search for another seeder with urgent share left: 1.53 against 1.47 x T*
  at 3,000 nodes, Fitter._urgent_fit).
* ``rarest_first`` -- without it the origin spent its upload on the first
  layer while the big one waited (1,000 nodes: 2 holders of the 8 MB layer at
  8.5 s against 993 of the 2 MB one).

No direct rule: a layer sent directly is not relayed. Suite at 100 nodes
(session 8): 1.99 x T* geometric mean, 5 of 16 shapes meet every goal.
"""

from __future__ import annotations

from .rules import Rules

RELAY = Rules(
    "relay",
    "slots + cut-through relay (lag-bounded) + rarest layer first + least slack first",
    relay=True,
    min_share=0.8,
    relay_lag_s=1.5,
    patience_s=15.0,
    rarest_first=True,
    slack_margin=0.3,
    urgent_share=0.25,
)
