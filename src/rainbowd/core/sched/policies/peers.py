"""PulledFrom: the seeders each demander has pulled from, whose connections it keeps.

Why the planner remembers them: an agent keeps one SSH connection per seeder
for as long as both run (agent/dataplane/seeder_connections.py), so a piece
from a seeder it has pulled from before starts over that connection (~2 ms
for a new channel), and one from any other seeder first pays a connection:
TCP, key exchange, the pinned host-key check and public-key auth -- 325-771
ms measured in the lab's runs of session 21 on the loaded 2-vCPU host
(``bench.sim --compare``), 30 ms assumed in the simulator's defaults. With
pieces of one chunk spread over many seeders ~40 % of the transfers on the
suite's shapes opened a new connection (simulator, 100 nodes: 16.7 per node on
homogeneous, 36.4 on random-pareto). The fit rule (rules.py, "known peers")
takes a seeder from this memory where it offers nearly as much.

Bounded: the last :data:`PEERS_KEPT` seeders per demander, most recent last. A
node that goes down is forgotten as a demander (its connections died with
it); as a seeder it stays in others' memories until pushed out -- a
preference for it then costs the one reconnection a stranger would.
"""

from __future__ import annotations

from collections.abc import Collection

#: seeders remembered per demander (the most recent ones): a demander pulls a layer's pieces
#: from a few dozen seeders at most within the seconds a connection matters
PEERS_KEPT = 64


class PulledFrom:
    """Per demander, the seeders it pulled from, the most recent last (module docstring)."""

    def __init__(self, kept: int = PEERS_KEPT) -> None:
        if kept < 1:
            raise ValueError(f"kept {kept}: must be at least 1")
        self._kept = kept
        self._of: dict[str, dict[str, None]] = {}  # demander -> seeders (an ordered set)

    def pulled(self, demander: str, seeder: str) -> None:
        """``demander`` was handed a transfer from ``seeder``: it connects to it."""
        seen = self._of.setdefault(demander, {})
        seen.pop(seeder, None)
        seen[seeder] = None
        if len(seen) > self._kept:
            del seen[next(iter(seen))]

    def of(self, demander: str) -> Collection[str]:
        """The seeders ``demander`` pulled from (empty if none, or forgotten)."""
        return self._of.get(demander, {}).keys()

    def forget(self, demander: str) -> None:
        """``demander`` went down: the connections it had are gone."""
        self._of.pop(demander, None)
