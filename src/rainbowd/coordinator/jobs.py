"""Job bookkeeping: which node of a distribution job is where, and the job's outcome.

A job asks for one image on a set of nodes. Per node it tracks
``pending -> transferring -> loading -> done | failed``, the layers and bytes
it has, the transfers that fed it (seeder, why that seeder, bytes, seconds)
and repeated failures per layer. The coordinator's services (jobs_service.py)
drive these objects; they never schedule or do I/O themselves, so the rules
here are unit-testable.

A target node that goes down mid-job is *not* failed at once (PAPER.md: "a
failed demander releases its seeder and is marked"): it keeps its non-final
state with an error saying since when it is down (:meth:`NodeProgress.went_down`),
so the job shows why it waits; when the node returns the note is cleared and
it finishes. Only after the coordinator's down timeout does it fail -- a
failed node is final, and a job whose nodes are all final is over for good.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import msgspec

from rainbowd.core.digest import short
from rainbowd.core.messages import JobView, NodeJobState, NodeJobStateName, SeederUse
from rainbowd.core.sched.jobdriver import Charge, FailureBudget

FINAL_STATES = ("done", "failed")

JobStateName = Literal["running", "done", "failed"]


def _clock(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def unique_layers(digests: list[str]) -> list[str]:
    """Layer digests in image order, each once (an image may repeat a layer)."""
    seen: set[str] = set()
    out: list[str] = []
    for d in digests:
        if d not in seen:
            seen.add(d)
            out.append(d)
    return out


@dataclass
class NodeProgress:
    """One node's part of a job."""

    node_id: str
    layers: list[str]
    sizes: dict[str, int]
    started_at: float
    state: NodeJobStateName = "pending"
    done: set[str] = field(default_factory=set)
    partial: dict[str, int] = field(default_factory=dict)  # layer -> bytes of the live transfer
    rate_bps: float = 0.0
    transfers: list[SeederUse] = field(default_factory=list)
    finished_at: float = 0.0
    error: str = ""
    #: failed transfers per layer (the budget's rule is the job driver's,
    #: rainbowd.core.sched.jobdriver)
    budget: FailureBudget = field(default_factory=FailureBudget)
    load_id: str = ""
    down_since: float = 0.0  # the node is down (not yet failed); 0 while it is up
    reopened: bool = False  # put back to pending once at the job's end (coordinator/holdings.py)
    #: layers this done node stopped listing (not evicted with the coordinator's consent)
    unheld: set[str] = field(default_factory=set)

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    @property
    def receiving(self) -> bool:
        """Still waiting for layers (not loading, not final)."""
        return self.state in ("pending", "transferring")

    def missing(self) -> list[str]:
        return [d for d in self.layers if d not in self.done]

    def needs(self, layer: str) -> bool:
        return self.receiving and layer in self.sizes and layer not in self.done

    def all_held(self) -> bool:
        return all(d in self.done for d in self.layers)

    def hold(self, layer: str) -> bool:
        """The node now holds ``layer``; True if that was news for this job."""
        if not self.needs(layer):
            return False
        self.done.add(layer)
        self.partial.pop(layer, None)
        return True

    def lose(self, layer: str) -> bool:
        """The node no longer holds ``layer``: True if it must be demanded again now.

        While the node still receives it is simply not done for it any more. A
        loading node's load reads the store and fails by itself. A done node
        notes it (:attr:`unheld`) and is rechecked when the job ends
        (:meth:`reopen`): a layer evicted with the coordinator's consent after
        the node finished never comes through here.
        """
        if self.state == "done" and layer in self.sizes:
            self.unheld.add(layer)
            return False
        if not self.receiving or layer not in self.done:
            return False
        self.done.discard(layer)
        return True

    def reopen(self, missing: list[str]) -> bool:
        """A done node lacks ``missing`` at the job's end: pending again (once). False if not."""
        if self.reopened or self.state != "done":
            return False
        self.reopened = True
        self.unheld.clear()
        self.done.difference_update(missing)
        self.state = "pending"
        self.finished_at = 0.0
        self.error = ""
        return True

    def started_transfer(self, layer: str) -> None:
        if self.receiving:
            self.state = "transferring"
            self.partial[layer] = 0

    def progress(self, layer: str, bytes_done: int, rate_bps: float) -> None:
        if self.needs(layer):
            self.partial[layer] = max(0, min(bytes_done, self.sizes[layer]))
            self.rate_bps = max(0.0, rate_bps)

    def transfer_stopped(self, layer: str) -> None:
        self.partial.pop(layer, None)
        if not self.partial:
            self.rate_bps = 0.0

    def record(self, use: SeederUse) -> None:
        """Count a finished transfer into this node; each one's bytes crossed a link.

        Pieces of one layer from one seeder (and a resumed pull from it) add up to
        one line, so the report keeps a line per layer and seeder while the wire
        bytes count every piece (they once counted the first piece of a layer only).

        A report can arrive after the node finished (its heartbeat showed the layer
        held first, and the load was quick): the layer was in place by then, so the
        use ends at the node's finish, never after it (the lab's timeline once showed a
        transfer done 4 ms after its node).
        """
        if self.state == "done" and 0 < self.finished_at < use.finished_at:
            use = msgspec.structs.replace(use, finished_at=self.finished_at)
        for i, u in enumerate(self.transfers):
            if u.layer == use.layer and u.seeder == use.seeder:
                started = min(u.started_at, use.started_at) or max(u.started_at, use.started_at)
                finished = max(u.finished_at, use.finished_at)
                span = finished - started if started and finished else u.seconds + use.seconds
                self.transfers[i] = msgspec.structs.replace(
                    u,
                    bytes=u.bytes + use.bytes,
                    seconds=max(span, u.seconds, use.seconds),
                    started_at=started,
                    finished_at=finished,
                )
                return
        self.transfers.append(use)

    @property
    def wire_bytes(self) -> int:
        """Bytes that crossed a link to this node for this job (finished transfers)."""
        return sum(t.bytes for t in self.transfers)

    def count_failure(self, layer: str, why: str, now: float, *, final: bool = False) -> bool:
        """Count a failed transfer of ``layer``; True if the node just failed the job.

        ``final`` failures (the demander's disk is full) fail the node at once:
        another seeder cannot help, and the agent's reason already names the
        node, the layer and the free space.
        """
        if not self.needs(layer):
            return False
        self.transfer_stopped(layer)
        charge = Charge.FINAL if final else Charge.COUNT
        n = self.budget.charge(layer, charge)
        if final:
            self.fail(why, now)
            return True
        if self.budget.exhausted(layer, charge):
            self.fail(
                f"node {self.node_id}: layer {short(layer)} failed {n} times (last: {why})", now
            )
            return True
        return False

    def went_down(self, why: str, now: float, timeout: float) -> None:
        """The node is gone for now: say so in ``error``; the state stays non-final."""
        if self.final or self.down_since:
            return
        self.down_since = now
        self.error = (
            f"node {self.node_id} down since {_clock(now)} ({why}); "
            f"waiting up to {timeout:.0f}s for it to return"
        )
        self.partial.clear()
        self.rate_bps = 0.0

    def came_back(self) -> bool:
        """The node is up again: clear the down note. True if it was noted down."""
        if not self.down_since or self.final:
            return False
        self.down_since = 0.0
        self.error = ""
        return True

    def loading(self, load_id: str) -> None:
        self.state = "loading"
        self.load_id = load_id
        self.partial.clear()
        self.rate_bps = 0.0

    def finish(self, now: float) -> None:
        self.down_since = 0.0
        self.error = ""
        self.state = "done"
        self.finished_at = now
        self.partial.clear()
        self.rate_bps = 0.0

    def fail(self, error: str, now: float) -> None:
        if self.final:
            return
        self.down_since = 0.0
        self.state = "failed"
        self.error = error
        self.finished_at = now
        self.partial.clear()
        self.rate_bps = 0.0

    def view(self, *, transfers: bool = True) -> NodeJobState:
        """This node's state in the job; without ``transfers``, its list of finished
        transfers is left empty (a poll's view: see :meth:`Job.view`)."""
        done_bytes = sum(self.sizes[d] for d in self.done)
        return NodeJobState(
            node_id=self.node_id,
            state="down" if self.down_since and not self.final else self.state,
            layers_done=len(self.done),
            layers_total=len(self.layers),
            bytes_done=done_bytes + sum(self.partial.values()),
            bytes_total=sum(self.sizes[d] for d in self.layers),
            rate_bps=self.rate_bps,
            transfers=list(self.transfers) if transfers else [],
            started_at=self.started_at,
            finished_at=self.finished_at,
            error=self.error,
            wire_bytes=self.wire_bytes,
        )


