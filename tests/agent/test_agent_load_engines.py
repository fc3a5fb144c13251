"""The agent's load: into every engine the node has, Docker then containerd; one failure fails it.

A real Agent (not running: no coordinator) with stand-in loaders, so what is
checked is the agent's own rule: which engines a LoadAssignment goes to, what
the reports say, and that the reason names the node, the image and the engine.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from coordinator_support import fake_image
from rainbowd.agent.agent import Agent
from rainbowd.agent.config import load_config
from rainbowd.agent.loadstream import LoadResult
from rainbowd.core.messages import ImageRecord, LoadAssignment, LoadDone, TaskFailed
from rainbowd.lib.store import LayerStore


class FakeLoader:
    def __init__(self, name: str, calls: list[str], error: str = "", layers: int = 1) -> None:
        self.name, self.calls, self.error, self.layers = name, calls, error, layers

    async def load(self, image: ImageRecord, store: LayerStore) -> LoadResult:
        self.calls.append(self.name)
        if self.error:
            raise RuntimeError(self.error)
        return LoadResult(layers_sent=self.layers, seconds=0.25, image_id="x")


class Reports:
    """What the agent reported, in place of its coordinator client."""

    def __init__(self) -> None:
        self.done: list[LoadDone] = []
        self.failed: list[TaskFailed] = []

    async def load_done(self, load_id: str, m: LoadDone, rid: str) -> None:
        self.done.append(m)

    async def load_failed(self, load_id: str, m: TaskFailed, rid: str) -> None:
        self.failed.append(m)


def make_agent(
    tmp: Path, reports: Reports, monkeypatch: pytest.MonkeyPatch, extra: str = ""
) -> Agent:
    cfg = tmp / "agent.toml"
    cfg.write_text(
        'node_id = "n7"\ncoordinator_url = "http://127.0.0.1:1"\n'
        f'state_dir = "{tmp / "state"}"\nlisten_address = "127.0.0.1"\nssh_port = 0\n' + extra
    )
    agent = Agent(load_config(cfg))

    async def report(what: str, send: Callable[[str], Awaitable[Any]]) -> None:
        await send("rid")

    monkeypatch.setattr(agent.reports, "send", report)
    monkeypatch.setattr(agent.api, "load_done", reports.load_done)
    monkeypatch.setattr(agent.api, "load_failed", reports.load_failed)
    return agent


def assignment() -> LoadAssignment:
    return LoadAssignment(load_id="l1", job_id="j1", image=fake_image().record)


async def test_both_engines_get_the_image_and_one_done_report_sums_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reports, calls = Reports(), list[str]()
    agent = make_agent(tmp_path, reports, monkeypatch)
    agent.loads.docker = FakeLoader("docker", calls, layers=2)  # type: ignore[assignment]
    agent.loads.containerd = FakeLoader("containerd", calls, layers=1)  # type: ignore[assignment]
    await agent.loads.load(assignment())
    assert calls == ["docker", "containerd"]
    assert reports.failed == [] and len(reports.done) == 1
    assert reports.done[0].layers_sent == 3 and reports.done[0].seconds == 0.5
    assert "example/app:1" in agent.view.images
    assert not agent.loads.loading  # the layers are no longer pinned by the load


@pytest.mark.parametrize(
    ("failing", "tried"), [("docker", ["docker"]), ("containerd", ["docker", "containerd"])]
)
async def test_a_failing_engine_fails_the_load_naming_node_image_and_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str, tried: list[str]
) -> None:
    reports, calls = Reports(), list[str]()
    agent = make_agent(tmp_path, reports, monkeypatch)
    agent.loads.docker = FakeLoader(  # type: ignore[assignment]
        "docker", calls, error="engine said no" if failing == "docker" else ""
    )
    agent.loads.containerd = FakeLoader(  # type: ignore[assignment]
        "containerd", calls, error="engine said no" if failing == "containerd" else ""
    )
    await agent.loads.load(assignment())
    assert calls == tried and reports.done == []
    (failed,) = reports.failed
    engine = "Docker" if failing == "docker" else "containerd"
    assert failed.reason == f"node n7 could not load example/app:1 into {engine}: engine said no"
    assert "example/app:1" not in agent.view.images


async def test_a_containerd_only_node_loads_into_containerd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reports, calls = Reports(), list[str]()
    agent = make_agent(tmp_path, reports, monkeypatch)
    assert agent.loads.docker is None
    agent.loads.containerd = FakeLoader("containerd", calls)  # type: ignore[assignment]
    await agent.loads.load(assignment())
    assert calls == ["containerd"] and len(reports.done) == 1


async def test_a_node_without_an_engine_fails_a_load_naming_both_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reports = Reports()
    agent = make_agent(tmp_path, reports, monkeypatch)
    assert agent.loads.docker is None and agent.loads.containerd is None
    await agent.loads.load(assignment())
    (failed,) = reports.failed
    assert "n7" in failed.reason
    assert "docker_url" in failed.reason and "containerd_address" in failed.reason


async def test_a_catalog_only_load_records_the_image_for_the_front_door_and_is_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No engine, but a registry front door: the load is the image record, and it is done."""
    reports = Reports()
    agent = make_agent(tmp_path, reports, monkeypatch, 'mirror_listen = "127.0.0.1:0"\n')
    assert agent.loads.docker is None and agent.loads.containerd is None
    a = LoadAssignment(load_id="l1", job_id="j1", image=fake_image().record, catalog_only=True)
    await agent.loads.load(a)
    assert not reports.failed and len(reports.done) == 1
    assert a.image.ref in agent.catalog.recorded
