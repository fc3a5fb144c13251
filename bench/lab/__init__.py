"""The emulated heterogeneous cluster: rbd and its baselines side by side on shaped links.

``python -m bench.lab run --profile paper`` builds the profile's cluster as
network namespaces (bench/lab/env.py), runs each system in it one after the
other (rbd with a chosen policy, registry-only pulls, a BitTorrent swarm),
and reports every system's completion time against T* (bench/lab/result.py),
with a per-node completion CDF. ``python -m bench.lab clean`` removes what a
killed run left behind.
"""
