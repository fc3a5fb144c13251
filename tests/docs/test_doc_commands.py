"""Every command README.md and deploy/INSTALL.md show, run against a local cluster.

The fenced ``sh`` blocks of both files are read line by line (a trailing
``\\`` joins lines, a ``  # comment`` is cut). Each command must have an entry
in :data:`COMMANDS`, keyed by its exact text:

- :class:`Run`: it runs here, in doc order, in one work directory, against one
  local cluster (an origin and node-07..node-09, the names the README uses).
  Paths and addresses of a real deployment are mapped onto the cluster and the
  work directory (:func:`_substitutions`); where a command cannot run as
  written, ``as_run`` is what runs instead and ``why`` says why; ``expect`` is
  its exit code (1 where the docs' command needs a Docker engine the nodes here
  lack: it still runs, through the CLI, the coordinator and every agent).
- :class:`Skip`: it cannot run here (systemd, apt on a fresh host, the
  host's firewall, a benchmark of minutes); ``why`` says so, and
  ``covered_by`` names the test that runs it, or its equivalent, where one does.

A command added to the docs fails :func:`test_every_doc_command_is_listed`
until it is given an entry; an entry whose command left the docs fails it
too. Nothing here skips on its own: a missing tool (busybox-static for the
image, skopeo, curl) skips only off CI (``tests/support/testdeps.py``), and fails the
run under ``CI=true``.

The admin token: the docs rely on the CLI's default file
(``/var/lib/rbd/coordinator/admin-token``, "root on the coordinator host needs
no setup"); here ``RBD_ADMIN_TOKEN_FILE`` names the cluster's copy instead,
until INSTALL.md's own ``export`` lines take over.
"""

from __future__ import annotations

import asyncio
import grp
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from rainbowd.devcluster.localcluster import LocalCluster, NodeSpec
from testdeps import missing_dependency

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DOCS = ("README.md", "deploy/INSTALL.md")
BIN = Path(sys.executable).parent
#: the README's node names; the origin reads the images
NODES = ("node-07", "node-08", "node-09")
#: seconds one documented command may take (a distribution of the demo image to 3 nodes)
COMMAND_TIMEOUT = 180.0
#: the docs' Dockerfile context for `rbd build ... --context ./app`
DOCKERFILE = "FROM myapp:1.0\nRUN echo built by rbd > /built\n"

NO_DOCKER = (
    "the nodes here have no Docker engine: the command runs through the CLI, the coordinator "
    "and every agent, and each node reports that (exit 1); with Docker it is "
    "tests/integration/test_cluster_ops.py"
)
#: the tests that run the coordinator on PostgreSQL (a throwaway server of the same package)
POSTGRES_COVERED = (
    "tests/coordinator/test_coordinator_units.py::test_cli_starts_serves_and_stops_on_sigterm"
)
RESTORE_COVERED = (
    "tests/faults/test_coordinator_restore.py::"
    "test_a_restored_backup_brings_every_node_back_with_its_own_credential"
)
#: the tests that run a standby pair (two coordinators on one PostgreSQL) as INSTALL.md sets it up
PAIR_COVERED = (
    "tests/cli/test_rbd_status.py::test_a_standby_pair_before_and_after_the_leader_is_killed"
)
#: a standby pair's second host: not here (the pair runs in tests/faults and tests/cli)
SECOND_HOST = "a second coordinator host: the pair's tests start both coordinators themselves"
SYSTEMD = "systemd units are not run on a test host (tests/docs/test_deploy_configs.py checks them)"


@dataclass(frozen=True)
class Run:
    """A documented command that runs here."""

    why: str = ""  # required when as_run or expect differ from the docs
    as_run: str = ""  # what runs instead of the docs' text; {name} from _substitutions
    expect: int = 0  # exit code
    stdin: str = ""  # fed to it ({name} as in as_run)
    output: str = ""  # a regular expression its stdout must match
    json: bool = False  # its stdout is JSON


@dataclass(frozen=True)
class Skip:
    """A documented command that cannot run here, and why."""

    why: str
    covered_by: str = ""  # tests/...py::test_name that runs it or its equivalent


WHEEL = "tests/docs/test_wheel.py::test_make_wheel_installs_as_install_md_says_and_runs"

