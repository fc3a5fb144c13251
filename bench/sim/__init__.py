"""A discrete-event simulator of rbd: the real Scheduler over a fluid, max-min fair network.

It answers what the lab (bench/lab) cannot at scale: how policy ``paper``
behaves at 1,000 or 10,000 nodes, against the bound T*, in seconds of wall
time. The pieces:

* :mod:`bench.sim.flows` -- max-min fair rates of flows over node up/down links;
* :mod:`bench.sim.overheads` -- the real system's per-transfer costs, calibratable;
* :mod:`bench.sim.engine` -- the event loop feeding :class:`rainbowd.core.sched.scheduler.Scheduler`
  through the coordinator's job driver (:mod:`rainbowd.core.sched.jobdriver`);
* :mod:`bench.sim.faults` -- faults a run injects (a node dies, is unreachable, sends bad
  chunks, is dropped by the coordinator), reported to the driver as agents report them;
* :mod:`bench.sim.report` -- the lab's JSON shape, the table, ``--compare``;
* :mod:`bench.sim.suite` -- every profile at several sizes, one table
  (``python -m bench.sim suite``), with shapes drawn from seeds (:mod:`bench.sim.drawn`);
* :mod:`bench.sim.gate` -- the regression gate against bench/sim/gate.json;
* ``python -m bench.sim`` -- the command line (:mod:`bench.sim.__main__`).
"""

from .engine import SimResult, Simulation
from .flows import FlowNetwork
from .overheads import IDEAL, Overheads

__all__ = ["IDEAL", "FlowNetwork", "Overheads", "SimResult", "Simulation"]
