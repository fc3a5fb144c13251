"""Bytes a lab node sent, from its interface's kernel counters.

The origin's egress is measured the same way for every system (rbd, the
registry, BitTorrent): the ``tx_bytes`` of the origin namespace's ``eth0``
(the veth into the lab bridge, after its upload ``tbf``) read just before a
system's timed phase starts and just after it ends (:meth:`bench.lab.env.LabEnv.timed_start`,
:meth:`~bench.lab.env.LabEnv.timed_end`). The count is what went on the wire:
Ethernet, IP and TCP headers, the transport's framing (SSH, HTTP, the
BitTorrent wire protocol), retransmissions, and the origin's own control
traffic in that window (rbd's heartbeats to the coordinator, aria2's tracker
announces) -- a few per cent over the layer bytes it served.
"""

from __future__ import annotations

import json

from rainbowd.devcluster.netlab import NetLab

#: the interface every lab node talks through (rainbowd.devcluster.netlab)
LAB_DEV = "eth0"


def parse_tx_bytes(ip_json: str, dev: str = LAB_DEV) -> int:
    """``tx`` bytes of ``dev`` from the output of ``ip -j -s link show dev <dev>``."""
    try:
        links = json.loads(ip_json)
        (link,) = [x for x in links if x.get("ifname") == dev]
        value = link["stats64"]["tx"]["bytes"]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ValueError(f"no tx byte count for {dev} in ip's output: {ip_json[:200]!r}") from None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{dev}: tx bytes {value!r} is not a byte count")
    return value


def tx_bytes(lab: NetLab, node: str, dev: str = LAB_DEV) -> int:
    """The bytes ``node``'s ``dev`` has sent since it was created."""
    return parse_tx_bytes(lab.run(node, ["ip", "-j", "-s", "link", "show", "dev", dev]), dev)
