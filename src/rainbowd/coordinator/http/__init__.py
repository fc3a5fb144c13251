"""The coordinator's HTTP API (aiohttp): routes, codec, auth, report ids, the web console.

The services beside this package know nothing of HTTP; only this package
and the coordinator's cli import it.
"""
