"""Lib: I/O shared by rbd's processes (layer store, image formats, HTTP clients, logs).

Imports only core; the agent, the coordinator and the CLI build on it.
"""
