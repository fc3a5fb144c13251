"""What the programs tell an operator (help, messages, summaries) matches what they do.

Each test here was written against a line that misled someone deploying from
deploy/INSTALL.md (issue 15, item 9).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from rainbowd import cli as rbd_cli
from rainbowd.chunks import DEFAULT_CHUNK_SIZE
from rainbowd.coordinator import cli as coordinator_cli
from rainbowd.coordinator import config as coordinator_config
from rainbowd.scheduler import DEFAULT_POLICY

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


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
