"""rbd: RainbowD-style Docker image distribution for heterogeneous clusters.

One folder per layer, each importing only the layers below it: core (pure
logic and wire types) and lib (I/O shared by processes), which the agent and
the coordinator build on, and on top the ``rbd`` CLI (cli) and the dev
cluster (devcluster). A module's folder is its layer; ARCHITECTURE.md says
what each holds and tests/contracts/test_import_contracts.py checks it. This
file imports nothing.
"""

__version__ = "0.1.0"
