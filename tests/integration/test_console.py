"""The web console in a real headless Chromium, during a real distribution.

Real parts throughout: an rbd-coordinator and five rbd-agent processes on
loopback (LocalCluster), a 24 MiB-payload demo image, every agent's upload
capped (``RBD_AGENT_MAX_UPLOAD_MBPS``, the agent's own pacer) so the job takes
several seconds, and Debian's ``chromium`` driven by Playwright (no browser
download: ``executable_path``). The test checks what a person looking at the
page would see: a wrong token is refused with the coordinator's reason; with
the right one the nodes appear, the job's per-node progress moves while the
job runs without the page reloading, every node ends "done", and the transfer
graph shows one arrow per transfer the coordinator recorded, each with its
layer, rate and reason. Screenshots go to the test's tmp dir.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import struct
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from rainbowd.agent.dataplane.keys import load_or_create_key
from rainbowd.agent.dataplane.ssh_server import ChunkServer
from rainbowd.core import messages as m
from rainbowd.core.sched.scheduler import POLICIES
from rainbowd.devcluster.imagebuild import BUSYBOX, build_demo_image
from rainbowd.devcluster.localcluster import LocalCluster, NodeSpec
from rainbowd.lib.store import LayerStore
from testdeps import missing_dependency
from waiting import wait_until

pytestmark = pytest.mark.integration

REF = "rbd-console:latest"
CHUNK = 256 * 1024
PAYLOAD_MIB = 24
UPLOAD_MBPS = 64  # 8 MB/s per agent: the payload layer takes ~3 s per hop
NODES = ["origin", "n1", "n2", "n3", "n4"]
CHROMIUM_ARGS = [
    "--no-sandbox",  # root in a container: the sandbox needs user namespaces we may not have
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: what the label of a progress bar says, e.g. "42% · 10.1 MiB / 24.2 MiB"
PROGRESS_RE = re.compile(r"^(\d+)% · ([\d.]+) MiB / ([\d.]+) MiB$")


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        missing_dependency("chromium missing: apt-get install chromium (scripts/setup.sh)")
    assert path is not None
    return path


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not BUSYBOX.is_file():
        missing_dependency(f"{BUSYBOX} missing: apt-get install busybox-static")
    out = tmp_path_factory.mktemp("console") / "console.tar"
    return build_demo_image(out, ref=REF, payload_mib=PAYLOAD_MIB, seed=11)


@pytest.fixture
async def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[LocalCluster]:
    monkeypatch.setenv("RBD_AGENT_MAX_UPLOAD_MBPS", str(UPLOAD_MBPS))
    specs = [NodeSpec("origin", roles=["origin"], speed_hint_mbps=1000)]
    specs += [NodeSpec(n, speed_hint_mbps=1000 - 100 * i) for i, n in enumerate(NODES[1:])]
    # the graph's arrows are checked against Algorithm 1's plan and reasons (policy paper;
    # the default policy plans differently)
    c = LocalCluster(
        tmp_path / "cluster", specs, chunk_size=CHUNK, heartbeat_interval=0.5, policy="paper"
    )
    await c.start()
    try:
        yield c
    finally:
        await c.stop()


@pytest.fixture
async def small_cluster(tmp_path: Path) -> AsyncIterator[LocalCluster]:
    """Uncapped: origin, n1 (fast: it will seed), n2, n3."""
    specs = [
        NodeSpec("origin", roles=["origin"], speed_hint_mbps=1000),
        NodeSpec("n1", speed_hint_mbps=1000),
        NodeSpec("n2", speed_hint_mbps=400),
        NodeSpec("n3", speed_hint_mbps=200),
    ]
    c = LocalCluster(
        tmp_path / "cluster", specs, chunk_size=CHUNK, heartbeat_interval=1.0, policy="paper"
    )
    await c.start()
    try:
        yield c
    finally:
        await c.stop()


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        missing_dependency("playwright missing: pip install -e '.[test]' (scripts/setup.sh)")
    exe = chromium_path()
    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            await b.close()


def check_png(path: Path, min_width: int, min_height: int) -> tuple[int, int]:
    """A valid PNG of at least that size whose pixels are not all one colour; (w, h)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    width, height = struct.unpack(">II", data[16:24])
    assert width >= min_width and height >= min_height, (width, height)
    idat, pos = b"", 8
    while pos < len(data):
        n, k = struct.unpack(">I4s", data[pos : pos + 8])
        if k == b"IDAT":
            idat += data[pos + 8 : pos + 8 + n]
        pos += 12 + n
    pixels = zlib.decompress(idat)
    assert len(set(pixels[: len(pixels) // 2])) > 16, "the screenshot is (nearly) blank"
    assert len(data) > 20_000, f"screenshot only {len(data)} bytes"
    return width, height


async def log_in(page: Any, cluster: LocalCluster, n_nodes: int) -> None:
    await page.fill("#token", cluster.admin_token)
    await page.click("#login-form button[type=submit]")
    await page.wait_for_function(
        """(n) => [...document.querySelectorAll("#nodes tbody tr[data-node] .badge")]
            .filter((b) => b.textContent === "up").length === n""",
        arg=n_nodes,
        timeout=15_000,
    )


async def progress_of(page: Any, job_id: str) -> dict[str, tuple[str, str, int]]:
    """node -> (state badge, progress label, bytes done in KiB) as the job card shows it."""
    rows = await page.evaluate(
        """(job) => [...document.querySelectorAll(`.job[data-job="${job}"] tr[data-node]`)]
            .map((tr) => [tr.dataset.node, tr.querySelector(".badge").textContent,
                          tr.querySelector(".bar .label").textContent])""",
        job_id,
    )
    out = {}
    for node, state, label in rows:
        match = PROGRESS_RE.match(label)
        assert match, f"progress label of {node} reads {label!r}"
        out[node] = (state, label, round(float(match.group(2)) * 1024))
    return out


async def test_console_shows_a_live_distribution(
    cluster: LocalCluster, image: Path, browser: Any, tmp_path: Path
) -> None:
    async with asyncio.timeout(150):
        async with cluster.admin() as admin:
            view = await admin.ingest(
                m.CreateImage(ref=REF, source=m.ArchiveSource(path=str(image))), timeout=60
            )
            assert view.state == "ready", view.error

        page = await browser.new_page(viewport={"width": 1400, "height": 1100})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        await page.goto(cluster.url + "/console")
        # the page shows nothing of the cluster before login
        assert await page.is_visible("#login-form")
        assert not await page.is_visible("#nodes")

        # a wrong token: a clear message naming what was wrong, still no data
        await page.fill("#token", "not-the-admin-token")
        await page.click("#login-form button[type=submit]")
        await page.wait_for_selector("#login-error:not([hidden])", timeout=10_000)
        message = await page.inner_text("#login-error")
        assert "refused this admin token" in message and "admin token is wrong" in message
        assert not await page.is_visible("#nodes")

        # the right token: every node appears, up, with its speed
        await log_in(page, cluster, len(NODES))
        assert not await page.is_visible("#login-form")
        rows = await page.locator("#nodes tbody tr[data-node]").all_inner_texts()
        assert sorted(r.split("\t")[0].strip() for r in rows) == sorted(NODES)
        assert "MB/s" in await page.inner_text("#nodes tr[data-node=n1]")
        assert "rbd-console:latest" in await page.inner_text("#images")
        assert "no security events" in await page.inner_text("#events")
        # a marker in the page's JS heap: it survives only if the page never reloads
        await page.evaluate("window.__rbdNoReload = 42")

        async with cluster.admin() as admin:
            job = await admin.create_job(m.CreateJob(image=REF, targets=["all"]))
        await page.wait_for_selector(f'.job[data-job="{job.job_id}"]', timeout=10_000)

        # while the job runs, the progress shown moves on its own
        seen: dict[str, set[int]] = {n: set() for n in NODES}
        totals: list[int] = []
        mid_shot = tmp_path / "console-running.png"
        shot_taken = False

        async def watch() -> bool:
            """One look at the page; True once it shows every node done."""
            nonlocal shot_taken
            shown = await progress_of(page, job.job_id)
            for node, (_, _, kib) in shown.items():
                seen[node].add(kib)
            totals.append(sum(kib for _, _, kib in shown.values()))
            moving = await page.locator("#graph g.edge.active").count()
            partial = [n for n, (st, _, _) in shown.items() if st == "transferring"]
            if not shot_taken and moving and partial and len(set(totals)) >= 3:
                await page.screenshot(path=str(mid_shot), full_page=True)
                shot_taken = True
            return all(st == "done" for st, _, _ in shown.values())

        await wait_until(watch, timeout=90, what="the page to show the job done on every node")
        # (a job too fast to watch shows no transfer in flight: raise the payload then)
        assert shot_taken, "no moment with a transfer in flight was seen"
        changing = [n for n in NODES[1:] if len(seen[n]) >= 3]
        assert changing, f"no node's progress changed while the job ran: {seen}"
        assert totals[-1] > totals[0], f"progress did not advance: {totals}"
        assert await page.evaluate("window.__rbdNoReload") == 42, "the page reloaded"

        # the job's card ends done for every node at 100%
        await page.wait_for_function(
            """(job) => document.querySelector(`.job[data-job="${job}"] .job-head .badge`)
                .textContent === "done" """,
            arg=job.job_id,
            timeout=15_000,
        )
        final = await progress_of(page, job.job_id)
        assert {n: s for n, (s, _, _) in final.items()} == dict.fromkeys(NODES, "done")
        assert all(label.startswith("100% ") for _, label, _ in final.values())

        # the transfer graph: one arrow per recorded transfer, with layer, rate and reason
        # (the reason's rule and numbers, read from the record: no sentence is parsed)
        async with cluster.admin() as admin:
            done = await admin.job(job.job_id)
        want = sorted(
            (u.seeder, ns.node_id, u.layer, u.reason.rule)
            for ns in done.nodes
            for u in ns.transfers
        )
        assert len(want) >= 3 * (len(NODES) - 1)  # every node got the image's 3 layers
        await page.wait_for_function(
            "(n) => document.querySelectorAll('#graph g.edge:not(.active)').length === n",
            arg=len(want),
            timeout=10_000,
        )
        edges = await page.evaluate(
            """() => [...document.querySelectorAll("#graph g.edge")].map((g) => [
                g.dataset.seeder, g.dataset.demander, g.dataset.layer, g.dataset.rule,
                g.querySelector("text.what").textContent, g.querySelector("text.why").textContent,
                g.querySelector("title").textContent])"""
        )
        assert sorted((s, d, la, r) for s, d, la, r, *_ in edges) == want
        for _, _, layer, rule, what, why, title in edges:
            assert what.startswith(layer.split(":")[1][:12]) and "MB/s" in what
            # the policy, its rule and the rate it gave on the arrow; the whole reason on hover
            assert why.split(": ")[0] in POLICIES and rule in why and "MB/s" in why, why
            assert f": {rule} (seeder " in title and "slower idle" in title, title
        boxes = await page.locator("#graph g.box").evaluate_all(
            "(gs) => gs.map((g) => g.dataset.node)"
        )
        assert sorted(boxes) == sorted(NODES)
        # the origin had the data: leftmost; every other node is to its right
        xs = await page.evaluate(
            """() => Object.fromEntries([...document.querySelectorAll("#graph g.box")].map(
                (g) => [g.dataset.node, g.transform.baseVal.getItem(0).matrix.e]))"""
        )
        assert all(xs["origin"] < xs[n] for n in NODES[1:]), xs
        table = await page.locator("#edges tbody tr").all_inner_texts()
        rules = {r for *_, r in want}
        assert len(table) == len(want), table
        # the full reason: its rule and every number by name
        assert all(any(r in row for r in rules) and "seeder " in row for row in table), table

        final_shot = tmp_path / "console-done.png"
        await page.screenshot(path=str(final_shot), full_page=True)
        check_png(mid_shot, 1400, 900)
        check_png(final_shot, 1400, 900)
        assert errors == [], f"JavaScript errors on the page: {errors}"
        print(f"job {job.job_id}: {len(totals)} looks in the browser; screenshots in {tmp_path}")


async def test_console_shows_a_refused_host_key_and_the_quarantine(
    small_cluster: LocalCluster, demo_image: Path, browser: Any, tmp_path: Path
) -> None:
    """A real spoofed seeder (another host key on n1's address) as the operator sees it."""
    cluster = small_cluster
    async with asyncio.timeout(120):
        async with cluster.admin() as admin:
            view = await admin.ingest(
                m.CreateImage(ref="rbd-demo:latest", source=m.ArchiveSource(path=str(demo_image)))
            )
            assert view.state == "ready", view.error
            first = await admin.distribute(
                m.CreateJob(image="rbd-demo:latest", targets=["n1"]), timeout=60
            )
            assert first.state == "done", first.error
            n1 = next(n for n in (await admin.nodes()).nodes if n.node_id == "n1")

        page = await browser.new_page(viewport={"width": 1400, "height": 1000})
        await page.goto(cluster.url + "/console")
        await log_in(page, cluster, 4)
        # the token is asked once per tab: a reload keeps the console open
        await page.reload()
        await page.wait_for_selector("#nodes tbody tr[data-node=n1]", timeout=10_000)
        assert not await page.is_visible("#login-form")
        assert "no security events" in await page.inner_text("#events")

        # n1 dies; an imposter with another host key takes its address and port
        cluster.kill("n1")
        imposter = ChunkServer(
            LayerStore(tmp_path / "imposter"),
            load_or_create_key(tmp_path / "imposter-key"),
            node_id="n1",
        )
        await imposter.start(n1.address, n1.ssh_port)
        try:
            async with cluster.admin() as admin:
                job = await admin.distribute(
                    m.CreateJob(image="rbd-demo:latest", targets=["n2", "n3"]), timeout=60
                )
        finally:
            await imposter.close()
        assert job.state == "done", job.error

        # what the operator sees: the refused host key, by whom, about n1; n1 quarantined
        await page.wait_for_function(
            """() => [...document.querySelectorAll("#events tbody tr")]
                .some((tr) => tr.innerText.includes("host_key_mismatch"))""",
            timeout=10_000,
        )
        rows = await page.locator("#events tbody tr").all_inner_texts()
        refused = [r.split("\t") for r in rows if "host_key_mismatch" in r]
        assert refused and all(c[3].strip() == "n1" for c in refused), rows
        # the demanders' claims, and the coordinator's own probe that confirmed them
        assert all(c[2].strip() in ("n2", "n3", "coordinator") for c in refused), rows
        assert any(c[2].strip() in ("n2", "n3") for c in refused), rows
        await page.wait_for_function(
            """() => document.querySelector("#nodes tr[data-node=n1] .badge")
                .textContent === "quarantined" """,
            timeout=10_000,
        )
        reason = await page.get_attribute("#nodes tr[data-node=n1] td:nth-child(2)", "title")
        assert reason and "host key" in reason, reason
        shown = await page.inner_text("#nodes tr[data-node=n1] td:nth-child(2)")
        assert "quarantined" in shown and "host key" in shown, shown  # why, without hovering
        assert "1 quarantined" in await page.inner_text("#nodes-summary")
        shot = tmp_path / "console-security.png"
        await page.screenshot(path=str(shot), full_page=True)
        check_png(shot, 1400, 900)
