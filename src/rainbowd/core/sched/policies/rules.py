"""The rules a policy switches on and weighs: :class:`Rules`, one field per rule.

Every rule the planner knows, each switched on and weighed by fields of
:class:`Rules` (why the planner plans with bandwidth, not with locks: the
package's docstring):

* **slots** -- a transfer reserves a rate, ``min(seeder's free upload,
  demander's free download)``; a seeder runs as many uploads as its estimated
  capacity covers, and a demander pulls several layers at once from different
  seeders while its download has room. A new transfer must get at least
  ``min_share`` of the demander's speed, so slow seeders are not handed fast
  demanders (they would hold the layer hostage for its whole length). The
  least rate of a new transfer of a layer (``Fitter._fits``, ``Fitter._serve``)::

      least = min_share * min(demander's download, fastest holder's speed)
      least = min(least, size / need_s)            # with need_share
      least = min(least, size / (wait_credit * waited))   # with wait_credit
      least = max(least, size / within_s)          # a starving demander's fill
      least = max(least, min(MIN_TRANSFER_BPS, fastest holder, free download))

  (``need_s``: seconds the demander needs for all it lacks; ``waited``: seconds
  since it began to wait, with room in its download, the planner's clock; a
  starving demander's first transfer has only the last line.)
* **wait credit** (``wait_credit``, with ``need_share``) -- a demander that has
  waited ``w`` seconds for a seeder meeting its least rate takes one that ends
  the piece within ``wait_credit * w``: waiting on for a fast seeder would
  cost it what the slow one costs (the ski-rental rule; it is 2-competitive
  at credit 1). ``min_share`` is right while fast seeders free up soon; where
  only the origin is fast enough for a fast downloader, its last pieces
  waited for crumbs of the origin's upload while 6 Mbit/s holders sat idle.
  The wait counts from when the demander began to wait (room in its download
  and a layer not in flight) by the planner's clock (the latest time it was
  told), not from its last transfer. The credit changes which seeder a
  demander the walk meets may take, not whom the walk meets: a layer's run
  still starts at its cut (``Walker._order``).
* **best fit** -- a demander takes the seeder whose free upload covers its
  free download most tightly (or, if none covers it, the one with most room),
  so big free uploads stay for fast demanders.
* **fastest-node-first** -- demanders are served in order of speed, so
  seeding capacity grows fastest. With ``rank_step`` speeds within one
  geometric step tie, and a tie goes to the demander lacking most: on equal
  nodes the first pieces then spread over nodes with idle uploads, which pass
  them on at once, instead of one node taking every fresh piece in turn
  (simulator, homogeneous profile at 100 nodes: 1.78 -> 1.71 x T*;
  upload-bound, where the origin fed the fastest node piece after piece:
  1.51 -> 1.49 x with ``upload_urgent``).
* **ties that finish** (``lacking_least_below``) -- ties go to the demander lacking
  most so that fresh pieces spread over idle uploads that pass them on. A node
  whose upload is under ``lacking_least_below`` of its download passes little on:
  its pieces hardly multiply, and what it is given counts only once it holds all
  of it. Its ties go lacking least first, after every tie that passes more on, so
  such a class ends one node after another, not all together at the end. Where
  the upload binds, such nodes are the median: on random-asymmetric (60 % of the
  nodes upload ~1 Mbit/s and download ~24) that class took the upload left over
  in parallel and progressed together: a quarter of the nodes had ended by 26.7 s
  of a 58 s job, half by 27.9 s (median slowdown 2.01, session 40).
* **breadth first** (``breadth_first``) -- within one rank class the walk
  gives every waiting demander one transfer before it gives any a second, then
  fills each in walk order. Served until its download was full, the first
  demander of a class took every piece the origin's upload covered and, on
  equal nodes, each next one both pieces the node ahead of it relays: on the
  homogeneous shape at 1,000 nodes the first walk was a chain eleven deep and
  the cluster moved 8, 31 and 58 of its 2,000 MB/s in its first three seconds
  (bench/RESULTS.md, session 21). Urgent demanders are still filled at their
  turn.
* **least slack first** -- a node whose remaining bytes over its speed come
  close to the horizon (the latest any current demander could finish,
  ``since + need * (1 + margin)``) is *urgent* and goes before everyone else:
  the slowest downloads decide T*, so they must start early, and they take
  little of a seeder's upload. Where the *upload* sets T* the downloads alone
  put the horizon too near and every node looks urgent within seconds; with
  ``upload_urgent`` the cut is at least that share of the seconds the whole
  cluster's upload needs for every open demand (``Planner._upload_bound_s``).
* **the horizon's setter** (``setter_guard``) -- the demander whose planned finish
  set the horizon (the slowest download: where the downloads bind, T*'s node) is
  kept at its pace: urgent once need * (1 + setter_guard) >= horizon - now, a
  tighter guard than the slack walk's. Its download is the slowest, so every
  second it waits is a second on the completion: under the slack walk alone it
  fell ``margin - urgent_guard`` of its need behind before it was urgent and then
  ended near the horizon, ~1.2 x its bound. One node costs little upload; three
  limits keep it off the ramp the fast nodes make (``Walker._setter``): only while
  the cluster's upload could deliver everything before the horizon, only while no
  other demander plans to end within the lag the rule allows it, and never a
  piece's first copy (``SETTER_HOLDERS``). Making every demander behind the cut
  urgent at once instead (the walk's next key each time the first is full) starved
  the fast ones (median slowdown 2.85 -> 5.34 on a drawn shape; session 37).
* **late by its own bound** (``own_urgent``) -- a node is also urgent once,
  given its whole download from now on, it would end later than ``own_urgent``
  times its own bound t_i* after its demand (``DemanderIndex._own_key``):
  the slack rule guards the horizon, this the node that downloads fast and
  uploads slowly, whom fastest first (rank "min") leaves last where every
  upload is booked. Those late are served least laxity first (their keys), or
  with ``own_shortest_first`` fewest seconds lacking first (``Walker._late``):
  they are past their deadlines already, and least laxity, which meets every
  deadline that can be met, then feeds the one lacking most first, so each
  late node gets crumbs of the freed uploads and all end together, late.
* **known peers** (``peer_share``) -- a seeder the demander pulled from before
  is taken over a stranger where it offers nearly as much: among the holders
  whose free upload covers the demander's free download (``PEER_TRIES`` of the
  tightest), a known one first; where none covers it, a known one with at least
  ``peer_share`` of the largest free upload over the largest. An agent keeps
  its connection to every seeder it pulled from, and a new one costs a
  handshake (the lab measured 325-771 ms on its loaded host; pieces from many
  seeders opened a new connection for ~40 % of the transfers). Complete
  holders still go before relays (``Fitter._fit``; the memory: peers.py)::

      covering:  first known of the PEER_TRIES tightest covering, else the tightest
      otherwise: a known one with free >= max(least, peer_share * largest free),
                 else the largest

* **booked as shared** (``fair_share_s``) -- a new transfer books ``rate`` of
  its seeder's upload, but of its demander's download only what the flow will
  get once the seeder's upload is shared by all the flows it sends (max-min,
  as links share: sharing.py), where at that share it would run
  ``fair_share_s`` or longer::

      cap_j  = down(demander of flow j) / flows into that demander
      shared = L such that  sum_j min(cap_j, L) + L = seeder's speed
      booked = min(rate, shared)  if size / shared >= fair_share_s  else rate

  Booked at the whole rate, a demander whose seeder sends to many others got
  half its booking or less and, its download full on paper, never asked a
  second seeder; what stays free now goes to one. A short transfer keeps its
  booking: it ends before a second seeder would add much, and the second
  seeder's upload taken for it is diluted for others (rbd's ci profile at
  1,000 nodes: its last nodes ended 1.5 s later).
* **last piece fitted whole** (``last_fit``) -- the last piece a demander asks for
  (nothing else it lacks is left to ask for) is fitted, by best fit, against the
  demander's whole download, not against what is free of it at that moment. Another
  transfer still in flight into it (the other half of a stripe, a tiny layer) ends
  within moments; fitted against the half left free, the node's last piece went to a
  seeder with half its download to spare and crawled at that rate to the end, while
  the idle uploads of the rest of the cluster could have sent it at full rate. The
  transfer is still planned at what is free (``Fitter._begin``).
* **room behind the horizon** (``late_room_share``) -- a demander takes another
  transfer only while ``min_share`` of its download is free (a fast demander is not
  handed crumbs of slow uploads). A demander behind the slack rule's horizon (need x
  (1 + guard) >= horizon - now, its need all it lacks at its download) takes one while
  ``late_room_share`` of it is free. Best fit gives a demander the most free upload
  there is when none covers its download, and with uploads below half its download
  that one flow booked over half of it: the node crawled at that flow's rate, its
  download half idle, to the end of the job (``DemanderIndex._room``).
* **room when late by its own bound** (``own_room_share``) -- likewise, a demander
  late by its own bound (``own_urgent``: given its whole download from now on it would
  end later than ``own_urgent`` x its own bound) takes another transfer while
  ``own_room_share`` of its download is free. Such a node downloads fast and uploads
  slowly, so the uploads that hold what it lacks are mostly below half its download:
  with half of it as room it ran one or two slow flows at a time, at about half its
  download, past three times its own bound.
* **stripe** -- while a demander has more to ask for, a transfer that is
  short at full rate reserves only ``stripe`` of its download, so two run side
  by side and each covers the other's set-up and report gap
  (``Planner._reserve_down``).
* **direct** -- a layer so small that a seeder can send it to many demanders
  within ``direct_s`` seconds goes straight from that seeder to all of them at
  once, reserving nothing (the DID crossover: a tree only adds hops). One of
  the ``DIRECT_TRIES`` fastest free holders qualifies when
  (``Fitter._direct_seeder``)::

      bytes of its direct transfers in flight + size * max(1, demanders waiting)
          <= direct_s * its speed

* **cut-through relay** (``relay``) -- a node with an active incoming transfer
  of layer L is a *relay* holder of L: it may seed L while still receiving it,
  at no more than its inbound transfer's planned rate and its free upload (the
  agent serves chunks as they land; agent/dataplane/relay.py). Store-and-forward costs
  one whole layer time per level of the tree; a relay adds only a chunk. A
  complete holder that covers the demander's free download is still taken
  first (it cannot stall); then the tightest-fitting relay; then the most
  room of either. A hop forwards whole verified chunks, so each one adds a
  chunk's time on the link *into* the relay plus a fixed cost
  (``RELAY_HOP_S``) to how far the last node of a chain trails a complete
  copy: a relay is offered only while that lag stays within the lag budget
  (``SeederIndex.hop_s``, ``SeederIndex.lag_budget``)::

      lag(new hop) = lag(relay's own inbound) + chunk size / inbound rate + RELAY_HOP_S
      budget       = relay_lag_s * max(1, log10(nodes) - 1)

  Without the bound best fit builds one long chain (each node's upload
  exactly covers the next node's download): in the lab a 100-hop chain left
  the tail waiting 20 s for its first chunk. The budget is ``relay_lag_s`` up
  to 100 nodes and one more ``relay_lag_s`` per tenfold beyond (``log10(nodes)
  - 1`` times it): between chains the layer is stored and forwarded, so a
  deeper chain per generation means fewer generations. (Simulator, paper
  profile with 64 KiB chunks, budget at 10,000 nodes: 3 s gave 1.53 x T*,
  4 s 1.46 x, 5 s 1.47 x; at 100 nodes 1.5 s gave 1.06 x and 2 s 1.10 x.)
  Small chunks shorten every hop: the slow nodes' chains (a 256 KiB chunk
  takes 0.5 s at 4 Mbit/s) went from 1.62 to 1.53 x T* at 10,000 nodes with
  64 KiB, the same budget; with this budget 256 / 128 / 64 KiB give 1.61 /
  1.51 / 1.47 x.
* **rarest layer first** -- a demander asks for the layer with the fewest
  copies (holders plus transfers in flight) before the others. Every node
  wants the image's layers in the same order; without this the origin spends
  its upload on the first layer while the big one waits there alone (in the
  simulator at 1,000 nodes, with least slack first, the 8 MB layer had 2
  holders at 8.5 s while the 2 MB one had 993). Tiny layers (one chunk, no
  bigger than a piece) go last: a copy of one costs a round trip.
* **measured speeds** -- a completed transfer that ran ``MIN_OBSERVE_S`` or
  longer moves the estimate of the side that limited it (EWMA of achieved /
  planned rate); repeated failures halve a seeder's estimate, so slow or
  failing peers drop out of ``min_share`` and best fit (``Planner.observe``,
  ``Planner.failed``; constants in state.py)::

      seen  = min(first estimate, speed * max(MIN_OBSERVED_RATIO, achieved / planned))
      speed = max(MIN_SPEED_BPS, (1 - ewma) * speed + ewma * seen)
      speed = max(MIN_SPEED_BPS, speed * FAILED_FACTOR)  # from the FAILURES_TO_SLOW-th
                                                         # failure in a row on

Each policy is one :class:`Rules` entry in a file of its own (fastest.py,
slots.py, relay.py, swarm.py, deadline.py) with why its weights are what they are;
the planner (planner.py and its bases) runs whichever it is given. Every
transfer it starts records which rule chose the seeder (``best-fit``,
``relay``, ``direct``, or ``fastest-idle`` without slots), which put the
demander first (``fastest-first``, ``urgent``, ``starving``), and the numbers
above that decided both: rainbowd.core.sched.reasons.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Rules:
    """One policy: which of the planner's rules it uses, and their weights (module docstring)."""

    name: str
    summary: str
    slots: bool = True  # several uploads per seeder / downloads per demander, by rate
    slack_margin: float | None = None  # least slack first with this margin; None = off
    urgent_share: float = 0.25  # most of a seeder's upload that urgent demanders may take
    min_share: float = 0.5  # least rate a new transfer gets, as a share of the demander's speed
    direct_s: float = 0.0  # direct rule: seconds a seeder may spend on small layers; 0 = off
    ewma: float = 0.0  # weight of one observation in the speed estimate; 0 = off
    #: seconds a demander with nothing in flight waits for a seeder meeting min_share;
    #: after that any seeder will do (min_share is for speed, never for starvation)
    patience_s: float = 5.0
    #: a demander found starving (``patience_s``) takes every seeder that fits, until its
    #: download is full, not one transfer per starving check (Planner._feed_starving)
    starve_fill: bool = False
    #: within one rank class (``rank_step``) every waiting demander gets one transfer before
    #: any gets a second; then each is filled as before, in walk order (Walker._walk)
    breadth_first: bool = False
    relay: bool = False  # cut-through: nodes still receiving a layer may seed it (needs slots)
    #: most seconds the end of a relay chain may trail a complete copy (first chunk's lag)
    relay_lag_s: float = 2.0
    #: a demander asks first for the layer with the fewest copies (holders + in flight)
    rarest_first: bool = False
    #: urgent only once waiting longer would miss the horizon: need * (1 + guard) >= horizon - now
    #: (None: the slack margin itself, which makes the slowest demanders urgent from the start)
    urgent_guard: float | None = None
    #: with slack_margin: the demander that set the horizon is urgent once need * (1 + this)
    #: >= horizon - now (Walker._setter; rules.py, the horizon's setter); None: off
    setter_guard: float | None = None
    #: a slow seeder may feed a demander whose other open demands keep it busy longer than the
    #: transfer takes: the least rate is also at most size / (the demander's need in seconds)
    need_share: bool = False
    #: what ranks waiting demanders ("fastest first"): "down" (its download), "min" (the
    #: lower of its upload and download: how fast it can pass the image on)
    rank: str = "down"
    #: split layers into pieces of about this many bytes (whole chunks; 0 = whole layers), so
    #: several seeders feed one demander and partial holders seed (rainbowd.core.sched.pieces)
    piece_bytes: int = 0
    #: with piece_bytes: split each layer into about this many pieces instead, where that
    #: gives pieces larger than piece_bytes (a piece's time is then a small share of the
    #: layer's, whatever the image's size; 0 = piece_bytes alone)
    layer_pieces: int = 0
    #: demanders whose ranks lie within this geometric step tie (0 = exact ranks), and ties
    #: go to the one lacking most, but see lacking_least_below (DemanderIndex._tie)
    rank_step: float = 0.0
    #: with rank_step: a demander whose upload is below this share of its download passes
    #: little of what it gets on, so among ties it goes lacking *least* first, after every
    #: tie that passes more on (0 = off; rules.py, ties that finish)
    lacking_least_below: float = 0.0
    #: the slack rule's cut is at least this share of the seconds the cluster's whole upload
    #: needs for every open demand (0 = off): where the upload binds, nobody is urgent in the
    #: first seconds, and later the nodes lacking most go first before their own download
    #: becomes the bound (Planner._upload_bound_s). Only while the slack rule's horizon is
    #: ahead: once it has passed nobody is urgent by slack (Walker._order says why)
    upload_urgent: float = 0.0
    #: most share of a demander's download one transfer reserves while the demander has more
    #: to ask for and the transfer would take under ``stripe_s`` at full rate (1 = no cap):
    #: two short transfers in flight overlap each other's set-up and report gaps
    #: (Planner._reserve_down)
    stripe: float = 1.0
    #: pieces taking longer than this at full rate are not striped (see ``stripe``)
    stripe_s: float = 0.0
    #: with piece_bytes: pieces grow so that done reports would take at most this share of
    #: the coordinator's time at the cluster's full rate (rainbowd.core.sched.pieces,
    #: PieceScheduler._load_chunks); 0 = pieces of piece_bytes alone
    report_load: float = 0.0
    #: with piece_bytes: pieces not yet started grow, mid-job, until the measured fixed
    #: cost of a transfer (assignment and report) is at most this share of its bytes' time
    #: (rainbowd.core.sched.transfer_cost; core/sched/piece_growth.py); 0 = off
    cost_share: float = 0.0
    #: with need_share: a demander that has waited w seconds takes a seeder that would end
    #: the piece within wait_credit x w (its need is at least that many seconds; 0 = off)
    wait_credit: float = 0.0
    #: a demander is also urgent once, given its whole download from now on, it would end
    #: later than this many times its own bound after its demand (0 = off;
    #: DemanderIndex._own_key)
    own_urgent: float = 0.0
    #: a seeder the demander pulled from before (its connection open) is taken while it
    #: offers at least this share of the best stranger's free upload (0 = off; Fitter._fit)
    peer_share: float = 0.0
    #: with own_urgent: the demanders late by their own bound are served fewest seconds
    #: lacking first, not least laxity first (Walker._late)
    own_shortest_first: bool = False
    #: a demander books of its download only what the flow will get of its seeder's upload
    #: beside the seeder's other flows, where the transfer would run at least this many
    #: seconds at that share, so the rest stays free for another seeder (0 = off;
    #: sharing.py; Fitter._booked_down)
    fair_share_s: float = 0.0
    #: a demander asking for the last piece it lacks takes the seeder whose free upload
    #: covers its whole download, not only what is free of it at that moment (Fitter._serve)
    last_fit: bool = False
    #: with slack_margin: a demander behind the slack rule's horizon has room for another
    #: transfer while this share of its download is free, not min_share's (0 = off;
    #: DemanderIndex.late_room)
    late_room_share: float = 0.0
    #: with own_urgent: a demander late by its own bound has room for another transfer while
    #: this share of its download is free, not min_share's (0 = off;
    #: DemanderIndex.late_room)
    own_room_share: float = 0.0
