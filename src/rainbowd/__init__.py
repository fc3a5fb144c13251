"""rbd: RainbowD-style Docker image distribution for heterogeneous clusters.

This package is the shared core: domain types and pure logic that both the
agent (rainbowd.agent) and the coordinator (rainbowd.coordinator) build on.
It imports neither side.
"""

__version__ = "0.1.0"