@dataclass
class Job:
    """A distribution job: one image to many nodes."""

    job_id: str
    image: str
    created_at: float
    nodes: dict[str, NodeProgress]
    state: JobStateName = "running"
    finished_at: float = 0.0
    error: str = ""
    image_bytes: int = 0  # one copy of the image, uncompressed
    #: made by pulls through the front doors: nodes pulling the image join it (pulls.py)
    pull: bool = False

    @classmethod
    def create(
        cls,
        job_id: str,
        image: str,
        layers: list[tuple[str, int]],
        targets: list[str],
        holdings: dict[str, set[str]],
        now: float,
        *,
        image_bytes: int = 0,
        pull: bool = False,
    ) -> Job:
        """A new job; ``layers`` are (digest, size) in image order, ``holdings`` per target.

        Layers are shared across images: a target already holding a layer (from
        any image) starts with it done and never demands it.
        """
        job = cls(
            job_id=job_id, image=image, created_at=now, nodes={}, image_bytes=image_bytes, pull=pull
        )
        order = unique_layers([d for d, _ in layers])
        sizes = dict(layers)
        for nid in targets:
            job.add_node(nid, order, sizes, holdings.get(nid, set()), now)
        return job

    def add_node(
        self,
        node_id: str,
        order: list[str],
        sizes: dict[str, int],
        holdings: set[str],
        now: float,
    ) -> NodeProgress:
        """A target (at creation, or a node joining a running pull job); held layers done."""
        p = NodeProgress(node_id=node_id, layers=order, sizes=sizes, started_at=now)
        p.done = {d for d in order if d in holdings}
        self.nodes[node_id] = p
        return p

    @classmethod
    def from_view(
        cls, view: JobView, layers: list[tuple[str, int]], holdings: dict[str, set[str]]
    ) -> Job:
        """Rebuild a persisted job; held layers are re-derived from current holdings."""
        order = unique_layers([d for d, _ in layers])
        sizes = dict(layers)
        nodes = {}
        for ns in view.nodes:
            p = NodeProgress(
                node_id=ns.node_id,
                layers=order,
                sizes=sizes,
                started_at=ns.started_at,
                state=ns.state,
                transfers=list(ns.transfers),
                finished_at=ns.finished_at,
                error=ns.error,
            )
            p.done = {d for d in order if d in holdings.get(ns.node_id, set())}
            if p.state == "transferring" and not p.all_held():
                p.state = "pending"  # in-flight transfers did not survive the restart
            nodes[ns.node_id] = p
        return cls(
            job_id=view.job_id,
            image=view.image,
            created_at=view.created_at,
            nodes=nodes,
            state=view.state,
            finished_at=view.finished_at,
            error=view.error,
            image_bytes=view.image_bytes,
            pull=view.pull,
        )

    @property
    def running(self) -> bool:
        return self.state == "running"

    def settle(self, now: float) -> bool:
        """Derive the job's state from its nodes; True when it just became final."""
        if not self.running or not all(p.final for p in self.nodes.values()):
            return False
        failed = [p for p in self.nodes.values() if p.state == "failed"]
        self.finished_at = now
        if failed:
            self.state = "failed"
            self.error = f"{len(failed)} of {len(self.nodes)} node(s) failed: " + "; ".join(
                f"{p.node_id}: {p.error}" for p in failed
            )
        else:
            self.state = "done"
        return True

    def view(self, *, transfers: bool = True) -> JobView:
        """The job as the API shows it, every node's finished transfers included.

        ``transfers=False`` leaves those lists empty: they grow with every piece a
        node receives (~100 a node for a 10 MB image in one-chunk pieces), and a
        client polling a running job every fraction of a second (``rbd distribute``'s
        live progress, ``wait_job``) does not read them -- encoding and sending them
        on every poll made the job's watcher a large share of the coordinator's work
        (session 16: a tenth of its samples in a 100-node lab run). Persistence
        always stores the full view.
        """
        return JobView(
            job_id=self.job_id,
            image=self.image,
            state=self.state,
            created_at=self.created_at,
            finished_at=self.finished_at,
            nodes=[self.nodes[n].view(transfers=transfers) for n in sorted(self.nodes)],
            error=self.error,
            image_bytes=self.image_bytes,
            wire_bytes=sum(p.wire_bytes for p in self.nodes.values()),
            copy_bytes=self.copy_bytes,
            pull=self.pull,
        )

    @property
    def copy_bytes(self) -> int:
        """One copy of the image as it crosses a link: its distinct layers as stored.

        The basis wire bytes are compared on (image_bytes is uncompressed, so a
        compressed image would seem to reach more nodes than it did).
        """
        any_node = next(iter(self.nodes.values()), None)
        if any_node is None:
            return 0
        return sum(any_node.sizes[d] for d in any_node.layers)