COMMANDS: dict[str, Run | Skip] = {
    # -- README.md: quick start -----------------------------------------------------
    "make demo": Skip(
        "needs Docker and minutes; the test runs `rbd demo`, what make demo runs after setup",
        covered_by="tests/integration/test_demo.py::test_rbd_demo_distributes_and_runs",
    ),
    "make test": Skip("the whole suite, this test included: it would run itself"),
    # -- README.md: using it ----------------------------------------------------------
    "rbd images add myapp:1.0 --from registry:registry.example.com:5000/team/myapp:1.0": Run(
        why="no registry.example.com here: the same image from an archive, so the commands "
        "below find myapp:1.0 (registry sources: tests/integration/test_registry_origin.py)",
        as_run="rbd images add myapp:1.0 --from archive:{archive}",
        output=r"myapp:1\.0: ready",
    ),
    "rbd images add tools:2 --from archive:/srv/images/tools.tar --compression zstd": Run(
        output=r"tools:2: ready"
    ),
    "rbd images add base:12 --from oci:/srv/layouts/base:12": Run(output=r"base:12: ready"),
    "rbd images add local:1 --from docker:local:1": Skip(
        "needs the origin's Docker engine holding local:1",
        covered_by="tests/integration/test_engine_origin.py::test_ingest_from_engine",
    ),
    "rbd images --wide": Run(output=r"myapp:1\.0\s+ready"),
    "rbd distribute myapp:1.0 --to all": Run(output=r"done: myapp:1\.0 on 4/4 nodes"),
    "rbd distribute myapp:1.0 --to node-07 node-08 --wait": Run(output=r"on 2/2 nodes"),
    "rbd job <id>": Run(output=r"done: myapp:1\.0"),
    "rbd job <id> --json": Run(json=True),
    "rbd images rm tools:2": Run(output="removed"),
    "rbd events": Run(),
    "rbd status": Run(output=r"leader: http://"),
    "rbd-agent status": Run(
        why="four agents share this host and none uses /etc/rbd/agent.toml; with several, "
        "rbd-agent status asks for --config, as here",
        as_run="rbd-agent status --config {origin_config}",
        output=r"node\s+origin",
    ),
    "curl http://127.0.0.1:7700/v1/health": Run(json=True, output='"status": "ok"'),
    'curl -H "Authorization: Bearer $(cat /var/lib/rbd/coordinator/metrics-token)" '
    "http://127.0.0.1:7700/metrics": Run(output=r"rbd_coordinator_nodes\{"),
    # -- README.md: cluster functions ---------------------------------------------------
    "rbd run myapp:1.0 --on node-07 node-08 --name web --network host": Run(
        why=NO_DOCKER, expect=1, output="no Docker engine configured"
    ),
    "rbd run myapp:1.0 --on all --network none -- /bin/sh -c 'uname -a'": Run(
        why=NO_DOCKER, expect=1, output="no Docker engine configured"
    ),
    "rbd rm web --on node-07 node-08": Run(
        why=NO_DOCKER, expect=1, output="no Docker engine configured"
    ),
    "rbd build myapp:1.1 --base myapp:1.0 --context ./app --to all": Run(
        why=NO_DOCKER, expect=1, output=r"context app: 1 file.*no Docker engine configured"
    ),
    "rbd images rm-nodes myapp:1.0 --from node-07": Run(output=r"node-07\s+done"),
    "rbd docker check --on all": Run(why=NO_DOCKER, expect=1, output="not reachable"),
    "rbd docker check --on node-09 --install": Skip(
        "runs apt-get install docker.io on the node, which here is this test host",
        covered_by="tests/integration/test_cluster_ops.py::test_docker_install_runs_apt_get_when_asked",
    ),
    "rbd ops; rbd op <id>": Run(
        why="the newest op is the failed docker check above: rbd op exits 1",
        expect=1,
        output=r"docker-check.*0 ok, 4 failed",
    ),
    # -- README.md: benchmarks -------------------------------------------------------------
    ".venv/bin/python -m bench.lab run --profile paper": Skip(
        "the paper profile runs for many minutes on shaped network namespaces",
        covered_by="tests/lab/test_lab.py::test_ci_profile_runs_every_system_against_the_bound",
    ),
    ".venv/bin/python -m bench.sim --profile paper --nodes 10000": Skip(
        "a benchmark: minutes of CPU for 10,000 simulated nodes"
    ),
    ".venv/bin/python bench/coordinator_load.py": Skip("a load benchmark: minutes of CPU"),
    ".venv/bin/python bench/takeover.py": Skip(
        "a benchmark: ten kills of a coordinator on PostgreSQL, a minute or more"
    ),
    ".venv/bin/python -m bench.lab run --profile homogeneous --systems rbd-pull,registry:gzip,"
    "bittorrent": Skip(
        "a rollout on 40 shaped namespaces: minutes",
        covered_by="tests/lab/test_rollout.py::"
        "test_a_rollout_reads_the_upstream_once_and_every_node_gets_the_image",
    ),
    # -- INSTALL.md § 1 ----------------------------------------------------------------------
    "make wheel": Skip("built and installed by the wheel test", covered_by=WHEEL),
    "apt-get install python3 python3-venv docker.io": Skip("installs packages on a fresh host"),
    "useradd --system --home-dir /var/lib/rbd --shell /usr/sbin/nologin --user-group rbd": Skip(
        "creates a system user on this host"
    ),
    "python3 -m venv /opt/rbd/venv": Skip("the wheel test makes this venv", covered_by=WHEEL),
    "/opt/rbd/venv/bin/pip install dist/rainbowd-*.whl": Skip(
        "the wheel test runs it (offline)", covered_by=WHEEL
    ),
    "install -d -m 0755 /opt/rbd/deploy && cp -r deploy/* /opt/rbd/deploy/": Run(),
    "install -d -m 0750 -o root -g rbd /etc/rbd": Run(),
    # -- INSTALL.md § 2 --------------------------------------------------------------------------
    "install -m 0640 -o root -g rbd deploy/config/coordinator.example.toml "
    "/etc/rbd/coordinator.toml": Run(),
    "$EDITOR /etc/rbd/coordinator.toml": Skip("an editor, for a person"),
    "install -m 0644 deploy/systemd/rbd-coordinator.service /etc/systemd/system/": Skip(SYSTEMD),
    "systemctl daemon-reload": Skip(SYSTEMD),
    "systemctl enable --now rbd-coordinator": Skip(SYSTEMD),
    "journalctl -u rbd-coordinator -f": Skip(SYSTEMD),
    # -- INSTALL.md § 3 --------------------------------------------------------------------------
    "cat /var/lib/rbd/coordinator/join-token": Run(output=r"\S{20,}"),
    "(umask 027; cat > /etc/rbd/join-token) && chgrp rbd /etc/rbd/join-token": Run(
        why="the pasted token comes on stdin", stdin="{join_token}\n"
    ),
    "export RBD_COORDINATOR=http://10.0.0.1:7700": Run(),
    "export RBD_ADMIN_TOKEN_FILE=~/.config/rbd/admin-token": Run(),
    # -- INSTALL.md § 4 --------------------------------------------------------------------------
    "install -m 0640 -o root -g rbd deploy/config/agent.example.toml /etc/rbd/agent.toml": Run(),
    "$EDITOR /etc/rbd/agent.toml": Skip("an editor, for a person"),
    "install -m 0644 deploy/systemd/rbd-agent.service /etc/systemd/system/": Skip(SYSTEMD),
    "systemctl enable --now rbd-agent": Skip(SYSTEMD),
    # -- INSTALL.md § 5 --------------------------------------------------------------------------
    "nft add rule inet filter input ip saddr 10.0.0.0/24 tcp dport { 7700, 7722 } accept": Skip(
        "changes this host's firewall"
    ),
    # -- INSTALL.md § 6 --------------------------------------------------------------------------
    "curl http://10.0.0.1:7700/v1/health": Run(json=True, output=r'"nodes_up": 4'),
    "rbd nodes": Run(output=r"node-07\s+up"),
    "systemctl status rbd-agent rbd-coordinator": Skip(SYSTEMD),
    "journalctl -u rbd-agent --since -10min": Skip(SYSTEMD),
    "rbd images add myapp:1 --from archive:/srv/images/myapp-1.tar --compression gzip": Run(
        output=r"myapp:1: ready.*uncompressed"
    ),
    "rbd distribute myapp:1 --to all": Run(output=r"a copy is .* on the wire"),
    "docker image inspect myapp:1": Skip(
        "needs a node's Docker engine",
        covered_by="tests/integration/test_distribution.py::"
        "test_distribute_to_all_verifies_every_layer_and_runs_in_docker",
    ),
    # -- INSTALL.md § 7 --------------------------------------------------------------------------
    "rbd-coordinator show-token metrics --config /etc/rbd/coordinator.toml | ssh prometheus-host "
    "'umask 027; cat > /etc/prometheus/rbd-metrics-token'": Run(
        why="no prometheus-host to ssh to, and the coordinator.toml installed above is the "
        "unedited example (state_dir /var/lib/rbd/coordinator): the cluster's state dir is named",
        as_run="rbd-coordinator show-token metrics --state-dir {coordinator_dir} "
        "| (umask 027; cat > {work}/rbd-metrics-token)",
    ),
    'curl -H "Authorization: Bearer $(cat /var/lib/rbd/coordinator/metrics-token)" '
    "http://10.0.0.1:7700/metrics": Run(output=r"rbd_coordinator_nodes\{"),
    # -- INSTALL.md § 8 --------------------------------------------------------------------------
    "rbd-agent mirror-config containerd": Skip(
        "reads /etc/rbd/agent.toml, which no agent here uses",
        covered_by="tests/agent/test_mirror_config.py::test_mirror_config_prints_and_writes",
    ),
    "rbd-agent mirror-config containerd --registry registry.example.com:5000 --write": Skip(
        "writes this host's /etc/containerd",
        covered_by="tests/agent/test_mirror_config.py::test_mirror_config_prints_and_writes",
    ),
    "rbd-agent mirror-config docker --write && systemctl restart docker": Skip(
        "writes this host's /etc/docker and restarts its dockerd",
        covered_by="tests/agent/test_mirror_config.py::test_mirror_config_prints_and_writes",
    ),
    # -- INSTALL.md: upgrading -------------------------------------------------------------------
    "/opt/rbd/venv/bin/pip install --force-reinstall --no-deps dist/rainbowd-*.whl": Skip(
        "the wheel test runs it (offline)", covered_by=WHEEL
    ),
    "systemctl restart rbd-coordinator; systemctl restart rbd-agent": Skip(SYSTEMD),
    # -- INSTALL.md: state in PostgreSQL, backup and restore -----------------------------
    "apt-get install postgresql": Skip(
        "apt on a fresh host; the tests run a throwaway server from the same package",
        covered_by=POSTGRES_COVERED,
    ),
    "runuser -u postgres -- createuser rbd": Skip(
        "the packaged cluster is not run here; the tests' own server has the role",
        covered_by=POSTGRES_COVERED,
    ),
    "runuser -u postgres -- createdb --owner rbd rbd": Skip(
        "the packaged cluster is not run here; the tests create a database per test",
        covered_by=POSTGRES_COVERED,
    ),
    "rbd-coordinator backup /var/backups/rbd/coordinator.sqlite "
    "--config /etc/rbd/coordinator.toml": Skip(
        "needs the coordinator stopped and its state dir deleted afterwards, so it runs in a "
        "cluster of its own, with --state-dir for --config",
        covered_by=RESTORE_COVERED,
    ),
    "systemctl stop rbd-coordinator": Skip(SYSTEMD),
    "rbd-coordinator restore /var/backups/rbd/coordinator.sqlite "
    "--config /etc/rbd/coordinator.toml": Skip(
        "stops this test's coordinator for good; the restore test runs it on a cluster of its own",
        covered_by=RESTORE_COVERED,
    ),
    "chown -R rbd:rbd /var/lib/rbd/coordinator": Skip(
        "the test cluster runs as the test's user; no rbd user here"
    ),
    "systemctl start rbd-coordinator": Skip(SYSTEMD),
    # -- INSTALL.md § 2: a standby coordinator -------------------------------------------
    "runuser -u postgres -- createuser --pwprompt rbd": Skip(
        "the packaged cluster is not run here, and the prompt is for a person",
        covered_by=POSTGRES_COVERED,
    ),
    "install -m 0640 -o root -g rbd deploy/config/standby-pair/coordinator-1.toml "
    "/etc/rbd/coordinator.toml": Run(
        why="this host's coordinator.toml stays the single coordinator's the later commands "
        "read; the pair's files load in tests/docs/test_deploy_configs.py",
        as_run="install -m 0640 -o root -g rbd deploy/config/standby-pair/coordinator-1.toml "
        "/etc/rbd/pair-coordinator-1.toml",
    ),
    "install -m 0640 -o root -g rbd deploy/config/standby-pair/coordinator-2.toml "
    "/etc/rbd/coordinator.toml": Run(
        why="as for coordinator-1.toml",
        as_run="install -m 0640 -o root -g rbd deploy/config/standby-pair/coordinator-2.toml "
        "/etc/rbd/pair-coordinator-2.toml",
    ),
    "install -D -m 0644 deploy/systemd/rbd-coordinator.service.d/standby-pair.conf "
    "/etc/systemd/system/rbd-coordinator.service.d/standby-pair.conf": Skip(SYSTEMD),
    "(umask 077; cat > /etc/rbd/pgpass) && chown rbd:rbd /etc/rbd/pgpass": Skip(
        "the password of the packaged PostgreSQL, not run here (its tests' server trusts "
        "loopback); no rbd user here"
    ),
    "install -d -m 0750 -o rbd -g rbd /var/lib/rbd/coordinator": Skip(SECOND_HOST),
    "scp -p '10.0.0.1:/var/lib/rbd/coordinator/*-token' /var/lib/rbd/coordinator/": Skip(
        SECOND_HOST, covered_by=PAIR_COVERED
    ),
    "chown rbd:rbd /var/lib/rbd/coordinator/*-token": Skip(SECOND_HOST),
    "export RBD_COORDINATOR=http://10.0.0.1:7700,http://10.0.0.2:7700": Skip(
        "no 10.0.0.2 here: every later command would carry a URL nobody answers",
        covered_by=PAIR_COVERED,
    ),
    "rbd status --coordinator http://10.0.0.1:7700,http://10.0.0.2:7700": Skip(
        SECOND_HOST, covered_by=PAIR_COVERED
    ),
}

