"""A cluster on one host: local cluster, private dockerd, demo image, namespace lab.

The top layer beside cli: it starts the agent and the coordinator as a
test, `rbd demo` or the lab would.
"""
