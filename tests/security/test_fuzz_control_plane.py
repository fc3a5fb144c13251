"""A bounded property-based fuzz of every control-plane endpoint (issue 14, item 8).

Bodies are generated from each endpoint's own schema (msgspec's type info):
valid values inside the declared bounds, mixed with hostile ones -- NaN,
infinities, huge and negative integers, lone surrogates, strings and lists
one past their limit, wrong types. They are posted to a real coordinator app
in-process (aiohttp test server, a real SQLite state dir) as msgpack or JSON.
Every answer must be below 500 and, when it has a body, strict JSON.

Then the coordinator is restarted on the same state dir, in-process and as
the real ``rbd-coordinator`` process, and a real distribution (agents over
SSH on loopback) must still succeed: nothing the fuzz got stored can break
the cluster.

Bounded: ``MAX_EXAMPLES`` bodies, no example database, so it runs in seconds.
"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any

import msgpack
import msgspec
import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestServer
from door_support import strict_json
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator_support import fake_image, register_request
from rainbowd.coordinator.core import Coordinator
from rainbowd.coordinator.http.app import create_app
from rainbowd.coordinator.limits import server_options
from rainbowd.coordinator.state.sqlite import SqliteStore
from rainbowd.core import messages as m
from rainbowd.core.chunks import MIN_CHUNK_SIZE
from rainbowd.devcluster.localcluster import LocalCluster, NodeSpec
from rainbowd.lib.client import AdminClient, AgentClient

pytestmark = pytest.mark.integration

#: bodies posted in all (each a few ms against the in-process app)
MAX_EXAMPLES = 600
REF = "rbd-demo:latest"

mi = msgspec.inspect

# -- hostile values ---------------------------------------------------------
#: non-finite values twice as often: they are what used to get stored
HOSTILE_FLOATS = st.sampled_from(
    [math.nan, math.inf, -math.inf, math.nan, math.inf, -math.inf, -1.0, 1e308, 1e14, 5e-324]
)
HOSTILE_INTS = st.one_of(
    st.sampled_from([-1, 2**31, 2**53 + 1, 2**63, 2**64 - 1, -(2**63)]),
    st.integers(min_value=-(2**70), max_value=2**70),
)
SURROGATES = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
HOSTILE_TEXT = st.one_of(
    st.text(alphabet=SURROGATES, min_size=1, max_size=3),
    st.builds(lambda a, s: a + s, st.text(max_size=5), st.text(alphabet=SURROGATES, min_size=1)),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=30),
)
WRONG_TYPE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    HOSTILE_FLOATS,
    st.text(max_size=5),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def _num(lo: float | None, hi: float | None, *, integer: bool) -> st.SearchStrategy[Any]:
    """A number inside the bounds; the hostile ones come from ``schema``."""
    if integer:
        return st.integers(
            min_value=int(lo) if lo is not None else -(2**40),
            max_value=int(min(hi, 2**40)) if hi is not None else 2**40,
        )
    return st.floats(
        min_value=lo if lo is not None else -1e9,
        max_value=min(hi, 1e9) if hi is not None else 1e9,
        allow_nan=False,
        allow_infinity=False,
    )


def _hostile(t: mi.Type) -> st.SearchStrategy[Any]:
    """A value of the right kind that breaks the field's rule (or the wrong kind)."""
    if isinstance(t, mi.FloatType):
        return HOSTILE_FLOATS
    if isinstance(t, mi.IntType):
        return HOSTILE_INTS
    if isinstance(t, mi.StrType):
        if t.max_length is not None:
            return st.one_of(HOSTILE_TEXT, st.just("x" * (t.max_length + 1)))
        return HOSTILE_TEXT
    if isinstance(t, mi.ListType | mi.DictType) and t.max_length is not None:
        return _past(t.max_length, VALID_TEXT)
    return WRONG_TYPE


def _past(limit: int, item: st.SearchStrategy[Any]) -> st.SearchStrategy[list[Any]]:
    """A list one past its limit (one value repeated: cheap to build and to send)."""
    return item.map(lambda x: [x] * (limit + 1))


#: real ids and digests of the coordinator under fuzz (filled in by _prepare), so valid
#: bodies reach past the "unknown id" checks into the code that stores values
VOCABULARY: list[str] = ["all"]
VALID_TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=12)


