"""Cluster operations on one node: run/remove containers, build, remove an image, check Docker.

The coordinator sends an :class:`~rainbowd.core.messages.OpAssignment`; :class:`OpRunner`
carries out exactly the typed operation it names against the local Docker
engine (aiodocker) and layer store and returns an
:class:`~rainbowd.core.messages.OpResult` -- never a shell command. The one program
the agent ever starts for an op is ``apt-get install -y docker.io``, with a
fixed argument list, and only for ``rbd docker check --install``.

Every refusal names the node and says what to do next ("distribute it first:
rbd distribute ..."), because the operator reads it on another machine. The
runner never raises: any error becomes a failed result, so one bad op cannot
take the agent down.

Removing an image changes what the node holds, so it runs under the agent's
holdings lock together with sending its report: a heartbeat is either built
and delivered before the layers go, or built after the coordinator has heard
they are gone (it never re-announces a deleted layer).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import aiodocker
import structlog

from rainbowd.agent.docker.loader import DockerLoader
from rainbowd.core import messages as m
from rainbowd.core.digest import Digest, short
from rainbowd.lib.buildcontext import MAX_CONTEXT, ContextError, digest_of, read_dockerfile
from rainbowd.lib.client import AgentClient, ApiError
from rainbowd.lib.dockerfile import check_from, check_triggers
from rainbowd.lib.store import LayerStore

log = structlog.get_logger(__name__)

#: output kept per result (the tail: that is where errors are)
MAX_OUTPUT = 32 * 1024
#: the only command an op may run, and only for ``docker check --install``
INSTALL_ARGV = ["apt-get", "install", "-y", "docker.io"]
#: seconds a Docker query may take during ``docker check``
CHECK_TIMEOUT = 10.0
#: op ids remembered so an assignment delivered twice is carried out once
SEEN_OPS = 1000


class OpFailed(Exception):
    """An op failed on this node; the message is the operator-facing error."""

    def __init__(self, error: str, *, summary: str = "failed", output: str = "") -> None:
        super().__init__(error)
        self.error = error
        self.summary = summary
        self.output = output


def _tail(text: str, limit: int = MAX_OUTPUT) -> str:
    return text if len(text) <= limit else "...\n" + text[-limit:]


def _docker_reason(e: aiodocker.DockerError) -> str:
    msg = e.message
    if isinstance(msg, dict):
        msg = msg.get("message", str(msg))
    return str(msg).strip()


class OpRunner:
    def __init__(
        self,
        node_id: str,
        loader: DockerLoader | None,
        store: LayerStore,
        api: AgentClient,
        holdings_lock: asyncio.Lock,
        *,
        docker_url: str = "",
        image_removed: Callable[[str], None] = lambda ref: None,
    ) -> None:
        self.node_id = node_id
        self.loader = loader
        self.store = store
        self.api = api
        self.holdings_lock = holdings_lock
        self.docker_url = docker_url
        self.image_removed = image_removed
        self._seen: OrderedDict[str, None] = OrderedDict()

    async def run(self, a: m.OpAssignment, report: Callable[[m.OpResult], Awaitable[None]]) -> None:
        """Carry out ``a`` within its timeout and hand the result to ``report``.

        An image removal and its report happen under the holdings lock (see
        the module docstring); other ops do not touch holdings.
        """
        if a.op_id in self._seen:
            # delivered again (e.g. the agent's cursor was reset before it acknowledged
            # it): starting a container twice is worse than reporting once
            log.info("operation already carried out; ignored", node=self.node_id, op=a.op_id)
            return
        self._seen[a.op_id] = None
        while len(self._seen) > SEEN_OPS:
            self._seen.popitem(last=False)
        removes = isinstance(a.op, m.RemoveImageOp)
        lock: contextlib.AbstractAsyncContextManager[Any] = (
            self.holdings_lock if removes else contextlib.nullcontext()
        )
        async with lock:
            result = await self._guarded(a)
            await report(result)

    async def _guarded(self, a: m.OpAssignment) -> m.OpResult:
        olog = log.bind(node=self.node_id, op=a.op_id, kind=type(a.op).__name__)
        olog.info("operation started")
        start = time.monotonic()
        try:
            async with asyncio.timeout(max(1.0, a.timeout - 5.0)):
                result = await self._dispatch(a)
        except OpFailed as e:
            result = m.OpResult(ok=False, summary=e.summary, error=e.error, output=_tail(e.output))
        except TimeoutError:
            result = m.OpResult(
                ok=False,
                summary="timed out",
                error=f"node {self.node_id}: gave up after {time.monotonic() - start:.0f}s",
            )
        except aiodocker.DockerError as e:
            result = m.OpResult(
                ok=False,
                summary="docker error",
                error=f"Docker on node {self.node_id} refused it: {_docker_reason(e)}",
            )
        except Exception as e:  # any bug becomes a reported failure, not a silent hang
            olog.exception("operation failed unexpectedly")
            result = m.OpResult(
                ok=False,
                summary="internal error",
                error=f"node {self.node_id}: unexpected {type(e).__name__}: {e} (see its log)",
            )
        olog.info("operation finished", ok=result.ok, summary=result.summary, error=result.error)
        return result

    async def _dispatch(self, a: m.OpAssignment) -> m.OpResult:
        op = a.op
        if isinstance(op, m.RunOp):
            return await self._run(op, a.op_id)
        if isinstance(op, m.RemoveContainerOp):
            return await self._rm(op)
        if isinstance(op, m.BuildOp):
            return await self._build(op, a.op_id)
        if isinstance(op, m.DockerCheckOp):
            return await self._docker_check(op)
        if isinstance(op, m.RemoveImageOp):
            return await self._rm_image(op)
        raise OpFailed(f"node {self.node_id} does not know operation {type(op).__name__}")

    def _docker(self) -> aiodocker.Docker:
        if self.loader is None:
            raise OpFailed(
                f"node {self.node_id} has no Docker engine configured (docker_url in its "
                "agent.toml); check it with: rbd docker check --on " + self.node_id,
                summary="no docker",
            )
        return self.loader.docker

    async def _image_id(self, docker: aiodocker.Docker, ref: str) -> str | None:
        try:
            info = await docker.images.inspect(ref)
        except aiodocker.DockerError as e:
            if e.status == 404:
                return None
            raise
        return str(info.get("Id", ""))

    # -- run / rm --------------------------------------------------------
    async def _run(self, op: m.RunOp, op_id: str) -> m.OpResult:
        docker = self._docker()
        if await self._image_id(docker, op.image) is None:
            raise OpFailed(
                f"image {op.image} is not loaded in Docker on node {self.node_id}; distribute "
                f"it first: rbd distribute {op.image} --to {self.node_id}",
                summary="image not loaded",
            )
        host: dict[str, Any] = {}
        if op.network:
            host["NetworkMode"] = op.network
        config: dict[str, Any] = {
            "Image": op.image,
            "Labels": {"rbd.op": op_id},
            "HostConfig": host,
        }
        if op.cmd:
            config["Cmd"] = list(op.cmd)
        try:
            container = await docker.containers.create(config=config, name=op.name or None)
        except aiodocker.DockerError as e:
            raise OpFailed(
                f"node {self.node_id}: Docker could not create the container: {_docker_reason(e)}",
                summary="not created",
            ) from None
        cid = str(container.id)
        label = op.name or cid[:12]
        try:
            await container.start()
        except aiodocker.DockerError as e:
            with contextlib.suppress(aiodocker.DockerError):
                await container.delete(force=True)
            raise OpFailed(
                f"node {self.node_id}: container {label} did not start: {_docker_reason(e)}",
                summary="not started",
            ) from None
        try:
            async with asyncio.timeout(op.wait):
                status = await container.wait()
        except TimeoutError:
            return m.OpResult(ok=True, summary=f"running ({label})", container=cid)
        code = int(status.get("StatusCode", -1))
        lines = await container.log(stdout=True, stderr=True)
        output = _tail("".join(lines))
        if code != 0:
            return m.OpResult(
                ok=False,
                summary=f"exited {code}",
                output=output,
                exit_code=code,
                container=cid,
                error=(
                    f"container {label} on {self.node_id} exited with {code}; "
                    f"remove it with: rbd rm {label} --on {self.node_id}"
                ),
            )
        return m.OpResult(
            ok=True, summary=f"exited 0 ({label})", output=output, exit_code=0, container=cid
        )

    async def _rm(self, op: m.RemoveContainerOp) -> m.OpResult:
        docker = self._docker()
        try:
            container = await docker.containers.get(op.container)
        except aiodocker.DockerError as e:
            if e.status == 404:
                raise OpFailed(
                    f"no container {op.container} on node {self.node_id}",
                    summary="no such container",
                ) from None
            raise
        running = bool((container["State"] or {}).get("Running"))
        if running:
            await container.stop(t=int(op.stop_timeout))
        await container.delete(force=True)
        what = "stopped and removed" if running else "removed"
        return m.OpResult(ok=True, summary=f"{what} {op.container}", container=str(container.id))

    # -- build -----------------------------------------------------------
    async def _build(self, op: m.BuildOp, op_id: str) -> m.OpResult:
        docker = self._docker()
        have = await self._image_id(docker, op.base)
        if have is None:
            raise OpFailed(
                f"base image {op.base} is not loaded in Docker on node {self.node_id}; "
                f"distribute it first: rbd distribute {op.base} --to {self.node_id}",
                summary="base not loaded",
            )
        if op.base_id and have != op.base_id:
            raise OpFailed(
                f"Docker's {op.base} on node {self.node_id} is image {short(have)}, not the "
                f"distributed {short(op.base_id)}; distribute it again: "
                f"rbd distribute {op.base} --to {self.node_id}",
                summary="base differs",
            )
        try:
            data = await self.api.fetch_context(op.context_digest, limit=MAX_CONTEXT)
        except ApiError as e:
            raise OpFailed(
                f"node {self.node_id} could not fetch the build context: {e}", summary="no context"
            ) from None
        if len(data) != op.context_size or digest_of(data) != op.context_digest:
            raise OpFailed(
                f"node {self.node_id}: the build context fetched is {digest_of(data)} "
                f"({len(data)} bytes), not {op.context_digest}; nothing was built",
                summary="context corrupt",
            )
        try:
            check_from(read_dockerfile(data, op.dockerfile), op.base)
            check_triggers(await self._onbuild(docker, op.base), op.base)
        except ContextError as e:
            raise OpFailed(f"node {self.node_id}: {e}", summary="refused") from None
        params: dict[str, Any] = {
            "t": op.tag,
            "dockerfile": op.dockerfile,
            "rm": "1",
            "forcerm": "1",
            # never reach a registry: the base is the distributed image, and the Dockerfile
            # names no other (rainbowd/dockerfile.py); the classic builder, pinned, has no
            # frontend image to fetch (BuildKit's "# syntax=" would)
            "pull": "0",
            "version": "1",
            "labels": json.dumps({"rbd.op": op_id, "rbd.base": op.base}),
        }
        if op.network:
            params["networkmode"] = op.network
        log_lines: list[str] = []
        image_id = ""
        async with docker._query(
            "build",
            "POST",
            params=params,
            headers={"content-type": "application/x-tar"},
            data=data,
            timeout=None,  # bounded by the op's own timeout
        ) as resp:
            async for raw in resp.content:
                for item in _json_items(raw):
                    if item.get("stream"):
                        log_lines.append(str(item["stream"]))
                    aux = item.get("aux")
                    if isinstance(aux, dict) and aux.get("ID"):
                        image_id = str(aux["ID"])
                    if item.get("error") or item.get("errorDetail"):
                        detail = item.get("errorDetail") or {}
                        msg = item.get("error") or detail.get("message") or str(item)
                        raise OpFailed(
                            f"build of {op.tag} on {self.node_id} failed: {str(msg).strip()}",
                            summary="build failed",
                            output="".join(log_lines),
                        )
        built = await self._image_id(docker, op.tag)
        if built is None:
            raise OpFailed(
                f"build of {op.tag} on {self.node_id} ended but Docker has no {op.tag}",
                summary="build failed",
                output="".join(log_lines),
            )
        return m.OpResult(
            ok=True,
            summary=f"built {op.tag} ({short(built)})",
            output=_tail("".join(log_lines)),
            image_id=image_id or built,
        )

    async def _onbuild(self, docker: aiodocker.Docker, ref: str) -> list[str]:
        """The ONBUILD triggers of image ``ref`` (they run in a build FROM it)."""
        info = await docker.images.inspect(ref)
        triggers = (info.get("Config") or {}).get("OnBuild") or []
        return [str(t) for t in triggers]

    # -- rm-image --------------------------------------------------------
    async def _rm_image(self, op: m.RemoveImageOp) -> m.OpResult:
        """Docker first (it may refuse: image in use), then the store; nothing half-done."""
        notes: list[str] = []
        if self.loader is not None:
            docker = self.loader.docker
            have = await self._image_id(docker, op.image)
            if have is None:
                notes.append("not in Docker")
            elif op.image_id and have != op.image_id:
                notes.append(f"Docker's {op.image} is another image ({short(have)}): left alone")
            else:
                try:
                    await docker.images.delete(op.image)
                except aiodocker.DockerError as e:
                    raise OpFailed(
                        f"Docker on node {self.node_id} refused to remove {op.image}: "
                        f"{_docker_reason(e)} (remove its containers first: rbd rm NAME "
                        f"--on {self.node_id}); its layers were left in the store",
                        summary="in use",
                    ) from None
                notes.append("removed from Docker")
            self.image_removed(op.image)
        removed: list[str] = []
        for digest in op.drop_layers:
            d = Digest(digest)
            if self.store.has(d):
                await asyncio.to_thread(self.store.remove, d)
                removed.append(digest)
            await asyncio.to_thread(self.store.discard_partial, d)
        kept = "" if op.drop_layers else " (layers kept: origin copy or needed by other images)"
        notes.append(f"{len(removed)} layer(s) dropped from the store{kept}")
        log.warning(
            "image removed from node",
            image=op.image,
            layers=[short(x) for x in removed],
            node=self.node_id,
        )
        return m.OpResult(ok=True, summary="; ".join(notes), removed_layers=removed)

    # -- docker check ----------------------------------------------------
    async def _docker_check(self, op: m.DockerCheckOp) -> m.OpResult:
        output = ""
        if op.install:
            output = await self._install()
        if self.loader is None:
            hint = (
                "installed; set docker_url in agent.toml and restart the agent to use it"
                if op.install
                else "set docker_url in agent.toml (or install with rbd docker check --install)"
            )
            raise OpFailed(
                f"node {self.node_id}: Docker engine not reachable: no docker_url configured; "
                + hint,
                summary="not reachable",
                output=output,
            )
        docker = self.loader.docker
        try:
            async with asyncio.timeout(CHECK_TIMEOUT):
                version = await docker.version()
                info = await docker.system.info()
        except (TimeoutError, aiodocker.DockerError, OSError) as e:
            raise OpFailed(
                f"node {self.node_id}: Docker engine at {self.docker_url} is not reachable: "
                f"{e or type(e).__name__}",
                summary="not reachable",
                output=output,
            ) from None
        summary = (
            f"Docker {version.get('Version', '?')} (API {version.get('ApiVersion', '?')}), "
            f"storage driver {info.get('Driver', '?')}, {info.get('Images', 0)} images, "
            f"{info.get('ContainersRunning', 0)}/{info.get('Containers', 0)} containers running"
        )
        return m.OpResult(ok=True, summary=summary, output=output)

    async def _install(self) -> str:
        """``apt-get install -y docker.io``: the fixed command, its output, OpFailed if it fails."""
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        try:
            proc = await asyncio.create_subprocess_exec(
                *INSTALL_ARGV,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
            )
        except OSError as e:
            raise OpFailed(
                f"node {self.node_id}: cannot run {' '.join(INSTALL_ARGV)}: {e} (is this Debian?)",
                summary="install failed",
            ) from None
        try:
            out, _ = await proc.communicate()
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        text = _tail(out.decode(errors="replace"))
        if proc.returncode != 0:
            raise OpFailed(
                f"node {self.node_id}: {' '.join(INSTALL_ARGV)} exited {proc.returncode}: "
                + (text.strip().splitlines() or ["no output"])[-1],
                summary="install failed",
                output=text,
            )
        return text


def _json_items(raw: bytes) -> list[dict[str, Any]]:
    """The JSON objects in one line of Docker's build stream (it may glue several together)."""
    text = raw.decode(errors="replace").strip()
    out: list[dict[str, Any]] = []
    decoder = json.JSONDecoder()
    pos = 0
    while pos < len(text):
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            break
        if isinstance(obj, dict):
            out.append(obj)
        pos = end
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return out
