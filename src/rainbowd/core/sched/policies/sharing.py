"""What a new flow gets from a seeder whose upload its other flows share (``fair_share_s``).

Why: the planner books rates, but a link does not hand out bookings: a
seeder's upload is shared by the flows it sends, each getting an equal part
unless its other end takes less (max-min fairness, what TCP flows settle on
to a first approximation and what the simulator models: bench/sim/flows.py).
A demander booked for its whole download on a seeder with nine other flows
gets a tenth of that seeder's upload, while the planner thinks its download
full and never asks a second seeder for the rest. Traced in session 27 on a
held-out drawn shape (seed 36, 1.31 x T*): the last node, 3.6 Mbit/s down,
had one transfer at a time for 64 s from a seeder sending to ten demanders and
got 1.8 Mbit/s of it.

So with ``fair_share_s`` a demander books of its download only what the flow
will get (:func:`shared_rate`) where the transfer would run that many seconds
or longer at it, and the rest stays free for another seeder;
the seeder still books the planned rate of its upload, which its flows fill
between them (rules.py, "booked as shared").
"""

from __future__ import annotations

from collections.abc import Iterable


def shared_rate(capacity: float, caps: Iterable[float]) -> float:
    """The rate a new flow gets on a link of ``capacity`` beside flows capped at ``caps``.

    Max-min fair water-filling: the flows whose cap is below the water level L
    take their cap, the rest (the new flow among them) take L, and the link is
    full::

        L such that  sum_j min(cap_j, L) + L = capacity

    A flow's cap is what its other end would take at most (its demander's
    download over the flows into it, :meth:`Fitter._booked_down`). Where every
    other flow is capped below an equal share, the new one gets what they leave.
    """
    if capacity <= 0:
        return 0.0
    ordered = sorted(caps)
    left, flows = capacity, len(ordered) + 1
    for cap in ordered:
        level = left / flows
        if cap >= level:
            return level
        left -= cap
        flows -= 1
    return left / flows
