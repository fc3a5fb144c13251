"""Cluster operations (coordinator/ops.py) through the real coordinator app, with fake agents.

The agents play the protocol (poll, report started/result), so the
bookkeeping -- fan-out, per-node states, durability, removal of holdings,
build contexts -- is checked step by step.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import msgspec
import pytest

from coordinator_support import (
    ADMIN,
    Running,
    enroll,
    fake_image,
    ingest,
    register_request,
    start,
)
from rainbowd.cli import main as cli
from rainbowd.coordinator.core import Coordinator
from rainbowd.core import messages as m
from rainbowd.lib import buildcontext
from rainbowd.lib.buildcontext import (
    ContextError,
    digest_of,
    normalize_ref,
    pack_context,
    read_dockerfile,
)
from rainbowd.lib.client import AdminClient, AgentClient, ApiError
from rainbowd.lib.dockerfile import check_from


async def ops_of(agent: AgentClient, cursor: int = 0) -> tuple[int, list[m.OpAssignment]]:
    batch = await agent.assignments(cursor, 10**9, 0)
    return batch.cursor, [a for a in batch.assignments if isinstance(a, m.OpAssignment)]


def ok(summary: str = "fine", **kw: object) -> m.OpResult:
    return m.OpResult(ok=True, summary=summary, **kw)  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# messages
# --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "op",
    [
        m.RunOp(image="app:1", name="web", cmd=["/bin/echo", "hi"], network="none", wait=2),
        m.RemoveContainerOp(container="web"),
        m.BuildOp(tag="app:2", base="app:1", context_digest="sha256:" + "a" * 64, context_size=3),
        m.RemoveImageOp(image="app:1"),
        m.DockerCheckOp(install=True),
    ],
)
@pytest.mark.parametrize("ctype", [m.MSGPACK, m.JSON])
def test_create_op_round_trips(op: m.Op, ctype: str) -> None:
    req = m.CreateOp(op=op, targets=["all"])
    assert m.decode(m.encode(req, ctype), m.CreateOp, ctype) == req
    batch = m.AssignmentBatch(
        cursor=3, assignments=[m.OpAssignment(op_id="o-1", op=op, timeout=10)]
    )
    assert m.decode(m.encode(batch), m.AssignmentBatch) == batch


def test_unknown_op_kind_and_bad_fields_are_refused() -> None:
    with pytest.raises(m.MessageError, match="shell"):
        m.decode(b'{"op": {"kind": "shell", "cmd": "rm -rf /"}, "targets": ["all"]}',
                 m.CreateOp, m.JSON)  # fmt: skip
    with pytest.raises(m.MessageError, match="wait"):
        m.decode(b'{"op": {"kind": "run", "image": "a", "wait": "x"}, "targets": []}',
                 m.CreateOp, m.JSON)  # fmt: skip
    with pytest.raises(m.MessageError, match="protocol version"):
        m.decode(b'{"v": 2, "op": {"kind": "docker-check"}, "targets": ["all"]}',
                 m.CreateOp, m.JSON)  # fmt: skip


# --------------------------------------------------------------------------
# build contexts
# --------------------------------------------------------------------------
def test_pack_context_and_dockerfile_checks(tmp_path: Path) -> None:
    ctx = tmp_path / "ctx"
    (ctx / "sub").mkdir(parents=True)
    (ctx / "Dockerfile").write_text("# base\nFROM rbd-demo\nCOPY sub/a.txt /a.txt\n")
    (ctx / "sub" / "a.txt").write_text("hello")
    packed = pack_context(ctx, "Dockerfile")
    assert packed.files == 2 and packed.digest == digest_of(packed.data)
    assert pack_context(ctx, "Dockerfile").digest == packed.digest  # deterministic
    with tarfile.open(fileobj=io.BytesIO(packed.data)) as tar:
        assert sorted(tar.getnames()) == ["Dockerfile", "sub", "sub/a.txt"]
    text = read_dockerfile(packed.data, "Dockerfile")
    check_from(text, "rbd-demo:latest")  # name == name:latest
    with pytest.raises(ContextError, match="not the base rbd-demo:2"):
        check_from(text, "rbd-demo:2")
    with pytest.raises(ContextError, match=r"larger than the 1\.0 KiB limit"):
        pack_context(ctx, "Dockerfile", limit=1024)
    with pytest.raises(ContextError, match="inside the build context"):
        pack_context(ctx, "../Dockerfile")
    with pytest.raises(ContextError, match="no Dockerfile other"):
        pack_context(ctx, "other")
    with pytest.raises(ContextError, match="no Dockerfile x"):
        read_dockerfile(packed.data, "x")


def test_build_cli_refuses_bad_contexts_before_upload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Exit 2 and a message naming the problem; the (absent) coordinator is never contacted."""
    monkeypatch.setenv("RBD_ADMIN_TOKEN", "x")
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text("FROM base:1\nCOPY big /big\n")
    (ctx / "big").write_bytes(b"x" * 4096)
    argv = ["--coordinator", "http://127.0.0.1:9", "build", "app:2", "--base", "base:1"]
    argv += ["--context", str(ctx), "--to", "all"]
    monkeypatch.setattr(buildcontext, "MAX_CONTEXT", 2048)
    assert cli.main(argv) == 2
    assert "larger than the 2.0 KiB limit" in capsys.readouterr().err
    monkeypatch.setattr(buildcontext, "MAX_CONTEXT", 1 << 20)
    assert cli.main([*argv[:5], "other:1", *argv[6:]]) == 2
    assert "FROM base:1 is not the base other:1" in capsys.readouterr().err
    assert cli.main([*argv, "-f", "Nope"]) == 2
    assert "no Dockerfile Nope in the build context" in capsys.readouterr().err


