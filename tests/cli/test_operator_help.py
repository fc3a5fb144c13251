"""What the programs tell an operator (help, messages, summaries) matches what they do.

Each test here was written against a line that misled someone deploying from
deploy/INSTALL.md (issue 15, item 9).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from rainbowd.agent import cli as agent_cli
from rainbowd.agent.status import StatusServer
from rainbowd.cli import main as rbd_cli
from rainbowd.coordinator import cli as coordinator_cli
from rainbowd.coordinator import config as coordinator_config
from rainbowd.coordinator.jobs import Job
from rainbowd.core.chunks import DEFAULT_CHUNK_SIZE
from rainbowd.core.messages import SeederUse
from rainbowd.core.sched.reasons import TransferReason
from rainbowd.core.sched.scheduler import DEFAULT_POLICY
from rainbowd.lib.progress import summary

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
LAYER = "sha256:" + "1" * 64


def _run_parser() -> argparse.ArgumentParser:
    sub = next(
        a for a in coordinator_cli.parser()._actions if isinstance(a, argparse._SubParsersAction)
    )
    run: argparse.ArgumentParser = sub.choices["run"]
    return run


def _run_help() -> str:
    return " ".join(_run_parser().format_help().split())  # argparse wraps lines; compare words


def test_coordinator_help_states_the_defaults_the_code_uses() -> None:
    text = _run_help()
    assert f"(default {DEFAULT_POLICY};" in text, text
    stated = {}
    for action in _run_parser()._actions:
        if found := re.search(r"\(default ([^;)]+)", action.help or ""):
            stated[action.option_strings[0].lstrip("-")] = found.group(1)
    cfg = coordinator_config.CoordinatorConfig(state_dir=Path("/x"))
    assert stated == {
        "listen": coordinator_config.DEFAULT_LISTEN,
        "heartbeat-interval": f"{cfg.heartbeat_interval:g}",
        "chunk-size": str(DEFAULT_CHUNK_SIZE),
        "policy": cfg.policy,
        "node-down-timeout": f"{cfg.node_down_timeout:g}",
        "seeder-fault-limit": str(cfg.seeder_fault_limit),
    }


def test_coordinator_help_follows_the_default_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    """The help reads the constant: change it and the help changes (no literal to go stale)."""
    monkeypatch.setattr(coordinator_cli, "DEFAULT_POLICY", "paper")
    assert "(default paper;" in _run_help()


def test_coordinator_example_config_names_the_default_policy() -> None:
    example = (DEPLOY / "config" / "coordinator.example.toml").read_text()
    stated = re.search(r'"(\w+)" \(default', example)
    assert stated and stated.group(1) == DEFAULT_POLICY, stated
    assert f'# policy = "{DEFAULT_POLICY}"' in example


#: a minimal command line for every rbd command with JSON output
JSON_ARGV = {
    ("status",): ["status"],
    ("nodes",): ["nodes"],
    ("images",): ["images"],
    ("images", "add"): ["images", "add", "r:1", "--from", "archive:/x.tar"],
    ("images", "rm-nodes"): ["images", "rm-nodes", "r:1", "--from", "all"],
    ("distribute",): ["distribute", "r:1", "--to", "n1", "n2"],
    ("events",): ["events"],
    ("jobs",): ["jobs"],
    ("job",): ["job", "j-1"],
    ("run",): ["run", "r:1", "--on", "all"],
    ("rm",): ["rm", "web", "--on", "all"],
    ("build",): ["build", "t:1", "--base", "r:1", "--context", ".", "--to", "all"],
    ("docker", "check"): ["docker", "check", "--on", "all"],
    ("ops",): ["ops"],
    ("op",): ["op", "op-1"],
}


def test_every_json_command_is_covered_here() -> None:
    assert set(JSON_ARGV) == rbd_cli.JSON_COMMANDS


@pytest.mark.parametrize("path", sorted(JSON_ARGV), ids=" ".join)
def test_rbd_json_goes_before_or_after_the_subcommand(path: tuple[str, ...]) -> None:
    argv = JSON_ARGV[path]
    parse = rbd_cli._parser().parse_args
    assert parse(argv).json is False
    assert parse(["--json", *argv]).json is True
    assert parse([*argv, "--json"]).json is True  # `rbd job ID --json` was refused
    assert parse(["--json", *argv, "--json"]).json is True


def test_rbd_help_says_where_json_goes() -> None:
    assert "rbd job ID --json" in " ".join(rbd_cli._parser().format_help().split())


# --------------------------------------------------------------------------
# rbd-agent status without --config
# --------------------------------------------------------------------------
@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A host with no /etc/rbd/agent.toml, no agent socket and an empty process table."""
    monkeypatch.setattr(agent_cli, "DEFAULT_CONFIG", tmp_path / "etc" / "agent.toml")
    monkeypatch.setattr(agent_cli, "DEFAULT_SOCKET", tmp_path / "var" / "agent.sock")
    monkeypatch.setattr(agent_cli, "PROC", tmp_path / "proc")
    (tmp_path / "proc").mkdir()
    return tmp_path


