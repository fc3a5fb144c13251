"""``rbd``: the admin CLI. Talks to the coordinator's admin API.

    rbd status                          (which coordinator leads; no token needed)
    rbd nodes
    rbd images [--wide]
    rbd images add REF --from SOURCE [--origin NODE] [--standby-origin NODE ...]
                   [--compression off|gzip|zstd]
                   [--platform OS/ARCH] [--insecure] [--ca-file PATH]
                   [--credentials-file PATH] [--no-wait]
    rbd images rm REF
    rbd distribute IMAGE --to all|NODE... [--detach | --wait]
    rbd [--json] COMMAND ... [--json]   (JSON output: before or after the subcommand)
    rbd events
    rbd jobs
    rbd job ID
    rbd demo
    rbd run | rm | build | images rm-nodes | docker check | ops | op   (see rainbowd.cli.ops)

The coordinator URL comes from --coordinator or $RBD_COORDINATOR: one URL, or
several separated by commas when a cluster runs standby coordinators (rbd then
finds the leader by itself and sends the token only to those); the admin
token from $RBD_ADMIN_TOKEN or the file named by --admin-token-file /
$RBD_ADMIN_TOKEN_FILE (default /var/lib/rbd/coordinator/admin-token).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import msgspec

from rainbowd.cli import ops as opscli
from rainbowd.cli.status import status_cmd
from rainbowd.core import messages as m
from rainbowd.core.sources import SourceError, parse_source
from rainbowd.core.units import human_bytes, human_rate
from rainbowd.lib.client import AdminClient, ApiError, CoordinatorUnreachable
from rainbowd.lib.coordinators import CoordinatorListError, parse_urls
from rainbowd.lib.log import configure as configure_logging
from rainbowd.lib.progress import follow_job, job_report, summary

DEFAULT_URL = "http://127.0.0.1:7700"
DEFAULT_TOKEN_FILE = Path("/var/lib/rbd/coordinator/admin-token")


class UsageError(Exception):
    pass


_FORMS = """SOURCE is one of:
  archive:PATH                              docker save output
  oci:PATH[:TAG]                            OCI image layout directory
  registry:HOST[:PORT]/REPO[:TAG|@sha256:D] OCI/Docker registry (v2 API)
  docker:IMAGE                              image in the origin's Docker engine"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rbd", description="rbd: image distribution admin CLI")
    p.add_argument(
        "--coordinator",
        metavar="URL[,URL...]",
        default=os.environ.get("RBD_COORDINATOR", DEFAULT_URL),
        help="the coordinator's URL, or every coordinator's, comma-separated: rbd asks the "
        "one that leads, and the admin token goes to no other address "
        f"(default: $RBD_COORDINATOR or {DEFAULT_URL})",
    )
    p.add_argument(
        "--admin-token-file",
        type=Path,
        default=Path(os.environ.get("RBD_ADMIN_TOKEN_FILE", DEFAULT_TOKEN_FILE)),
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print the API's JSON instead of tables (also accepted after the subcommand: "
        "rbd job ID --json)",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser(
        "status",
        help="which coordinator leads: each configured URL's role and the leader it names "
        "(exit 0 if exactly one leads, 1 if none does, 3 if none answers)",
    )
    sub.add_parser("nodes", help="list nodes with state, speed and holdings")
    im = sub.add_parser("images", help="list images, add or remove one")
    im.add_argument(
        "--wide",
        action="store_true",
        help="name the nodes holding each image, and the manifest digest to pull it by",
    )
    isub = im.add_subparsers(dest="images_cmd")
    add = isub.add_parser(
        "add",
        help="add an image from a source read by the origin node",
        description="Paths and credential files name files on the origin host. " + _FORMS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add.add_argument("ref", help="image name:tag as it will be known")
    where = add.add_mutually_exclusive_group(required=True)
    where.add_argument("--from", dest="source", metavar="SOURCE", help="where the origin reads it")
    where.add_argument("--archive", metavar="PATH", help="deprecated: same as --from archive:PATH")
    add.add_argument("--origin", default="", help="origin node id (default: the only origin)")
    add.add_argument(
        "--standby-origin",
        dest="standby_origins",
        action="append",
        default=[],
        metavar="NODE",
        help="an origin node that reads the same source and takes over if the origin dies "
        "while the image is ingested or distributed (repeat for more, in order)",
    )
    add.add_argument(
        "--compression",
        choices=("off", "gzip", "zstd"),
        default="off",
        help="compress uncompressed layers on ingest (registry blobs pass unchanged)",
    )
    add.add_argument("--platform", default="", help="registry: os/arch[/variant] from an index")
    add.add_argument("--insecure", action="store_true", help="registry: plain HTTP")
    add.add_argument("--ca-file", default="", help="registry: CA bundle on the origin host")
    add.add_argument(
        "--credentials-file", default="", help="registry: 'user:password' file on the origin host"
    )
    add.add_argument("--no-wait", action="store_true", help="return before the ingest ends")
    rm = isub.add_parser("rm", help="forget an image (its layers stay on the nodes)")
    rm.add_argument("ref")
    d = sub.add_parser("distribute", help="send an image to nodes and follow the job")
    d.add_argument("image")
    d.add_argument("--to", nargs="+", required=True, metavar="NODE", help="'all' or node ids")
    mode = d.add_mutually_exclusive_group()
    mode.add_argument("--detach", action="store_true", help="print the job id and return")
    mode.add_argument(
        "--wait", action="store_true", help="no live view; wait, print a summary, exit 0/1"
    )
    ev = sub.add_parser(
        "events", help="security events: refused host keys, bad chunks, quarantined seeders"
    )
    ev.add_argument("--limit", type=int, default=100, help="show the newest N (at most 1000)")
    sub.add_parser("jobs", help="list jobs")
    j = sub.add_parser("job", help="show a job: per-node state, seeder used and why, time")
    j.add_argument("job_id")
    demo = sub.add_parser("demo", help="run a local cluster that distributes a real image")
    demo.add_argument("--nodes", type=int, default=8, help="agents besides the origin (>= 1)")
    demo.add_argument("--payload-mib", type=int, default=64, help="size of the data layer")
    demo.add_argument("--dir", type=Path, default=None, help="work dir (default: a temp dir)")
    demo.add_argument("--keep", action="store_true", help="keep the work dir and logs")
    demo.add_argument("--no-docker", action="store_true", help="do not start a Docker engine")
    pulls = demo.add_mutually_exclusive_group()
    pulls.add_argument(
        "--pull",
        action="store_true",
        default=None,
        help="then pull the image through every node's registry mirror (default with skopeo)",
    )
    pulls.add_argument("--no-pull", dest="pull", action="store_false", help="do not pull")
    opscli.add_parsers(sub, isub)
    for path, sp in _subparsers(p):
        if path in JSON_COMMANDS:
            # SUPPRESS: absent after the subcommand, the flag keeps what was given before it
            # (argparse would otherwise reset it to False)
            sp.add_argument(
                "--json", action="store_true", default=argparse.SUPPRESS, help=JSON_HELP
            )
    return p


#: commands whose output has a JSON form; each takes --json after its name too
JSON_COMMANDS = frozenset(
    {
        ("status",),
        ("nodes",),
        ("images",),
        ("images", "add"),
        ("images", "rm-nodes"),
        ("distribute",),
        ("events",),
        ("jobs",),
        ("job",),
        ("run",),
        ("rm",),
        ("build",),
        ("docker", "check"),
        ("ops",),
        ("op",),
    }
)
JSON_HELP = "print the API's JSON instead of tables (same as rbd --json ...)"


def _subparsers(
    p: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every subcommand parser under ``p`` with its command path, e.g. ("images", "add")."""
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sp in action.choices.items():
                yield (*path, name), sp
                yield from _subparsers(sp, (*path, name))


def main(argv: list[str] | None = None) -> int:
    argv, command = opscli.split_command(sys.argv[1:] if argv is None else list(argv))
    args = _parser().parse_args(argv)
    args.command = command
    if args.cmd == "demo":
        from rainbowd.devcluster.demo import run_demo

        return asyncio.run(
            run_demo(
                nodes=args.nodes,
                payload_mib=args.payload_mib,
                workdir=args.dir,
                keep=args.keep,
                docker=not args.no_docker,
                pull=args.pull,
            )
        )
    # stdout is the command's output (tables, --json): the client's notes go to stderr, and
    # only warnings (a standby naming a leader that is not configured), not routine ones
    configure_logging("warning")
    try:
        try:
            args.coordinator = parse_urls(args.coordinator, "--coordinator / $RBD_COORDINATOR")
        except CoordinatorListError as e:
            raise UsageError(str(e)) from None
        if args.cmd == "status":  # health is unauthenticated: no token to read
            return asyncio.run(status_cmd(args))
        if args.cmd == "images" and args.images_cmd == "add":
            args.parsed_source = _source(args)  # a bad --from is reported before anything else
        token = _admin_token(args.admin_token_file)
        return asyncio.run(_COMMANDS[args.cmd](args, token))
    except (UsageError, opscli.OpsUsageError) as e:
        print(f"rbd: {e}", file=sys.stderr)
        return 2
    except CoordinatorUnreachable as e:
        print(f"rbd: {e}", file=sys.stderr)
        return 3
    except ApiError as e:
        print(f"rbd: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _admin_token(path: Path) -> str:
    if tok := os.environ.get("RBD_ADMIN_TOKEN"):
        return tok
    try:
        return path.read_text().strip()
    except OSError as e:
        raise UsageError(
            f"cannot read the admin token from {path} ({e.strerror}); set RBD_ADMIN_TOKEN or "
            "--admin-token-file"
        ) from None


def _admin(args: argparse.Namespace, token: str) -> AdminClient:
    return AdminClient(args.coordinator, token)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def _dump(obj: msgspec.Struct) -> None:
    print(json.dumps(m.to_wire(obj), indent=2))


async def _nodes(args: argparse.Namespace, token: str) -> int:
    async with _admin(args, token) as admin:
        nodes = await admin.nodes()
    if args.json:
        _dump(nodes)
        return 0
    rows = [["NODE", "STATE", "ADDRESS", "SPEED", "LAYERS", "LOAD", "DISK FREE", "ROLES", "BUSY"]]
    for n in sorted(nodes.nodes, key=lambda n: n.node_id):
        state = "QUARANTINED" if n.quarantined else n.state
        rows.append(
            [
                n.node_id,
                state,
                f"{n.address}:{n.ssh_port}",
                human_rate(n.speed_bps),
                str(n.holdings),
                f"{n.load:.2f}",
                human_bytes(n.disk_free),
                ",".join(
                    n.roles
                    + (["docker"] if n.docker else [])
                    + (["containerd"] if n.containerd else [])
                    + (["mirror"] if n.mirror else [])
                )
                or "-",
                "yes" if n.busy else "",
            ]
        )
    print(_table(rows))
    return 0


async def _images(args: argparse.Namespace, token: str) -> int:
    if args.images_cmd == "add":
        return await _images_add(args, token)
    if args.images_cmd == "rm":
        return await _images_rm(args, token)
    if args.images_cmd == "rm-nodes":
        return await opscli.rm_nodes_cmd(args, token)
    async with _admin(args, token) as admin:
        images = await admin.images()
    if args.json:
        _dump(images)
        return 0
    rows = [["REF", "STATE", "SIZE", "UNCOMPRESSED", "LAYERS", "NODES", "SOURCE", "ORIGIN"]]
    if args.wide:  # the digest to pull it by from a node's front door
        rows[0].append("DIGEST")
    for i in sorted(images.images, key=lambda i: i.ref):
        nodes = str(len(i.nodes))
        if args.wide:
            nodes += f" ({','.join(i.nodes)})" if i.nodes else ""
        rows.append(
            [
                i.ref,
                i.state + (f" ({i.error})" if i.error else ""),
                human_bytes(i.size) if i.state == "ready" else "-",
                human_bytes(i.uncompressed_size) if i.state == "ready" else "-",
                str(len(i.layers)),
                nodes,
                i.source or "-",
                # the standby origins after it, in the order they take over
                ",".join([i.origin, *i.standby_origins]),
            ]
        )
        if args.wide:
            rows[-1].append((i.digest + (" (upstream)" if i.upstream else "")) or "-")
    print(_table(rows))
    return 0


def _source(args: argparse.Namespace) -> m.ImageSource:
    """The source named by --from (or the deprecated --archive); UsageError if malformed."""
    text = args.source
    if args.archive is not None:
        print(f"rbd: --archive is deprecated; use --from archive:{args.archive}", file=sys.stderr)
        text = f"archive:{args.archive}"
    try:
        return parse_source(
            text,
            insecure=args.insecure,
            ca_file=args.ca_file,
            credentials_file=args.credentials_file,
            platform=args.platform,
        )
    except SourceError as e:
        raise UsageError(str(e)) from None


async def _images_add(args: argparse.Namespace, token: str) -> int:
    source = getattr(args, "parsed_source", None) or _source(args)
    req = m.CreateImage(
        ref=args.ref,
        source=source,
        origin=args.origin,
        compression=args.compression,
        standby_origins=args.standby_origins,
    )
    async with _admin(args, token) as admin:
        view = await admin.add_image(req)
        if not args.no_wait:
            view = await admin.wait_image(args.ref, interval=0.3)
    if args.json:
        _dump(view)
        return 1 if view.state == "failed" else 0
    if view.state == "failed":
        print(f"rbd: image {view.ref} failed: {view.error}", file=sys.stderr)
        return 1
    if view.state == "ingesting":
        print(f"image {view.ref}: ingesting on {view.origin} from {view.source}")
        return 0
    print(
        f"image {view.ref}: {view.state}, {len(view.layers)} layers, "
        f"{human_bytes(view.size)} stored ({human_bytes(view.uncompressed_size)} uncompressed), "
        f"from {view.source} via {view.origin}"
    )
    return 0


async def _images_rm(args: argparse.Namespace, token: str) -> int:
    async with _admin(args, token) as admin:
        await admin.remove_image(args.ref)
    print(
        f"image {args.ref} removed; its layers stay on the nodes that hold them "
        "(other images may share them)"
    )
    return 0


async def _distribute(args: argparse.Namespace, token: str) -> int:
    """Create the job and follow it; with --json no live view, the job's JSON at the end.

    ``--json --detach`` prints the job as created.
    """
    targets = ["all"] if args.to == ["all"] else list(args.to)
    async with _admin(args, token) as admin:
        job = await admin.create_job(m.CreateJob(image=args.image, targets=targets))
        if args.detach:
            if args.json:
                _dump(job)
            else:
                print(job.job_id)
            return 0
        if not args.json:
            print(f"job {job.job_id}: {args.image} to {len(job.nodes)} node(s)")
        final = await follow_job(admin, job.job_id, quiet=args.wait or args.json)
    if args.json:
        _dump(final)
    else:
        print(summary(final))
    return 0 if final.state == "done" else 1


async def _events(args: argparse.Namespace, token: str) -> int:
    async with _admin(args, token) as admin:
        events = await admin.security_events(limit=args.limit)
    if args.json:
        _dump(events)
        return 0
    if not events.events:
        print("no security events")
        return 0
    rows = [["TIME", "KIND", "PEER", "REPORTED BY", "DETAIL"]]
    for e in events.events:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.at))
        rows.append([when, e.kind, e.peer, e.reporter, e.detail])
    print(_table(rows))
    if events.total > len(events.events):
        print(f"(the newest {len(events.events)} of {events.total}; rbd events --limit N)")
    return 0


async def _jobs(args: argparse.Namespace, token: str) -> int:
    async with _admin(args, token) as admin:
        jobs = await admin.jobs()
    if args.json:
        _dump(jobs)
        return 0
    rows = [["JOB", "IMAGE", "STATE", "NODES DONE", "CREATED", "TOOK"]]
    for j in sorted(jobs.jobs, key=lambda j: j.created_at):
        done = sum(1 for n in j.nodes if n.state == "done")
        took = (j.finished_at or time.time()) - j.created_at
        rows.append(
            [
                j.job_id,
                j.image,
                j.state,
                f"{done}/{len(j.nodes)}",
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.created_at)),
                f"{took:.1f}s",
            ]
        )
    print(_table(rows))
    return 0


async def _job(args: argparse.Namespace, token: str) -> int:
    async with _admin(args, token) as admin:
        job = await admin.job(args.job_id)
    if args.json:
        _dump(job)
    else:
        print(job_report(job))
    return 0


_COMMANDS: dict[str, Callable[[argparse.Namespace, str], Coroutine[Any, Any, int]]] = {
    "nodes": _nodes,
    "images": _images,
    "distribute": _distribute,
    "events": _events,
    "jobs": _jobs,
    "job": _job,
    **opscli.COMMANDS,
}


if __name__ == "__main__":
    sys.exit(main())
