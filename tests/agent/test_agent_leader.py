"""An agent configured with several coordinators registers with the one that leads (issue 16).

The leader is a real coordinator; the standby a stand-in (tests/support/leader_support.py)
until the real standby lands. The agent runs in-process with its real SSH server.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from coordinator_support import ADMIN, JOIN, start
from leader_support import dead_url, standby_stand_in
from rainbowd.agent.agent import Agent
from rainbowd.agent.config import ConfigError, load_config
from rainbowd.agent.status import render_status
from rainbowd.lib.client import AdminClient
from waiting import wait_until

BASE = 'node_id = "n1"\nstate_dir = "/tmp/x"\n'


def config(tmp: Path, urls: str) -> Path:
    p = tmp / "agent.toml"
    p.write_text(BASE + f"coordinator_url = {urls}\n")
    return p


def test_coordinator_url_takes_one_url_or_a_list(tmp_path: Path) -> None:
    one = load_config(config(tmp_path, '"http://c1:7700/"'))
    assert one.coordinator_urls == ("http://c1:7700",) and one.coordinator_url == "http://c1:7700"
    many = load_config(config(tmp_path, '["http://c1:7700", "https://c2:7700"]'))
    assert many.coordinator_urls == ("http://c1:7700", "https://c2:7700")


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("[]", "at least one"),
        ('["http://c1:7700", "c2:7700"]', "'c2:7700': must start with http"),
        ('["http://c1:7700", "http://C1:7700/"]', "listed twice"),
        ("7700", "coordinator_url"),
        ("[" + ", ".join(f'"http://c{i}:1"' for i in range(17)) + "]", "at most 16"),
    ],
)
def test_a_bad_coordinator_list_names_the_key(tmp_path: Path, value: str, words: str) -> None:
    with pytest.raises(ConfigError, match="coordinator_url") as e:
        load_config(config(tmp_path, value))
    assert words in str(e.value)


async def test_the_agent_follows_a_standby_to_the_leader(tmp_path: Path) -> None:
    leader = await start(tmp_path / "coordinator")
    standby, standby_server = await standby_stand_in(lambda: leader.url)
    dead = dead_url()
    (tmp_path / "join").write_text(JOIN)
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        f'node_id = "n1"\ncoordinator_url = ["{dead}", "{standby.url}", "{leader.url}"]\n'
        f'state_dir = "{tmp_path / "state"}"\njoin_token_file = "{tmp_path / "join"}"\n'
        'listen_address = "127.0.0.1"\nssh_port = 0\nadvertise_address = "127.0.0.1"\n'
    )
    agent = Agent(load_config(cfg))
    run = asyncio.create_task(agent.run())
    try:
        await wait_until(lambda: agent.view.registered, timeout=20, what="registered")
        async with AdminClient(leader.url, ADMIN) as admin:
            assert [n.node_id for n in (await admin.nodes()).nodes] == ["n1"]
        status = agent.status_snapshot()["coordinator"]
        assert status["url"] == leader.url
        assert status["urls"] == [dead, standby.url, leader.url]
        shown = render_status(agent.status_snapshot())
        assert f"coordinator {leader.url}" in shown
        assert f"configured: {dead}, {standby.url}, {leader.url} (current)" in shown
        assert standby.seen == ["POST /v1/register"]  # later calls go to the leader directly
    finally:
        agent.stop()
        await asyncio.wait_for(run, 20)
        await standby_server.close()
        await leader.stop()