def test_from_rules() -> None:
    multi = "FROM base:1 AS build\nRUN make\nFROM --platform=linux/amd64 \\\n  build\nCOPY . /\n"
    check_from(multi, "base:1")
    with pytest.raises(ContextError, match="uses a variable"):
        check_from("ARG B=base:1\nFROM $B\n", "base:1")
    with pytest.raises(ContextError, match="no FROM line"):
        check_from("RUN true\n", "base:1")
    with pytest.raises(ContextError, match="FROM debian is not the base"):
        check_from("FROM base:1\nFROM debian\n", "base:1")
    assert normalize_ref("reg:5000/app") == "reg:5000/app:latest"
    assert normalize_ref("app@sha256:" + "0" * 64) == "app@sha256:" + "0" * 64


# --------------------------------------------------------------------------
# fan-out, states, durability
# --------------------------------------------------------------------------
async def test_run_fans_out_and_tracks_each_node(coord: Running, admin: AdminClient) -> None:
    a = await enroll(coord.url, "a", docker=True)
    b = await enroll(coord.url, "b")
    try:
        run = m.RunOp(image="app:1", name="web", network="none")
        view = await admin.create_op(m.CreateOp(op=run, targets=["all"]))
        assert view.kind == "run" and view.state == "running"
        assert [(n.node_id, n.state) for n in view.nodes] == [("a", "pending"), ("b", "pending")]
        _, (oa,) = await ops_of(a)
        _, (ob,) = await ops_of(b)
        assert oa.op_id == ob.op_id == view.op_id and oa.op == run
        assert oa.timeout == pytest.approx(60 + run.wait)

        await a.op_started(view.op_id)
        assert {n.node_id: n.state for n in (await admin.op(view.op_id)).nodes} == {
            "a": "running",
            "b": "pending",
        }
        await a.op_result(view.op_id, ok("exited 0 (web)", output="hello\n", exit_code=0))
        await b.op_result(
            view.op_id, m.OpResult(ok=False, summary="no docker", error="node b has no Docker")
        )
        done = await admin.op(view.op_id)
        assert done.state == "failed" and done.finished_at
        na, nb = done.nodes
        assert (na.state, na.output, na.exit_code) == ("done", "hello\n", 0)
        assert (nb.state, nb.error) == ("failed", "node b has no Docker")
        # a late repeat changes nothing
        await b.op_result(view.op_id, ok())
        assert (await admin.op(view.op_id)).nodes[1].state == "failed"
        assert [o.op_id for o in (await admin.ops()).ops] == [view.op_id]

        # a node not targeted cannot report on it; an unknown op is 404
        c = await enroll(coord.url, "c")
        only_a = await admin.create_op(m.CreateOp(op=run, targets=["a"]))
        with pytest.raises(ApiError) as e:
            await c.op_result(only_a.op_id, ok())
        assert e.value.status == 403 and "does not target node c" in e.value.message
        with pytest.raises(ApiError) as e:
            await a.op_result("o-nope", ok())
        assert e.value.status == 404
        await c.close()
    finally:
        await a.close()
        await b.close()


