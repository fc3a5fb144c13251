"""The real system's costs that a fluid model leaves out, as named parameters.

The fluid model alone moves a layer in exactly size / rate. The real rbd adds
a fixed delay before the first byte of every transfer, a delay after its
last byte before the coordinator knows the layer is held, and it gets less
than the line rate out of a shaped link. Each of these is one parameter here,
so the simulator can be calibrated against the lab (bench/lab) rather than
tuned by hand:

* ``efficiency`` -- goodput over line rate. Run the lab's ``ci`` or ``paper``
  profile and take, for the big payload layer, size / (time of its transfer)
  over the slower of the two links: TCP/IP and SSH packet framing, the chunk
  protocol and tc's tbf token accounting together leave ~5 %.
* ``assign_s`` -- coordinator to demander: the long-poll answer carrying the
  assignment (bench/assignment_latency.py measured a median 1.7 ms, p99 2.5).
* ``connect_s`` -- an SSH connection to a seeder the demander has not pulled
  from before: TCP handshake, key exchange (curve25519), ed25519 host-key
  check and public-key auth in asyncssh on both ends, then the subsystem
  channel. A guess of 30 ms until measured (a few kB of handshake over a
  4 Mbit/s link alone is ~10 ms).
* ``channel_s`` -- the same, over a connection the demander already has to that
  seeder (the agent keeps one connection per seeder, and the chunk channel its
  last clean pull from it left: agent/dataplane/chunk_channels.py): the first
  chunk request, ~2 ms.
* ``relay_hop_s`` -- what one cut-through relay hop adds beyond a chunk's wire
  time on the link into the relay: the relay wakes for the chunk, checks it
  before serving, the demander checks and writes it. ``--compare LAB.json``
  measures it from the lab run's first-round chains of equal links
  (bench/sim/calibrate.py). Five relay runs of the ``paper`` profile
  (128 KiB chunks, session 5) gave medians of 5, 9, 11, 12 and 43 ms over
  8 hops each; 50 ms covers the slowest of them. (Session 3's 150 ms came
  from one 100-hop chain of 256 KiB chunks when every chunk took three
  thread-pool hops and heartbeats were being missed.)
* ``coordinator_s`` -- the coordinator's CPU per done report (rainbowd.core.sched.pieces
  ``REPORT_COST_S``, measured: 1.1 ms; 2.5 ms until session 15). The coordinator is one
  server taking the reports first come, first served; while it works off a queue, the
  report waits and so does every assignment it would bring (engine.py ``_report``). Pieces of one
  128 KiB chunk at 2.5 ms kept it 74-89 % busy on ci, homogeneous and paper at 100 nodes,
  and doubled ci's and homogeneous's time (bench/RESULTS.md, session 14).
* ``finish_s`` and ``verify_Bps`` -- after the last byte: the final whole-digest
  check of the layer (re-read and hashed at ``verify_Bps``), the atomic rename
  and the done report reaching the coordinator (``finish_s``).

Calibrating: the small third layer (10 kB) of the demo image takes almost only
the fixed costs, so its per-transfer time in a lab run pins
``assign_s + connect_s/channel_s + finish_s``; the payload layer then pins
``efficiency``. ``python -m bench.sim --compare LAB.json`` prints the error of
the whole run for the chosen values (the target is within 15 %).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from rainbowd.core.sched.pieces import REPORT_COST_S


@dataclass(frozen=True)
class Overheads:
    """Per-transfer costs and link efficiency of the real system; see the module docstring."""

    efficiency: float = 0.95
    assign_s: float = 0.002
    connect_s: float = 0.030
    channel_s: float = 0.002
    finish_s: float = 0.005
    verify_Bps: float = 1.0e9  # bytes per second
    relay_hop_s: float = 0.05
    coordinator_s: float = REPORT_COST_S

    def __post_init__(self) -> None:
        if not 0 < self.efficiency <= 1:
            raise ValueError(f"efficiency must be in (0, 1], got {self.efficiency}")
        for name in (
            "assign_s",
            "connect_s",
            "channel_s",
            "finish_s",
            "relay_hop_s",
            "coordinator_s",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.verify_Bps <= 0:
            raise ValueError(f"verify_Bps must be > 0, got {self.verify_Bps}")

    def setup(self, new_connection: bool) -> float:
        """Seconds from the coordinator's decision to the first byte on the wire."""
        return self.assign_s + (self.connect_s if new_connection else self.channel_s)

    def finish(self, size: int) -> float:
        """Seconds from the last byte to the coordinator recording the layer as held."""
        return self.finish_s + size / self.verify_Bps

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


#: the fluid model alone: no latency, full line rate (what the analytic tests check)
IDEAL = Overheads(
    efficiency=1.0,
    assign_s=0.0,
    connect_s=0.0,
    channel_s=0.0,
    finish_s=0.0,
    verify_Bps=1e300,
    relay_hop_s=0.0,
    coordinator_s=0.0,
)
