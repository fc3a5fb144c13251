"""The coordinator's shape: services of bounded size that never reach for the whole coordinator.

core.py once was one class of 1,400 lines, and metrics.py and ops.py were
written against all of it. Now each service gets a narrow context
(coordinator/context.py) and core.py only wires them; these checks keep it
so. The shape checks read the source (ast); the last one builds a service
from a context alone.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from coordinator_support import open_state
from rainbowd.coordinator.cluster import MISSED_HEARTBEATS, Cluster
from rainbowd.coordinator.context import ServiceContext, Settings
from rainbowd.coordinator.dispatch import Dispatch
from rainbowd.coordinator.evidence import PeerEvidence
from rainbowd.coordinator.jobs_service import JobsService
from rainbowd.coordinator.liveness import Liveness
from rainbowd.coordinator.metrics import CoordinatorMetrics
from rainbowd.coordinator.state import StoredNode
from rainbowd.core.sched.pieces import PieceScheduler

COORDINATOR = Path(__file__).resolve().parents[2] / "src" / "rainbowd" / "coordinator"
#: longest class (lines, docstring included) the standards allow
MAX_CLASS_LINES = 400
#: the only modules that may import the facade (core.py): the process and its HTTP layer
#: (http/, whose report_batch is the route of batched transfer reports)
FACADE_USERS = {
    "cli",
    "http.app",
    "http.console",
    "http.common",
    "http.report_batch",
    "http.leadership",  # builds a Coordinator when it takes over (issue 16)
}
#: modules each built from the narrow ServiceContext, never from the coordinator
SERVICES = (
    "enrollment",
    "liveness",
    "dispatch",
    "transfers",
    "quarantine",
    "jobs_service",
    "images_service",
    "holdings_service",
    "restore",
    "views",
    "ops",
    "metrics",
)


def _modules() -> dict[str, ast.Module]:
    """The coordinator's modules by name relative to it (``core``, ``http.app``)."""
    return {
        ".".join(p.relative_to(COORDINATOR).with_suffix("").parts): ast.parse(p.read_text())
        for p in sorted(COORDINATOR.rglob("*.py"))
        if p.stem != "__init__"
    }


def _imports(name: str, tree: ast.Module, names: set[str]) -> set[str]:
    """Coordinator modules ``tree`` imports anywhere (top level, functions, TYPE_CHECKING)."""
    package = name.split(".")[:-1]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            module = [*base, *(node.module.split(".") if node.module else [])]
            targets = [module] if node.module else [[*module, a.name] for a in node.names]
            out |= {".".join(t) for t in targets} & names
    return out


@pytest.mark.backends("sqlite")  # touches no state store
def test_no_class_is_over_the_limit() -> None:
    too_long = [
        f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
        for name, tree in _modules().items()
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef)
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES
    ]
    assert not too_long, too_long


@pytest.mark.backends("sqlite")  # touches no state store
def test_only_the_http_layer_and_the_cli_import_the_facade() -> None:
    modules = _modules()
    users = {n for n, tree in modules.items() if "core" in _imports(n, tree, set(modules))}
    assert users <= FACADE_USERS, sorted(users - FACADE_USERS)
    assert set(SERVICES) <= set(modules)


def _context(tmp_path: Path, now: list[float], interval: float) -> ServiceContext:
    """A service context on a fake clock (``now[0]``), no coordinator."""
    return ServiceContext(
        store=open_state(tmp_path),
        scheduler=PieceScheduler("paper"),
        cluster=Cluster(),
        clock=lambda: now[0],
        metrics=CoordinatorMetrics(),
        settings=Settings(
            heartbeat_interval=interval,
            chunk_size=1 << 20,
            node_down_timeout=60.0,
            seeder_fault_limit=3,
        ),
    )


def _stored(node_id: str) -> StoredNode:
    return StoredNode(
        node_id=node_id,
        address="10.0.0.1",
        ssh_port=22,
        host_key="ssh-ed25519 AAAA",
        client_key="ssh-ed25519 BBBB",
        credential_hash="x",
    )


def test_a_service_runs_on_its_narrow_context_alone(tmp_path: Path) -> None:
    """Liveness built from a context, the jobs and the dispatch service: no coordinator."""
    now = [1000.0]
    interval = 2.0
    ctx = _context(tmp_path, now, interval)
    jobs = JobsService(ctx, {}, lambda _now: None)
    dispatch = Dispatch(ctx, {}, jobs, PeerEvidence())
    expired: list[float] = []
    liveness = Liveness(ctx, jobs, dispatch, started_at=now[0], on_pass=expired.append)
    node = ctx.cluster.add(_stored("n1"))
    liveness.bring_up(node, now[0])
    node.last_seen = now[0]
    assert node.up and liveness.check_liveness() == []
    passes = [now[0]]
    while node.up and now[0] < 1100.0:  # a pass every half interval, as the app runs them
        now[0] += interval / 2
        passes.append(now[0])
        liveness.check_liveness()
    assert not node.up and node.down_since == now[0]
    assert now[0] - 1000.0 > MISSED_HEARTBEATS * interval
    assert expired == passes  # cluster ops are checked on every pass


def test_a_late_liveness_pass_gives_stale_nodes_one_more_pass(tmp_path: Path) -> None:
    """The coordinator's own stall is not held against the nodes, but only once in a row."""
    now = [1000.0]
    interval = 2.0
    ctx = _context(tmp_path, now, interval)
    jobs = JobsService(ctx, {}, lambda _now: None)
    dispatch = Dispatch(ctx, {}, jobs, PeerEvidence())
    liveness = Liveness(ctx, jobs, dispatch, started_at=now[0], on_pass=lambda _now: None)
    nodes = []
    for name in ("live", "dead"):
        n = ctx.cluster.add(_stored(name))
        liveness.bring_up(n, now[0])
        n.last_seen = now[0]
        nodes.append(n)
    live, dead = nodes
    assert liveness.check_liveness() == []
    now[0] += MISSED_HEARTBEATS * interval + 1.0  # the coordinator stalled: no pass, no read
    assert liveness.check_liveness() == []  # late: both get one more pass
    live.last_seen = now[0]  # its queued heartbeat is read after the stall
    now[0] += interval / 2
    assert liveness.check_liveness() == ["dead"]
    assert live.up and not dead.up
    now[0] += MISSED_HEARTBEATS * interval + 1.0  # late twice in a row: no second grace
    assert liveness.check_liveness() == []
    now[0] += MISSED_HEARTBEATS * interval + 1.0
    assert liveness.check_liveness() == ["live"]
