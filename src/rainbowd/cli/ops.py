"""``rbd`` commands for cluster operations: run, rm, build, images rm-nodes, docker check, ops.

    rbd run IMAGE --on NODE... [--name N] [--network MODE] [--wait S] [-- CMD...]
    rbd rm CONTAINER --on NODE... [--stop-timeout S]
    rbd build TAG --base IMAGE --context DIR [-f DOCKERFILE] --to NODE... [--network MODE]
    rbd images rm-nodes IMAGE --from NODE...
    rbd docker check --on NODE... [--install]
    rbd ops | rbd op ID

Each sends one operation to the coordinator, which fans it out to the agents,
then waits for every node and prints one line per node (``NODE  STATE
SUMMARY``, with output or the error indented below). Exit 0 when every node
succeeded, 1 when any failed, 2 for bad input (also when the coordinator
refuses the request as malformed or naming unknown things), 3 when the
coordinator cannot be reached.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from rainbowd.core import messages as m
from rainbowd.core.units import human_bytes
from rainbowd.lib.buildcontext import ContextError, pack_context
from rainbowd.lib.client import AdminClient, ApiError, CoordinatorUnreachable
from rainbowd.lib.dockerfile import check_from

#: extra seconds the CLI waits beyond an op's deadline for the last reports
WAIT_SLACK = 15.0


class OpsUsageError(Exception):
    """Bad input for an op command (exit 2); cli.main turns it into its UsageError."""


def split_command(argv: list[str]) -> tuple[list[str], list[str]]:
    """``rbd run ... -- CMD...``: the arguments before ``--`` and the command after it.

    argparse cannot take a command with its own options after subcommands,
    so it is cut off first; only for ``run``, the one command that takes one.
    """
    if "--" in argv:
        cut = argv.index("--")
        if "run" in argv[:cut]:
            return argv[:cut], argv[cut + 1 :]
    return argv, []


def add_parsers(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    images_sub: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    """Add the op commands to ``rbd`` (``sub``) and ``rbd images`` (``images_sub``)."""
    nodes = {"nargs": "+", "required": True, "metavar": "NODE", "help": "'all' or node ids"}
    r = sub.add_parser(
        "run",
        help="create and start a container on nodes from an image they hold in Docker",
        description="rbd run IMAGE --on NODE... [options] [-- CMD...]",
    )
    r.add_argument("image")
    r.add_argument("--on", dest="nodes", **nodes)  # type: ignore[arg-type]
    r.add_argument("--name", default="", help="container name (default: Docker picks one)")
    r.add_argument("--network", default="", help="Docker network mode, e.g. none or host")
    r.add_argument(
        "--wait",
        type=float,
        default=5.0,
        help="seconds to wait for the container to exit before reporting it running (<= 60)",
    )
    rm = sub.add_parser("rm", help="stop and remove a container on nodes")
    rm.add_argument("container")
    rm.add_argument("--on", dest="nodes", **nodes)  # type: ignore[arg-type]
    rm.add_argument("--stop-timeout", type=float, default=10.0, help="seconds before SIGKILL")
    b = sub.add_parser(
        "build",
        help="build a Dockerfile on nodes on top of an already distributed base image",
        description="Every FROM must name --base (or an earlier stage); the context is "
        "packed, uploaded to the coordinator and fetched by each node.",
    )
    b.add_argument("tag", help="name:tag of the image to build")
    b.add_argument("--base", required=True, help="the distributed image the Dockerfile builds on")
    b.add_argument("--context", required=True, type=Path, metavar="DIR", help="build context")
    b.add_argument("-f", "--file", default="Dockerfile", help="Dockerfile path inside DIR")
    b.add_argument("--to", dest="nodes", **nodes)  # type: ignore[arg-type]
    b.add_argument("--network", default="", help="network mode for RUN steps, e.g. none")
    rn = images_sub.add_parser(
        "rm-nodes",
        help="remove an image from nodes' Docker engines and their layer stores",
        description="Layers other images on a node still need stay, and so does the "
        "origin's copy; the coordinator stops using those nodes as seeders of what is removed.",
    )
    rn.add_argument("ref")
    rn.add_argument("--from", dest="nodes", **nodes)  # type: ignore[arg-type]
    d = sub.add_parser("docker", help="the Docker engine on nodes")
    dsub = d.add_subparsers(dest="docker_cmd", required=True)
    chk = dsub.add_parser("check", help="report each node's Docker engine (version, driver)")
    chk.add_argument("--on", dest="nodes", **nodes)  # type: ignore[arg-type]
    chk.add_argument(
        "--install", action="store_true", help="first run apt-get install -y docker.io on them"
    )
    for p in (r, rm, b, rn, chk):
        p.add_argument("-v", "--verbose", action="store_true", help="print every node's output")
    sub.add_parser("ops", help="list cluster operations")
    o = sub.add_parser("op", help="show an operation: per-node state, output, error")
    o.add_argument("op_id")


def _targets(nodes: list[str]) -> list[str]:
    return ["all"] if nodes == ["all"] else list(nodes)


async def run_cmd(args: argparse.Namespace, token: str) -> int:
    op = m.RunOp(
        image=args.image,
        name=args.name,
        cmd=list(getattr(args, "command", []) or []),
        network=args.network,
        wait=args.wait,
    )
    return await _submit(args, token, op, f"run {args.image}")


async def rm_cmd(args: argparse.Namespace, token: str) -> int:
    op = m.RemoveContainerOp(container=args.container, stop_timeout=args.stop_timeout)
    return await _submit(args, token, op, f"rm {args.container}")


async def build_cmd(args: argparse.Namespace, token: str) -> int:
    try:
        packed = pack_context(args.context, args.file)
        dockerfile = (args.context / args.file).read_text(errors="replace")
        check_from(dockerfile, args.base)
    except ContextError as e:
        raise OpsUsageError(str(e)) from None
    async with AdminClient(args.coordinator, token) as admin:
        try:
            await admin.upload_context(packed.digest, packed.data)
        except ApiError as e:
            if isinstance(e, CoordinatorUnreachable) or e.status not in (400, 413):
                raise
            raise OpsUsageError(str(e)) from None
    if not args.json:
        print(
            f"context {args.context}: {packed.files} file(s), {human_bytes(len(packed.data))} "
            "uploaded"
        )
    op = m.BuildOp(
        tag=args.tag,
        base=args.base,
        context_digest=packed.digest,
        context_size=len(packed.data),
        dockerfile=args.file,
        network=args.network,
    )
    return await _submit(args, token, op, f"build {args.tag} on {args.base}")


async def rm_nodes_cmd(args: argparse.Namespace, token: str) -> int:
    op = m.RemoveImageOp(image=args.ref)
    return await _submit(args, token, op, f"remove {args.ref} from nodes")


async def docker_cmd(args: argparse.Namespace, token: str) -> int:
    op = m.DockerCheckOp(install=args.install)
    what = "install and check Docker" if args.install else "check Docker"
    return await _submit(args, token, op, what)


async def ops_cmd(args: argparse.Namespace, token: str) -> int:
    async with AdminClient(args.coordinator, token) as admin:
        ops = await admin.ops()
    if args.json:
        print(json.dumps(m.to_wire(ops), indent=2))
        return 0
    if not ops.ops:
        print("no operations")
        return 0
    rows = [["OP", "KIND", "STATE", "NODES OK", "CREATED"]]
    for op in ops.ops:
        ok = sum(1 for n in op.nodes if n.state == "done")
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(op.created_at))
        rows.append([op.op_id, op.kind, op.state, f"{ok}/{len(op.nodes)}", when])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


async def op_cmd(args: argparse.Namespace, token: str) -> int:
    async with AdminClient(args.coordinator, token) as admin:
        view = await admin.op(args.op_id)
    if args.json:
        print(json.dumps(m.to_wire(view), indent=2))
    else:
        print(report(view, verbose=True))
    return 1 if view.state == "failed" else 0


async def _submit(args: argparse.Namespace, token: str, op: m.Op, what: str) -> int:
    req = m.CreateOp(op=op, targets=_targets(args.nodes))
    async with AdminClient(args.coordinator, token) as admin:
        try:
            view = await admin.create_op(req)
        except ApiError as e:
            if isinstance(e, CoordinatorUnreachable) or e.status not in (400, 404):
                raise
            raise OpsUsageError(str(e)) from None
        if not args.json:
            print(f"op {view.op_id}: {what} on {len(view.nodes)} node(s)", flush=True)
        wait = max(0.0, view.deadline - view.created_at) + WAIT_SLACK
        try:
            view = await admin.wait_op(view.op_id, timeout=wait)
        except TimeoutError:
            view = await admin.op(view.op_id)
    if args.json:
        print(json.dumps(m.to_wire(view), indent=2))
    else:
        print(report(view, verbose=args.verbose or isinstance(op, m.RunOp)))
    return 0 if view.state == "done" else 1


def report(view: m.OpView, *, verbose: bool = False) -> str:
    """One line per node, its output (when ``verbose`` or it failed) and error indented below."""
    width = max(len(n.node_id) for n in view.nodes) if view.nodes else 4
    lines: list[str] = []
    for n in view.nodes:
        summary = n.summary or ("" if n.state != "failed" else "failed")
        lines.append(f"{n.node_id.ljust(width)}  {n.state.ljust(7)}  {summary}".rstrip())
        if n.output and (verbose or n.state == "failed"):
            lines += [f"{' ' * width}  | {line}" for line in n.output.rstrip().splitlines()]
        if n.error:
            lines.append(f"{' ' * width}  error: {n.error}")
        if n.removed_layers:
            lines.append(f"{' ' * width}  removed layers: {', '.join(n.removed_layers)}")
    ok = sum(1 for n in view.nodes if n.state == "done")
    failed = sum(1 for n in view.nodes if n.state == "failed")
    waiting = len(view.nodes) - ok - failed
    tail = f"{view.op_id}: {ok} ok, {failed} failed"
    if waiting:
        tail += f", {waiting} still running (rbd op {view.op_id})"
    lines.append(tail)
    return "\n".join(lines)


COMMANDS: dict[str, Callable[[argparse.Namespace, str], Coroutine[Any, Any, int]]] = {
    "run": run_cmd,
    "rm": rm_cmd,
    "build": build_cmd,
    "docker": docker_cmd,
    "ops": ops_cmd,
    "op": op_cmd,
}