FENCE = re.compile(r"^```(\S*)\s*$")
SHELLS = ("sh", "bash", "console", "shell")


def doc_commands(path: Path) -> list[tuple[int, str]]:
    """(line, command) of every command in the fenced shell blocks of ``path``, in order."""
    found: list[tuple[int, str]] = []
    lang: str | None = None
    pending = ""
    for number, line in enumerate(path.read_text().splitlines(), 1):
        text = line.strip()
        fence = FENCE.match(text)
        if fence:
            lang = None if lang is not None else fence.group(1)
            continue
        if lang not in SHELLS or not text or text.startswith("#"):
            continue
        if text.endswith("\\"):
            pending += text[:-1].strip() + " "
            continue
        command = re.split(r"\s+#\s", pending + text, maxsplit=1)[0]
        pending = ""
        found.append((number, " ".join(command.split())))
    return found


def all_doc_commands() -> list[tuple[str, int, str]]:
    return [(doc, n, c) for doc in DOCS for n, c in doc_commands(REPO / doc)]


def test_every_doc_command_is_listed() -> None:
    shown = {c for _, _, c in all_doc_commands()}
    unlisted = sorted(shown - set(COMMANDS))
    assert not unlisted, (
        "commands in README.md / INSTALL.md with no entry in COMMANDS (run them here, "
        f"or list them with the reason they cannot run): {unlisted}"
    )
    stale = sorted(set(COMMANDS) - shown)
    assert not stale, f"COMMANDS lists commands no doc shows any more: {stale}"
    for command, entry in COMMANDS.items():
        if isinstance(entry, Skip):
            assert entry.why, command
            if entry.covered_by:
                file, _, name = entry.covered_by.partition("::")
                source = (REPO / file).read_text()
                assert re.search(rf"def {name}\(", source), f"{command}: no {entry.covered_by}"
        elif entry.as_run or entry.expect:
            assert entry.why, f"{command}: say why it runs differently from the docs"