async def test_bad_requests_are_refused(coord: Running, admin: AdminClient) -> None:
    a = await enroll(coord.url, "a")
    try:
        cases: list[tuple[m.Op, list[str], str]] = [
            (m.RunOp(image="x"), ["zz"], "unknown node(s): zz"),
            (m.RunOp(image="x"), [], "targets is empty"),
            (m.RunOp(image="x", name="bad name"), ["a"], "container name 'bad name'"),
            (m.RunOp(image="x", wait=600), ["a"], "wait must be between"),
            (m.RemoveContainerOp(container=""), ["a"], "not a container name"),
            (m.RemoveImageOp(image="nope:1"), ["a"], "no image 'nope:1'"),
            (m.RemoveImageOp(image="x", drop_layers=["sha256:" + "0" * 64]), ["a"], "set by"),
        ]
        for op, targets, message in cases:
            with pytest.raises(ApiError) as e:
                await admin.create_op(m.CreateOp(op=op, targets=targets))
            assert e.value.status in (400, 404) and message in e.value.message, (op, e.value)
        assert (await admin.ops()).ops == []
    finally:
        await a.close()


async def test_down_node_fails_at_once_and_silent_node_at_deadline(
    coord: Running, admin: AdminClient
) -> None:
    a = await enroll(coord.url, "a")
    b = await enroll(coord.url, "b")
    try:
        coord.coordinator.cluster.nodes["b"].up = False
        view = await admin.create_op(m.CreateOp(op=m.DockerCheckOp(), targets=["a", "b"]))
        nb = view.nodes[1]
        assert nb.state == "failed" and "node b is down" in nb.error
        _, assigned = await ops_of(b)
        assert assigned == []  # nothing queued for a down node
        coord.coordinator.ops.expire(view.deadline + 1)
        after = await admin.op(view.op_id)
        assert after.state == "failed"
        assert "node a did not report within 60s" in after.nodes[0].error
    finally:
        await a.close()
        await b.close()


async def test_ops_survive_a_coordinator_restart(tmp_path: Path) -> None:
    first = await start(tmp_path)
    a = await enroll(first.url, "a")
    async with AdminClient(first.url, ADMIN) as admin:
        view = await admin.create_op(m.CreateOp(op=m.DockerCheckOp(), targets=["a"]))
        await a.op_started(view.op_id)
    await a.close()
    await first.stop()
    first.store.close()

    second = await start(tmp_path)
    try:
        async with AdminClient(second.url, ADMIN) as admin:
            again = await admin.op(view.op_id)
            assert again.state == "running" and again.nodes[0].state == "running"
            assert again.op == m.DockerCheckOp() and again.deadline == view.deadline
            # the agent's late report (it kept working) is applied after the restart
            agent = AgentClient(second.url)
            await agent.register(register_request("a", join="", credential=a.credential))
            await agent.op_result(view.op_id, ok("Docker 20.10"))
            final = await admin.op(view.op_id)
            assert final.state == "done" and final.nodes[0].summary == "Docker 20.10"
            await agent.close()
    finally:
        await second.stop()


