"""``swarm`` (the default): relay over pieces, several seeders per layer, slow uploads used.

What it is for: every cluster shape of issue 13. Layers are split into
pieces (``piece_bytes=512 KiB``, or ``layer_pieces=16`` per layer where that
gives larger pieces: rainbowd.core.sched.pieces), so several seeders feed one
demander and a node seeds pieces before it holds the layer; ``relay`` with
``relay_lag_s=1.5`` (relay.py) runs over those pieces.

Its weights (bench/RESULTS.md: "Every cluster shape (issue 13)", sessions 6
to 10; the numbers below are the simulator at 100 nodes):

* ``need_share`` with ``min_share=0.5`` -- a slow upload may feed a demander
  that lacks much: its transfer ends before the demander could finish the rest.
* ``slack_margin=0.2``, ``urgent_guard=0.05``, ``urgent_share=1.0`` -- urgent
  only once waiting longer would miss the horizon, and then with a seeder's
  whole upload.
* ``rank="min"``, ``rank_step=0.5`` -- demanders rank by how fast they pass the
  image on; near-equal ones tie and ties go to who lacks most (homogeneous:
  1.78 -> 1.71 x T*).
* ``upload_urgent=0.6`` -- where the upload binds, the slack cut is at least
  0.6 of the seconds the cluster's upload needs (upload-bound: 1.51 -> 1.49 x).
* ``starve_fill`` with ``patience_s=5`` -- a starving demander fills its
  download (a drawn shape, seed 5: 2.30 -> 1.65 x T*; Walker._feed_starving).
* ``stripe=0.5``, ``stripe_s=2.0`` -- two short pieces in flight overlap their
  gaps (ci 1.29 -> 1.24, homogeneous 1.71 -> 1.57, random-pareto 1.41 -> 1.29;
  Fitter._reserve_down).

Suite at 100 nodes (session 8): 1.19 x T* geometric mean, 10 of 16 shapes
meet every goal; the best measured policy. Session 11: 1.18, rarest first no
longer leaving one-chunk pieces last (Fitter._scarcity).
"""

from __future__ import annotations

from .rules import Rules

SWARM = Rules(
    "swarm",
    "relay over pieces: several seeders per layer, slow uploads used, urgent only at need",
    relay=True,
    min_share=0.5,
    relay_lag_s=1.5,
    patience_s=5.0,
    rarest_first=True,
    slack_margin=0.2,
    urgent_guard=0.05,
    urgent_share=1.0,
    need_share=True,
    rank="min",
    rank_step=0.5,
    upload_urgent=0.6,
    starve_fill=True,
    stripe=0.5,
    stripe_s=2.0,
    piece_bytes=512 * 1024,
    layer_pieces=16,
)
