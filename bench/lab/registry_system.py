"""The registry-only baseline: every node pulls the image from one registry at once.

This is what a cluster without P2P does (``docker pull`` on every node), and
what PAPER.md's N*S/u_registry is about: the registry's uplink is shared by
all demanders. The registry is the real one (Debian's ``docker-registry``,
CNCF distribution) inside the *origin* node's namespace, listening on the
origin's bridge address over plain HTTP, so its upload is the origin's shaped
link. The client is skopeo (containers/image): it speaks the same Registry
HTTP API V2 a ``docker pull`` does (manifest GET, one GET per blob, every blob's
digest checked), without needing a dockerd per node. It is not the engine's
own client library (dockerd uses distribution's), which the notes say.

Untimed set-up: the registry's config (shared with the tests,
rainbowd.devcluster.registryconf), the registry started and polled until ``/v2/``
answers, the archive pushed into it with skopeo from inside the origin.
``--preserve-digests`` keeps the archive's uncompressed layers as they are:
without it skopeo gzips them on the way in, and the pull would move fewer
bytes than the S every other system (and T*) is measured with.
``compress=True`` gives the gzipped push a real registry would hold.

Timed: one ``skopeo copy docker://<origin>:<port>/<ref> dir:<node_dir>/image``
per demander, all started at once; a node's time is when its skopeo exited 0.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.lab.baseline import (
    NO_PROXY_ENV,
    archive_ref,
    run_baseline,
    run_to_end,
    tool_version,
    wait_clients,
    wait_until_answers,
)
from bench.lab.env import LabEnv
from bench.lab.result import SystemResult, layer_sizes
from rainbowd.devcluster.registryconf import (
    REGISTRY_BIN,
    REGISTRY_ENV,
    SKOPEO_BIN,
    registry_config,
    skopeo_push_argv,
)


async def start_registry(
    env: LabEnv, system: str, host: str, *, compress: bool, timeout: float
) -> subprocess.Popen[bytes]:
    """A docker-registry on ``host`` in the origin's namespace, holding ``env.image``.

    Untimed set-up shared by the registry-only baseline and the rollout through rbd's
    front doors (rollout_system.py): started, polled until ``/v2/`` answers, and the
    archive pushed with skopeo from inside the origin (module docstring: the digests).
    Its log is ``<system>-<origin>-registry`` (one line per response, with its bytes).
    """
    origin = env.origin
    odir = env.node_dir(system, origin)
    storage = odir / "storage"
    shutil.rmtree(storage, ignore_errors=True)
    storage.mkdir()
    config = odir / "config.yml"
    config.write_text(registry_config(storage=storage, addr=host))
    reg_log = f"{system}-{origin}-registry"
    registry = env.spawn(
        origin, reg_log, [REGISTRY_BIN, "serve", str(config)], env=REGISTRY_ENV, central=True
    )
    await wait_until_answers(
        env,
        origin,
        f"http://{host}/v2/",
        what="docker-registry",
        log_name=reg_log,
        process=registry,
        ok=lambda r: r.status == 200,
        timeout=timeout,
    )
    push = skopeo_push_argv(
        env.image,
        f"{host}/{archive_ref(env.image)}",
        extra=() if compress else ("--preserve-digests",),
    )
    await run_to_end(
        env, origin, f"{system}-{origin}-push", push, what="skopeo push", timeout=timeout
    )
    return registry


@dataclass
class RegistrySystem:
    """Concurrent skopeo pulls of ``env.image`` from a docker-registry on the origin."""

    name: str = "registry"
    port: int = 5000
    #: gzip the layers on push (what a real registry holds) instead of keeping the archive's bytes
    compress: bool = False
    #: bound on each untimed set-up step (registry start, push)
    setup_timeout: float = 60.0

    async def run(self, env: LabEnv, *, timeout: float) -> SystemResult:
        """Push into the origin's registry (untimed), then time every demander's pull."""
        return await run_baseline(self.name, env, timeout, self._run)

    async def _run(self, env: LabEnv, timeout: float, result: SystemResult) -> None:
        origin = env.origin
        host = f"{env.address(origin)}:{self.port}"
        ref = archive_ref(env.image)
        result.notes.update(self._notes(host, ref))

        # -- untimed: the registry, and the image in it -------------------------
        registry = await start_registry(
            env, self.name, host, compress=self.compress, timeout=self.setup_timeout
        )

        # -- timed: every demander pulls at once --------------------------------
        seconds, failed = await self.pull_all(env, lambda _node: host, ref, timeout)
        result.node_seconds.update(seconds)
        result.failed.update(failed)
        if registry.poll() is not None:
            result.notes["registry_exit"] = registry.returncode

    async def pull_all(
        self, env: LabEnv, host_of: Callable[[str], str], ref: str, timeout: float
    ) -> tuple[dict[str, float], dict[str, str]]:
        """Time every demander's skopeo pull of ``ref`` from ``host_of(node)``, all at once.

        (node_seconds, failed); a pull is done when its skopeo exits 0 and what it
        wrote is the image (every blob there at its size; skopeo checked the digests).
        """
        targets: dict[str, Path] = {}
        for node in env.demanders:
            d = env.node_dir(self.name, node) / "image"
            shutil.rmtree(d, ignore_errors=True)
            targets[node] = d
        clients = {}
        env.timed_start()
        start = time.monotonic()
        for node, d in targets.items():
            log_name = f"{self.name}-{node}"
            argv = self.pull_argv(host_of(node), ref, d)
            clients[node] = (env.spawn(node, log_name, argv, env=NO_PROXY_ENV), log_name)
        seconds, failed = await wait_clients(
            env,
            clients,
            start=start,
            timeout=timeout,
            check=lambda _node: None,
            exit_means_done=True,
        )
        env.timed_end()
        # -- untimed: what landed is the image (skopeo checked every digest) ----
        layers = layer_sizes(env.image)
        for node in list(seconds):
            problem = self._check_pulled(targets[node], layers)
            if problem:
                del seconds[node]
                failed[node] = f"{node}: skopeo exited 0 but {problem}"
        return seconds, failed

    def pull_argv(self, host: str, ref: str, dest: Path) -> list[str]:
        """The demander's pull: skopeo checks each blob's digest as it writes it."""
        return [
            SKOPEO_BIN,
            "--insecure-policy",
            "copy",
            "--src-tls-verify=false",
            f"docker://{host}/{ref}",
            f"dir:{dest}",
        ]

    def _check_pulled(self, dest: Path, layers: list[tuple[str, int]]) -> str:
        """'' if ``dest`` holds a manifest whose every blob is there at its size."""
        try:
            manifest = json.loads((dest / "manifest.json").read_text())
        except (OSError, ValueError) as e:
            return f"no readable manifest.json in {dest}: {e}"
        blobs = [manifest.get("config", {}), *manifest.get("layers", [])]
        for b in blobs:
            digest, size = str(b.get("digest", "")), b.get("size")
            f = dest / digest.partition(":")[2]
            if not f.is_file() or f.stat().st_size != size:
                return f"blob {digest} is missing or not {size} bytes in {dest}"
        got = [(str(b["digest"]), int(b["size"])) for b in manifest.get("layers", [])]
        if not self.compress and got != layers:
            return f"its layers {got} are not the archive's {layers}"
        return ""

    def _notes(self, host: str, ref: str) -> dict[str, Any]:
        return {
            "docker-registry": tool_version([REGISTRY_BIN, "--version"]),
            "skopeo": tool_version([SKOPEO_BIN, "--version"]),
            "registry": f"http://{host} in the origin's namespace, filesystem storage, no auth",
            "push": "skopeo copy docker-archive: -> docker:// "
            + (
                "(layers gzipped by skopeo)"
                if self.compress
                else "--preserve-digests (the archive's uncompressed layers, digests unchanged)"
            ),
            "pull": f"skopeo --insecure-policy copy --src-tls-verify=false docker://{host}/{ref} "
            "dir:<node_dir>/image (every node at once; done = exit 0)",
            "client": "skopeo (containers/image) speaks the same Registry HTTP API V2 as "
            "docker pull and verifies every blob digest; docker pull itself would need a "
            "dockerd per node (and uses distribution's client code, not containers/image)",
        }