def test_the_extractor_reads_blocks_continuations_and_comments(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(
        "text `not a command`\n```sh\n# a comment\nrbd nodes   # trailing # words\n"
        "a \\\n  b\n```\n```toml\nx = 1\n```\n  ```sh\n  indented --flag\n  ```\n"
    )
    assert doc_commands(doc) == [(4, "rbd nodes"), (6, "a b"), (12, "indented --flag")]


# --------------------------------------------------------------------------
# running them
# --------------------------------------------------------------------------
@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[LocalCluster]:
    specs = [NodeSpec("origin", roles=["origin"]), *(NodeSpec(n) for n in NODES)]
    async with LocalCluster(tmp_path / "cluster", specs, chunk_size=256 * 1024) as c:
        yield c


def _substitutions(c: LocalCluster, work: Path, archive: Path) -> dict[str, str]:
    """What a real deployment's paths and addresses are here (applied to every command)."""
    user = pwd.getpwuid(os.getuid()).pw_name
    group = grp.getgrgid(os.getgid()).gr_name
    return {
        "http://10.0.0.1:7700": c.url,
        "http://127.0.0.1:7700": c.url,
        "/var/lib/rbd/coordinator/": f"{c.coordinator_dir}/",
        "/srv/images/tools.tar": str(archive),
        "/srv/images/myapp-1.tar": str(archive),
        "/srv/layouts/base": str(work / "layouts" / "base"),
        "/opt/rbd": str(work / "opt-rbd"),
        "/etc/rbd": str(work / "etc-rbd"),
        "-o root -g rbd": f"-o {user} -g {group}",
        "chgrp rbd ": f"chgrp {group} ",
    }


def _prepare(c: LocalCluster, work: Path, archive: Path) -> None:
    """The files the docs assume: the checkout's deploy/, an app to build, an OCI layout,
    an admin's token file."""
    work.mkdir()
    (work / "deploy").symlink_to(REPO / "deploy")
    (work / "app").mkdir()
    (work / "app" / "Dockerfile").write_text(DOCKERFILE)
    skopeo = shutil.which("skopeo")
    if skopeo is None:
        missing_dependency(
            "skopeo not installed (the README's oci: source): apt-get install skopeo"
        )
    layout = work / "layouts" / "base"
    layout.parent.mkdir()  # skopeo makes the layout, not the folder it goes in
    argv = [skopeo, "--insecure-policy", "copy", "--quiet"]
    subprocess.run([*argv, f"docker-archive:{archive}", f"oci:{layout}:12"], check=True)
    token = work / "home" / ".config" / "rbd" / "admin-token"
    token.parent.mkdir(parents=True)
    token.write_text(c.admin_token_file.read_text())
    token.chmod(0o600)


async def _newest(c: LocalCluster, kind: str) -> str:
    async with c.admin() as admin:
        if kind == "job":
            jobs = (await admin.jobs()).jobs
            return max(jobs, key=lambda j: j.created_at).job_id
        ops = (await admin.ops()).ops
        return max(ops, key=lambda o: o.created_at).op_id


async def _shell(script: str, cwd: Path, env: dict[str, str], stdin: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        "bash",
        "-o",
        "pipefail",
        "-c",
        script,
        cwd=cwd,
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(COMMAND_TIMEOUT):
        out, err = await proc.communicate(stdin.encode())
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_doc_commands_run_against_a_local_cluster(
    cluster: LocalCluster, demo_image: Path, tmp_path: Path
) -> None:
    if shutil.which("curl") is None:
        missing_dependency(
            "curl not installed (the docs curl the coordinator): apt-get install curl"
        )
    work = tmp_path / "work"
    _prepare(cluster, work, demo_image)
    subs = _substitutions(cluster, work, demo_image)
    names = {
        "archive": str(demo_image),
        "work": str(work),
        "coordinator_dir": str(cluster.coordinator_dir),
        "origin_config": str(cluster.agent_config("origin")),
        "join_token": (cluster.coordinator_dir / "join-token").read_text().strip(),
    }
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "HOME": str(work / "home"),
        "RBD_COORDINATOR": cluster.url,
        "RBD_ADMIN_TOKEN_FILE": str(cluster.admin_token_file),
    }
    env_file = tmp_path / "env"
    ran = 0
    for doc, line, command in all_doc_commands():
        entry = COMMANDS[command]
        if isinstance(entry, Skip):
            continue
        text = entry.as_run or command
        for real, here in subs.items():
            text = text.replace(real, here)
        for name, value in names.items():
            text = text.replace("{" + name + "}", value)
        if "rbd job <id>" in text:
            text = text.replace("<id>", await _newest(cluster, "job"))
        if "rbd op <id>" in text:
            text = text.replace("<id>", await _newest(cluster, "op"))
        stdin = entry.stdin
        for name, value in names.items():
            stdin = stdin.replace("{" + name + "}", value)
        # the environment carries over, as in one shell: INSTALL.md's `export` lines count
        script = f'{text}\nrc=$?\nenv -0 > "{env_file}"\nexit $rc\n'
        code, out, err = await _shell(script, work, env, stdin)
        where = f"{doc}:{line}: {command}\n  ran: {text}\n  exit {code}\n{out}\n{err}"
        assert code == entry.expect, where
        if entry.output:
            assert re.search(entry.output, out, re.S), where
        if entry.json:
            json.loads(out)
        env = dict(item.split("=", 1) for item in env_file.read_text().split("\0") if "=" in item)
        ran += 1
    assert ran >= 30, f"only {ran} documented commands ran"
