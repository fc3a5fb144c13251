"""``swarm`` (the default): pieces of one chunk, several seeders per layer, slow uploads used.

What it is for: every cluster shape of issue 13. Layers are split into
pieces of one chunk each (rainbowd.core.sched.pieces), so several seeders feed
one demander and a node seeds each chunk it has verified: the unit that is
checked is the unit that is scheduled, the finest grain at which a node can
pass on what it got.

Why one chunk (session 13; before, pieces of 512 KiB or 1/16 of the layer,
relayed cut-through while they landed): a relayed piece books its relay's
upload and its demander's download from the start, but no byte flows until
the relay has a whole chunk of it. On the homogeneous shape at 100 nodes 15-39
of the ~195 transfers in flight were waiting so at any moment, 20 % of the
cluster's upload booked and idle. One-chunk pieces are never relayed (a relay
forwards whole chunks) and pass on as soon as they land. Simulator, 16 shapes,
three runs each (``python -m bench.sim.noise``), medians: geometric mean
1.186 -> 1.169 x T*; homogeneous 1.58 -> 1.50, ci 1.24 -> 1.20, drawn-2 1.52
-> 1.34, random-pareto's median slowdown 2.57 -> 2.30, random-asymmetric's p90
3.22 -> 2.95; at 1,000 nodes homogeneous 1.91 -> 1.69, random-pareto 1.35 ->
1.22, slow-origin 1.21 -> 1.10, ci 1.31 -> 1.26 (bench/RESULTS.md, session 13).
The cost is transfers: with 128 KiB chunks four times as many as with 512 KiB
pieces, each an assignment and a report; with the agents' default 4 MiB
chunks pieces were one chunk already.

Pieces grow where the coordinator could not keep up (session 14,
``report_load=1.0``): every piece is a done report, and the coordinator
spends ~1.1 ms of CPU on one (rainbowd.core.sched.pieces.REPORT_COST_S,
measured on an idle host, session 15; session 14 used 2.5 ms, measured on a
busy one). With the simulator charging 2.5 ms, one-chunk pieces kept it
74-89 % busy on ci, homogeneous and paper at 100 nodes, and at 1,000 nodes
ci and homogeneous took 20.8 and 20.5 x T* (every report queued seconds).
So a piece is at least R x cost / report_load bytes, R the cluster's summed
rate (PieceScheduler._load_chunks), and a piece of several chunks is relayed
cut-through as its chunks land (``relay``). At 100 nodes, charged: ci 2.31
-> 1.24 x T*, homogeneous 2.31 -> 1.64, paper 1.32 -> 1.10, straggler's
median slowdown 4.23 -> 1.76; at 1,000: ci 20.8 -> 2.08, homogeneous 20.5 ->
3.26. Targets 0.25 / 0.5 / 2.0 were worse, 1.5 level (bench/RESULTS.md,
session 14); uncharged (a coordinator of no cost) pieces stay one chunk.

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
* ``breadth_first`` -- within a rank class one transfer each before a second
  to any (session 21; Walker._walk). Noise medians at 100 nodes (x T* / median
  / p90 slowdown): ci 1.23 / 1.78 / 2.45 -> 1.20 / 1.61 / 1.78, paper's p90
  1.90 -> 1.46, straggler 1.55 / 1.63 -> 1.48 / 1.51, upload-bound 1.21 ->
  1.18, drawn-1's p90 5.11 -> 4.73; random-asymmetric's median 2.28 -> 2.36
  the one shape moving the wrong way. At 1,000 nodes homogeneous 2.57 ->
  1.84 x T*, random-pareto 1.33 -> 1.20, paper's p90 2.64 -> 1.78, straggler
  1.08 / 2.84 / 3.01 -> 1.06 / 2.12 / 2.28; ci 1.41 -> 1.54 x T* the loss.
* ``lacking_least_below=0.15`` -- ties in a rank class whose upload is under 0.15 of
  their download go lacking least first, not most (session 40; rules.py, ties that
  finish). Traced on random-asymmetric at 100 nodes: 60 % of its nodes upload ~1 Mbit/s
  and download ~24, their class took the upload left over in parallel and progressed
  together: a quarter of the nodes had ended by 26.7 s of a 58 s job, half by 27.9 s,
  three quarters by 35.1 s. Noise medians
  at 100 nodes, three runs (x T* / median / p90 slowdown): random-pareto 1.19 / 2.03 /
  2.18 -> 1.18 / 1.84 / 2.22 (its median goal met: range 1.77-1.86, was 1.78-2.04),
  drawn-2 1.18 / 2.10 / 2.98 -> 1.16 / 2.08 / 2.95, random-asymmetric, upload-bound
  and drawn-1 within 0.01. Gate, one run: 11 -> 13 of 16 shapes meet every goal
  (random-asymmetric's median 2.01 -> 1.96 and random-pareto's 2.04 -> 1.77),
  geometric mean of x T* 1.1137 -> 1.1163. At 1,000 nodes, two runs each:
  random-pareto's p90 2.86 -> 2.69, random-asymmetric's x T* 1.13 -> 1.20 and
  upload-bound's 1.20 -> 1.23 (runs of 1.20 and 1.27) -- the cost: slow downloads
  that upload slowly lack the most seconds of their class and wait. At 0.3 the
  same shapes gained a little more at 100 nodes in one run, but at three runs
  random-asymmetric went 1.08 -> 1.13 x T*; ordered by bytes lacking instead of
  seconds, random-asymmetric 1.16 and drawn-2 1.20 x T*.
* ``upload_urgent=0.6`` -- where the upload binds, the slack cut is at least
  0.6 of the seconds the cluster's upload needs (upload-bound: 1.51 -> 1.49 x).
* ``starve_fill`` with ``patience_s=5`` -- a starving demander fills its
  download (a drawn shape, seed 5: 2.30 -> 1.65 x T*; Walker._feed_starving).
* ``wait_credit=1.0`` -- a demander that has waited w seconds takes a seeder
  that ends its piece within w (session 23; rules.py, wait credit). Where only
  the origin gives half a fast download, a fast downloader's last pieces
  waited for it while slower holders sat idle. Noise medians at 100 nodes (x
  T* / median / p90 slowdown): random-asymmetric 1.08 / 2.36 / 2.54 -> 1.07 /
  1.94 / 2.57, random-pareto 1.21 / 2.16 / 2.22 -> 1.24 / 1.94 / 2.12, drawn-2
  1.21 / 1.93 / 4.89 -> 1.20 / 1.92 / 3.49, drawn-1's p90 4.73 -> 4.27,
  slow-origin's 1.63 -> 1.23 (11 -> 13 of 16 shapes meet every goal). At 1,000
  nodes (one run): random-lognormal 1.14 -> 1.18 x T*, random-asymmetric 1.13 /
  2.89 / 2.99 -> 1.15 / 2.74 / 3.17, drawn-1's p90 9.73 -> 8.56, six shapes
  unchanged. Credit 2 and 0.5 were worse (random-pareto 1.22 / 1.99 and 1.17 /
  2.02, drawn-2 1.27 x at 2); so was restarting the wait at each transfer into
  the demander, and meeting every waiting demander whatever its rank
  (the walk's cut off: random-asymmetric 1.21 x, upload-bound 1.27 x).
* ``own_urgent=2.5`` -- a node is also urgent once it would end later than 2.5
  x its own bound (session 24; rules.py, late by its own bound). Where every
  upload is booked, fast downloaders with slow uploads rank last and got
  nothing for most of the job. Simulator, 100 nodes, one run each (x T* /
  median / p90 slowdown): a drawn shape held out of the gate (seed 5) 1.35 /
  2.59 / 11.03 -> 1.24 / 2.47 / 5.57, drawn-1 1.11 / 2.10 / 4.27 -> 1.12 / 2.50
  / 3.69, drawn-2 1.20 / 1.93 / 3.49 -> 1.23 / 2.03 / 3.06, the gate's 13 other
  shapes within 0.01. At 2.0 random-asymmetric's median went 1.94 -> 2.34 and
  upload-bound 1.18 -> 1.21 x T*; at 3.0 drawn-5's p90 was 6.20, drawn-1's 4.05.
* ``own_shortest_first`` -- of the demanders late by their own bound, the one
  lacking the fewest seconds goes first, not the least laxity (session 29; rules.py,
  late by its own bound; Walker._late). Traced on a held-out drawn shape (seed 39):
  its ten fast downloaders, uploading under 1 Mbit/s, became late together at ~4.9 s,
  shared the freed uploads in crumbs and ended together at 17.5-18 s against an own
  bound of 3.3 s. Held out, 100 nodes, one run each (x T* / median / p90 slowdown):
  seed 39 1.26 / 1.36 / 5.37 -> 1.26 / 1.38 / 3.61, seed 54 1.26 / 3.65 / 3.67 ->
  1.21 / 2.86 / 3.77, seed 52 1.22 / 3.72 / 4.07 -> 1.21 / 3.28 / 4.43 (the late
  lacking most wait longer: the tail pays), seed 45 1.34 -> 1.38 x T*; the other 35
  of seeds 16-55 unchanged (35 of 40 meet every goal either way). Noise medians at 100
  nodes: geometric mean of the 16 x T* medians 1.1257 -> 1.1250, drawn-2 1.20 / 2.04 /
  3.05 -> 1.19 / 2.01 / 3.02, drawn-1's p90 3.62 -> 3.74, the other 14 the same. At
  1,000 nodes drawn-1 1.09 / 4.34 / 7.05 -> 1.09 / 4.03 / 6.95, the nine others run
  within 0.03. Late earlier (``own_urgent`` 2.0, or once the deadline is 1.5 or 2 x
  the need away) took random-asymmetric's median to 2.09-2.39.
* ``peer_share=0.7`` -- a seeder the demander pulled from before goes first where it
  offers 0.7 of the best stranger's free upload (session 26; rules.py, known peers):
  its connection is open, a stranger's costs a handshake. New connections per node at
  100 nodes: homogeneous 16.7 -> 11.2, paper 14.9 -> 9.5. With the lab's measured
  costs (``bench.sim --compare``, connect 325-771 ms): paper x0.25 93.3 -> 90.9 s,
  upload-bound 187.1 -> 183.0, bimodal 483.8 -> 477.0; in the lab, side by side,
  upload-bound 198.4 -> 193.4 s (median node 158.0 -> 162.2 s). Noise medians at 100 nodes (x T*
  / median / p90 slowdown): paper 1.11 / 1.28 / 1.46 -> 1.08 / 1.28 / 1.43,
  random-pareto 1.24 / 1.94 / 2.12 -> 1.20 / 1.95 / 2.18, random-asymmetric's median
  1.95 -> 1.91, ci 1.20 -> 1.21, upload-bound 1.18 -> 1.20, drawn-1 and drawn-2 level;
  geometric mean of those seven 1.163 -> 1.158. Twenty held-out drawn shapes (seeds
  16-35) meet every goal either way.
* ``fair_share_s=2.0`` -- a demander books of its download what its seeder's
  shared upload will give the flow, not the rate planned, where the transfer
  runs 2 s or longer at that share (session 28; rules.py, booked as shared;
  sharing.py). Traced on a held-out drawn shape (seed 36, 1.31 x T*): its last
  node had one transfer at a time for 64 s from a seeder sending to ten
  demanders, got half its download, and never asked a second seeder. Held out,
  100 nodes, one run each: seed 36 1.31 / 1.23 / 1.35 -> 1.21 / 1.22 / 1.32,
  14 -> 15 of seeds 36-55 meeting every goal, 20 of 20 of seeds 16-35 either
  way. Noise medians at 100 nodes (x T* /
  median / p90 slowdown), side by side: random-pareto 1.20 / 1.95 / 2.18 ->
  1.20 / 1.88 / 2.16, drawn-2 1.21 / 1.98 / 3.12 -> 1.20 / 2.04 / 3.05,
  upload-bound 1.20 / 1.86 / 2.15 -> 1.19 / 1.89 / 2.14, the 13 others within
  0.03; geometric mean of the 16 x T* medians 1.1271 -> 1.1257. Without the 2 s
  (every transfer booked as shared) seed 36 went to 1.17 x T*, but ci at 1,000
  nodes 1.53 -> 1.89 over seven runs: a short transfer ends before a second
  seeder adds much, and that seeder's upload, shared with one more flow, was
  diluted for the last nodes; at 1 s the same. Session 25 re-booked every
  upload of a seeder at its fair share and offered a new one the share of k +
  1, so seeders took ever more flows (10.2 each), each slower: random-pareto
  1.40 x T*. Here a seeder books the planned rate as before; only the
  demander's side follows the link.
* ``last_fit`` -- the last piece a demander asks for is fitted against its whole
  download, not against the half a transfer still in flight leaves free (session 31;
  rules.py, last piece fitted whole). Traced on ``paper`` at 1,000 nodes (1.25 x T*):
  its slowest node (4.1 Mbit/s down, the bound) asked for its last 2.2 MB piece while
  a 10 kB layer took half its download for 30 ms; best fit gave the piece to a seeder
  with 2.5 Mbit/s to spare, and it crawled at that for 7.2 s at the end of the job
  while nine tenths of the cluster's upload sat idle. Simulator, one run each, side
  by side (x T* / median / p90 slowdown), 1,000 nodes: paper 1.25 / 1.47 / 1.77 ->
  1.21 / 1.46 / 1.76, random-lognormal 1.26 / 1.24 / 1.94 -> 1.10 / 1.22 / 1.94,
  slow-origin 1.19 -> 1.12, ci 1.53 -> 1.50, random-asymmetric 1.10 -> 1.11, the
  ten others within 0.01 (7 -> 9 of 15 shapes meet every goal; drawn-2 not run). 100
  nodes: the gate's 16 shapes within 0.01 of the record, 11 of 16 either way; held out,
  35 of 40 either way.
* ``late_room_share=0.25`` -- a demander behind the slack rule's horizon takes
  another transfer while a quarter of its download is free, not half (session 33;
  rules.py, room behind the horizon). Traced on a held-out drawn shape (seed 67,
  the aggregate upload binding, 1.38 x T*): its last node (9.7 Mbit/s down) was
  handed, by best fit, the largest free upload there was, ~5.7 Mbit/s, which booked
  over half its download, so it took nothing more and received 58 % of its download
  from 60 s to 110 s of a 148 s job. Noise medians at 100 nodes (x T* / median / p90
  slowdown): upload-bound 1.19 / 1.89 / 2.13 -> 1.14 / 1.94 / 2.08, drawn-2 1.19 /
  2.01 / 3.03 -> 1.13 / 2.06 / 3.10, the 14 others within 0.01 (13 of 16 meet every
  goal either way). Held out, one run each: seed 67 1.38 -> 1.27, 39 1.25 -> 1.18,
  53 1.26 -> 1.18 (p90 3.25 -> 3.50), 45 1.37 -> 1.31 (p90 3.35 -> 3.51), 32 1.14
  -> 1.08, 44 and 55 +0.02; 53 of 60 meet every goal either way. At 1,000 nodes
  (one run): paper 1.21 -> 1.18, random-pareto's p90 3.07 -> 2.97, upload-bound
  1.19 -> 1.22 x T*, twelve others level (drawn-2 not run). At 0.1
  (one run): upload-bound 1.16, drawn-2's p90 3.19. In the lab, side by side:
  upload-bound 195.8 -> 183.7 s (1.31 -> 1.23 x T*), median node 155.0 -> 159.0 s.
  The nodes that catch up take upload the median ones would have had: where a node
  would miss the horizon, that is the paper's order.
* ``own_room_share=0.1`` -- a demander late by its own bound (``own_urgent``) takes
  another transfer while a tenth of its download is free (session 35; rules.py, room
  when late by its own bound). Traced on drawn-1 at 100 nodes (a 1.2 MB image, T* 8.5
  s): its p90 nodes download at 12-29 Mbit/s and upload 0.6-4, so their own bounds
  are 0.3-0.8 s; they got their first piece at 0.5-0.9 s, when they became late, and
  then received at about half their download, one or two flows from slow uploads at
  a time, ending at 3.3-3.9 x their bound. Noise medians at 100 nodes (x T* / median
  / p90 slowdown): drawn-1 1.10 / 2.49 / 3.74 -> 1.12 / 2.60 / 2.97, drawn-2 1.13 /
  2.06 / 3.10 -> 1.18 / 2.10 / 2.98; random-asymmetric, random-pareto and
  upload-bound within 0.03. A share of 0.25 (one run): drawn-1's p90 3.12, drawn-2's
  3.01. Only past 1.5 x its own bound, not 2.5 (noise medians): the same within 0.03.
  The late nodes take upload the median ones would have had, as every rule for the
  late does.
* ``setter_guard=0.18`` -- the demander that set the slack rule's horizon, the slowest
  download, is kept at its pace: urgent once it lags ~1.7 % of its need, not the
  slack walk's ~14 % (session 38; rules.py, the horizon's setter). Where the slowest
  download sets T* that lag was the completion's: a held-out drawn shape (seed 52,
  slowest 2.5 Mbit/s, the next 3.2) 1.21 -> 1.12 x T*; gate, one run (x T* / median /
  p90 slowdown): ci 1.22 -> 1.17, big-layer 1.12 / 1.16 / 1.59 -> 1.07 / 1.16 / 1.68,
  drawn-1 1.12 / 2.62 / 2.92 -> 1.10 / 2.60 / 2.99, random-pareto 1.18 / 2.04 / 2.15 ->
  1.19 / 2.04 / 2.18, the 12 others the same; geometric mean 1.1200 -> 1.1137, 11 of
  16 meet every goal either way. Its three limits each undo a loss measured without
  it: served from the start (guard 0.2, no limits) random-asymmetric's median went
  2.01 -> 2.80 and ci's p90 1.76 -> 3.21 (the setter took the origin's first
  copies); where another node is as slow, homogeneous 1.44 -> 1.49 and a held-out
  drawn shape with two nodes at 6.7 Mbit/s (seed 67) 1.27 -> 1.36. Guard 0.1: no
  gain (the setter lags 8 % before it is urgent); 0.19: ci's p90 1.84.
* ``stripe=0.5``, ``stripe_s=2.0`` -- two short pieces in flight overlap their
  gaps (ci 1.29 -> 1.24, homogeneous 1.71 -> 1.57, random-pareto 1.41 -> 1.29;
  Fitter._reserve_down). Still so with one-chunk pieces (without it, session
  13: homogeneous 1.50 -> 1.58, ci 1.20 -> 1.41).

Suite at 100 nodes (session 8): 1.19 x T* geometric mean, 10 of 16 shapes
meet every goal; the best measured policy. Session 11: 1.18, rarest first no
longer leaving one-chunk pieces last (Fitter._scarcity).
"""