# --------------------------------------------------------------------------
# removing an image from nodes: holdings, scheduler, shared layers, origin
# --------------------------------------------------------------------------
async def test_rm_image_drops_holdings_but_keeps_shared_layers_and_the_origin(
    coord: Running, admin: AdminClient
) -> None:
    c: Coordinator = coord.coordinator
    origin = await enroll(coord.url, "origin", roles=["origin"])
    img = fake_image("app:1")
    await ingest(admin, origin, img)
    l0, l1 = img.digests
    # a second image sharing layer 0 plus a layer l2 only b holds: l0 must stay on b
    extra = fake_image("other:1", sizes=(90_000,))
    l2 = extra.digests[0]
    other = msgspec.structs.replace(
        img.record, ref="other:1", layers=[img.record.layers[0], extra.record.layers[0]]
    )
    await admin.add_image(m.CreateImage(ref="other:1", source=m.ArchiveSource(path="/o.tar")))
    items = (await origin.assignments(1, 0, 0)).assignments  # after the first ingest
    (ing,) = [x for x in items if isinstance(x, m.IngestAssignment)]
    await origin.ingest_done(
        ing.ingest_id,
        m.IngestDone(image=other, manifests=[img.manifests[0], extra.manifests[0]]),
    )
    a = await enroll(coord.url, "a", holdings=[l0, l1])
    b = await enroll(coord.url, "b", holdings=[l0, l1, l2])
    try:
        assert (await admin.image("app:1")).nodes == ["a", "b", "origin"]
        view = await admin.create_op(m.CreateOp(op=m.RemoveImageOp(image="app:1"), targets=["all"]))
        per_node: dict[str, m.RemoveImageOp] = {}
        for name, agent in (("a", a), ("b", b), ("origin", origin)):
            cursor = 0 if name != "origin" else 2
            _, (oa,) = await ops_of(agent, cursor)
            assert isinstance(oa.op, m.RemoveImageOp)
            per_node[name] = oa.op
        assert per_node["a"].drop_layers == [l0, l1]
        assert per_node["b"].drop_layers == [l1]  # l0 is other:1's, which b holds whole
        assert per_node["origin"].drop_layers == []  # never the origin's copy
        assert per_node["a"].image_id == img.record.config_digest

        # withheld at once: the scheduler no longer sees a as a seeder of them,
        # and a heartbeat built before the removal does not bring them back
        assert "a" not in c.scheduler.holders(l0) and "b" not in c.scheduler.holders(l1)
        await a.heartbeat(m.Heartbeat(holdings=[l0, l1]))
        assert c.cluster.nodes["a"].holdings == set()

        await a.op_result(view.op_id, ok("removed", removed_layers=[l0, l1]))
        # b's Docker refused (a container uses the image): its layers come back
        await b.op_result(view.op_id, m.OpResult(ok=False, summary="in use", error="in use"))
        await b.heartbeat(m.Heartbeat(holdings=[l0, l1, l2]))
        await origin.op_result(view.op_id, ok("kept"))
        done = await admin.op(view.op_id)
        assert done.state == "failed"
        assert done.nodes[0].removed_layers == [l0, l1]
        assert c.cluster.nodes["a"].holdings == set()
        assert c.cluster.nodes["b"].holdings == {l0, l1, l2}
        assert c.scheduler.holders(l0) == ["b", "origin"]
        assert (await admin.image("app:1")).nodes == ["b", "origin"]
        nodes = {n.node_id: n.holdings for n in (await admin.nodes()).nodes}
        assert nodes["a"] == 0
        # the removal is durable: the node row no longer lists them
        stored = {n.node_id: n.holdings for n, _ in coord.store.load_nodes()}
        assert stored["a"] == []
    finally:
        for x in (a, b, origin):
            await x.close()


async def test_rm_image_refused_while_a_job_sends_it(coord: Running, admin: AdminClient) -> None:
    origin = await enroll(coord.url, "origin", roles=["origin"])
    a = await enroll(coord.url, "a")
    img = fake_image("app:1")
    await ingest(admin, origin, img)
    try:
        await admin.create_job(m.CreateJob(image="app:1", targets=["a"]))
        with pytest.raises(ApiError) as e:
            await admin.create_op(m.CreateOp(op=m.RemoveImageOp(image="app:1"), targets=["a"]))
        assert e.value.status == 409 and "distributing app:1" in e.value.message
    finally:
        await a.close()
        await origin.close()


