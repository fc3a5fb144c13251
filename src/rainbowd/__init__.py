"""rbd: RainbowD-style Docker image distribution for heterogeneous clusters.

This package holds the layers the agent (rainbowd.agent) and the coordinator
(rainbowd.coordinator) build on -- core (pure logic and wire types), lib (I/O
shared by processes) -- and the ones on top of them, the ``rbd`` CLI and the
dev cluster; ARCHITECTURE.md and tests/unit/test_import_contracts.py say which
module is in which. It imports neither process.
"""

__version__ = "0.1.0"