from __future__ import annotations

from .rules import Rules

SWARM = Rules(
    "swarm",
    "pieces of one chunk: several seeders per layer, slow uploads used, urgent only at need",
    min_share=0.5,
    patience_s=5.0,
    rarest_first=True,
    slack_margin=0.2,
    urgent_guard=0.05,
    urgent_share=1.0,
    # the demander that set the horizon, the slowest, is kept at its pace (where the
    # downloads bind and it is the one slowest; never with a piece's first copy)
    setter_guard=0.18,
    need_share=True,
    rank="min",
    rank_step=0.5,
    # ties whose upload is under 0.15 of their download go lacking least first
    lacking_least_below=0.15,
    upload_urgent=0.6,
    starve_fill=True,
    breadth_first=True,
    stripe=0.5,
    stripe_s=2.0,
    # a demander that waited w seconds takes a seeder ending its piece within w
    wait_credit=1.0,
    # a node that would end later than 2.5 x its own bound is urgent; of those, the one
    # lacking the fewest seconds goes first
    own_urgent=2.5,
    own_shortest_first=True,
    # a seeder the demander pulled from before (its connection open) goes first while it
    # offers 0.7 of the best stranger's free upload
    peer_share=0.7,
    # a demander books of its download what its seeder's shared upload will give the flow,
    # where at that share the transfer runs 2 s or longer
    fair_share_s=2.0,
    # the last piece a demander asks for goes to a seeder covering its whole download
    last_fit=True,
    # a demander behind the slack rule's horizon takes another transfer while a quarter of
    # its download is free (min_share's half otherwise)
    late_room_share=0.25,
    # a demander late by its own bound takes another transfer while a tenth of its download
    # is free
    own_room_share=0.1,
    # one chunk per piece (piece_chunks rounds a piece up to a whole chunk), more where the
    # coordinator's reports would take more than its time at the cluster's full rate
    piece_bytes=1,
    report_load=1.0,
    # and larger, mid-job, where a transfer's fixed cost would be over a quarter of its
    # bytes' time (transfer_cost.py)
    cost_share=0.25,
    # a piece of several chunks is relayed as its chunks land
    relay=True,
    relay_lag_s=1.5,
)