def mostly(valid: st.SearchStrategy[Any], *other: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``valid`` 8 times in 10, else one of ``other`` (hypothesis's one_of is not even)."""
    return st.sampled_from(range(10)).flatmap(lambda i: valid if i < 8 else other[i % len(other)])


def _schema(t: mi.Type, depth: int) -> st.SearchStrategy[Any]:
    if isinstance(t, mi.FloatType):
        return _num(t.ge, t.le, integer=False)
    if isinstance(t, mi.IntType):
        return _num(t.ge, t.le, integer=True)
    if isinstance(t, mi.BoolType):
        return st.booleans()
    if isinstance(t, mi.NoneType):
        return st.none()
    if isinstance(t, mi.LiteralType):
        return st.one_of(st.sampled_from(list(t.values)), st.text(max_size=8))
    if isinstance(t, mi.StrType):
        return st.one_of(st.sampled_from(VOCABULARY), VALID_TEXT)
    if isinstance(t, mi.ListType | mi.SetType | mi.FrozenSetType):
        item = _schema(t.item_type, depth + 1) if depth < 4 else st.none()
        return st.lists(item, max_size=3)
    if isinstance(t, mi.DictType):
        return st.dictionaries(
            _schema(t.key_type, depth + 1), _schema(t.value_type, depth + 1), max_size=3
        )
    if isinstance(t, mi.UnionType):
        return st.one_of([_schema(u, depth) for u in t.types])
    if isinstance(t, mi.StructType):
        return struct_doc(t, depth)
    return WRONG_TYPE


#: real values of the coordinator under fuzz, by field name (filled in by _prepare): a body
#: with these gets past "unknown node/id/join token" and into the code that stores values
KNOWN: dict[str, list[Any]] = {}


def _valid_field(name: str, t: mi.Type, depth: int) -> st.SearchStrategy[Any]:
    if name == "v":
        return st.just(m.PROTOCOL_VERSION)
    if KNOWN.get(name):
        return st.one_of(
            st.sampled_from(KNOWN[name]), st.sampled_from(KNOWN[name]), _schema(t, depth)
        )
    return _schema(t, depth)


def struct_doc(t: mi.StructType, depth: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    """A body of ``t``: valid field values, at most one of them (at this level) hostile."""
    fields = list(t.fields)

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        # the body itself breaks one field in most examples; a struct inside it rarely
        # does (else nearly every body would fail on a nested field before the top one)
        valid_share = 1 if depth == 0 else 9 * len(fields)
        bad = draw(st.sampled_from([-1] * valid_share + list(range(len(fields)))))
        doc: dict[str, Any] = {}
        if t.tag_field is not None:
            doc[t.tag_field] = t.tag
        for i, f in enumerate(fields):
            if i == bad:
                doc[f.encode_name] = draw(st.one_of(_hostile(f.type), WRONG_TYPE))
            elif f.required or draw(st.booleans()):
                doc[f.encode_name] = draw(_valid_field(f.encode_name, f.type, depth + 1))
        return doc

    return build()


def body_of(kind: type) -> st.SearchStrategy[dict[str, Any]]:
    info = mi.type_info(kind)
    assert isinstance(info, mi.StructType)
    return struct_doc(info)


# -- the endpoints ------------------------------------------------------------
AGENT = "agent"
ADMIN = "admin"
NOBODY = "nobody"

#: (method, path template, body type, who calls it); {t}/{i}/{l}/{o} are real ids
ENDPOINTS: list[tuple[str, str, type | None, str]] = [
    ("POST", "/v1/register", m.RegisterRequest, NOBODY),
    ("POST", "/v1/heartbeat", m.Heartbeat, AGENT),
    ("POST", "/v1/evictions", m.EvictRequest, AGENT),
    ("POST", "/v1/tags/resolve", m.ResolveTag, AGENT),
    ("POST", "/v1/transfers/{t}/progress", m.TransferProgress, AGENT),
    ("POST", "/v1/transfers/{t}/done", m.TransferDone, AGENT),
    ("POST", "/v1/transfers/{t}/failed", m.TransferFailed, AGENT),
    ("POST", "/v1/ingests/{i}/done", m.IngestDone, AGENT),
    ("POST", "/v1/ingests/{i}/failed", m.TaskFailed, AGENT),
    ("POST", "/v1/loads/l-unknown/done", m.LoadDone, AGENT),
    ("POST", "/v1/loads/l-unknown/failed", m.TaskFailed, AGENT),
    ("POST", "/v1/events", m.SecurityEvent, AGENT),
    ("POST", "/v1/ops/{o}/started", m.OpStarted, AGENT),
    ("POST", "/v1/ops/{o}/result", m.OpResult, AGENT),
    ("POST", "/v1/images", m.CreateImage, ADMIN),
    ("POST", "/v1/jobs", m.CreateJob, ADMIN),
    ("POST", "/v1/ops", m.CreateOp, ADMIN),
    ("GET", "/v1/assignments", None, AGENT),
    ("GET", "/v1/security-events", None, ADMIN),
    # what the console polls: any value stored above shows here
    ("GET", "/v1/nodes", None, ADMIN),
    ("GET", "/v1/jobs", None, ADMIN),
    ("GET", "/v1/images", None, ADMIN),
]
QUERY_VALUES = st.one_of(
    st.sampled_from(["0", "1", "-1", "nan", "inf", "1e400", "1.5", "99999999999999999999"]),
    st.text(max_size=6),
)


def _encode(doc: Any, ctype: str) -> tuple[bytes, str]:
    """msgpack when it can carry the value (no lone surrogates, 64-bit ints), else JSON."""
    if ctype == m.MSGPACK:
        try:
            return msgpack.packb(doc, use_bin_type=True), m.MSGPACK
        except (UnicodeEncodeError, OverflowError, TypeError, ValueError):
            pass
    return json.dumps(doc).encode(), m.JSON  # NaN/Infinity literals, \udXXX escapes: hostile


class _Target:
    """The in-process coordinator under fuzz and the ids its paths need."""

    def __init__(self, url: str, auth: dict[str, str], ids: dict[str, str]) -> None:
        self.url = url
        self.auth = auth
        self.ids = ids


async def _prepare(
    state_dir: Path, join: str, admin_token: str
) -> tuple[TestServer, SqliteStore, _Target]:
    """A coordinator with an origin, a demander, an image, a job, a transfer and an op."""
    store = SqliteStore(state_dir / "coordinator.sqlite")
    c = Coordinator(store, join_token=join, admin_token=admin_token, chunk_size=MIN_CHUNK_SIZE)
    server = TestServer(create_app(c), host="127.0.0.1", port=0)
    await server.start_server(**server_options())
    url = str(server.make_url("")).rstrip("/")
    origin, demander = AgentClient(url), AgentClient(url)
    await origin.open()
    await demander.open()
    try:
        o = await origin.register(
            msgspec.structs.replace(
                register_request("fz-origin", roles=["origin"]), join_token=join
            )
        )
        d = await demander.register(
            msgspec.structs.replace(register_request("fz-n1", speed=1e6), join_token=join)
        )
        img = fake_image("fuzz/app:1", sizes=(60_000,))  # one chunk: one piece, one transfer
        async with AdminClient(url, admin_token) as admin:
            await admin.add_image(
                m.CreateImage(ref="fuzz/app:1", source=m.ArchiveSource(path="/a"))
            )
            (ing,) = (await origin.assignments(0, 0, 0)).assignments
            assert isinstance(ing, m.IngestAssignment)
            await origin.ingest_done(
                ing.ingest_id, m.IngestDone(image=img.record, manifests=img.manifests)
            )
            # a second image stays "ingesting": its ingest id takes the fuzzed reports
            await admin.add_image(
                m.CreateImage(ref="fuzz/other:1", source=m.ArchiveSource(path="/b"))
            )
            items = (await origin.assignments(1, 0, 0)).assignments
            (ing2,) = [a for a in items if isinstance(a, m.IngestAssignment)]
            await admin.create_job(m.CreateJob(image="fuzz/app:1", targets=["fz-n1"]))
            (tr,) = (await demander.assignments(0, 0, 0)).assignments
            assert isinstance(tr, m.TransferAssignment)
            op = await admin.create_op(m.CreateOp(op=m.DockerCheckOp(), targets=["fz-n1"]))
    finally:
        await origin.close()
        await demander.close()
    digests = [*img.digests, *(c for mf in img.manifests for c in mf.chunks[:2])]
    VOCABULARY[:] = ["all", "fz-n1", "fz-origin", "fuzz/app:1", tr.transfer_id, *digests]
    new_ids = [f"fz-new{i}" for i in range(8)]
    KNOWN.update(
        node_id=new_ids,
        join_token=[join],
        address=["10.0.0.9"],
        host_key=["ssh-ed25519 AAAAfuzzhost"],
        client_key=["ssh-ed25519 AAAAfuzzclient"],
        ssh_port=[2222],
        peer=["fz-origin", "fz-n1"],
        seeder=["fz-origin"],
        transfer_id=[tr.transfer_id],
        layer=digests,
        digest=digests,
        holdings=[img.digests],
        layers=[img.digests],
        image=["fuzz/app:1"],
        targets=[["fz-n1"], ["all"]],
    )
    target = _Target(
        url,
        {
            AGENT: f"Bearer fz-n1:{d.credential}",
            ADMIN: f"Bearer {admin_token}",
            NOBODY: "",
            "origin": f"Bearer fz-origin:{o.credential}",
        },
        {"t": tr.transfer_id, "i": ing2.ingest_id, "o": op.op_id},
    )
    return server, store, target


async def _send(
    session: ClientSession,
    target: _Target,
    endpoint: int,
    doc: Any,
    ctype: str,
    query: dict[str, str],
) -> None:
    method, template, kind, who = ENDPOINTS[endpoint]
    path = template.format(**target.ids)
    headers = {"Accept": m.JSON}
    auth = target.auth["origin"] if "/ingests/" in path else target.auth[who]
    if auth:
        headers["Authorization"] = auth
    data = None
    if kind is not None:
        data, sent_as = _encode(doc, ctype)
        headers["Content-Type"] = sent_as
    async with session.request(
        method,
        target.url + path,
        data=data,
        headers=headers,
        params=query if kind is None else None,
    ) as resp:
        body = await resp.read()
        assert resp.status < 500, (method, path, doc, resp.status, body[:300])
        if body:
            assert resp.content_type == m.JSON, (path, resp.content_type)
            strict_json(body)
        accepted = resp.status < 300
    if accepted and method == "POST":  # whatever it stored, the console's views stay valid
        for view in ("/v1/nodes", "/v1/jobs"):
            await _admin_get(session, target, view)


def test_fuzz_every_endpoint_then_restart_and_distribute(tmp_path: Path, demo_image: Path) -> None:
    cluster = LocalCluster(
        tmp_path / "cluster",
        [NodeSpec("origin", roles=["origin"]), NodeSpec("a1"), NodeSpec("a2")],
        chunk_size=256 * 1024,
        heartbeat_interval=1.0,
    )
    state_dir = cluster.coordinator_dir
    state_dir.mkdir(parents=True)
    loop = asyncio.new_event_loop()
    try:
        server, store, target = loop.run_until_complete(
            _prepare(state_dir, cluster.join_token, cluster.admin_token)
        )
        session = loop.run_until_complete(_session())
        try:
            _fuzz(loop, session, target)
            for path in ("/v1/nodes", "/v1/jobs", "/v1/images", "/v1/ops", "/v1/security-events"):
                loop.run_until_complete(_admin_get(session, target, path))
        finally:
            loop.run_until_complete(session.close())
            loop.run_until_complete(server.close())
            store.close()
        # a restart on the same state, in-process: every row loads or is set aside
        again = SqliteStore(state_dir / "coordinator.sqlite")
        Coordinator(again, join_token="j", admin_token="a")
        again.close()
        # and the real coordinator process on that state, with real agents
        loop.run_until_complete(_distribute(cluster, demo_image))
    finally:
        loop.close()


async def _session() -> ClientSession:
    return ClientSession()


async def _admin_get(session: ClientSession, target: _Target, path: str) -> None:
    headers = {"Accept": m.JSON, "Authorization": target.auth[ADMIN]}
    async with session.get(target.url + path, headers=headers) as resp:
        assert resp.status == 200, path
        strict_json(await resp.read())


def _fuzz(loop: asyncio.AbstractEventLoop, session: ClientSession, target: _Target) -> None:
    bodies = [body_of(kind) if kind is not None else st.just(None) for _, _, kind, _ in ENDPOINTS]

    @st.composite
    def request(draw: st.DrawFn) -> tuple[int, Any, str, dict[str, str]]:
        endpoint = draw(st.integers(min_value=0, max_value=len(ENDPOINTS) - 1))
        doc = draw(mostly(bodies[endpoint], WRONG_TYPE))
        ctype = draw(st.sampled_from([m.MSGPACK, m.JSON]))
        names = ["cursor", "trust_version", "wait", "after", "limit"]
        query = draw(st.dictionaries(st.sampled_from(names), QUERY_VALUES, max_size=3))
        if "wait" in query:
            query["wait"] = "0"  # a long-poll would only make the fuzz slow
        return endpoint, doc, ctype, query

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(request())
    def one(req: tuple[int, Any, str, dict[str, str]]) -> None:
        endpoint, doc, ctype, query = req
        loop.run_until_complete(_send(session, target, endpoint, doc, ctype, query))

    one()


async def _distribute(cluster: LocalCluster, archive: Path) -> None:
    await cluster.start()
    try:
        async with cluster.admin() as admin:
            view = await admin.ingest(
                m.CreateImage(ref=REF, source=m.ArchiveSource(path=str(archive)), origin="origin"),
                timeout=60,
            )
            assert view.state == "ready", view.error
            job = await admin.distribute(m.CreateJob(image=REF, targets=["a1", "a2"]), timeout=90)
        assert job.state == "done", job.error
        assert {n.node_id for n in job.nodes} == {"a1", "a2"}
        assert all(n.state == "done" for n in job.nodes)
    finally:
        await cluster.stop()