RBD_AGENT = "/opt/rbd/venv/bin/rbd-agent"  # as the systemd unit starts it
VENV_PYTHON = "/opt/rbd/venv/bin/python"


def _agent_config(path: Path, node_id: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f'node_id = "{node_id}"\ncoordinator_url = "http://127.0.0.1:7700"\n'
        f'state_dir = "{path.parent}"\nstatus_socket = "{path.parent / "agent.sock"}"\n'
    )
    return path


def _process(host: Path, pid: int, *argv: str, cwd: Path | None = None) -> None:
    """A fake /proc/PID: its command line (NUL-separated) and working directory."""
    entry = host / "proc" / str(pid)
    entry.mkdir()
    (entry / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    (entry / "cwd").symlink_to(cwd or host)


@contextlib.contextmanager
def _serving(socket: Path, node_id: str) -> Iterator[None]:
    """A real status socket answering, in a thread of its own (the CLI runs its own loop)."""
    loop = asyncio.new_event_loop()
    server = StatusServer(socket, lambda: {"node_id": node_id})
    loop.run_until_complete(server.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


def test_agent_status_says_where_it_looked_and_suggests_config(
    host: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert agent_cli.main(["status"]) == 1
    err = capsys.readouterr().err
    assert "not running" in err
    assert f"no config file {host / 'etc' / 'agent.toml'}" in err
    assert "no 'rbd-agent run' process found" in err
    assert f"default socket {host / 'var' / 'agent.sock'}" in err
    assert "rbd-agent status --config FILE" in err


def test_agent_status_finds_the_running_agent_config(
    host: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An agent started with a config elsewhere (a local cluster) is found, not 'not running'."""
    config = _agent_config(host / "cluster" / "n7" / "agent.toml", "n7")
    code = "from rainbowd.agent.cli import main; import sys; sys.exit(main())"
    _process(host, 1, "/usr/bin/python3", "-c", code, "run", "--config", str(config))
    _process(host, 2, "/usr/bin/python3", "-m", "http.server")  # not an agent
    with _serving(config.parent / "agent.sock", "n7"):
        assert agent_cli.main(["status", "--json"]) == 0, capsys.readouterr().err
    assert '"node_id": "n7"' in capsys.readouterr().out


def test_agent_status_resolves_a_relative_config_in_the_agent_cwd(
    host: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _agent_config(host / "srv" / "agent.toml", "n8")
    _process(host, 5, RBD_AGENT, "run", "--config=agent.toml", cwd=config.parent)
    with _serving(config.parent / "agent.sock", "n8"):
        assert agent_cli.main(["status", "--json"]) == 0, capsys.readouterr().err
    assert '"node_id": "n8"' in capsys.readouterr().out


def test_agent_status_with_several_agents_asks_which(
    host: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = _agent_config(host / "a" / "agent.toml", "a")
    b = _agent_config(host / "b" / "agent.toml", "b")
    _process(
        host,
        11,
        "/opt/rbd/venv/bin/python",
        RBD_AGENT,
        "run",
        "--config",
        str(a),
    )
    _process(host, 12, RBD_AGENT, "run", "--config", str(b))
    assert agent_cli.main(["status"]) == 2
    err = capsys.readouterr().err
    assert "2 agents run on this host" in err and "--config" in err
    assert f"{a} (pid 11)" in err and f"{b} (pid 12)" in err


def test_agent_status_prefers_the_default_config(
    host: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _agent_config(host / "etc" / "agent.toml", "main")
    other = _agent_config(host / "x" / "agent.toml", "x")
    _process(host, 3, RBD_AGENT, "run", "--config", str(other))
    with _serving(config.parent / "agent.sock", "main"):
        assert agent_cli.main(["status", "--json"]) == 0
    assert '"node_id": "main"' in capsys.readouterr().out


def test_install_md_quotes_the_summary_the_cli_prints() -> None:
    """INSTALL.md's example of the distribute summary is what `summary` prints for it."""
    install = " ".join((DEPLOY / "INSTALL.md").read_text().split())
    quoted = re.search(r'"(a copy is .*? to \d+ nodes)"', install)
    assert quoted, "INSTALL.md no longer quotes the distribute summary"
    mib = 1024 * 1024
    nodes = [f"n{i:02d}" for i in range(40)]
    job = Job.create("j1", "img", [(LAYER, 66 * mib)], nodes, {}, 1.0, image_bytes=int(190.3 * mib))
    for nid in nodes:
        use = SeederUse(
            layer=LAYER,
            seeder="origin",
            reason=TransferReason.legacy("r"),
            bytes=66 * mib,
            seconds=1.0,
        )
        job.nodes[nid].record(use)
    assert quoted.group(1) in summary(job.view())


def test_readme_names_the_default_policy() -> None:
    readme = " ".join((DEPLOY.parent / "README.md").read_text().split())
    stated = re.search(r"`rbd-coordinator --policy`\) defaults to `(\w+)`", readme)
    assert stated and stated.group(1) == DEFAULT_POLICY, stated