# --------------------------------------------------------------------------
# build: context upload, checks, who may fetch it
# --------------------------------------------------------------------------
def _context(dockerfile: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = dockerfile.encode()
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


async def test_build_context_upload_checks_and_fetch(coord: Running, admin: AdminClient) -> None:
    origin = await enroll(coord.url, "origin", roles=["origin"])
    img = fake_image("base:1")
    await ingest(admin, origin, img)
    a = await enroll(coord.url, "a", docker=True)
    b = await enroll(coord.url, "b", docker=True)
    try:
        good = _context('FROM base:1\nCMD ["/bin/true"]\n')
        digest = digest_of(good)
        with pytest.raises(ApiError) as e:
            await admin.upload_context("sha256:" + "0" * 64, good)
        assert e.value.status == 400 and "not sha256:" + "0" * 64 in e.value.message
        with pytest.raises(ApiError) as e:
            await admin.upload_context("nonsense", good)
        assert e.value.status == 400

        def build(d: str, size: int, base: str = "base:1") -> m.CreateOp:
            op = m.BuildOp(tag="app:2", base=base, context_digest=d, context_size=size)
            return m.CreateOp(op=op, targets=["a"])

        with pytest.raises(ApiError) as e:
            await admin.create_op(build(digest, len(good)))
        assert e.value.status == 400 and "was not uploaded" in e.value.message
        await admin.upload_context(digest, good)
        await admin.upload_context(digest, good)  # idempotent
        with pytest.raises(ApiError) as e:
            await admin.create_op(build(digest, len(good), base="nope:1"))
        assert e.value.status == 404 and "no image 'nope:1'" in e.value.message
        bad = _context("FROM debian:12\n")
        await admin.upload_context(digest_of(bad), bad)
        with pytest.raises(ApiError) as e:
            await admin.create_op(build(digest_of(bad), len(bad)))
        assert e.value.status == 400 and "FROM debian:12 is not the base base:1" in e.value.message

        view = await admin.create_op(build(digest, len(good)))
        _, (oa,) = await ops_of(a)
        assert isinstance(oa.op, m.BuildOp) and oa.op.base_id == img.record.config_digest
        assert await a.fetch_context(digest, limit=1 << 20) == good
        with pytest.raises(ApiError) as e:
            await b.fetch_context(digest, limit=1 << 20)  # b builds nothing with it
        assert e.value.status == 403
        await a.op_result(view.op_id, ok("built app:2", image_id="sha256:" + "1" * 64))
        assert (await admin.op(view.op_id)).state == "done"
        # a finished build's context is deleted; the node cannot fetch it any more
        assert not coord.coordinator.ops.context_path(digest).exists()
        with pytest.raises(ApiError) as e:
            await a.fetch_context(digest, limit=1 << 20)
        assert e.value.status == 403
    finally:
        for x in (a, b, origin):
            await x.close()


# --------------------------------------------------------------------------
# the agent side without Docker
# --------------------------------------------------------------------------
async def test_agent_runner_without_docker_reports_clearly_and_runs_each_op_once(
    tmp_path: Path,
) -> None:
    import asyncio

    from rainbowd.agent.docker.ops import OpRunner
    from rainbowd.lib.store import LayerStore

    store = LayerStore(tmp_path / "store")
    async with AgentClient("http://127.0.0.1:9") as api:
        runner = OpRunner("n1", None, store, api, asyncio.Lock())
        results: list[m.OpResult] = []

        async def report(r: m.OpResult) -> None:
            results.append(r)

        check = m.OpAssignment(op_id="o-1", op=m.DockerCheckOp(), timeout=30)
        await runner.run(check, report)
        await runner.run(check, report)  # delivered twice: carried out once
        run = m.OpAssignment(op_id="o-2", op=m.RunOp(image="app:1"), timeout=30)
        await runner.run(run, report)
    assert len(results) == 2
    first, second = results
    assert not first.ok and first.summary == "not reachable"
    assert "n1: Docker engine not reachable: no docker_url configured" in first.error
    assert not second.ok and "node n1 has no Docker engine configured" in second.error
