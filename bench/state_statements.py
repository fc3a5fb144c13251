"""What one state statement costs the coordinator on each backend (issue 16).

The store is called synchronously from the coordinator's event loop (see
rainbowd.coordinator.state), so a statement's time is time no request is
served. This times the statements a report or heartbeat issues, on SQLite (a
file in a temp dir) and on PostgreSQL (a throwaway durable server on
loopback, rainbowd.devcluster.pgserver; its commits as the coordinator makes
them, not waiting for the disk)::

    PYTHONPATH=. .venv/bin/python bench/state_statements.py [--count 2000]

Prints microseconds per statement: an autocommit UPDATE, an autocommit upsert
of a node, an upsert inside a transaction of ten, an indexed SELECT.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from rainbowd.coordinator.state import StateStore, StoredNode
from rainbowd.coordinator.state.postgres import PostgresStore
from rainbowd.coordinator.state.sqlite import SqliteStore
from rainbowd.devcluster.pgserver import PostgresServer

#: statements per transaction in the batched case (a report batch writes about this many)
PER_TRANSACTION = 10

NODE = StoredNode(
    node_id="n1",
    address="10.0.0.1",
    ssh_port=2222,
    host_key="ssh-ed25519 HOSTKEY",
    client_key="ssh-ed25519 CLIENTKEY",
    credential_hash="hash",
)


def _per_statement_us(count: int, body: Callable[[int], object]) -> float:
    start = time.perf_counter()
    for i in range(count):
        body(i)
    return (time.perf_counter() - start) / count * 1e6


def measure(store: StateStore, count: int) -> dict[str, float]:
    """Microseconds per statement of each kind, ``count`` statements each."""
    store.save_node(NODE, 0)

    def batch(i: int) -> None:
        with store.transaction():
            for j in range(PER_TRANSACTION):
                store.save_node(NODE, i * PER_TRANSACTION + j)

    return {
        "update": _per_statement_us(count, lambda i: store.save_seq("n1", i)),
        "upsert": _per_statement_us(count, lambda i: store.save_node(NODE, i)),
        "upsert_in_txn": _per_statement_us(count // PER_TRANSACTION, batch) / PER_TRANSACTION,
        "select": _per_statement_us(
            count, lambda i: store.has_report_id("n1", "/r", f"rid-{i:08d}")
        ),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--count", type=int, default=2000, help="statements of each kind")
    args = p.parse_args()
    server = PostgresServer(durable=True)
    server.start()
    try:
        with tempfile.TemporaryDirectory(prefix="rbd-state-bench-") as tmp:
            stores: list[tuple[str, StateStore]] = [
                ("sqlite", SqliteStore(Path(tmp) / "c.sqlite")),
                ("postgresql", PostgresStore(server.create_database("bench"), work_dir=Path(tmp))),
            ]
            print(f"{'backend':<11} {'update':>7} {'upsert':>7} {'in txn':>7} {'select':>7}  (us)")
            for name, store in stores:
                try:
                    r = measure(store, args.count)
                finally:
                    store.close()
                print(
                    f"{name:<11} {r['update']:7.0f} {r['upsert']:7.0f} "
                    f"{r['upsert_in_txn']:7.0f} {r['select']:7.0f}"
                )
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
