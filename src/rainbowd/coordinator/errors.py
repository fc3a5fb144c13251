"""Errors the coordinator's core raises, each carrying the HTTP status it maps to.

The core stays free of aiohttp so it can be unit tested; the web layer turns
these into ``ErrorReply`` bodies. Every message is meant for the operator or
the agent on the other end, so it says what was wrong and how to fix it.
"""

from __future__ import annotations


class CoordinatorError(Exception):
    """A request the coordinator refuses; ``status`` is the HTTP status to answer with."""

    status = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(CoordinatorError):
    status = 400


class Unauthorized(CoordinatorError):
    """No usable credentials were presented."""

    status = 401


class Forbidden(CoordinatorError):
    """Credentials were presented but do not allow this."""

    status = 403


class NotFound(CoordinatorError):
    status = 404


class Conflict(CoordinatorError):
    status = 409
